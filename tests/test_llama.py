"""The Llama form (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM) against transformers:
small random models made by transformers, with biases and norm weights moved off their initial
values, read through our transformers import; logits, loss and every gradient compared; our
exports read back by transformers; runs bit-identical across threads, processes and a resume;
the decoder equal to the whole-sequence pass; what we cannot compute refused by name."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_one_error_line, call, sentences
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers import (
    LlamaConfig as HFLlamaConfig,
)

from cllm_cli._engine import (
    ADAPTER_SITES,
    Decoder,
    forward_logits,
    loss_and_grads,
    parameter_layout,
)
from cllm_cli.cli.export import main as export_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.formats.model_files import load_model_files
from cllm_cli.model import (
    LlamaConfig,
    LoraSpec,
    adapter_views,
    init_adapters,
    merge_adapters,
    named_views,
    parse_targets,
)
from cllm_cli.model.llama import LLAMA
from cllm_cli.tokenizers import BPETokenizer

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
CLASSES = {"llama": (HFLlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}
# 4 query heads over 2 key/value heads; llama untied, qwen2 tied with q/k/v biases
SHAPES = {"llama": dict(tie_word_embeddings=False, rope_theta=500.0),
          "qwen2": dict(tie_word_embeddings=True, rope_theta=10000.0),
          "mistral": dict(tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None)}
TINY = ["--tokenizer", "word", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "4",
        "--seq-len", "32", "--batch-size", "8", "--micro-batch", "2", "--max-steps", "12",
        "--warmup-steps", "2", "--save-interval", "5", "--log-interval", "0",
        "--eval-interval", "0", "--final-eval-tokens", "300", "--seed", "3"]


@pytest.fixture(scope="module")
def text():
    return sentences(800, seed=11, punct=".,!?;")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return path


def hf_directory(path, kind, text, seed=0, capsys=None, **overrides):
    """A small random transformers model of `kind` saved with a BPE tokenizer.json; every
    parameter moved off its initial value."""
    tok = BPETokenizer.train([text], 300)
    config_class, model_class = CLASSES[kind]
    settings = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=48, rms_norm_eps=1e-5,
                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    shape = dict(SHAPES[kind])
    settings["rope_parameters"] = {"rope_type": "default", "rope_theta": shape.pop("rope_theta")}
    settings.update(shape, **overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**settings)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    if capsys is not None:
        capsys.readouterr()         # transformers' progress bar, written while saving
    return model


def relative(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_logits_loss_and_gradients_equal_transformers(kind, text, tmp_path):
    hf = hf_directory(tmp_path / kind, kind, text)
    cfg, flat, tok = load_model_files(tmp_path / kind)[:3]
    assert isinstance(cfg, LlamaConfig) and cfg.hf_model_type == kind
    assert (cfg.num_kv_heads, cfg.tie_embeddings, cfg.attention_bias) == \
        (2, kind == "qwen2", kind == "qwen2")
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, cfg.vocab_size, (3, 40)).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, (3, 40)).astype(np.int32)
    grads = np.zeros_like(flat)
    loss, counted = loss_and_grads(cfg, flat, inputs, targets, grads, pad_id=-1)
    logits = np.zeros((3, 40, cfg.vocab_size), np.float32)
    forward_logits(cfg, flat, inputs, logits)

    theirs = hf(input_ids=torch.tensor(inputs, dtype=torch.long)).logits
    their_loss = torch.nn.functional.cross_entropy(
        theirs.reshape(-1, cfg.vocab_size), torch.tensor(targets, dtype=torch.long).reshape(-1),
        reduction="sum")
    their_loss.backward()
    assert counted == 120
    assert abs(loss - their_loss.item()) <= 1e-4 * abs(their_loss.item())
    assert relative(logits, theirs.detach().numpy()) <= 1e-4
    parameters = dict(hf.named_parameters())
    for name, shape, offset in parameter_layout(cfg):
        hf_name = name if name == "lm_head.weight" else "model." + name
        want = parameters[hf_name].grad.numpy()
        got = grads[offset:offset + int(np.prod(shape))].reshape(shape)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max(), name


def test_decoder_equals_the_whole_sequence_pass(text, tmp_path):
    """Prefill, then one position at a time, and scoring give the logits of forward_logits,
    bit-identical for 1, 2 and 3 decoding threads."""
    hf_directory(tmp_path / "qwen2", "qwen2", text)
    cfg, flat = load_model_files(tmp_path / "qwen2")[:2]
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 40).astype(np.int32)
    want = np.zeros((1, 40, cfg.vocab_size), np.float32)
    forward_logits(cfg, flat, ids[None], want)
    runs = []
    for threads in (1, 2, 3):
        decoder = Decoder(cfg, flat, threads=threads)
        got = [decoder.prefill(ids[:25])]
        got += [decoder.feed(int(t)) for t in ids[25:]]
        logp, _ = Decoder(cfg, flat, threads=threads).score(ids[:39], ids[1:])
        runs.append((np.stack(got), logp))
    for got, logp in runs:
        assert np.array_equal(got, runs[0][0]) and np.array_equal(logp, runs[0][1])
    assert relative(runs[0][0], want[0, 24:]) <= 1e-5
    shifted = want[0, :39] - want[0, :39].max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted.astype(np.float64)).sum(-1, keepdims=True))
    assert np.abs(runs[0][1] - log_softmax[np.arange(39), ids[1:]]).max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_export_is_read_by_transformers_as_its_class(kind, text, tmp_path, capsys):
    hf_directory(tmp_path / "in", kind, text, capsys=capsys)
    code, out, err = call(capsys, export_main, tmp_path / "in", tmp_path / "out")
    assert code == 0, err
    assert f"wrote a transformers {CLASSES[kind][1].__name__} directory" in out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == kind and config["num_key_value_heads"] == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(model).__name__ == CLASSES[kind][1].__name__
    cfg, flat = load_model_files(tmp_path / "in")[:2]
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 30)).astype(np.int32)
    ours = np.zeros((2, 30, cfg.vocab_size), np.float32)
    forward_logits(cfg, flat, ids, ours)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert relative(ours, theirs) <= 1e-4
    again, flat_again = load_model_files(tmp_path / "out")[:2]
    assert again == cfg and np.array_equal(flat_again, flat)


def train_command(ranks, threads, *argv):
    line = [sys.executable, "-m", "cllm_cli.cli.train", *map(str, argv), "--threads",
            str(threads)]
    return [MPIEXEC, "-n", str(ranks), *line] if ranks > 1 else line


@pytest.mark.slow
def test_runs_are_bit_identical_across_threads_processes_and_resume(corpus, tmp_path):
    """A Llama-form run from scratch (grouped-query, untied, with attention dropout) gives the
    same final model for 1, 2 and 3 threads, under mpiexec -n 2, and resumed from step 10."""
    args = [*TINY, "--arch", "llama", "--num-kv-heads", "2", "--no-tie-embeddings",
            "--dropout", "0.1", corpus]
    finals = []
    for ranks, threads in ((1, 1), (1, 2), (1, 3), (2, 1)):
        ckpt = tmp_path / f"r{ranks}t{threads}"
        p = subprocess.run(train_command(ranks, threads, *args, "--checkpoint-dir", ckpt),
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        finals.append((ckpt / "final_model.cllm").read_bytes())
    assert "llama, d 32, 2 layers, 4 heads over 2 key/value heads" in p.stdout
    resumed = tmp_path / "r1t1"
    (resumed / "final_model.cllm").unlink()
    (resumed / "checkpoint_step_12.cllm").unlink(missing_ok=True)
    p = subprocess.run(train_command(1, 2, "--resume", "--checkpoint-dir", resumed, corpus),
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "resum" in p.stdout.lower()
    finals.append((resumed / "final_model.cllm").read_bytes())
    assert all(f == finals[0] for f in finals)


def fine_tune(capsys, corpus, source, run, steps, log_interval, final_eval_tokens):
    """train_model --init-from source into run: windows of 24 tokens, batches of 4 in
    micro-batches of 2, 2 threads, no evaluation during the run; (status, stdout, stderr)."""
    return call(capsys, train_main, corpus, "--init-from", source, "--batch-size", "4",
                "--micro-batch", "2", "--max-steps", str(steps), "--seq-len", "24",
                "--checkpoint-dir", run, "--log-interval", str(log_interval),
                "--eval-interval", "0", "--final-eval-tokens", str(final_eval_tokens),
                "--threads", "2")


def test_fine_tuning_a_transformers_llama_continues_its_loss(text, corpus, tmp_path, capsys):
    """--init-from a Qwen2 directory: the run takes its family and shape, and its first
    loss is the transformers model's own loss on those windows (nothing was reinitialised)."""
    hf_directory(tmp_path / "qwen2", "qwen2", text, capsys=capsys)
    code, out, err = fine_tune(capsys, corpus, tmp_path / "qwen2", tmp_path / "run", steps=3,
                               log_interval=1, final_eval_tokens=200)
    assert code == 0, err
    assert "qwen2, d 32, 2 layers, 4 heads over 2 key/value heads" in out
    assert "tied output layer, q/k/v biases" in out
    cfg = load_model_files(tmp_path / "run")[0]
    assert isinstance(cfg, LlamaConfig) and cfg.seq_len == 24 and cfg.attention_bias


