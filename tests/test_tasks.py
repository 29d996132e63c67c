"""Zero-shot task evaluation (cllm_eval --task, cllm_cli.tasks, Decoder.score): the
log-probabilities against a reference written here with transformers and torch (the harness's
rules: the pair split, left truncation, log softmax summed over the continuation), acc and
acc_norm, the same bits for every thread count, a .cllm model, and every malformed item as one
line naming the file and the line."""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import WORDS, assert_one_error_line, call
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from cllm_cli import _engine
from cllm_cli.cli.evaluate import main as eval_main
from cllm_cli.config import CLLMConfig
from cllm_cli.formats import load_model_files
from cllm_cli.model import CLLMModel
from cllm_cli.progress import ItemProgress
from cllm_cli.tasks import (
    HellaSwagItem,
    LambadaItem,
    Scorer,
    encode_pair,
    mean_stderr,
    read_hellaswag,
    read_lambada,
    score_hellaswag,
    score_lambada,
)

BIN = os.path.dirname(sys.executable)
N_POSITIONS = 48        # the transformers model's context: some items below are longer
TOLERANCE = 1e-4        # per-item summed log-probability against the reference
# more vocabulary columns than one classifier chunk, more scored rows than one block
CFG = CLLMConfig(vocab_size=2500, embed_dim=48, num_layers=2, num_heads=3, ff_dim=40,
                 seq_len=96)


