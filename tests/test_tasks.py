"""Zero-shot task evaluation (cllm_eval --task, cllm_cli.evaluation): per-item log-probabilities,
acc and acc_norm against the reference of task_cases.py (a random GPT-2 with GPT-2's
vocabulary, transformers and torch), the harness's pair split and standard errors, the same
bits for every thread count, the JSON and the text report, a model trained by train_model.
Bad input: test_task_faults.py; the Decoder's scoring itself: test_decoder_score.py."""
import dataclasses
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import call
from task_cases import (
    EOT,
    N_POSITIONS,
    harness_pair,
    load,
    random_gpt2,
    reference_hellaswag,
    reference_lambada,
    reference_score,
    torch_logits,
    words,
    write_task_files,
)

from cllm_cli.cli.evaluate import main as eval_main
from cllm_cli.evaluation import (
    TASKS,
    HellaSwagItem,
    LambadaItem,
    Scorer,
    encode_pair,
    mean_stderr,
    read_hellaswag,
    read_lambada,
)
from cllm_cli.progress import ItemProgress

BIN = os.path.dirname(sys.executable)
TOLERANCE = 1e-4        # per-item summed log-probability against the reference


@pytest.fixture(scope="module")
def hf_model(gpt2_files, tmp_path_factory):
    """(directory, torch model, transformers tokenizer) of task_cases.random_gpt2."""
    d = tmp_path_factory.mktemp("gpt2_small_random")
    return (d, *random_gpt2(d, gpt2_files))


@pytest.fixture(scope="module")
def task_files(hf_model, tmp_path_factory):
    """(hellaswag.jsonl, lambada.txt) of task_cases.write_task_files."""
    return write_task_files(tmp_path_factory.mktemp("task_files"), *hf_model[1:])


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
    result = TASKS["hellaswag"].score(model, tokenizer, items, threads=2)
    lls, acc, acc_norm = reference_hellaswag(hf_model, task_files[0])
    np.testing.assert_allclose(np.array(result.loglikelihoods), np.array(lls), rtol=0,
                               atol=TOLERANCE)
    assert abs(sum(result.correct) - acc) <= 1 and abs(sum(result.per_item["correct_norm"]) - acc_norm) <= 1
    assert result.figures["acc"].value == pytest.approx(sum(result.correct) / 12)
    assert result.figures["acc"].stderr == pytest.approx(mean_stderr(result.correct))
    assert result.figures["acc_norm"].stderr == pytest.approx(mean_stderr(result.per_item["correct_norm"]))
    # acc and acc_norm from the sums, as the harness takes them
    for item, sums, right, right_norm in zip(items, result.loglikelihoods, result.correct,
                                            result.per_item["correct_norm"]):
        assert right == (int(np.argmax(sums)) == item.label)
        lengths = [len(e) for e in item.endings]
        assert right_norm == (int(np.argmax(np.array(sums) / lengths)) == item.label)


def test_lambada_matches_the_reference(hf_model, task_files):
    model, tokenizer = load(hf_model[0])
    items = read_lambada(task_files[1])
    assert len(items) == 12
    result = TASKS["lambada"].score(model, tokenizer, items, threads=3)
    reference = reference_lambada(hf_model, task_files[1])
    np.testing.assert_allclose(result.loglikelihoods, [ll for ll, _ in reference], rtol=0,
                               atol=TOLERANCE)
    assert result.per_item["greedy"] == [g for _, g in reference]
    assert sum(result.per_item["greedy"]) >= 3                 # the greedy passages are found greedy
    assert result.figures["acc"].value == pytest.approx(sum(result.per_item["greedy"]) / 12)
    mean_ll = np.mean([ll for ll, _ in reference])
    assert result.figures["perplexity"].value == pytest.approx(np.exp(-mean_ll), rel=1e-4)
    stderr_ll = np.std(result.loglikelihoods, ddof=1) / np.sqrt(12)
    assert result.figures["perplexity"].stderr == pytest.approx(result.figures["perplexity"].value * stderr_ll, rel=1e-9)


def test_lambada_jsonl_is_read_as_its_text_lines(hf_model, task_files, tmp_path):
    """lambada_openai's own form: {"text": passage} per line, other keys ignored."""
    lines = task_files[1].read_text(encoding="utf-8").splitlines()
    jsonl = tmp_path / "lambada_test.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "domain": None}) + "\n" for t in lines),
                     encoding="utf-8")
    assert [(i.context, i.word) for i in read_lambada(jsonl)] == \
        [(i.context, i.word) for i in read_lambada(task_files[1])]


def test_hellaswag_labels_as_digit_strings_are_read_as_numbers(task_files, tmp_path):
    """Hugging Face's copy of HellaSwag writes each label as a string: "2" reads as 2."""
    lines = task_files[0].read_text(encoding="utf-8").splitlines()
    strings = tmp_path / "hf_hellaswag.jsonl"
    strings.write_text("".join(json.dumps({**json.loads(line), "label": str(json.loads(line)["label"])})
                               + "\n" for line in lines), encoding="utf-8")
    assert [(i.context, i.endings, i.label) for i in read_hellaswag(strings)] == \
        [(i.context, i.endings, i.label) for i in read_hellaswag(task_files[0])]


