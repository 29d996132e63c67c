"""Instruction data (.jsonl records, cllm_cli/corpus/instructions.py): the loss counts the
answers only (checked against numpy's cross-entropy over the unmasked targets), a small model
learns a rule from prompt-completion pairs and answers new prompts through the project's own
generation, results do not depend on threads, processes or a resume, cllm_eval reports the
same masked loss as training, malformed records are one line naming file:line."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, assert_bit_identical, assert_one_error_line, call

from cllm_cli import CLLMModel
from cllm_cli._engine import Engine, forward_logits
from cllm_cli.cli.evaluate import main as eval_main
from cllm_cli.cli.train import main as train_main
from cllm_cli.corpus.instructions import (
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_TARGET,
    Instructions,
    Record,
    encode_pieces,
    is_instruction_data,
    read_records,
)
from cllm_cli.model import CLLMConfig
from cllm_cli.tokenizers import BPETokenizer, Tokenizer
from cllm_cli.tokenizers.chat_template import ChatTemplate

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
LETTERS = "abcdef"


def reverse_records(n, seed):
    """Records whose completion follows from the prompt by a rule: the letters reversed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 4)))
        out.append({"prompt": f"reverse {' '.join(word)} =",
                    "completion": " " + " ".join(reversed(word))})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# a small word-level model; 16 records a step
SMALL = ["--tokenizer", "word", "--vocab-size", "40", "--embed-dim", "32", "--num-layers", "2",
         "--num-heads", "2", "--seq-len", "16", "--batch-size", "16", "--micro-batch", "4",
         "--dropout", "0", "--quiet"]


def test_masked_loss_equals_numpy_cross_entropy_over_counted_targets():
    """The engine's loss on labelled windows is the sum of -log softmax over exactly the
    targets whose label is not negative (pad_id plays no part: -1 here)."""
    cfg = CLLMConfig(vocab_size=23, embed_dim=16, num_layers=2, num_heads=2, seq_len=12)
    model = CLLMModel(cfg, seed=3)
    rng = np.random.default_rng(0)
    B, width = 6, cfg.seq_len + 1
    ids = rng.integers(0, cfg.vocab_size, size=(B, width)).astype(np.int32)
    labels = np.where(rng.random((B, width)) < 0.4, ids, IGNORE_TARGET).astype(np.int32)
    labels[:, 1] = ids[:, 1]                      # at least one counted target a window
    windows = np.ascontiguousarray(np.concatenate([ids, labels], axis=1))
    logits = np.zeros((B, cfg.seq_len, cfg.vocab_size), dtype=np.float32)
    forward_logits(cfg, model.flat, np.ascontiguousarray(ids[:, :-1]), logits)
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = labels[:, 1:]
    mask = targets >= 0
    expected = -logp[mask, targets[mask]].sum()
    assert 0 < mask.sum() < mask.size
    with Engine(cfg, model.flat, 2, 2, B, pad_id=-1, labelled=True) as engine:
        loss_sum, counted = engine.evaluate(windows)
    assert counted == mask.sum()
    assert loss_sum == pytest.approx(expected, rel=1e-5)
    # the same targets through the Python API, as PyTorch's ignore_index does
    mean, _ = model.loss_and_grads(ids[:, :-1], targets, pad_id=None)
    assert mean == pytest.approx(expected / mask.sum(), rel=1e-5)


def test_padding_after_a_record_changes_nothing_before_it():
    cfg = CLLMConfig(vocab_size=23, embed_dim=16, num_layers=2, num_heads=2, seq_len=12)
    model = CLLMModel(cfg, seed=5)
    record = np.array([[4, 9, 7, 3, 11]], dtype=np.int32)
    padded = np.concatenate([record, np.full((1, 7), 3, dtype=np.int32)], axis=1)
    a = np.zeros((1, 5, cfg.vocab_size), dtype=np.float32)
    b = np.zeros((1, 12, cfg.vocab_size), dtype=np.float32)
    forward_logits(cfg, model.flat, record, a)
    forward_logits(cfg, model.flat, padded, b)
    np.testing.assert_array_equal(a[0], b[0, :5])