@pytest.mark.parametrize("change, fragment", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"hidden_act": "gelu"}, 'hidden_act "gelu"'),
    ({"hidden_act": None}, "hidden_act null"),
    ({"rms_norm_eps": None}, "rms_norm_eps must be a number in (0, 1), got None"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}},
     "rope_theta must be a number above 1, got None"),
    ({"rope_parameters": None, "rope_theta": None}, "rope_theta must be a number above 1, got None"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096},
     "sliding_window 4096"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3"),
    ({"head_dim": {}}, "head_dim {}"),
    ({"tie_word_embeddings": "false"}, 'tie_word_embeddings "false" is not true or false'),
    ({"mlp_bias": "false"}, 'mlp_bias "false" is not true or false'),
    ({"architectures": "LlamaForCausalLM"}, "is not a list of class names"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope_parameters per attention layer type"),
])
def test_what_we_cannot_compute_is_refused_by_name(change, fragment, text, corpus, tmp_path,
                                                   capsys):
    hf_directory(tmp_path / "m", "llama", text, capsys=capsys)
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config.update(change)
    path.write_text(json.dumps(config))
    code, _, err = call(capsys, train_main, corpus, "--init-from", tmp_path / "m",
                        "--checkpoint-dir", tmp_path / "run")
    assert_one_error_line(code, err, "train_model", fragment)


