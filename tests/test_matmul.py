"""--matmul: the kernel of the fp32 weight products, scipy's BLAS (the default) or oneDNN's
fp32 matmul. Each kernel gives gradients equal to the other's within float rounding, and its
own bits, the same for any thread or process count; the run records the kernel, a resume keeps
it (another is refused), and cllm_eval computes with it."""
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, assert_one_error_line, call, sentences

from cllm_cli._engine import load_bf16, loss_and_grads
from cllm_cli.api import CLLMModel
from cllm_cli.cli.evaluate import main as eval_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.formats.checkpoint_load import load_checkpoint
from cllm_cli.model import CLLMConfig, LlamaConfig, named_views, precision
from cllm_cli.model.llama import init_parameters

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TINY = ["--tokenizer", "word", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "4",
        "--seq-len", "32", "--batch-size", "8", "--micro-batch", "2", "--max-steps", "8",
        "--warmup-steps", "2", "--save-interval", "4", "--log-interval", "0",
        "--eval-interval", "0", "--final-eval-tokens", "300", "--seed", "5"]


@pytest.fixture(scope="module", autouse=True)
def onednn():
    load_bf16(precision.library_path())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(sentences(600, seed=3, punct=".,!?;"))
    return path


def models():
    gpt2 = CLLMConfig(vocab_size=301, embed_dim=64, num_layers=2, num_heads=4, seq_len=40)
    llama = LlamaConfig(vocab_size=301, embed_dim=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, seq_len=40, attention_bias=True, tie_embeddings=False)
    flat = np.zeros(CLLMModel(llama, 0).flat.size, np.float32)
    init_parameters(llama, named_views(llama, flat), np.random.default_rng(2))
    return [(gpt2, CLLMModel(gpt2, 1).flat), (llama, flat)]


@pytest.mark.parametrize("index", [0, 1], ids=["gpt2", "llama"])
def test_onednn_products_equal_the_blas_ones_within_rounding(index):
    cfg, flat = models()[index]
    rng = np.random.default_rng(4)
    inputs = rng.integers(0, cfg.vocab_size, (3, 40)).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, (3, 40)).astype(np.int32)
    grads, losses = {}, {}
    for kernel in ("blas", "onednn"):
        grads[kernel] = np.zeros_like(flat)
        losses[kernel], _ = loss_and_grads(cfg, flat, inputs, targets, grads[kernel],
                                           pad_id=-1, matmul=kernel)
    assert abs(losses["onednn"] - losses["blas"]) <= 1e-6 * abs(losses["blas"])
    for name, want in named_views(cfg, grads["blas"]).items():
        got = named_views(cfg, grads["onednn"])[name]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name


def train(*argv):
    return subprocess.run([sys.executable, "-m", "cllm_cli.cli.train", *map(str, argv)],
                          cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_a_onednn_run_is_its_own_the_same_for_threads_and_ranks(corpus, tmp_path, capsys):
    finals = {}
    for name, line in (("t1", ["--threads", "1"]), ("t2", ["--threads", "2"]),
                       ("mpi", None), ("blas", ["--threads", "2"])):
        kernel = [] if name == "blas" else ["--matmul", "onednn"]
        argv = [corpus, *TINY, *kernel, "--checkpoint-dir", tmp_path / name]
        if line is None:
            p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "cllm_cli.cli.train",
                                *map(str, argv), "--threads", "1"], cwd=ROOT,
                               capture_output=True, text=True)
        else:
            p = train(*argv, *line)
        assert p.returncode == 0, p.stderr
        finals[name] = (tmp_path / name / "final_model.cllm").read_bytes()
    assert finals["t1"] == finals["t2"] == finals["mpi"] != finals["blas"]
    ckpt = load_checkpoint(tmp_path / "t1" / "final_model.cllm")
    assert ckpt.meta["train_config"]["matmul"] == "onednn"
    assert "matmul" not in load_checkpoint(tmp_path / "blas" / "final_model.cllm").meta["train_config"]


def test_the_run_header_names_the_kernel_eval_uses_it_and_a_resume_keeps_it(corpus, tmp_path,
                                                                              capsys):
    import json

    from cllm_cli.api import load_model
    from cllm_cli.evaluation.text import evaluate_stream, split_of_run
    code, out, err = call(capsys, train_main, corpus, *TINY, "--matmul", "onednn",
                          "--checkpoint-dir", tmp_path / "run", "--threads", "2")
    assert code == 0, err
    assert "matmul onednn" in out
    code, out, err = call(capsys, eval_main, tmp_path / "run", "--split", "val", "--json",
                          "--threads", "2")
    assert code == 0, err
    model, tok, _ = load_model(tmp_path / "run")
    stream, _ = split_of_run(tmp_path / "run" / "final_model.cllm", model, tok, "val")
    sums = {kernel: evaluate_stream(model, stream, 2, 8, 2, tok.pad_id, matmul=kernel)[0]
            for kernel in ("blas", "onednn")}
    assert sums["onednn"] != sums["blas"]
    report = json.loads(out)
    assert report["loss"] == sums["onednn"] / report["counted"]
    (tmp_path / "run" / "final_model.cllm").unlink()
    code, _, err = call(capsys, train_main, corpus, "--resume", "--matmul", "blas",
                        "--checkpoint-dir", tmp_path / "run")
    assert_one_error_line(code, err, "train_model", "--matmul", "resum")