def noisy_model(cfg, seed=1):
    model = CLLMModel(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    model.flat += rng.standard_normal(model.flat.size).astype(np.float32) * np.float32(0.15)
    return model


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------
# The reference: the harness's rules, written out again with transformers and torch


def harness_pair(encode, context, continuation, eos_id):
    """lm-evaluation-harness's split of a (context, continuation) request into ids."""
    if context == "":
        return [eos_id], encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def reference_score(logits_of, ctx, cont, seq_len):
    """(summed log-probability, all greedy) of cont after ctx, the harness's left
    truncation: the last seq_len + 1 ids, the last one only a target."""
    ids = (ctx + cont)[-(seq_len + 1):]
    logits = np.asarray(logits_of(ids[:-1]), dtype=np.float64)[-len(cont):]
    picked = log_softmax(logits)[np.arange(len(cont)), cont]
    return float(picked.sum()), bool((logits.argmax(-1) == cont).all())


@pytest.fixture(scope="module")
def hf_model(gpt2_files, tmp_path_factory):
    """(directory, torch model, transformers tokenizer): a small random GPT2LMHeadModel with
    GPT-2's own 50,257-token vocabulary, saved by transformers with vocab.json + merges.txt."""
    d = tmp_path_factory.mktemp("gpt2_small_random")
    torch.manual_seed(5)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=N_POSITIONS, n_embd=32,
                                       n_layer=2, n_head=4, n_inner=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(d)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(gpt2_files / name, d / name)
    return d, model, GPT2TokenizerFast.from_pretrained(gpt2_files)


def torch_logits(model):
    def logits_of(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].double().numpy()
    return logits_of


def words(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def hellaswag_docs(seed=3, n=12):
    """Items in HellaSwag's own jsonl form: short and long contexts (some longer than the
    model's 48 positions), 1 to 12-word endings, a context ending in a space, extra keys."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        ctx = words(rng, 2, 70 if i % 3 == 0 else 15).capitalize() + ("," if i % 4 else ".")
        if i == 5:
            ctx += " "
        endings = [words(rng, 1, 12) + rng.choice([".", "!", ", 42 of them."]) for _ in range(4)]
        docs.append({"ind": i, "activity_label": "Walking", "ctx_a": ctx, "ctx_b": "",
                     "ctx": ctx, "endings": endings, "label": rng.randrange(4),
                     "split": "val"})
    return docs


def greedy_passages(model, tok, rng, wanted=3):
    """Passages whose last word is, token for token, the model's greedy continuation."""
    found = []
    for _ in range(400):
        ctx = words(rng, 3, 20)
        ids = tok.encode(ctx)
        with torch.no_grad():
            g = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        text = tok.decode([g])
        if re.fullmatch(r" [A-Za-z]{2,}", text) and tok.encode(ctx + text) == ids + [g]:
            found.append(ctx + text)
            if len(found) == wanted:
                return found
    pytest.fail("no greedy passage found: the premise of the LAMBADA acc test")


@pytest.fixture(scope="module")
def task_files(hf_model, tmp_path_factory):
    """hellaswag.jsonl (12 items) and lambada.txt (12 passages, 3 of them greedy-correct,
    some longer than the model's context)."""
    _, model, tok = hf_model
    d = tmp_path_factory.mktemp("task_files")
    hs = d / "hellaswag.jsonl"
    hs.write_text("".join(json.dumps(doc) + "\n" for doc in hellaswag_docs()), encoding="utf-8")
    rng = random.Random(9)
    passages = [words(rng, 2, 80 if i % 4 == 0 else 25) for i in range(9)]
    passages[1:1] = greedy_passages(model, tok, rng)
    lam = d / "lambada.txt"
    lam.write_text("\n".join(passages) + "\n", encoding="utf-8")
    return hs, lam


def reference_hellaswag(hf_model, path):
    _, model, tok = hf_model
    lls, acc, acc_norm = [], 0, 0
    for doc in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
        sums = [reference_score(torch_logits(model),
                                *harness_pair(tok.encode, doc["ctx"], " " + e, 50256),
                                N_POSITIONS)[0] for e in doc["endings"]]
        lls.append(sums)
        acc += int(np.argmax(sums)) == doc["label"]
        norm = np.array(sums) / [len(e) for e in doc["endings"]]
        acc_norm += int(np.argmax(norm)) == doc["label"]
    return lls, acc, acc_norm


def reference_lambada(hf_model, path):
    _, model, tok = hf_model
    out = []
    for text in path.read_text(encoding="utf-8").splitlines():
        words_ = text.split(" ")
        out.append(reference_score(torch_logits(model),
                                   *harness_pair(tok.encode, " ".join(words_[:-1]),
                                                 " " + words_[-1], 50256), N_POSITIONS))
    return out


def load(directory):
    cfg, flat, tokenizer, meta, _ = load_model_files(directory)
    return CLLMModel.from_flat(cfg, flat, meta), tokenizer


# ----------------------------------------------------------------------------------------
# Decoder.score and Decoder.truncate


def test_score_is_the_log_softmax_of_the_full_pass():
    model = noisy_model(CFG)
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, 91)
    logits = model.logits(ids[None, :90])[0]
    targets = ids[1:91].copy()
    targets[[3, 40, 77]] = logits[[3, 40, 77]].argmax(-1)       # greedy there
    expected = log_softmax(logits)[np.arange(90), targets]
    decoder = _engine.Decoder(CFG, model.flat, 2)
    logp, greedy = decoder.score(ids[:10], ())                   # fills the cache only
    assert logp.shape == (0,) and greedy.shape == (0,) and decoder.length == 10
    logp, greedy = decoder.score(ids[10:90], targets[15:90])     # 75 of 80 positions scored
    assert decoder.length == 90 and logp.dtype == np.float64 and greedy.dtype == bool
    np.testing.assert_allclose(logp, expected[15:], rtol=0, atol=2e-5)
    assert list(np.flatnonzero(greedy)) == list(np.flatnonzero(
        logits[15:].argmax(-1) == targets[15:]))
    assert greedy[40 - 15] and greedy[77 - 15]


def test_truncate_reuses_the_cached_context_with_the_same_bits():
    model = noisy_model(CFG)
    rng = np.random.default_rng(4)
    context = rng.integers(0, CFG.vocab_size, 30)
    endings = [rng.integers(0, CFG.vocab_size, n) for n in (5, 17, 1)]
    shared = _engine.Decoder(CFG, model.flat, 1)
    shared.score(context[:-1], ())
    for ending in endings:
        shared.truncate(29)
        tokens = np.concatenate([context[-1:], ending[:-1]])
        reused = shared.score(tokens, ending)
        fresh = _engine.Decoder(CFG, model.flat, 1)
        fresh.score(context[:-1], ())
        again = fresh.score(tokens, ending)
        assert reused[0].tobytes() == again[0].tobytes()
        assert reused[1].tolist() == again[1].tolist()
    # the cache keeps working for generation after scoring and truncating
    shared.truncate(12)
    row = shared.feed(int(context[12]))
    np.testing.assert_allclose(row, model.logits(context[None, :13])[0, -1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("n, k", [(70, 70), (23, 9), (1, 1)])
def test_scores_are_the_same_bits_for_every_thread_count(n, k):
    model = noisy_model(CFG)
    ids = np.random.default_rng(n).integers(0, CFG.vocab_size, n + 9)
    results = []
    for threads in (1, 2, 3):
        decoder = _engine.Decoder(CFG, model.flat, threads)
        decoder.score(ids[:8], ())
        logp, greedy = decoder.score(ids[8:8 + n], ids[9 + n - k:9 + n])
        results.append((logp.tobytes(), greedy.tobytes()))
    assert results[0] == results[1] == results[2]


def test_score_and_truncate_refuse_bad_arguments():
    model = noisy_model(CFG)
    decoder = _engine.Decoder(CFG, model.flat, 1)
    with pytest.raises(ValueError, match="at most one target per token"):
        decoder.score([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one token"):
        decoder.score([], [])
    with pytest.raises(ValueError, match="outside"):
        decoder.score([1, 2], [CFG.vocab_size])
    with pytest.raises(ValueError, match="cache is full"):
        decoder.score(np.zeros(CFG.seq_len + 1, dtype=np.int32), [])
    decoder.score([1, 2, 3], [4])
    with pytest.raises(ValueError, match="cannot truncate 3 cached positions to 4"):
        decoder.truncate(4)
    with pytest.raises(ValueError):
        decoder.truncate(-1)
    decoder.truncate(0)
    assert decoder.length == 0


# ----------------------------------------------------------------------------------------
# The pair split and the statistics


class MergingTokenizer:
    """One id per character, except that "ab" is one id: encode("a" + "b") does not start
    with encode("a")."""
    eos_id = 0

    def encode(self, text):
        return np.array([99 if piece == "ab" else ord(piece)
                         for piece in re.findall("ab|.", text, re.S)], dtype=np.int64)


def test_encode_pair_follows_the_harness_and_falls_back_when_the_join_merges(gpt2_files):
    tok = MergingTokenizer()
    assert encode_pair(tok, "xy", " z") == ([ord("x"), ord("y")], [ord(" "), ord("z")])
    # trailing white space of the context moves to the continuation
    assert encode_pair(tok, "xy  ", "z") == ([ord("x"), ord("y")], [32, 32, ord("z")])
    # the joined encoding does not start with the context's: the continuation on its own
    assert encode_pair(tok, "xa", "b") == ([ord("x"), ord("a")], [ord("b")])
    # an empty context is the end-of-text id
    assert encode_pair(tok, "", " q") == ([0], [32, ord("q")])


def test_mean_stderr_is_the_harness_sample_standard_error():
    values = [1, 0, 0, 1, 1, 1, 0]
    mean = sum(values) / 7
    assert mean_stderr(values) == pytest.approx(
        (sum((v - mean) ** 2 for v in values) / 6) ** 0.5 / 7 ** 0.5, rel=1e-12)
    assert mean_stderr([1]) is None


# ----------------------------------------------------------------------------------------
# HellaSwag and LAMBADA against the reference


def test_hellaswag_matches_the_reference(hf_model, task_files):
    model, tokenizer = load(hf_model[0])
    items = read_hellaswag(task_files[0])
    assert len(items) == 12 and items[3].where == f"{task_files[0]}:4"
    # the premise of the truncation check: some contexts do not fit in the model's context
    assert max(len(tokenizer.encode(item.context)) for item in items) > N_POSITIONS
    result = score_hellaswag(model, tokenizer, items, threads=2)
    lls, acc, acc_norm = reference_hellaswag(hf_model, task_files[0])
    np.testing.assert_allclose(np.array(result.loglikelihoods), np.array(lls), rtol=0,
                               atol=TOLERANCE)
    assert abs(sum(result.correct) - acc) <= 1 and abs(sum(result.correct_norm) - acc_norm) <= 1
    assert result.acc == pytest.approx(sum(result.correct) / 12)
    assert result.acc_stderr == pytest.approx(mean_stderr(result.correct))
    assert result.acc_norm_stderr == pytest.approx(mean_stderr(result.correct_norm))
    # acc and acc_norm from the sums, as the harness takes them
    for item, sums, right, right_norm in zip(items, result.loglikelihoods, result.correct,
                                            result.correct_norm):
        assert right == (int(np.argmax(sums)) == item.label)
        lengths = [len(e) for e in item.endings]
        assert right_norm == (int(np.argmax(np.array(sums) / lengths)) == item.label)


def test_lambada_matches_the_reference(hf_model, task_files):
    model, tokenizer = load(hf_model[0])
    items = read_lambada(task_files[1])
    assert len(items) == 12
    result = score_lambada(model, tokenizer, items, threads=3)
    reference = reference_lambada(hf_model, task_files[1])
    np.testing.assert_allclose(result.loglikelihoods, [ll for ll, _ in reference], rtol=0,
                               atol=TOLERANCE)
    assert result.greedy == [g for _, g in reference]
    assert sum(result.greedy) >= 3                 # the greedy passages are found greedy
    assert result.acc == pytest.approx(sum(result.greedy) / 12)
    mean_ll = np.mean([ll for ll, _ in reference])
    assert result.perplexity == pytest.approx(np.exp(-mean_ll), rel=1e-4)
    stderr_ll = np.std(result.loglikelihoods, ddof=1) / np.sqrt(12)
    assert result.perplexity_stderr == pytest.approx(result.perplexity * stderr_ll, rel=1e-9)


def test_lambada_jsonl_is_read_as_its_text_lines(hf_model, task_files, tmp_path):
    """lambada_openai's own form: {"text": passage} per line, other keys ignored."""
    lines = task_files[1].read_text(encoding="utf-8").splitlines()
    jsonl = tmp_path / "lambada_test.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "domain": None}) + "\n" for t in lines),
                     encoding="utf-8")
    assert [(i.context, i.word) for i in read_lambada(jsonl)] == \
        [(i.context, i.word) for i in read_lambada(task_files[1])]


def test_results_are_the_same_bits_for_every_thread_count(hf_model, task_files):
    model, tokenizer = load(hf_model[0])
    items = read_hellaswag(task_files[0])
    runs = [score_hellaswag(model, tokenizer, items, threads=t) for t in (1, 2, 3)]
    assert runs[0].loglikelihoods == runs[1].loglikelihoods == runs[2].loglikelihoods
    passages = read_lambada(task_files[1])
    runs = [score_lambada(model, tokenizer, passages, threads=t) for t in (1, 3)]
    assert runs[0].loglikelihoods == runs[1].loglikelihoods and runs[0].greedy == runs[1].greedy


def test_an_item_scores_alike_whatever_came_before(hf_model, task_files):
    """A context's cached positions are reused across items: the same bits as from scratch."""
    model, tokenizer = load(hf_model[0])
    items = read_hellaswag(task_files[0])
    twice = [items[2], items[2], items[7]]
    together = score_hellaswag(model, tokenizer, twice).loglikelihoods
    alone = score_hellaswag(model, tokenizer, [items[7]]).loglikelihoods
    assert together[0] == together[1] and together[2] == alone[0]


def run_eval(*argv):
    return subprocess.run([os.path.join(BIN, "cllm_eval"), *map(str, argv)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("task", ["hellaswag", "lambada"])
def test_cllm_eval_json_is_the_api_result(hf_model, task_files, task):
    path = task_files[0] if task == "hellaswag" else task_files[1]
    proc = run_eval(hf_model[0], "--task", task, path, "--json", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""                    # no progress line: stderr is not a terminal
    [line] = proc.stdout.splitlines()
    out = json.loads(line)
    model, tokenizer = load(hf_model[0])
    if task == "hellaswag":
        api = score_hellaswag(model, tokenizer, read_hellaswag(path))
        keys = {"acc_norm", "acc_norm_stderr"}
    else:
        api = score_lambada(model, tokenizer, read_lambada(path))
        keys = {"perplexity", "perplexity_stderr"}
    assert set(out) == {"task", "items", "acc", "acc_stderr", "seconds", "seconds_per_item",
                        "model"} | keys
    assert out["task"] == task and out["items"] == 12 and out["model"] == str(hf_model[0])
    for key in {"acc", "acc_stderr"} | keys:
        assert out[key] == getattr(api, key), key
    assert out["seconds"] > 0 and out["seconds_per_item"] == pytest.approx(out["seconds"] / 12)


def test_cllm_eval_report_without_json(hf_model, task_files, capsys):
    code, out, err = call(capsys, eval_main, hf_model[0], "--task", "hellaswag", task_files[0])
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert re.fullmatch(r"hellaswag: 12 items in \d+:\d\d \([0-9.e-]+ s per item\)", lines[0])
    assert re.fullmatch(r"acc +\d\.\d{4} ± \d\.\d{4}", lines[1])
    assert re.fullmatch(r"acc_norm +\d\.\d{4} ± \d\.\d{4}", lines[2])
    code, out, err = call(capsys, eval_main, hf_model[0], "--task", "lambada", task_files[1])
    assert code == 0 and re.search(r"^perplexity +[0-9.]+ ± [0-9.]+$", out, re.M)


def test_item_progress_line(monkeypatch):
    monkeypatch.setattr(ItemProgress, "REFRESH", 0.0)

    class Screen:
        text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    screen = Screen()
    with ItemProgress("hellaswag", 4, screen) as shown:
        shown.add(1)
        assert screen.text.startswith("\rhellaswag: 1 of 4 items, ") and "s per item, ETA" in screen.text
        shown.add(3)
        shown.done()
    assert re.search(r"\rhellaswag: 4 items in 0:00, [0-9.e-]+ s per item\x1b\[K\n$", screen.text)


# ----------------------------------------------------------------------------------------
# A model trained by train_model


def test_a_trained_cllm_model(trained, tmp_path, capsys):
    """A .cllm file with its word vocabulary; seq_len 16, so most items are truncated."""
    model, tokenizer = load(trained / "final_model.cllm")
    rng = random.Random(1)
    docs = [{"ctx": words(rng, 3, 30), "endings": [words(rng, 1, 6) for _ in range(4)],
             "label": i % 4} for i in range(8)]
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    code, out, err = call(capsys, eval_main, trained / "final_model.cllm", "--task",
                          "hellaswag", hs, "--json", "--threads", "3")
    assert code == 0, err
    out = json.loads(out)
    result = score_hellaswag(model, tokenizer, read_hellaswag(hs))
    assert out["items"] == 8 and out["acc"] == result.acc and out["acc_norm"] == result.acc_norm

    def encode(text):
        return [int(i) for i in tokenizer.encode(text)]

    def logits_of(ids):
        return model.logits(np.array([ids]))[0]
    T = model.config.seq_len
    for doc, sums in zip(docs, result.loglikelihoods):
        expected = [reference_score(logits_of, *harness_pair(encode, doc["ctx"], " " + e,
                                                             tokenizer.eos_id), T)[0]
                    for e in doc["endings"]]
        np.testing.assert_allclose(sums, expected, rtol=0, atol=TOLERANCE)


def test_a_continuation_longer_than_the_context_is_one_line(trained, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    rng = random.Random(2)
    ok = {"ctx": "the king", "endings": ["ran", "sang"], "label": 0}
    bad = {"ctx": "the king", "endings": ["ran", words(rng, 20, 20)], "label": 1}
    path.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    code, _, err = call(capsys, eval_main, trained, "--task", "hellaswag", path)
    assert_one_error_line(code, err, "cllm_eval", f"{path}:2", "20 tokens long",
                          "context of 16")


# ----------------------------------------------------------------------------------------
# Malformed files: one line naming the file and the line, status 2

GOOD = json.dumps({"ctx": "A man walks", "endings": ["in.", "out."], "label": 1})
HELLASWAG_FAULTS = {
    "invalid JSON": (b'{"ctx": "a", "endings": ["b"]', 2, "not valid JSON"),
    "missing label": (b'{"ctx": "a", "endings": ["b", "c"]}', 2, "missing key label"),
    "missing ctx and endings": (b'{"label": 0}', 2, "missing keys ctx, endings"),
    "label out of range": (b'{"ctx": "a", "endings": ["b", "c"], "label": 2}', 2,
                           "label 2 is not the index"),
    "negative label": (b'{"ctx": "a", "endings": ["b", "c"], "label": -1}', 2, "label -1"),
    "label a string": (b'{"ctx": "a", "endings": ["b", "c"], "label": "1"}', 2,
                       "label must be an integer"),
    "label a float": (b'{"ctx": "a", "endings": ["b", "c"], "label": 1.0}', 2,
                      "label must be an integer"),
    "label a boolean": (b'{"ctx": "a", "endings": ["b", "c"], "label": true}', 2,
                        "label must be an integer"),
    "empty ending": (b'{"ctx": "a", "endings": ["b", " "], "label": 0}', 2, "ending 1 is empty"),
    "ending not a string": (b'{"ctx": "a", "endings": ["b", 3], "label": 0}', 2,
                            "ending 1 is not a string"),
    "empty endings": (b'{"ctx": "a", "endings": [], "label": 0}', 2, "endings must be"),
    "endings a string": (b'{"ctx": "a", "endings": "bc", "label": 0}', 2, "endings must be"),
    "ctx not a string": (b'{"ctx": null, "endings": ["b"], "label": 0}', 2, "ctx must be"),
    "not an object": (b'[1, 2]', 2, "expected a JSON object"),
    "not UTF-8": (b'{"ctx": "caf\xe9", "endings": ["b"], "label": 0}', 2, "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(HELLASWAG_FAULTS))
def test_malformed_hellaswag_item(hf_model, tmp_path, capsys, case):
    bad, line, fragment = HELLASWAG_FAULTS[case]
    path = tmp_path / "items.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + bad + b"\n" + GOOD.encode() + b"\n")
    code, out, err = call(capsys, eval_main, hf_model[0], "--task", "hellaswag", path)
    assert_one_error_line(code, err, "cllm_eval", f"{path}:{line}:", fragment)
    assert out == ""


LAMBADA_FAULTS = {
    "one word": ("txt", b"the old king walked home\n\n   alone  \nthe end\n", 3,
                 "at least two words"),
    "not UTF-8": ("txt", b"the old king\nthe caf\xc3 was closed\n", 2, "not UTF-8"),
    "jsonl without text": ("jsonl", b'{"text": "a b"}\n{"passage": "a b"}\n', 2,
                           "missing key text"),
    "jsonl text not a string": ("jsonl", b'{"text": "a b"}\n{"text": 7}\n', 2,
                                "text must be a string"),
    "jsonl invalid": ("jsonl", b'{"text": "a b"}\n\n{"text": "a b\n', 3, "not valid JSON"),
    "jsonl one word": ("jsonl", b'{"text": "alone"}\n', 1, "at least two words"),
}


@pytest.mark.parametrize("case", sorted(LAMBADA_FAULTS))
def test_malformed_lambada_passage(hf_model, tmp_path, capsys, case):
    suffix, data, line, fragment = LAMBADA_FAULTS[case]
    path = tmp_path / f"passages.{suffix}"
    path.write_bytes(data)
    code, _, err = call(capsys, eval_main, hf_model[0], "--task", "lambada", path)
    assert_one_error_line(code, err, "cllm_eval", f"{path}:{line}:", fragment)


@pytest.mark.parametrize("task", ["hellaswag", "lambada"])
@pytest.mark.parametrize("data", [b"", b"\n  \n\t\n"], ids=["empty", "blank"])
def test_a_file_without_items(hf_model, tmp_path, capsys, task, data):
    path = tmp_path / "none.txt"
    path.write_bytes(data)
    code, _, err = call(capsys, eval_main, hf_model[0], "--task", task, path)
    assert_one_error_line(code, err, "cllm_eval", str(path), "no ", "in the file")


@pytest.mark.parametrize("make, fragment", [(None, "No such file"),
                                            (os.mkdir, "it is a directory")],
                         ids=["missing", "directory"])
def test_a_task_file_that_cannot_be_read(hf_model, tmp_path, capsys, make, fragment):
    path = tmp_path / "items.jsonl"
    if make is not None:
        make(path)
    code, _, err = call(capsys, eval_main, hf_model[0], "--task", "hellaswag", path)
    assert_one_error_line(code, err, "cllm_eval", f"{path}: cannot read", fragment)


def test_a_malformed_item_in_a_real_process(hf_model, tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.encode() + b"\n{oops\n")
    proc = run_eval(hf_model[0], "--task", "hellaswag", path, "--json")
    assert_one_error_line(proc.returncode, proc.stderr, "cllm_eval", f"{path}:3:",
                          "not valid JSON")
    assert proc.stdout == ""


@pytest.mark.parametrize("extra, fragment", [
    (["second.txt"], "takes one task file, got 2"),
    (["--split", "val"], "--split does not apply with --task"),
    (["--precision", "fp32"], "--precision does not apply"),
    (["--glob", "*.md"], "--glob does not apply"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_task_usage_errors(hf_model, task_files, capsys, extra, fragment):
    code, _, err = call(capsys, eval_main, hf_model[0], "--task", "lambada", task_files[1],
                        *extra)
    assert_one_error_line(code, err, "cllm_eval", fragment)


def test_items_can_be_made_in_python(hf_model):
    """The Python API without files: items built directly, the Scorer on its own."""
    model, tokenizer = load(hf_model[0])
    item = HellaSwagItem("The dog", ("barked.", "sang opera."), 0)
    result = score_hellaswag(model, tokenizer, [item])
    assert result.items == 1 and result.acc_stderr is None and len(result.loglikelihoods[0]) == 2
    scorer = Scorer(model, tokenizer)
    pairs = scorer.loglikelihoods("The dog", [" barked.", " sang opera."])
    assert [s for s, _ in pairs] == result.loglikelihoods[0]
    passage = LambadaItem.from_passage("the dog barked", "here")
    assert (passage.context, passage.word) == ("the dog", "barked")