def test_a_config_json_with_rope_theta_at_the_top_is_read(text, tmp_path):
    """Files on the Hub (SmolLM2's, Qwen2.5's) keep rope_theta beside rope_scaling null."""
    hf_directory(tmp_path / "m", "llama", text)
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=500.0, rope_scaling=None)
    path.write_text(json.dumps(config))
    assert load_model_files(tmp_path / "m")[0].rope_theta == 500.0


@pytest.mark.parametrize("argv, fragment", [
    (["--num-kv-heads", "2"], "--num-kv-heads needs --arch llama"),
    (["--arch", "llama", "--num-kv-heads", "3"], "--num-heads 4 is not divisible by --num-kv-heads 3"),
    (["--arch", "llama", "--embed-dim", "12", "--num-heads", "4"], "must be even"),
    (["--arch", "llama", "--rope-theta", "0.5"], "--rope-theta must be a number above 1"),
])
def test_from_scratch_options_are_checked(argv, fragment, corpus, tmp_path, capsys):
    code, _, err = call(capsys, train_main, corpus, *TINY, *argv, "--checkpoint-dir",
                        tmp_path / "run")
    assert_one_error_line(code, err, "train_model", fragment)


def test_lora_gradients_are_those_of_the_merged_weights(text, tmp_path):
    """Adapters on every site of a Qwen2 block: the loss is the merged model's, and each
    adapter's gradient is what the merged weight's gradient gives through W + s B A
    (dA = s B^T dW, dB = s dW A^T)."""
    hf_directory(tmp_path / "m", "qwen2", text)
    cfg, flat = load_model_files(tmp_path / "m")[:2]
    spec = LoraSpec(4, 8.0, 0.0, parse_targets("q_proj,k_proj,v_proj,o_proj,mlp", LLAMA))
    assert spec.sites == ADAPTER_SITES["llama"]
    rng = np.random.default_rng(5)
    adapters = init_adapters(cfg, spec, 1)
    adapters += rng.standard_normal(adapters.size).astype(np.float32) * np.float32(0.05)
    inputs = rng.integers(0, cfg.vocab_size, (2, 30)).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, (2, 30)).astype(np.int32)
    grads = np.zeros_like(adapters)
    loss, _ = loss_and_grads(cfg, flat, inputs, targets, grads, pad_id=-1, adapters=adapters,
                             lora=spec.engine_args)
    merged = merge_adapters(cfg, flat, spec, adapters)
    full = np.zeros_like(merged)
    merged_loss, _ = loss_and_grads(cfg, merged, inputs, targets, full, pad_id=-1)
    assert abs(loss - merged_loss) <= 1e-5 * abs(merged_loss)
    weights = named_views(cfg, full)
    views, got = adapter_views(cfg, spec, adapters), adapter_views(cfg, spec, grads)
    for name, view in views.items():
        site, kind = name.rsplit(".", 1)
        dw = weights[site + ".weight"]
        want = (spec.scale * views[site + ".lora_B"].T @ dw if kind == "lora_A"
                else spec.scale * dw @ views[site + ".lora_A"].T)
        assert np.abs(got[name] - want).max() <= 2e-3 * np.abs(want).max(), name


