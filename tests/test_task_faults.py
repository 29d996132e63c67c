"""cllm_eval --task on bad input: every malformed item, a file without items or that cannot
be read, a continuation longer than the model's context, options that do not apply. Each is
one line on stderr naming the file and the line, status 2, no traceback."""
import json
import os
import random
import subprocess
import sys

import pytest
from helpers import assert_one_error_line, call
from task_cases import random_gpt2, words

from cllm_cli.cli.evaluate import main as eval_main

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def model_dir(gpt2_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2_small_random")
    random_gpt2(d, gpt2_files)
    return d


@pytest.fixture(scope="module")
def passages(tmp_path_factory):
    path = tmp_path_factory.mktemp("passages") / "lambada.txt"
    path.write_text("the old king walked home\nthe end of it\n", encoding="utf-8")
    return path


def run_eval(*argv):
    return subprocess.run([os.path.join(BIN, "cllm_eval"), *map(str, argv)],
                          capture_output=True, text=True, timeout=300)


def test_a_continuation_longer_than_the_context_is_one_line(model_dir, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    ok = {"ctx": "the king", "endings": ["ran", "sang"], "label": 0}
    bad = {"ctx": "the king", "endings": ["ran", words(random.Random(2), 60, 60)], "label": 1}
    path.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    code, _, err = call(capsys, eval_main, model_dir, "--task", "hellaswag", path)
    assert_one_error_line(code, err, "cllm_eval", f"{path}:2", "tokens long",
                          "more than the model's context of 48")


GOOD = json.dumps({"ctx": "A man walks", "endings": ["in.", "out."], "label": 1})
HELLASWAG_FAULTS = {
    "invalid JSON": (b'{"ctx": "a", "endings": ["b"]', 2, "not valid JSON"),
    "missing label": (b'{"ctx": "a", "endings": ["b", "c"]}', 2, "missing key label"),
    "missing ctx and endings": (b'{"label": 0}', 2, "missing keys ctx, endings"),
    "label out of range": (b'{"ctx": "a", "endings": ["b", "c"], "label": 2}', 2,
                           "label 2 is not the index"),
    "negative label": (b'{"ctx": "a", "endings": ["b", "c"], "label": -1}', 2, "label -1"),
    "label a word": (b'{"ctx": "a", "endings": ["b", "c"], "label": "one"}', 2,
                     "label must be an integer"),
    "label a string out of range": (b'{"ctx": "a", "endings": ["b", "c"], "label": "2"}', 2,
                                    "label 2 is not the index"),
    "label of more digits than Python converts": (
        b'{"ctx": "a", "endings": ["b", "c"], "label": "' + b"9" * 5000 + b'"}', 2,
        "label '999"),
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
def test_malformed_hellaswag_item(model_dir, tmp_path, capsys, case):
    bad, line, fragment = HELLASWAG_FAULTS[case]
    path = tmp_path / "items.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + bad + b"\n" + GOOD.encode() + b"\n")
    code, out, err = call(capsys, eval_main, model_dir, "--task", "hellaswag", path)
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
def test_malformed_lambada_passage(model_dir, tmp_path, capsys, case):
    suffix, data, line, fragment = LAMBADA_FAULTS[case]
    path = tmp_path / f"passages.{suffix}"
    path.write_bytes(data)
    code, _, err = call(capsys, eval_main, model_dir, "--task", "lambada", path)
    assert_one_error_line(code, err, "cllm_eval", f"{path}:{line}:", fragment)


@pytest.mark.parametrize("task", ["hellaswag", "lambada"])
@pytest.mark.parametrize("data", [b"", b"\n  \n\t\n"], ids=["empty", "blank"])
def test_a_file_without_items(model_dir, tmp_path, capsys, task, data):
    path = tmp_path / "none.txt"
    path.write_bytes(data)
    code, _, err = call(capsys, eval_main, model_dir, "--task", task, path)
    assert_one_error_line(code, err, "cllm_eval", str(path), "no ", "in the file")


@pytest.mark.parametrize("make, fragment", [(None, "No such file"),
                                            (os.mkdir, "it is a directory")],
                         ids=["missing", "directory"])
def test_a_task_file_that_cannot_be_read(model_dir, tmp_path, capsys, make, fragment):
    path = tmp_path / "items.jsonl"
    if make is not None:
        make(path)
    code, _, err = call(capsys, eval_main, model_dir, "--task", "hellaswag", path)
    assert_one_error_line(code, err, "cllm_eval", f"{path}: cannot read", fragment)


def test_a_malformed_item_in_a_real_process(model_dir, tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + GOOD.encode() + b"\n{oops\n")
    proc = run_eval(model_dir, "--task", "hellaswag", path, "--json")
    assert_one_error_line(proc.returncode, proc.stderr, "cllm_eval", f"{path}:3:",
                          "not valid JSON")
    assert proc.stdout == ""


@pytest.mark.parametrize("extra, fragment", [
    (["second.txt"], "takes one task file, got 2"),
    (["--split", "val"], "--split does not apply with --task"),
    (["--precision", "fp32"], "--precision does not apply with --task (tasks are scored in fp32)"),
    (["--glob", "*.md"], "--glob does not apply with --task (a task reads one file, not a "
                         "directory)"),
    (["--threads", "0"], "--threads: must be an integer from 1"),
])
def test_task_usage_errors(model_dir, passages, capsys, extra, fragment):
    code, _, err = call(capsys, eval_main, model_dir, "--task", "lambada", passages,
                        *extra)
    assert_one_error_line(code, err, "cllm_eval", fragment)
