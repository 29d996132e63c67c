"""LoRA fine-tuning: the adapters' gradients against PEFT on transformers' GPT-2 (an independent
implementation) and against the chain rule through the merged weight, frozen base weights,
bit-identical adapters for every thread count, MPI layout and resume, NaN and bf16 steps, small
checkpoints that name their base by hash, the PEFT export loaded by PEFT, and the refusals.
Every model is built here, small and random; nothing is downloaded."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    assert_bit_identical,
    assert_one_error_line,
    call,
    gpt2_directory,
    sentences,
    tensors,
    write,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2LMHeadModel

from cllm_cli import CLLMConfig, CLLMModel, _engine, _engine_testing
from cllm_cli.cli.evaluate import main as eval_main
from cllm_cli.cli.export import main as export_main
from cllm_cli.cli.inference import main as inference_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.formats import load_checkpoint, load_model_files, save_checkpoint
from cllm_cli.model import LoraSpec, adapter_views, content_hash, init_adapters, merge_adapters
from cllm_cli.model import lora as lora_module

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
LORA_RUN = ["--lora-rank", "4", "--lora-targets", "attn,proj,mlp", "--lora-dropout", "0.1",
            "--dropout", "0.1", "--batch-size", "6", "--micro-batch", "2", "--max-steps", "4",
            "--warmup-steps", "1", "--learning-rate", "1e-2", "--save-interval", "2",
            "--keep-checkpoints", "0", "--eval-interval", "2", "--quiet", "--seed", "3"]
ALL_SITES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def text():
    return sentences(300, seed=17, punct=".,!?")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, text):
    return gpt2_directory(tmp_path_factory.mktemp("base") / "gpt2", text)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, text):
    return write(tmp_path_factory.mktemp("corpus") / "corpus.txt", text)


def train(capsys, corpus, base_dir, out, *extra):
    code, _, err = call(capsys, train_main, corpus, "--init-from", base_dir,
                        "--checkpoint-dir", out, *LORA_RUN, *extra)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, corpus, base_dir):
    """A LoRA run on one sphere (the reference of the invariance tests)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    code = train_main([str(corpus), "--init-from", str(base_dir), "--checkpoint-dir", str(out),
                       *LORA_RUN, "--threads", "1"])
    assert code == 0
    return out


def random_adapters(cfg, spec, seed):
    """Adapters with non-zero B too, so that every gradient path is exercised."""
    flat = init_adapters(cfg, spec, seed)
    rng = np.random.default_rng(seed)
    for name, view in adapter_views(cfg, spec, flat).items():
        if name.endswith("lora_B"):
            view[...] = rng.standard_normal(view.shape).astype(np.float32) * 0.1
    return flat


# ----------------------------------------------------------------------------------------
# gradients and the forward


def test_adapter_gradients_equal_peft_on_transformers(base_dir):
    cfg, flat, tok, *_ = load_model_files(base_dir)
    spec = LoraSpec(rank=3, alpha=5.0, dropout=0.0, sites=ALL_SITES)
    adapters = random_adapters(cfg, spec, seed=1)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, cfg.vocab_size, (2, 17)).astype(np.int32)
    inputs, targets = np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:])
    grads = np.empty_like(adapters)
    loss_sum, counted = _engine.loss_and_grads(cfg, flat, inputs, targets, grads, pad_id=-1,
                                               adapters=adapters, lora=spec.engine_args)

    torch.manual_seed(0)
    hf = GPT2LMHeadModel.from_pretrained(base_dir).double()
    peft_model = get_peft_model(hf, LoraConfig(r=3, lora_alpha=5.0, lora_dropout=0.0,
                                               target_modules=list(ALL_SITES),
                                               fan_in_fan_out=True))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, view in adapter_views(cfg, spec, adapters).items():
            params[f"base_model.model.transformer.{name}.default.weight"].copy_(
                torch.from_numpy(view.astype(np.float64)))
    logits = peft_model(torch.from_numpy(inputs.astype(np.int64))).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(targets.astype(np.int64)).reshape(-1),
                                             reduction="sum")
    loss.backward()
    assert counted == targets.size
    assert abs(loss_sum - loss.item()) <= 1e-5 * abs(loss.item())
    for name, view in adapter_views(cfg, spec, grads).items():
        theirs = params[f"base_model.model.transformer.{name}.default.weight"].grad.numpy()
        assert np.abs(view - theirs).max() <= 1e-5 * np.abs(theirs).max() + 1e-7, name


