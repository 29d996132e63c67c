"""cllm_eval: a model's loss, perplexity and bits per byte on any text, and exactly
train_model's validation figures on a run's own split."""
import json
import math

import numpy as np
import pytest
from helpers import assert_one_error_line, call, gpt2_directory, sentences

from cllm_cli.api import CLLMModel
from cllm_cli.cli.evaluate import main
from cllm_cli.cli.train import main as train_main

TINY = ["--embed-dim", "16", "--num-layers", "2", "--num-heads", "2", "--seq-len", "16",
        "--batch-size", "8", "--micro-batch", "2", "--max-steps", "6", "--warmup-steps", "1",
        "--tokenizer", "word", "--vocab-size", "120", "--threads", "2", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    corpus = d / "corpus.txt"
    corpus.write_text(sentences(200, 3, punct=(".", "!", "?")), encoding="utf-8")
    metrics = d / "metrics.jsonl"
    code = train_main([str(corpus), *TINY, "--checkpoint-dir", str(d / "ck"),
                       "--metrics-file", str(metrics), "--val-fraction", "0.2"])
    assert code == 0
    return corpus, d / "ck", [json.loads(l) for l in metrics.read_text().splitlines()]


def evaluate(capsys, *argv):
    code, out, err = call(capsys, main, *argv)
    assert code == 0, err
    return json.loads(out)


def test_val_split_reproduces_train_models_figures(run, capsys):
    corpus, ck, metrics = run
    last = [m for m in metrics if "val_loss" in m][-1]
    for threads in ("1", "3"):
        got = evaluate(capsys, ck / "final_model.cllm", "--split", "val", "--json",
                       "--threads", threads)
        assert got["loss"] == last["val_loss"]          # exactly, not approximately
        assert got["bpb"] == last["val_bpb"]
        assert got["ppl"] == last["val_ppl"]


def test_loss_on_a_file_matches_the_model_api(run, tmp_path, capsys):
    """Every window's loss recomputed from CLLMModel.logits in float64."""
    corpus, ck, _ = run
    other = tmp_path / "other.txt"
    other.write_text(sentences(30, 99, punct=(".",)), encoding="utf-8")
    got = evaluate(capsys, ck, other, "--json")
    model = CLLMModel.load(ck / "final_model.cllm")
    from cllm_cli.corpus.batches import eval_windows
    from cllm_cli.tokenizers import Tokenizer
    tok = Tokenizer.load(ck / "vocab.txt", "word")
    stream = tok.encode_document(other.read_text())
    windows = eval_windows(stream, model.config.seq_len)
    logits = model.logits(windows[:, :-1]).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = windows[:, 1:]
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert got["counted"] == targets.size and got["tokens"] == len(stream)
    assert got["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    size = len(other.read_text().encode())
    assert got["bpb"] == pytest.approx(got["loss"] / math.log(2) * len(stream) / size, rel=1e-12)


def test_table_output(run, capsys):
    corpus, ck, _ = run
    code, out, err = call(capsys, main, ck, corpus)
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["evaluated", "tokens", "windows", "loss", "ppl", "bits/byte"]
    assert row.startswith("1 file ")


@pytest.mark.parametrize("argv, words", [
    (["{ck}"], ["nothing to evaluate"]),
    (["{ck}", "{corpus}", "--split", "val"], ["not both"]),
    (["{ck}", "{tmp}/missing.txt"], ["missing.txt"]),
    (["{ck}", "{tmp}/binary.txt"], ["binary.txt", "offset"]),
    (["{ck}", "{corpus}", "--threads", "0"], ["--threads"]),
    (["{tmp}/nothing.cllm", "{corpus}"], ["nothing.cllm"]),
])
def test_bad_input_is_one_line(run, tmp_path, capsys, argv, words):
    corpus, ck, _ = run
    (tmp_path / "binary.txt").write_bytes(b"abc\x00def")
    argv = [a.format(ck=ck, corpus=corpus, tmp=tmp_path) for a in argv]
    code, _, err = call(capsys, main, *argv)
    assert_one_error_line(code, err, "cllm_eval", *words)


def test_split_of_a_transformers_directory_is_refused_as_such(tmp_path, capsys):
    directory = gpt2_directory(tmp_path / "gpt2", sentences(40, seed=3, punct="."))
    capsys.readouterr()                  # what transformers printed while saving it
    code, _, err = call(capsys, main, directory, "--split", "val")
    assert_one_error_line(code, err, "cllm_eval", "--split", "transformers directory",
                          "DATA")


def test_spread_windows_is_a_fixed_even_subset():
    from cllm_cli.corpus.batches import spread_windows
    windows = np.arange(10 * 5).reshape(10, 5)          # 10 windows of 4 targets
    assert spread_windows(windows, 0) is windows
    assert spread_windows(windows, 400) is windows
    picked = spread_windows(windows, 12)                # 3 windows' worth
    assert picked[:, 0].tolist() == [0, 20, 45]        # windows 0, 4, 9: first, middle, last
    assert spread_windows(windows, 9)[:, 0].tolist() == [0, 20, 45]   # rounded up


def test_periodic_evaluations_use_a_subset_and_the_final_one_all(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sentences(200, 3, punct=(".", "!", "?")), encoding="utf-8")
    runs = {}
    for name, tokens in (("all", "0"), ("some", "32")):
        metrics = tmp_path / f"{name}.jsonl"
        code, out, err = call(capsys, train_main, corpus, *TINY[:-1], "--checkpoint-dir",
                              tmp_path / name, "--metrics-file", metrics, "--val-fraction", "0.3",
                              "--eval-interval", "2", "--eval-tokens", tokens)
        assert code == 0, err
        runs[name] = ([json.loads(l)["val_loss"] for l in metrics.read_text().splitlines()
                       if "val_loss" in json.loads(l)], out)
    (all_losses, out_all), (some_losses, out_some) = runs["all"], runs["some"]
    assert "evaluated every 2 steps on all of them, at the end on all" in out_all
    assert "evaluated every 2 steps on 2 of them, evenly spread, at the end on all" in out_some
    assert all(a != b for a, b in zip(all_losses[:-1], some_losses[:-1]))
    assert all_losses[-1] == some_losses[-1]           # the final evaluation covers the split
    from helpers import assert_bit_identical
    assert_bit_identical(tmp_path / "all" / "final_model.cllm",
                         tmp_path / "some" / "final_model.cllm")