@pytest.mark.slow
def test_lora_run_bit_identical_and_loaded_by_peft(text, corpus, tmp_path, capsys):
    """A LoRA run on a Llama directory (q_proj, v_proj and the MLP): the same adapters for 1
    and 3 threads and under mpiexec -n 2; its PEFT export, loaded by PeftModel.from_pretrained
    onto the transformers base, gives our logits."""
    from peft import PeftModel
    hf_directory(tmp_path / "base", "llama", text, capsys=capsys)
    args = ["--init-from", tmp_path / "base", "--lora-rank", "4", "--lora-targets", "attn,mlp",
            "--lora-dropout", "0.1", "--batch-size", "8", "--micro-batch", "2",
            "--max-steps", "6", "--seq-len", "24", "--learning-rate", "0.01",
            "--warmup-steps", "1", "--log-interval", "0", "--eval-interval", "0",
            "--final-eval-tokens", "200", corpus]
    finals = []
    for ranks, threads in ((1, 1), (1, 3), (2, 1)):
        ckpt = tmp_path / f"r{ranks}t{threads}"
        p = subprocess.run(train_command(ranks, threads, *args, "--checkpoint-dir", ckpt),
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        finals.append((ckpt / "final_model.cllm").read_bytes())
    assert finals[1] == finals[0] and finals[2] == finals[0]
    final = tmp_path / "r1t1" / "final_model.cllm"
    code, _, err = call(capsys, export_main, final, tmp_path / "adapter", "--format", "peft")
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"self_attn.q_proj", "self_attn.v_proj",
                                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    cfg, flat = load_model_files(final)[:2]
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    ours = np.zeros((2, 20, cfg.vocab_size), np.float32)
    forward_logits(cfg, flat, ids, ours)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert relative(ours, theirs) <= 1e-4
    base_cfg, base_flat = load_model_files(tmp_path / "base")[:2]
    before = np.zeros_like(ours)
    forward_logits(base_cfg, base_flat, ids, before)
    assert np.abs(before - theirs).max() > 1e-3 * np.abs(theirs).max()    # the adapters act


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gguf_export_reads_back_in_llama_cpps_layout(kind, text, tmp_path, capsys):
    """gguf's reader finds llama.cpp's architecture and settings, every tensor under its name,
    q and k reordered within each head in the llama architecture (the reverse order gives
    ours back), the output layer of an untied model, and the tokenizer's pre-tokenizer."""
    import gguf
    hf_directory(tmp_path / "m", kind, text, capsys=capsys)
    out = tmp_path / "model.gguf"
    code, _, err = call(capsys, export_main, tmp_path / "m", out, "--format", "gguf")
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    field = lambda key: reader.fields[key].contents()   # noqa: E731
    cfg, flat = load_model_files(tmp_path / "m")[:2]
    assert field("general.architecture") == kind
    assert (field(f"{kind}.attention.head_count"), field(f"{kind}.attention.head_count_kv"),
            field(f"{kind}.feed_forward_length"), field(f"{kind}.rope.freq_base")) == \
        (4, 2, 48, pytest.approx(cfg.rope_theta))
    assert field(f"{kind}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field("tokenizer.ggml.pre") == "gpt-2"
    tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    ours = named_views(cfg, flat)
    assert ("output.weight" in tensors) and len(tensors) == len(ours) + cfg.tie_embeddings
    hs = cfg.embed_dim // cfg.num_heads
    for name, view in ours.items():
        got = tensors[LLAMA.gguf_name(name)]
        heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name.split(".")[-2])
        if kind == "llama" and heads:       # pairs (2i, 2i+1) back to halves (i, i + hs/2)
            got = got.reshape(heads, hs // 2, 2, *got.shape[1:]).swapaxes(1, 2).reshape(got.shape)
        assert np.array_equal(got, view), name


def metaspace_tokenizer(path, text):
    """A Llama-2-style tokenizer.json: BPE with byte fallback (<0x00> .. <0xFF> in the
    vocabulary), the Metaspace pre-tokenizer, <unk> <s> </s> as its special tokens."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    specials = ["<unk>", "<s>", "</s>"]
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator([text], trainer)
    spec = json.loads(tok.to_str())
    # the byte tokens are ordinary vocabulary entries, as in Llama 2's file
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    path.write_text(json.dumps(spec))
    return tokenizers.Tokenizer.from_file(str(path))


def test_a_llama_2_style_tokenizer_reads_and_round_trips(text, corpus, tmp_path, capsys):
    """A Llama directory whose tokenizer.json is Metaspace + byte-fallback BPE: our ids are
    the tokenizers library's (no special token added), text outside the vocabulary comes
    back byte for byte, --init-from trains on it, and the run exports as GGUF with llama.cpp's
    SPM tokenizer, warning in one line of the text llama.cpp reads with one "\u2581" more."""
    hf_directory(tmp_path / "m", "llama", text, capsys=capsys, vocab_size=512)
    theirs = metaspace_tokenizer(tmp_path / "m" / "tokenizer.json", text)
    cfg, _, tok = load_model_files(tmp_path / "m")[:3]
    sample = "The miller's cat, na\u00efve: 12 apples \u2603 \U0001F600!"
    ids = tok.encode(sample)
    assert ids.tolist() == theirs.encode(sample, add_special_tokens=False).ids
    assert any(theirs.id_to_token(int(i)).startswith("<0x") for i in ids)
    assert tok.decode(ids.tolist()) == sample
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    code, _, err = fine_tune(capsys, corpus, tmp_path / "m", tmp_path / "run", steps=2,
                             log_interval=0, final_eval_tokens=100)
    assert code == 0, err
    code, _, err = call(capsys, export_main, tmp_path / "run", tmp_path / "m.gguf",
                        "--format", "gguf")
    assert code == 0 and err.startswith("cllm_export: warning: ") and err.count("\n") == 1, err
    assert "starts with a space" in err
    import gguf
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:len(tok)] == \
        [tok.id_to_token(i) for i in range(len(tok))]


# --- GGUF: a byte-fallback tokenizer as llama.cpp's SPM tokenizer ----------------------------

SPACE = "\u2581"
# ASCII, runs of spaces, tabs and newlines, a leading and a trailing space, "▁" typed in the
# text, and characters the vocabulary has no token for (bytes then)
SPM_TEXTS = ["The miller's cat walked to the old bridge.", "two  spaces,   three\tand a tab",
             "line one\nline two\n\n", " a leading space", "a trailing space ",
             f"the {SPACE}marker typed in", "na\u00efve caf\u00e9 \u00fcber",
             "\u2603 snow, \U0001F600 \u4e2d\u6587 \u0416\u0443\u043a", "ZQXJ 3.14159 #@!", ""]


def spm_form(path, form):
    """Rewrites the tokenizer.json of metaspace_tokenizer in another of the forms llama.cpp's
    SPM tokenizer reads: "metaspace" leaves it (a "▁" first unless the text starts with a
    space, split at each "▁"), "never" puts no "▁" first and does not split, "normalizer" is
    Llama 2's own form (Prepend and Replace normalizers, no pre-tokenizer) with <s> put
    before each text by its post-processor."""
    import tokenizers
    from tokenizers import decoders, normalizers, pre_tokenizers, processors
    tok = tokenizers.Tokenizer.from_file(str(path))
    if form == "never":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never",
                                                     split=False)
        tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    elif form == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE),
                                               normalizers.Replace(" ", SPACE)])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    spec = json.loads(tok.to_str())
    if form == "normalizer":
        spec["pre_tokenizer"] = None
    path.write_text(json.dumps(spec))


@pytest.mark.parametrize("form", ["metaspace", "never", "normalizer"])
def test_gguf_export_of_a_byte_fallback_tokenizer_splits_as_ours(form, text, tmp_path, capsys):
    """A Llama directory with a Metaspace / byte-fallback tokenizer.json exports as GGUF with
    llama.cpp's SPM tokenizer ("llama"): gguf's reader finds our tokens, the types (BYTE,
    UNKNOWN, CONTROL, UNUSED rows), scores in the order of the merges that make the tokens,
    the special ids and whether a "▁" and <s> are put first; transformers' GGUF loader
    rebuilds from them a tokenizer that gives our ids for every text, and the model's
    logits."""
    import gguf
    from transformers import AutoTokenizer
    hf_directory(tmp_path / "m", "llama", text, capsys=capsys, vocab_size=512)
    metaspace_tokenizer(tmp_path / "m" / "tokenizer.json", text)
    spm_form(tmp_path / "m" / "tokenizer.json", form)
    cfg, flat, tok = load_model_files(tmp_path / "m")[:3]
    (tmp_path / "g").mkdir()
    code, _, err = call(capsys, export_main, tmp_path / "m", tmp_path / "g" / "m.gguf")
    lines = err.splitlines()
    assert code == 0 and len(lines) == (form == "metaspace"), err
    assert all(ln.startswith("cllm_export: warning: ") and f"one '{SPACE}' more" in ln for ln in lines)

    reader = gguf.GGUFReader(str(tmp_path / "g" / "m.gguf"))
    field = lambda key: reader.fields[key].contents()   # noqa: E731
    spec = json.loads(tok.json_bytes)
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("llama", "default")
    tokens, types, scores = (field(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == cfg.vocab_size > len(tok)
    assert tokens == [tok.id_to_token(i) for i in range(len(tok))] + \
        [f"[PAD{i}]" for i in range(len(tok), cfg.vocab_size)]
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    T = gguf.TokenType
    assert types == [T.UNUSED if i >= len(tok) else T.BYTE if t in [f"<0x{b:02X}>" for b in range(256)]
                     else T.UNKNOWN if i == tok.unk_id else T.CONTROL if i in special else T.NORMAL
                     for i, t in enumerate(tokens)]
    assert types.count(T.BYTE) == 256 and types.count(T.CONTROL) == 2
    score = dict(zip(tokens, scores))
    made = list(dict.fromkeys("".join(m) for m in spec["model"]["merges"]))   # by first merge
    assert sorted(made, key=lambda t: -score[t]) == made and len({score[t] for t in made}) == len(made)
    assert max(s for t, s in score.items() if t not in made) < min(score[t] for t in made)
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.unknown_token_id")) == (tok.bos_id, tok.eos_id, tok.unk_id)
    assert "tokenizer.ggml.padding_token_id" not in reader.fields and tok.pad_id == -1
    assert (field("tokenizer.ggml.add_bos_token"), field("tokenizer.ggml.add_eos_token"),
            field("tokenizer.ggml.add_space_prefix")) == (form == "normalizer", False, form != "never")

    theirs = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="m.gguf")
    rng = np.random.default_rng(4)
    starts = rng.integers(0, len(text) - 300, 60)
    texts = SPM_TEXTS + [text[a:a + n] for a, n in zip(starts, rng.integers(1, 300, 60))]
    # transformers' GGUF loader puts a "▁" first by Metaspace's rule whatever the file says:
    # one "▁" fewer than Llama 2's normalizer before a text that starts with a space, and
    # one more than a tokenizer that puts none (llama.cpp reads add_space_prefix:
    # tools/llama_cpp_check.py); for that one its ids are ours of the text after a space
    if form != "metaspace":
        texts = [t for t in texts if not t.startswith(" ")]
    bytes_seen = 0
    for t in texts:
        ours = tok.encode(t).tolist()
        after_space = tok.encode(" " * bool(t) + t).tolist() if form == "never" else ours
        assert theirs.encode(t, add_special_tokens=False) == after_space, t
        assert theirs.encode(t) == [tok.bos_id] * (form == "normalizer") + after_space, t
        bytes_seen += sum(types[i] == T.BYTE for i in ours)
    assert bytes_seen > 10        # text outside the vocabulary was read as bytes

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="m.gguf",
                                                 dtype=torch.float32).eval()
    ids = tok.encode(" ".join(SPM_TEXTS))[None, :cfg.seq_len].astype(np.int32)
    ours = np.zeros((1, ids.shape[1], cfg.vocab_size), np.float32)
    forward_logits(cfg, flat, ids, ours)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - logits).max() <= 1e-4


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def tiny_spm(pieces, merges, edit=None, split=True):
    """A BPETokenizer of a byte-fallback BPE tokenizer.json made here: <unk> <s> </s>, the 256
    byte tokens, then `pieces`, with `merges`; Metaspace ("▁" first, split at each "▁" unless
    not split); edit(spec) changes the JSON before it is read."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *BYTE_TOKENS, *pieces])}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                          byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=split)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    spec = json.loads(tok.to_str())
    if edit is not None:
        edit(spec)
    return BPETokenizer(json.dumps(spec).encode())


def write_tiny_gguf(tok, path):
    """A GGUF file of a small Llama-form model (zero weights) with `tok`."""
    from cllm_cli.formats.gguf_export import write_gguf
    cfg = LlamaConfig(vocab_size=len(tok), embed_dim=8, num_layers=1, num_heads=2, seq_len=8)
    flat = np.zeros(sum(int(np.prod(s)) for _, s, _ in parameter_layout(cfg)), np.float32)
    return write_gguf(cfg, flat, tok, path)


def test_a_token_several_merges_make_splits_as_ours(tmp_path):
    """'abc' made by two merges (a list converted from a sentencepiece model has every split),
    'bca' built by a merge the library never uses ('b' + 'ca': 'bca' is split into 'bc' +
    'a' first), both accepted: transformers' GGUF loader gives our ids."""
    from transformers import AutoTokenizer
    pieces = [SPACE, "a", "b", "c", "ab", "bc", "ca", "abc", f"{SPACE}abc", "bca"]
    merges = [("a", "b"), ("b", "c"), ("c", "a"), ("ab", "c"), ("a", "bc"), (SPACE, "abc"),
              ("bc", "a")]
    tok = tiny_spm(pieces, merges)
    notes = write_tiny_gguf(tok, tmp_path / "t.gguf")
    assert len(notes) == 1 and f"one '{SPACE}' more" in notes[0]
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    texts = ["abc", "abcabc", "bcab cabc", "aabcc bca", "cabca", "bcabca abcbca", "ab c a"]
    made = {tok.id_to_token(int(i)) for t in texts for i in tok.encode(t)}
    assert {"abc", f"{SPACE}abc", "bca"} <= made
    for t in texts:
        assert theirs.encode(t, add_special_tokens=False) == tok.encode(t).tolist(), t


def _drop_byte(spec):
    del spec["model"]["vocab"]["<0x41>"]


def _plain_added(spec):
    spec["added_tokens"].append({"id": spec["model"]["vocab"]["abc"], "content": "abc", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": False})


@pytest.mark.parametrize("pieces, merges, edit, split, fragment", [
    # llama.cpp joins 'a' + 'bc' in "abc"; the library splits it 'a' + 'bc' and stops
    ([SPACE, "a", "b", "c", "ab", "bc", "abc"], [("b", "c"), ("a", "b"), ("ab", "c")], None, True,
     "would join 'a' + 'bc' into 'abc', which no merge does"),
    ([SPACE, "a", f"a{SPACE}"], [("a", SPACE)], None, True,
     f"token 'a{SPACE}' has a '{SPACE}' after its first character"),
    ([SPACE, "a", "b", "ab"], [("a", "b")], _drop_byte, True, "1 of the 256 byte tokens"),
    ([SPACE, "a", "b", "c", "abc"], [], _plain_added, True, "added token 'abc' is not special"),
    ([SPACE, "a", "b"], [], lambda s: s["added_tokens"].append(
        {"id": 262, "content": "c", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}), True, "added token 'c' is not in its BPE model's"),
    ([SPACE, "a", "b"], [], lambda s: s.update(decoder={"type": "Metaspace", "replacement": SPACE,
                                                          "prepend_scheme": "first", "split": True}),
     True, "its decoder (Metaspace) is not"),
    ([SPACE, "a", "b"], [], lambda s: s.update(normalizer={"type": "NFKC"}), True,
     "it has the normalizer NFKC and the pre-tokenizer Metaspace"),
    ([SPACE, "a", "b"], [], lambda s: s.update(post_processor={
        "type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                                 {"SpecialToken": {"id": "<s>", "type_id": 0}}],
        "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}),
     True, "puts id 1 after a text"),
])
def test_what_llama_cpps_spm_tokenizer_would_split_differently_is_refused(
        pieces, merges, edit, split, fragment, tmp_path):
    from cllm_cli.errors import ConversionError
    from cllm_cli.formats.gguf_vocab import gguf_vocabulary
    tok = tiny_spm(pieces, merges, edit, split)
    with pytest.raises(ConversionError, match=re.escape(fragment)):
        gguf_vocabulary(tok, len(tok))


@pytest.mark.parametrize("pieces, merges, fragment", [
    # of 'a', 'aa', 'a' llama.cpp joins the left pair, the library 'aa' + 'a' first
    ([SPACE, "a", "aa", "aaa"], [("a", "a"), ("aa", "a"), ("a", "aa")],
     "cannot follow 1 of the merges' orders"),
    ([SPACE, "a", "b", "c", "d", "ab", "bc", "abc", "abcd"],
     [("a", "b"), ("b", "c"), ("abc", "d"), ("ab", "c"), ("a", "bc")],
     "'abcd' is built from 'abc', which several merges make, and ranks before"),
    ([SPACE, "a", "b", "c", "ab", "bc", "cb", "abc"],
     [("a", "b"), ("b", "c"), ("ab", "c"), ("c", "b"), ("a", "bc")],
     "the merges that make 'abc' are not next to each other"),
])
def test_merge_orders_llama_cpp_does_not_follow_are_written_with_a_note(pieces, merges, fragment):
    """A tokenizer.json converted from a sentencepiece model orders some merges in a way
    llama.cpp's score-driven joins cannot follow: written (llama.cpp then joins as the
    sentencepiece model does), the note says so; a rare text may split otherwise."""
    from cllm_cli.formats.gguf_vocab import gguf_vocabulary
    tok = tiny_spm(pieces, merges)
    notes = gguf_vocabulary(tok, len(tok)).notes
    assert any(fragment in note for note in notes), notes


def test_gguf_export_refusal_is_one_line(text, tmp_path, capsys):
    """A token llama.cpp would build where no merge does: one line naming it, no file."""
    hf_directory(tmp_path / "m", "llama", text, capsys=capsys, vocab_size=512)
    metaspace_tokenizer(tmp_path / "m" / "tokenizer.json", text)
    spec = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    words = [t for t in vocab if t.startswith(SPACE) and len(t) > 2]
    tails = [t for t in vocab if SPACE not in t and len(t) > 1 and not t.startswith("<")]
    joined = max(words, key=len) + max(tails, key=len)
    assert joined not in vocab
    vocab[joined] = max(vocab.values()) + 1
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(spec))
    code, _, err = call(capsys, export_main, tmp_path / "m", tmp_path / "m.gguf")
    assert_one_error_line(code, err, "cllm_export", f"into '{joined}', which no merge does")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.bf16
def test_bf16_products_in_the_llama_form(text, corpus, tmp_path):
    """--precision bf16 on a Llama-form model: the loss within bf16's rounding of fp32's,
    and a run's final model bit-identical for 1 and 2 threads."""
    hf_directory(tmp_path / "m", "qwen2", text)
    cfg, flat = load_model_files(tmp_path / "m")[:2]
    rng = np.random.default_rng(6)
    inputs = rng.integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    losses = {}
    for precision in ("fp32", "bf16"):
        grads = np.zeros_like(flat)
        losses[precision], _ = loss_and_grads(cfg, flat, inputs, targets, grads, pad_id=-1,
                                              precision=precision)
    assert losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) <= 2e-2 * abs(losses["fp32"])
    args = [*TINY, "--arch", "llama", "--num-kv-heads", "2", "--precision", "bf16", corpus]
    finals = []
    for threads in (1, 2):
        p = subprocess.run(train_command(1, threads, *args, "--checkpoint-dir",
                                         tmp_path / f"t{threads}"),
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        finals.append((tmp_path / f"t{threads}" / "final_model.cllm").read_bytes())
    assert finals[0] == finals[1]


def test_a_gpt2_text_run_stores_what_it_stored_before_families(corpus, tmp_path, capsys):
    """The settings of the Llama form and of chat templates are stored only by runs that use
    them, so that a GPT-2 run on text writes the checkpoint bytes it wrote before them."""
    from cllm_cli.formats.checkpoint_load import load_checkpoint
    code, _, err = call(capsys, train_main, corpus, *TINY, "--max-steps", "2",
                        "--checkpoint-dir", tmp_path / "run")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "run" / "final_model.cllm")
    stored = ckpt.meta["train_config"]
    assert not {"arch", "num_kv_heads", "rope_theta", "tie_embeddings", "chat_template"} & set(stored)
    assert "family" not in ckpt.config.to_dict()


def test_llama_options_on_a_gpt2_base_are_refused(corpus, tmp_path, capsys):
    """--num-kv-heads (or another option of the Llama form) with --init-from of a GPT-2 model
    is one line, not dropped in silence."""
    code, _, err = call(capsys, train_main, corpus, *TINY, "--checkpoint-dir", tmp_path / "g2")
    assert code == 0, err
    code, _, err = call(capsys, train_main, corpus, "--init-from", tmp_path / "g2" / "final_model.cllm",
                        "--num-kv-heads", "2", "--checkpoint-dir", tmp_path / "run")
    assert_one_error_line(code, err, "train_model", "--num-kv-heads needs a Llama-form model",
                          "is gpt2")


def test_an_output_layer_that_differs_while_tied_says_so(text, tmp_path, capsys):
    """A Llama config that ties the output layer, with an lm_head in the file that differs
    from the embedding: the line names the tie, not a lack of support for untied layers."""
    from safetensors.numpy import load_file, save_file
    hf_directory(tmp_path / "m", "llama", text, capsys=capsys)      # untied, lm_head its own
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = True
    path.write_text(json.dumps(config))
    weights = load_file(tmp_path / "m" / "model.safetensors")
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="lm_head.weight differs from model.embed_tokens.weight "
                                        r"\(tie_word_embeddings is true\)"):
        load_model_files(tmp_path / "m")