@pytest.mark.parametrize("sites", [("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc", "mlp.c_proj"),
                                   ALL_SITES])
def test_adapters_follow_the_chain_rule_through_the_merged_weight(tiny_model, sites):
    """Forward with adapters = forward of the merged model; d/dA = scale B^T dW and
    d/dB = scale dW A^T, dW the merged model's weight gradient."""
    cfg = tiny_model.config
    spec = LoraSpec(rank=2, alpha=3.0, dropout=0.0, sites=sites)
    adapters = random_adapters(cfg, spec, seed=5)
    rng = np.random.default_rng(6)
    inputs = rng.integers(0, cfg.vocab_size, (2, cfg.seq_len)).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, (2, cfg.seq_len)).astype(np.int32)
    ours = np.empty_like(adapters)
    loss, _ = _engine.loss_and_grads(cfg, tiny_model.flat, inputs, targets, ours, pad_id=-1,
                                     adapters=adapters, lora=spec.engine_args)
    merged = merge_adapters(cfg, tiny_model.flat, spec, adapters)
    merged_grads = np.empty_like(merged)
    merged_loss, _ = _engine.loss_and_grads(cfg, merged, inputs, targets, merged_grads, pad_id=-1)
    assert abs(loss - merged_loss) <= 1e-5 * abs(merged_loss)
    dW = CLLMModel.from_flat(cfg, merged_grads).params
    views, grads = adapter_views(cfg, spec, adapters), adapter_views(cfg, spec, ours)
    for name in views:
        if name.endswith("lora_A"):
            site = name[:-len(".lora_A")]
            a, b = views[name].astype(np.float64), views[site + ".lora_B"].astype(np.float64)
            g = dW[site + ".weight"].astype(np.float64)
            for mine, exact in ((grads[name], spec.scale * b.T @ g),
                                (grads[site + ".lora_B"], spec.scale * g @ a.T)):
                assert np.abs(mine - exact).max() <= 1e-5 * np.abs(exact).max()


def test_forward_with_adapters_is_the_merged_model(tiny_model):
    cfg = tiny_model.config
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.3, sites=ALL_SITES)
    adapters = random_adapters(cfg, spec, seed=8)
    ids = np.random.default_rng(9).integers(0, cfg.vocab_size, (2, cfg.seq_len)).astype(np.int32)
    ours = np.empty((2, cfg.seq_len, cfg.vocab_size), np.float32)
    _engine.forward_logits(cfg, tiny_model.flat, ids, ours, adapters=adapters,
                           lora=spec.engine_args)
    merged = CLLMModel.from_flat(cfg, merge_adapters(cfg, tiny_model.flat, spec, adapters))
    theirs = merged.logits(ids)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


def test_fresh_adapters_start_as_the_base():
    cfg = CLLMConfig(vocab_size=40, embed_dim=16, num_layers=2, num_heads=2, ff_dim=32,
                     seq_len=8)
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0, sites=ALL_SITES)
    views = adapter_views(cfg, spec, init_adapters(cfg, spec, seed=1))
    for name, view in views.items():
        if name.endswith("lora_B"):
            assert not view.any()
        else:
            bound = 1 / math.sqrt(view.shape[1])
            assert np.abs(view).max() <= bound and np.abs(view).max() > 0.5 * bound


# ----------------------------------------------------------------------------------------
# the engine: frozen base, NaN steps, bf16


def engine_step(cfg, flat, adapters, spec, threads, step=0, precision_name="fp32", nan=None):
    windows = np.random.default_rng(11).integers(0, cfg.vocab_size,
                                                 (6, cfg.seq_len + 1)).astype(np.int32)
    m, v = np.zeros_like(adapters), np.zeros_like(adapters)
    module = _engine if nan is None else _engine_testing    # the testing one injects the NaN
    with module.Engine(cfg, flat, threads, 2, 6, pad_id=-1, dropout=0.1, seed=2,
                       precision=precision_name, adapters=adapters,
                       lora=spec.engine_args) as engine:
        assert engine.gradient_size == adapters.size
        if nan is not None:
            _engine_testing.inject_nan(engine, step, nan)
        return engine.train_step(windows, step, m, v, adamw=True, lr=1e-2, weight_decay=0.01,
                                 grad_clip=1.0, t=1)