def test_windows_hold_one_record_with_answer_labels_then_padding():
    tokenizer = Tokenizer.build(["reverse a b = b a"], "word", 40)
    records = [Record([("reverse a b =", False), (" b a", True)], "f:1")]
    inst = Instructions.build(records, tokenizer, 8)
    ids, labels = inst.windows[0, :9], inst.windows[0, 9:]
    expected = list(tokenizer.encode("reverse a b =")) + list(tokenizer.encode(" b a"))
    n = len(expected) + 1
    assert list(ids[:n]) == expected + [tokenizer.eos_id]
    assert all(ids[n:] == tokenizer.eos_id)            # padding inputs: a valid id
    answer = len(tokenizer.encode(" b a"))
    assert list(labels[:n - answer - 1]) == [IGNORE_TARGET] * (n - answer - 1)
    assert list(labels[n - answer - 1:n]) == list(ids[n - answer - 1:n])   # answer + eos
    assert all(labels[n:] == IGNORE_TARGET)


def test_long_records_are_cut_from_the_left_of_the_prompt_or_refused():
    tokenizer = Tokenizer.build(["a b c d e f g h x y"], "word", 40)
    long_prompt = Record([("a b c d e f g h", False), (" x y", True)], "f:1")   # 8 + 2 + eos
    long_answer = Record([("a", False), (" x y x y x y x y x y", True)], "f:2")
    inst = Instructions.build([long_prompt, long_answer], tokenizer, 7)
    assert (inst.cut, inst.refused, len(inst.windows)) == (1, 1, 1)
    ids = inst.windows[0, :8]
    # 11 ids for 8 places: the first three prompt tokens go, the answer and eos stay
    assert list(ids) == list(tokenizer.encode("d e f g h x y")) + [tokenizer.eos_id]
    assert inst.where == ["f:1"]


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_pieces_encode_to_the_whole_conversations_ids(kind):
    """The training sequence (each piece encoded on its own) equals the tokenizer's encoding
    of the whole rendered conversation, for the default template."""
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is two and two?"},
                {"role": "assistant", "content": "Four, of course."},
                {"role": "user", "content": "and three?"},
                {"role": "assistant", "content": "Five."}]
    template = ChatTemplate.default("<bos>", "<eos>")
    text = template.render(messages)
    tokenizer = Tokenizer.build([text * 3], kind, 300 if kind == "bpe" else 200)
    ids, trained = encode_pieces(tokenizer, template.segments(messages))
    assert list(ids[:-1]) == list(tokenizer.encode_marked(text))
    assert ids[-1] == tokenizer.eos_id and trained[-1]
    answer = tokenizer.decode(ids[trained][:-1])
    assert "five" in answer.lower() and "four" in answer.lower() and "three" not in answer


def test_special_tokens_in_a_template_are_read_as_their_ids(tmp_path):
    """A BPE tokenizer with <|im_start|> / <|im_end|> as added special tokens (as chat
    models have) encodes them to their ids in rendered text, as transformers does."""
    from tokenizers import Tokenizer as HF
    from transformers import PreTrainedTokenizerFast
    trained = BPETokenizer.train(["user said hi to the assistant\n"] * 20, 300)
    tk = HF.from_str(trained.tokenizer_json().decode("utf-8"))
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    ours = BPETokenizer.read(tmp_path / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert list(ours.encode_marked(text)) == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.encode_marked(text)[0] == hf.convert_tokens_to_ids("<|im_start|>")
    assert len(ours.encode(text)) > len(ours.encode_marked(text))   # encode: text as text


def test_a_small_model_learns_to_reverse_and_answers_new_prompts(tmp_path, capsys):
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_records(600, seed=1))
    run = tmp_path / "run"
    code, out, err = call(capsys, train_main, train_file, "--checkpoint-dir", run, *SMALL,
                          "--max-steps", "1500", "--learning-rate", "3e-3", "--warmup-steps",
                          "20", "--threads", "2", "--eval-interval", "0", "--metrics-file",
                          tmp_path / "m.jsonl")
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "m.jsonl")
              if '"loss"' in line]
    assert np.mean(losses[-20:]) < 0.1, losses[-20:]
    model = CLLMModel.load(run / "final_model.cllm")
    tokenizer = Tokenizer.load(run / "vocab.txt", "word")
    seen = {r["prompt"] for r in reverse_records(600, seed=1)}
    new = [r for r in reverse_records(200, seed=99) if r["prompt"] not in seen][:40]
    right = 0
    for record in new:
        prompt = list(tokenizer.encode(record["prompt"]))
        answer = list(model.generate(prompt, max_tokens=8, temperature=0,
                                     stop_ids=(tokenizer.eos_id,)))
        right += tokenizer.decode(answer).split() == record["completion"].split()
    assert len(new) >= 20 and right >= 0.8 * len(new), f"{right} of {len(new)}"


