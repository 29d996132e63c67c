"""The user's JSON files, read by every tool through cllm_cli.jsonfile: a document nested too
deeply for Python's parser (a line of 100,000 "[") or invalid is one line naming the file and
the line, never a RecursionError; LAMBADA files of JSON lines are recognised whatever the case
of their extension; a tokenizer.json whose model is neither BPE nor WordLevel (which
cllm_export writes for word and char models) is refused, naming its type."""
import json
import shutil

import pytest
import tokenizers
from helpers import assert_one_error_line, call, gpt2_directory, sentences, write
from tokenizers import models, pre_tokenizers

from cllm_cli.cli.evaluate import main as eval_main
from cllm_cli.cli.plot import main as plot_main
from cllm_cli.cli.tokenize import main as tokenize_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.errors import DataError
from cllm_cli.evaluation import read_items
from cllm_cli.jsonfile import JSONError, loads, parse_json

DEEP = "[" * 100_000 + "\n"
TRAIN = ["--embed-dim", "16", "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
         "--batch-size", "4", "--max-steps", "1", "--warmup-steps", "0", "--threads", "1",
         "--eval-interval", "0", "--quiet"]


@pytest.fixture(scope="module")
def text():
    return sentences(200, seed=21, punct=".!?")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, text):
    """A small random transformers GPT-2 directory with a 300-token tokenizer.json (read
    only: a test that changes it changes a copy)."""
    return gpt2_directory(tmp_path_factory.mktemp("gpt2") / "model", text)


@pytest.fixture(autouse=True)
def quiet_start(model_dir, capsys):
    """Each test starts with nothing captured (transformers reports its saving on stderr)."""
    capsys.readouterr()


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, text):
    """A finished one-step bpe run (its final_model.cllm and tokenizer.json)."""
    base = tmp_path_factory.mktemp("bpe_run")
    corpus = write(base / "corpus.txt", text)
    assert train_main([str(corpus), "--vocab-size", "300", "--checkpoint-dir", str(base / "ck"),
                       *TRAIN]) == 0
    return base / "ck"


def test_loads_names_the_line_of_each_fault():
    with pytest.raises(JSONError, match=r"nested too deeply to read \(100,001 levels\)") as deep:
        loads('{"a": 1,\n "b": ' + DEEP)
    assert deep.value.line == 2
    with pytest.raises(JSONError, match="not valid JSON") as bad:
        loads('{"a": 1,\n\n "b": }')
    assert bad.value.line == 3
    with pytest.raises(JSONError, match="not UTF-8 text") as binary:
        loads(b'{"a":\n "\xff"}')
    assert binary.value.line == 2
    assert loads('["[", "{", "\\"["]') == ["[", "{", '"[']
    with pytest.raises(JSONError, match=r"\\udc00 is half of a UTF-16 surrogate pair, not a "
                                        r"character, at column 17") as half:
        loads('{"a":\n "x\\ud83d\\ude00 \\udc00"}')
    assert half.value.line == 2
    # a pair is one character; an escaped backslash before "ud800" is no escape of it
    assert loads('["\\ud83d\\ude00", "\\\\ud800"]') == ["\U0001f600", "\\ud800"]
    with pytest.raises(DataError, match=r"^f\.json:2: JSON nested too deeply"):
        parse_json("{\"a\":\n" + DEEP, "f.json")


def test_a_number_too_long_to_read_is_one_line(model_dir, tmp_path, capsys):
    """Python refuses to read an integer of more than 4,300 digits (a ValueError that is not a
    JSONDecodeError): the readers of task files, checkpoints' headers and transformers
    directories report it in one line too."""
    huge = "1" * 5000
    with pytest.raises(JSONError, match="not valid JSON") as fault:
        loads('{"a": 1,\n "b": ' + huge + "}")
    assert fault.value.line == 2
    items = write(tmp_path / "hs.jsonl", '{"ctx": "a", "endings": ["b"], "label": ' + huge + "}\n")
    code, _, err = call(capsys, eval_main, model_dir, "--task", "hellaswag", items)
    assert_one_error_line(code, err, "cllm_eval", f"{items}:1: not valid JSON")
    copy = shutil.copytree(model_dir, tmp_path / "model")
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config.replace('"n_layer": ', '"big": ' + huge + ', "n_layer": '))
    code, _, err = call(capsys, eval_main, copy, items)
    assert_one_error_line(code, err, "cllm_eval", "config.json", "not valid JSON")


@pytest.mark.parametrize("task, name", [("hellaswag", "deep.jsonl"), ("lambada", "deep.jsonl"),
                                        ("lambada", "deep.json")])
def test_deep_task_file_is_one_line(model_dir, tmp_path, capsys, task, name):
    path = write(tmp_path / name, DEEP)
    code, _, err = call(capsys, eval_main, model_dir, "--task", task, path)
    assert_one_error_line(code, err, "cllm_eval", f"{path}:1: JSON nested too deeply")


def test_deep_tokenizer_file_is_one_line(tmp_path, capsys):
    corpus = write(tmp_path / "c.txt", sentences(50, seed=2, punct="."))
    for name in ("tokenizer.json", "deep.json"):
        path = write(tmp_path / name, DEEP)
        code, _, err = call(capsys, train_main, corpus, "--tokenizer-file", path,
                            "--checkpoint-dir", tmp_path / "ck", *TRAIN)
        assert_one_error_line(code, err, "train_model", f"{path}:1: JSON nested too deeply")