def test_the_base_stays_frozen_and_the_adapters_move(tiny_model):
    cfg = tiny_model.config
    spec = LoraSpec(rank=2, alpha=4.0, dropout=0.2, sites=ALL_SITES)
    base = tiny_model.flat.copy()
    adapters = init_adapters(cfg, spec, seed=4)
    before = adapters.copy()
    result = engine_step(cfg, tiny_model.flat, adapters, spec, threads=2)
    assert result.applied and result.tokens == 6 * cfg.seq_len
    assert tiny_model.flat.tobytes() == base.tobytes()
    assert (adapters != before).any()


def test_a_nan_micro_batch_is_named_by_its_adapter_and_left_out(tiny_model):
    cfg = tiny_model.config
    spec = LoraSpec(rank=2, alpha=4.0, dropout=0.0, sites=ALL_SITES)
    adapters = init_adapters(cfg, spec, seed=4)
    result = engine_step(cfg, tiny_model.flat, adapters, spec, threads=2, nan=1)
    assert [b.index for b in result.bad] == [1] and result.applied
    middle = adapters.size // 2
    owner = next(name for name, shape, offset in _engine.adapter_layout(cfg, 2, spec.mask)
                 if offset <= middle < offset + math.prod(shape))
    assert result.bad[0].tensor == owner and "lora_" in owner


@pytest.mark.parametrize("precision_name", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16)])
def test_adapter_steps_do_not_depend_on_the_thread_count(tiny_model, precision_name):
    cfg = tiny_model.config
    spec = LoraSpec(rank=3, alpha=6.0, dropout=0.1, sites=ALL_SITES)
    results = []
    for threads in (1, 2, 3):
        adapters = init_adapters(cfg, spec, seed=4)
        engine_step(cfg, tiny_model.flat, adapters, spec, threads, precision_name=precision_name)
        results.append(adapters.tobytes())
    assert results[0] == results[1] == results[2]


# ----------------------------------------------------------------------------------------
# training runs


def test_a_lora_checkpoint_is_small_and_names_its_base(lora_run, base_dir):
    final = lora_run / "final_model.cllm"
    ckpt = load_checkpoint(final)
    assert ckpt.lora["spec"] == LoraSpec(4, 8.0, 0.1, ALL_SITES)
    base_cfg, base_flat, *_ = load_model_files(base_dir)
    assert ckpt.lora["base_sha256"] == content_hash(base_flat)
    assert ckpt.lora["base_path"] == str(base_dir)
    assert set(tensors(final)) == {prefix + name for prefix in ("", "adam.m.", "adam.v.")
                                   for name in adapter_views(base_cfg, ckpt.lora["spec"],
                                                             ckpt.params)}
    # the adapters and their two moments, no base: 3 x 4 bytes an adapter value, a header
    assert os.path.getsize(final) < 12 * ckpt.params.size + 16384
    assert ckpt.params.size < 0.15 * base_flat.size
    assert any(v.any() for name, v in adapter_views(base_cfg, ckpt.lora["spec"],
                                                    ckpt.params).items() if "lora_B" in name)
    # loaded as a model: the base with the adapters merged in
    model = CLLMModel.load(final)
    expected = merge_adapters(base_cfg, base_flat, ckpt.lora["spec"], ckpt.params)
    assert model.flat.tobytes() == expected.tobytes()


@pytest.mark.parametrize("threads", [2, 3])
def test_lora_runs_are_bit_identical_for_any_thread_count(capsys, tmp_path, corpus, base_dir,
                                                          lora_run, threads):
    out = train(capsys, corpus, base_dir, tmp_path / "run", "--threads", str(threads))
    for name in ("checkpoint_step_2.cllm", "final_model.cllm"):
        assert_bit_identical(lora_run / name, out / name)


def test_lora_run_on_two_mpi_ranks_is_bit_identical(tmp_path, corpus, base_dir, lora_run):
    assert os.path.exists(MPIEXEC), "mpiexec missing: make installs the mpich wheel"
    out = tmp_path / "mpi"
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "cllm_cli.cli.train",
                           str(corpus), "--init-from", str(base_dir), "--checkpoint-dir", str(out),
                           *LORA_RUN, "--threads", "1"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert_bit_identical(lora_run / "final_model.cllm", out / "final_model.cllm")


def test_a_resumed_lora_run_equals_the_straight_run(capsys, tmp_path, corpus, base_dir, lora_run):
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("checkpoint_step_2.cllm", "dataset.bin", "tokenizer.json"):
        shutil.copyfile(lora_run / name, out / name)
    code, _, err = call(capsys, train_main, corpus, "--checkpoint-dir", out, "--resume",
                        "--threads", "2", "--quiet")
    assert code == 0, err
    assert_bit_identical(lora_run / "final_model.cllm", out / "final_model.cllm")