def small_run(tmp_path, data, name, *extra, threads=2):
    run = tmp_path / name
    line = [sys.executable, "-m", "cllm_cli.cli.train", str(data), "--checkpoint-dir", str(run),
            *SMALL, "--max-steps", "6", "--warmup-steps", "2", "--eval-interval", "3",
            "--save-interval", "3", "--threads", str(threads), *map(str, extra)]
    done = subprocess.run(line, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture
def chat_file(tmp_path):
    """Records of all three kinds in one file: prompt-completion, messages, Alpaca."""
    records = reverse_records(40, seed=2)
    for i, r in enumerate(reverse_records(20, seed=3)):
        records.append({"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": r["completion"]}]})
        records.append({"instruction": "reverse", "input": r["prompt"][8:] if i % 2 else "",
                        "output": r["completion"]})
    return write_jsonl(tmp_path / "mixed.jsonl", records)


def test_threads_processes_and_resume_give_the_same_model(tmp_path, chat_file):
    one = small_run(tmp_path, chat_file, "one", threads=1)
    two = small_run(tmp_path, chat_file, "two", threads=2)
    assert_bit_identical(one / "final_model.cllm", two / "final_model.cllm")
    # resume from step 3 of another copy
    part = small_run(tmp_path, chat_file, "part", "--max-steps", "3")
    resumed = small_run(tmp_path, chat_file, "part", "--resume")
    assert resumed == part
    assert_bit_identical(one / "final_model.cllm", part / "final_model.cllm")
    assert os.path.exists(MPIEXEC), "mpiexec missing: make installs the mpich wheel"
    mpi = tmp_path / "mpi"
    line = [MPIEXEC, "-n", "2", sys.executable, "-m", "cllm_cli.cli.train", str(chat_file),
            "--checkpoint-dir", str(mpi), *SMALL, "--max-steps", "6", "--warmup-steps", "2",
            "--eval-interval", "3", "--save-interval", "3", "--threads", "1"]
    done = subprocess.run(line, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_bit_identical(one / "final_model.cllm", mpi / "final_model.cllm")
    # the run keeps its template and says how many records it trains on
    meta = CLLMModel.load(one / "final_model.cllm").meta
    assert meta["chat_template"] == (one / "chat_template.jinja").read_text(encoding="utf-8")
    # the Alpaca prompts (40 records) do not fit in 16 tokens: cut from the left
    assert meta["records"].startswith("80 records (40 cut from the left of the prompt, 0 ")


def test_cllm_eval_reports_the_training_sides_masked_loss(tmp_path, chat_file, capsys):
    run = tmp_path / "run"
    code, out, err = call(capsys, train_main, chat_file, "--checkpoint-dir", run, *SMALL,
                          "--max-steps", "2", "--threads", "2", "--metrics-file",
                          tmp_path / "m.jsonl", "--val-fraction", "0.25")
    assert code == 0, err
    val = [json.loads(line) for line in open(tmp_path / "m.jsonl") if "val_loss" in line][-1]
    # no bits per byte: the loss counts the answers' tokens, the files' bytes are JSON
    assert val["val_bpb"] is None and "bpb" not in out and "bits/byte" not in out
    code, out, err = call(capsys, eval_main, run, "--split", "val", "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] == val["val_loss"]
    # the same records given as a file: the held-out quarter, whole records
    lines = chat_file.read_text(encoding="utf-8").splitlines(keepends=True)
    held = write_jsonl(tmp_path / "held.jsonl", [json.loads(x) for x in lines[-len(lines) // 4:]])
    code, out, err = call(capsys, eval_main, run, held, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["records"] == len(lines) // 4
    assert result["loss"] == val["val_loss"]


def test_cllm_eval_reports_the_records_it_cut_or_left_out(tmp_path, capsys):
    """Records whose answer does not fit in the model's context are not evaluated, and long
    prompts are cut: cllm_eval says how many of each, never scoring a subset silently."""
    records = reverse_records(8, seed=4)
    run = tmp_path / "run"
    code, _, err = call(capsys, train_main, write_jsonl(tmp_path / "train.jsonl", records),
                        "--checkpoint-dir", run, *SMALL, "--max-steps", "1")
    assert code == 0, err
    long_prompt = {"prompt": "reverse " + "a b " * 10 + "=", "completion": " b a"}
    long_answer = {"prompt": "reverse a b =", "completion": " b a" * 10}
    data = write_jsonl(tmp_path / "eval.jsonl", records[:3] + [long_prompt, long_answer])
    code, out, err = call(capsys, eval_main, run, data, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["records"], result["cut"], result["refused"]) == (4, 1, 1)
    assert err.strip() == ("cllm_eval: warning: of 5 records, 1 left out (answer longer than "
                           "the model's context of 16 tokens), 1 cut from the left of the prompt")
    code, out, err = call(capsys, eval_main, run, write_jsonl(tmp_path / "fit.jsonl",
                                                              records[:3]))
    assert code == 0 and err == "", err


def test_lora_on_records(tmp_path, chat_file, capsys):
    base = tmp_path / "base"
    code, _, err = call(capsys, train_main, chat_file, "--checkpoint-dir", base, *SMALL,
                        "--max-steps", "2", "--threads", "2")
    assert code == 0, err
    code, _, err = call(capsys, train_main, chat_file, "--checkpoint-dir", tmp_path / "lora",
                        "--init-from", base / "final_model.cllm", "--lora-rank", "2",
                        "--max-steps", "2", "--threads", "2", "--quiet",
                        "--micro-batch", "4", "--batch-size", "16", "--dropout", "0")
    assert code == 0, err
    assert (tmp_path / "lora" / "final_model.cllm").exists()


@pytest.mark.parametrize("line, fragment", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "a record is a JSON object, got a list"),
    ('{"prompt": "a"}', '"completion" must be a string, got missing'),
    ('{"prompt": "a", "completion": 3}', '"completion" must be a string, got a number'),
    ('{"prompt": "a", "completion": "b", "extra": 1}', 'a prompt-completion record has no field '
                                                      '"extra"'),
    ('{"instruction": "a", "output": "b", "x": 1}', 'an Alpaca record has no field "x"'),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}',
     '"content" must be a string'),
    ('{"instruction": "a"}', '"output" must be a string'),
    ('{"text": "a"}', "not a record"),
    # half of a UTF-16 pair, as a text cut inside an emoji escapes it: no character at all
    ('{"prompt": "a \\ud83d", "completion": "b"}', "\\ud83d is half of a UTF-16 surrogate pair"),
])
def test_malformed_record_is_one_line_naming_file_and_line(tmp_path, capsys, line, fragment):
    good = json.dumps(reverse_records(1, seed=0)[0])
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
    code, _, err = call(capsys, train_main, data, "--checkpoint-dir", tmp_path / "run", *SMALL,
                        "--max-steps", "1")
    assert_one_error_line(code, err, "train_model", f"{data}:4:", fragment)
    code, _, err = call(capsys, eval_main, tmp_path / "missing.cllm", data)
    assert code == 2 and "Traceback" not in err


def test_a_json_array_saved_as_jsonl_says_one_object_per_line(tmp_path, capsys):
    data = tmp_path / "array.jsonl"
    data.write_text(json.dumps(reverse_records(2, seed=0), indent=2), encoding="utf-8")
    code, _, err = call(capsys, train_main, data, "--checkpoint-dir", tmp_path / "run", *SMALL)
    assert_one_error_line(code, err, "train_model", f"{data}:1:", "one JSON object per line")


def test_a_byte_order_mark_before_the_first_record_is_not_part_of_it(tmp_path):
    """A file saved with a UTF-8 byte order mark (as Windows editors write it) holds the
    same records as without it."""
    plain = write_jsonl(tmp_path / "plain.jsonl", reverse_records(3, seed=6))
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    template = ChatTemplate.default
    assert read_records([marked], template)[0][0].pieces == \
        read_records([plain], template)[0][0].pieces


def test_no_usable_record_and_mixed_data_are_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "long.jsonl",
                       [{"prompt": "a", "completion": " b" * 40}] * 3)
    code, _, err = call(capsys, train_main, data, "--checkpoint-dir", tmp_path / "run", *SMALL)
    assert_one_error_line(code, err, "train_model", "no usable records", "3 refused")
    text = tmp_path / "notes.txt"
    text.write_text("a b c\n", encoding="utf-8")
    code, _, err = call(capsys, train_main, data, text, "--checkpoint-dir", tmp_path / "r2",
                        *SMALL)
    assert_one_error_line(code, err, "train_model", "mixes .jsonl")


def test_a_records_file_named_in_capitals_is_records(tmp_path):
    """PC.JSONL holds records as pc.jsonl does: never trained on as plain text."""
    rows = [{"prompt": "a", "completion": " b"}]
    upper = write_jsonl(tmp_path / "PC.JSONL", rows)
    assert is_instruction_data([upper])
    assert read_records([upper], ChatTemplate.default)[0][0].pieces == \
        read_records([write_jsonl(tmp_path / "pc.jsonl", rows)], ChatTemplate.default)[0][0].pieces


def test_alpaca_prompt_is_the_documented_template(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    records, _ = read_records([data], ChatTemplate.default)
    assert records[0].pieces == [(ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."), False),
                                 ("hi", True)]
    with open(os.path.join(ROOT, "docs", "fine-tuning.md"), encoding="utf-8") as f:
        docs = f.read()
    assert ALPACA_PROMPT_NO_INPUT.split("\n")[0] in docs


def test_messages_need_the_chat_extra(tmp_path):
    data = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    program = ("import sys; sys.modules['jinja2'] = None; "
               "from cllm_cli.cli.train import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", program, str(data), "--checkpoint-dir",
                           str(tmp_path / "run"), *SMALL], cwd=ROOT, capture_output=True,
                          text=True)
    assert_one_error_line(done.returncode, done.stderr, "train_model", "jinja2",
                          "cllm[chat]")


def test_export_carries_the_runs_chat_template(tmp_path, chat_file, capsys):
    """transformers reads the exported tokenizer_config.json's chat_template and renders a
    conversation as the run does."""
    from transformers import AutoTokenizer

    from cllm_cli.cli.export import main as export_main
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}", encoding="utf-8")
    run = tmp_path / "run"
    code, _, err = call(capsys, train_main, chat_file, "--checkpoint-dir", run, *SMALL,
                        "--max-steps", "1", "--chat-template", template)
    assert code == 0, err
    code, _, err = call(capsys, export_main, run, tmp_path / "hf")
    assert code == 0, err
    messages = [{"role": "user", "content": "reverse a b ="}]
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = ChatTemplate.of(run / "chat_template.jinja")
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.render(messages, add_generation_prompt=True) == "[user] reverse a b =\n[assistant]"