def test_deep_vocab_of_a_bpe_model_is_one_line(bpe_run, tmp_path, capsys):
    corpus = write(tmp_path / "c.txt", "the old king walked home.\n")
    vocab = write(tmp_path / "v" / "vocab.json", DEEP)
    write(tmp_path / "v" / "merges.txt", "#version: 0.2\n")
    tokenizer = write(tmp_path / "t" / "tokenizer.json", "{\"model\":\n" + DEEP)
    for path, line in ((vocab, 1), (tokenizer, 2)):
        code, _, err = call(capsys, eval_main, bpe_run, corpus, "--vocab", path)
        assert_one_error_line(code, err, "cllm_eval", f"{path}:{line}: JSON nested too deeply")
        code, _, err = call(capsys, tokenize_main, corpus, "--vocab", path)
        assert_one_error_line(code, err, "cllm_tokenize", f"{path}:{line}: JSON nested")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_deep_file_of_a_transformers_directory_is_one_line(model_dir, tmp_path, capsys, text,
                                                           name):
    copy = shutil.copytree(model_dir, tmp_path / "model")
    write(copy / name, DEEP)
    corpus = write(tmp_path / "c.txt", text)
    code, _, err = call(capsys, train_main, corpus, "--init-from", copy, "--checkpoint-dir",
                        tmp_path / "ck", *TRAIN)
    assert_one_error_line(code, err, "train_model", f"{copy / name}:1: JSON nested too deeply")


def test_deep_metrics_and_ids_files_are_one_line(model_dir, tmp_path, capsys):
    metrics = write(tmp_path / "m.jsonl", '{"step": 1, "loss": 2.0}\n' + DEEP)
    code, _, err = call(capsys, plot_main, metrics, "-o", tmp_path / "m.png")
    assert_one_error_line(code, err, "cllm_plot", f"{metrics}:2: JSON nested too deeply")
    ids = write(tmp_path / "ids.jsonl", "[1, 2]\n" + DEEP)
    code, _, err = call(capsys, tokenize_main, ids, "--decode", "--vocab", model_dir)
    assert_one_error_line(code, err, "cllm_tokenize", f"{ids}:2: JSON nested too deeply")


# --- LAMBADA as JSON lines -------------------------------------------------------------------

PASSAGES = ["the old king walked home", "a quiet river ran under the bridge"]


@pytest.mark.parametrize("name", ["lambada.JSONL", "lambada.Jsonl", "lambada.json",
                                  "lambada.JSON", "lambada_test"])
def test_lambada_json_lines_are_read_whatever_the_name(tmp_path, name):
    path = write(tmp_path / name, "".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    items = read_items("lambada", path)
    assert [(i.context, i.word) for i in items] == [("the old king walked", "home"),
                                                    ("a quiet river ran under the", "bridge")]


def test_lambada_plain_passages_stay_passages(tmp_path):
    path = write(tmp_path / "lambada.txt", "".join(p + "\n" for p in PASSAGES))
    assert [i.word for i in read_items("lambada", path)] == ["home", "bridge"]


def test_lambada_json_lines_with_a_bad_line_are_refused(model_dir, tmp_path, capsys):
    path = write(tmp_path / "lambada.JSONL", json.dumps({"text": PASSAGES[0]}) + "\n"
                 + '{"text": "a b"\n')
    code, _, err = call(capsys, eval_main, model_dir, "--task", "lambada", path)
    assert_one_error_line(code, err, "cllm_eval", f"{path}:2: not valid JSON")


# --- tokenizer.json of another model type ---------------------------------------------------

def other_tokenizer(kind):
    """A tokenizer.json of model type `kind` with an end-of-text token."""
    vocab = {"<eos>": 0, "[UNK]": 1, "to": 2, "be": 3, ",": 4, "or": 5, "not": 6}
    if kind == "Unigram":
        model = models.Unigram([(token, -1.0) for token in vocab], unk_id=1)
    else:
        model = models.WordPiece(vocab, unk_token="[UNK]")
    tk = tokenizers.Tokenizer(model)
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk.to_str()


@pytest.mark.parametrize("kind", ["Unigram", "WordPiece"])
def test_a_tokenizer_of_another_model_type_is_refused(bpe_run, model_dir, tmp_path, capsys,
                                                      kind):
    tokenizer = write(tmp_path / "tokenizer.json", other_tokenizer(kind))
    corpus = write(tmp_path / "c.txt", "To be, or not to be.\n")
    code, _, err = call(capsys, tokenize_main, corpus, "--vocab", tokenizer)
    assert_one_error_line(code, err, "cllm_tokenize", str(tokenizer), f"a {kind} tokenizer")
    code, _, err = call(capsys, train_main, corpus, "--tokenizer-file", tokenizer,
                        "--checkpoint-dir", tmp_path / "ck", *TRAIN)
    assert_one_error_line(code, err, "train_model", str(tokenizer), f"a {kind} tokenizer")
    copy = shutil.copytree(model_dir, tmp_path / "model")
    write(copy / "tokenizer.json", other_tokenizer(kind))
    code, _, err = call(capsys, train_main, corpus, "--init-from", copy, "--checkpoint-dir",
                        tmp_path / "ck", *TRAIN)
    assert_one_error_line(code, err, "train_model", f"a {kind} tokenizer")
    code, _, err = call(capsys, eval_main, bpe_run, corpus, "--vocab", tokenizer)
    assert_one_error_line(code, err, "cllm_eval", f"a {kind} tokenizer")