def test_inference_and_eval_read_the_adapters(capsys, tmp_path, corpus, lora_run, base_dir):
    final = lora_run / "final_model.cllm"
    merged = tmp_path / "merged"
    code, _, err = call(capsys, export_main, final, merged)
    assert code == 0, err
    outputs = {}
    for name, model in (("lora", final), ("merged", merged), ("base", base_dir)):
        code, text, err = call(capsys, inference_main, model, "--prompt", "the old",
                               "--temperature", "0", "--max-tokens", "12")
        assert code == 0, err
        code, report, err = call(capsys, eval_main, model, corpus, "--json")
        assert code == 0, err
        outputs[name] = (text, json.loads(report)["loss"])
    assert outputs["lora"][0] == outputs["merged"][0]
    assert abs(outputs["lora"][1] - outputs["merged"][1]) <= 1e-5 * outputs["merged"][1]
    assert outputs["lora"][1] < outputs["base"][1]      # fine-tuning on this text helped


def peft_logits(base_dir, adapter_dir, ids):
    base = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def test_peft_loads_the_exported_adapters(capsys, tmp_path, lora_run, base_dir):
    final = lora_run / "final_model.cllm"
    adapter_dir, merged = tmp_path / "adapter", tmp_path / "merged"
    code, out, err = call(capsys, export_main, final, adapter_dir, "--format", "peft")
    assert code == 0, err
    assert "PeftModel.from_pretrained" in out and str(base_dir) in out
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8.0, True)
    assert config["base_model_name_or_path"] == str(base_dir)
    assert os.path.getsize(adapter_dir / "adapter_model.safetensors") \
        < 0.15 * os.path.getsize(base_dir / "model.safetensors")
    code, _, err = call(capsys, export_main, final, merged)
    assert code == 0, err
    ours = CLLMModel.load(final)
    ids = np.random.default_rng(3).integers(0, ours.config.vocab_size, (2, 24)).astype(np.int32)
    mine = ours.logits(ids)
    theirs = peft_logits(base_dir, adapter_dir, ids)
    with torch.no_grad():
        merged_logits = GPT2LMHeadModel.from_pretrained(merged).eval()(
            torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    scale = np.abs(theirs).max()
    assert np.abs(mine - theirs).max() <= 1e-4 * scale
    assert np.abs(merged_logits - theirs).max() <= 1e-4 * scale
    with torch.no_grad():
        base_logits = GPT2LMHeadModel.from_pretrained(base_dir).eval()(
            torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(base_logits - theirs).max() > 1e-3 * scale     # the adapters changed them


# ----------------------------------------------------------------------------------------
# refusals: one line each


@pytest.mark.parametrize("options, fragment", [
    (["--lora-rank", "4"], "--lora-rank needs --init-from"),
    (["--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
    (["--init-from", "BASE", "--lora-rank", "4", "--lora-targets", "attn,ffn"],
     "unknown LoRA target 'ffn'"),
    (["--init-from", "BASE", "--lora-rank", "4", "--lora-dropout", "1.5"], "--lora-dropout"),
    (["--init-from", "BASE", "--lora-rank", "4", "--lora-alpha", "1e38"],
     "--lora-alpha must be at most 1024 x --lora-rank"),
    (["--init-from", "BASE", "--lora-rank", "4", "--lora-alpha", "4097"], "got 4097"),
])
def test_bad_lora_options_are_one_line(capsys, tmp_path, corpus, base_dir, options, fragment):
    options = [str(base_dir) if o == "BASE" else o for o in options]
    code, _, err = call(capsys, train_main, corpus, "--checkpoint-dir", tmp_path / "ck", *options)
    assert_one_error_line(code, err, "train_model", fragment)
    assert not (tmp_path / "ck").exists()


def test_adapters_on_a_lora_run_are_refused(capsys, tmp_path, corpus, lora_run):
    """A LoRA run as the base of new adapters: refused before anything is written (its
    merged model may start a full run)."""
    code, _, err = call(capsys, train_main, corpus, "--init-from", lora_run, "--checkpoint-dir",
                        tmp_path / "ck", *LORA_RUN)
    assert_one_error_line(code, err, "train_model", "holds LoRA adapters, not a full model")
    assert not (tmp_path / "ck").exists()


def test_merged_weights_that_are_not_finite_are_refused(capsys, tmp_path, corpus, lora_run,
                                                        monkeypatch):
    """Finite adapters whose product overflows, and a stored alpha above the bound (as a
    program without it wrote): every reader refuses the checkpoint in one line."""
    for case in ("overflow", "alpha"):
        monkeypatch.setattr(lora_module, "MAX_LORA_SCALE", math.inf)     # as the writer checks
        run = tmp_path / case
        shutil.copytree(lora_run, run)
        ckpt = load_checkpoint(run / "final_model.cllm")
        lora = {**ckpt.lora["spec"].to_dict(), "base_sha256": ckpt.lora["base_sha256"],
                "base_path": ckpt.lora["base_path"]}
        if case == "overflow":
            ckpt.params[:] = 1e30
        else:
            lora["alpha"] = 1e38
        save_checkpoint(run / "final_model.cllm", ckpt.config, ckpt.params,
                        ckpt.adam_m, ckpt.adam_v, ckpt.meta, lora=lora)
        monkeypatch.undo()
        fragment = "non-finite" if case == "overflow" else "bad LoRA alpha"
        for prog, main, argv in (
                ("cllm_inference", inference_main, [run, "--max-tokens", "2"]),
                ("cllm_eval", eval_main, [run, corpus]),
                ("cllm_export", export_main, [run, tmp_path / "hf"])):
            code, _, err = call(capsys, main, *argv)
            assert_one_error_line(code, err, prog, fragment)
        assert not (tmp_path / "hf").exists()


def test_peft_export_of_a_full_model_is_refused(capsys, tmp_path, base_dir):
    code, _, err = call(capsys, export_main, base_dir, tmp_path / "adapter", "--format", "peft")
    assert_one_error_line(code, err, "cllm_export", "not a LoRA run")


def test_a_changed_or_missing_base_is_refused(capsys, tmp_path, lora_run, base_dir, text):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    moved = tmp_path / "moved"
    shutil.copytree(base_dir, moved)
    final = run / "final_model.cllm"
    # the base the checkpoint names, replaced by another model of the same shape
    gpt2_directory(tmp_path / "other", text, seed=5)
    shutil.copyfile(tmp_path / "other" / "model.safetensors", base_dir / "model.safetensors")
    capsys.readouterr()                  # transformers' progress bar while saving "other"
    adapter_dir = tmp_path / "adapter"
    try:
        code, _, err = call(capsys, inference_main, final, "--max-tokens", "2")
        assert_one_error_line(code, err, "cllm_inference", "another model")
        code, _, err = call(capsys, export_main, final, adapter_dir, "--format", "peft")
        assert_one_error_line(code, err, "cllm_export", "another model")
        assert not adapter_dir.exists()
        shutil.rmtree(base_dir)
        code, _, err = call(capsys, inference_main, final, "--max-tokens", "2")
        assert_one_error_line(code, err, "cllm_inference", "its base model", str(base_dir))
        code, _, err = call(capsys, export_main, final, adapter_dir, "--format", "peft")
        assert_one_error_line(code, err, "cllm_export", "its base model", str(base_dir))
        assert not adapter_dir.exists()
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
        shutil.copytree(moved, base_dir)


def test_a_base_whose_config_changed_is_named_by_what_changed(capsys, tmp_path, corpus, text):
    """The same weights under another config.json are another model: the line names the
    config value that differs, not a weights hash that is the same."""
    base = gpt2_directory(tmp_path / "base", text)
    run = train(capsys, corpus, base, tmp_path / "run")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "n_head": 2}))
    code, _, err = call(capsys, eval_main, run, corpus)
    assert_one_error_line(code, err, "cllm_eval", "num_heads 2", "not 4")
    assert "sha256" not in err



@pytest.mark.parametrize("fmt", ["hf", "peft", "gguf"])
def test_an_export_never_replaces_the_base_of_the_lora_run(capsys, tmp_path, corpus, base_dir,
                                                            fmt):
    """--force replaces OUT, but never with the base a LoRA run's adapters need: the run
    could not be read any more (and the base may be the only copy of a downloaded model)."""
    base = tmp_path / ("base.gguf" if fmt == "gguf" else "base")
    if fmt == "gguf":        # a base file at OUT: a full .cllm model named like an export
        code, _, err = call(capsys, train_main, corpus, "--init-from", base_dir,
                            "--checkpoint-dir", tmp_path / "full", "--max-steps", "1", "--quiet")
        assert code == 0, err
        shutil.copyfile(tmp_path / "full" / "final_model.cllm", base)
        shutil.copyfile(tmp_path / "full" / "tokenizer.json", tmp_path / "tokenizer.json")
    else:
        shutil.copytree(base_dir, base)
    run = train(capsys, corpus, base, tmp_path / "run")
    before = snapshot_files(base)
    code, _, err = call(capsys, export_main, run, base, "--format", fmt, "--force")
    assert_one_error_line(code, err, "cllm_export", f"{base} holds", "base model")
    assert snapshot_files(base) == before
    code, _, err = call(capsys, inference_main, run, "--max-tokens", "2")
    assert code == 0, err


def snapshot_files(path):
    """{relative name: bytes} of a file or of the files below a directory."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))}

def renamed_base(run, base_path):
    """Every checkpoint of `run` rewritten to name `base_path` as its base (the same hash)."""
    for path in run.glob("*.cllm"):
        ckpt = load_checkpoint(path)
        lora = {**ckpt.lora["spec"].to_dict(), "base_sha256": ckpt.lora["base_sha256"],
                "base_path": str(base_path)}
        save_checkpoint(path, ckpt.config, ckpt.params, ckpt.adam_m, ckpt.adam_v,
                        ckpt.meta, lora=lora)
    return run


@pytest.mark.parametrize("loop", ["itself", "a copy naming it"])
def test_a_base_that_is_a_lora_run_is_refused(capsys, tmp_path, corpus, lora_run, loop):
    """A LoRA run whose recorded base holds a LoRA run (itself, or a copy of it naming the
    first: a loop) is refused by every reader in one line, not followed from base to base."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    if loop == "itself":
        renamed_base(run, run)
    else:
        shutil.copytree(lora_run, tmp_path / "copy")
        renamed_base(run, renamed_base(tmp_path / "copy", run))
    before = sorted(os.listdir(run))
    for prog, main, argv in (
            ("cllm_inference", inference_main, [run, "--max-tokens", "2"]),
            ("cllm_eval", eval_main, [run, corpus]),
            ("cllm_export", export_main, [run, tmp_path / "hf"]),
            ("cllm_export", export_main, [run, tmp_path / "peft", "--format", "peft"]),
            ("train_model", train_main, [corpus, "--checkpoint-dir", run, "--resume",
                                         "--max-steps", "6", "--quiet"])):
        code, _, err = call(capsys, main, *argv)
        assert_one_error_line(code, err, prog, "holds LoRA adapters, not a full model")
    assert sorted(os.listdir(run)) == before
    assert not (tmp_path / "hf").exists() and not (tmp_path / "peft").exists()


def test_resume_refuses_another_rank(capsys, tmp_path, corpus, lora_run):
    out = tmp_path / "resumed"
    shutil.copytree(lora_run, out)
    code, _, err = call(capsys, train_main, corpus, "--checkpoint-dir", out, "--resume",
                        "--lora-rank", "8", "--max-steps", "6")
    assert_one_error_line(code, err, "train_model", "--lora-rank cannot change")


@pytest.mark.parametrize("options, fragment", [
    (["--lora-alpha", "16"], "--lora-alpha cannot change when resuming (the checkpoint has "
                             "the default, given 16.0)"),
    (["--lora-dropout", "0.2"], "--lora-dropout cannot change when resuming"),
    (["--lora-targets", "attn"], "--lora-targets cannot change when resuming"),
    (["--lora-rank", "0"], "LoRA cannot be switched off when resuming"),
])
def test_resume_refuses_a_changed_lora_setting(capsys, tmp_path, corpus, lora_run, options,
                                               fragment):
    out = tmp_path / "resumed"
    shutil.copytree(lora_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = call(capsys, train_main, corpus, "--checkpoint-dir", out, "--resume",
                        "--max-steps", "6", *options)
    assert_one_error_line(code, err, "train_model", fragment)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_accepts_the_lora_settings_restated(capsys, tmp_path, corpus, lora_run):
    """The run's own settings given again (alpha as its default 2R, the targets in another
    order) are no change."""
    out = tmp_path / "resumed"
    shutil.copytree(lora_run, out)
    code, _, err = call(capsys, train_main, corpus, "--checkpoint-dir", out, "--resume",
                        "--max-steps", "5", "--quiet", "--lora-rank", "4", "--lora-alpha", "8",
                        "--lora-dropout", "0.1", "--lora-targets", "mlp, proj,attn")
    assert code == 0, err
    assert load_checkpoint(out / "final_model.cllm").meta["state"]["step"] == 5