def test_a_context_of_white_space_only_is_the_start_of_a_text(hf_model, tmp_path):
    """ctx "  ": its white space goes to the continuation, as for any context, and nothing is
    left before it: scored after <|endoftext|>, as an empty context is (was an IndexError)."""
    path = tmp_path / "blank_ctx.jsonl"
    path.write_text(json.dumps({"ctx": "  ", "endings": ["the king.", "a bird"], "label": 1})
                    + "\n", encoding="utf-8")
    model, tokenizer = load(hf_model[0])
    result = TASKS["hellaswag"].score(model, tokenizer, read_hellaswag(path))
    _, torch_model, tok = hf_model
    expected = [reference_score(torch_logits(torch_model), [EOT], tok.encode("   " + e),
                                N_POSITIONS)[0] for e in ("the king.", "a bird")]
    np.testing.assert_allclose(result.loglikelihoods, [expected], rtol=0, atol=TOLERANCE)


def test_a_byte_order_mark_at_the_start_of_a_task_file_is_not_text(hf_model, task_files,
                                                                  tmp_path):
    """A file saved with a UTF-8 byte order mark (as Windows editors save) reads as without
    it: JSON lines stay JSON lines (LAMBADA read them as passages of JSON text, scoring
    '"}' as the target), a passage does not start with U+FEFF."""
    lines = task_files[1].read_text(encoding="utf-8").splitlines()
    jsonl = tmp_path / "lambada_test.txt"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}) + "\n"
                                                for t in lines).encode())
    plain = tmp_path / "lambada.txt"
    plain.write_bytes(b"\xef\xbb\xbf" + task_files[1].read_bytes())
    expected = [(i.context, i.word) for i in read_lambada(task_files[1])]
    assert [(i.context, i.word) for i in read_lambada(jsonl)] == expected
    assert [(i.context, i.word) for i in read_lambada(plain)] == expected
    hellaswag = tmp_path / "hellaswag.jsonl"
    hellaswag.write_bytes(b"\xef\xbb\xbf" + task_files[0].read_bytes())
    assert read_hellaswag(hellaswag) == [
        dataclasses.replace(i, where=i.where.replace(str(task_files[0]), str(hellaswag)))
        for i in read_hellaswag(task_files[0])]


def test_results_are_the_same_bits_for_every_thread_count(hf_model, task_files):
    model, tokenizer = load(hf_model[0])
    items = read_hellaswag(task_files[0])
    runs = [TASKS["hellaswag"].score(model, tokenizer, items, threads=t) for t in (1, 2, 3)]
    assert runs[0].loglikelihoods == runs[1].loglikelihoods == runs[2].loglikelihoods
    passages = read_lambada(task_files[1])
    runs = [TASKS["lambada"].score(model, tokenizer, passages, threads=t) for t in (1, 3)]
    assert runs[0].loglikelihoods == runs[1].loglikelihoods and runs[0].per_item == runs[1].per_item


def test_an_item_scores_alike_whatever_came_before(hf_model, task_files):
    """A context's cached positions are reused across items: the same bits as from scratch."""
    model, tokenizer = load(hf_model[0])
    items = read_hellaswag(task_files[0])
    twice = [items[2], items[2], items[7]]
    together = TASKS["hellaswag"].score(model, tokenizer, twice).loglikelihoods
    alone = TASKS["hellaswag"].score(model, tokenizer, [items[7]]).loglikelihoods
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
        api = TASKS["hellaswag"].score(model, tokenizer, read_hellaswag(path))
        keys = {"acc_norm", "acc_norm_stderr"}
    else:
        api = TASKS["lambada"].score(model, tokenizer, read_lambada(path))
        keys = {"perplexity", "perplexity_stderr"}
    assert set(out) == {"task", "items", "acc", "acc_stderr", "seconds", "seconds_per_item",
                        "model"} | keys
    assert out["task"] == task and out["items"] == 12 and out["model"] == str(hf_model[0])
    for key in {"acc", "acc_stderr"} | keys:
        assert out[key] == api.summary()[key], key
    for name, (value, stderr) in api.figures.items():
        assert (out[name], out[f"{name}_stderr"]) == (value, stderr)
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
    result = TASKS["hellaswag"].score(model, tokenizer, read_hellaswag(hs))
    assert out["items"] == 8 and out["acc"] == result.figures["acc"].value and out["acc_norm"] == result.figures["acc_norm"].value

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


def test_items_can_be_made_in_python(hf_model):
    """The Python API without files: items built directly, the Scorer on its own."""
    model, tokenizer = load(hf_model[0])
    item = HellaSwagItem("The dog", ("barked.", "sang opera."), 0)
    result = TASKS["hellaswag"].score(model, tokenizer, [item])
    assert result.items == 1 and result.figures["acc"].stderr is None and len(result.loglikelihoods[0]) == 2
    scorer = Scorer(model, tokenizer)
    pairs = scorer.loglikelihoods("The dog", [" barked.", " sang opera."])
    assert [s for s, _ in pairs] == result.loglikelihoods[0]
    passage = LambadaItem.from_passage("the dog barked", "here")
    assert (passage.context, passage.word) == ("the dog", "barked")
