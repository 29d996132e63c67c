"""The options every tool shares: --threads bounded alike (1 to MAX_THREADS, one line and
status 2 beyond, never an OverflowError) and a warning above the usable cores, the integer
options that reach the engine bounded by a C int, and --version."""
import json
import os
import pty
import re
import subprocess
import sys

import pytest
from helpers import assert_one_error_line, call, read_terminal, sentences, write

from cllm_cli.cli import chat, evaluate, export, inference, plot, tokenize, train
from cllm_cli.threads import MAX_THREADS

TOOLS = {"train_model": train, "cllm_inference": inference, "cllm_eval": evaluate,
         "cllm_export": export, "cllm_tokenize": tokenize, "cllm_plot": plot, "cllm_chat": chat}
TINY = ["--tokenizer", "word", "--vocab-size", "200", "--embed-dim", "16", "--num-layers", "1",
        "--num-heads", "2", "--seq-len", "16", "--batch-size", "4", "--max-steps", "1",
        "--warmup-steps", "0", "--eval-interval", "0", "--threads", "1", "--quiet"]
CORES = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(corpus, a finished one-step word-level run, a HellaSwag file of two items)."""
    base = tmp_path_factory.mktemp("options")
    corpus = write(base / "corpus.txt", sentences(200, 8, ".!?"))
    assert train.main([str(corpus), *TINY, "--checkpoint-dir", str(base / "ck")]) == 0
    items = "".join(json.dumps({"ctx": "the old king", "endings": ["walked home", "sang"],
                                "label": 0}) + "\n" for _ in range(2))
    return corpus, base / "ck", write(base / "hellaswag.jsonl", items)


def commands(run, new_run):
    """Each tool that has --threads: (main, argv without --threads); train_model writes
    into `new_run`."""
    corpus, ck, items = run
    return {"train_model": (train.main, [corpus, *TINY[:-3], "--quiet", "--checkpoint-dir",
                                         new_run]),
            "cllm_inference": (inference.main, [ck, "--prompt", "the", "--max-tokens", "2"]),
            "cllm_eval": (evaluate.main, [ck, corpus]),
            "cllm_eval --task": (evaluate.main, [ck, "--task", "hellaswag", items])}


@pytest.mark.parametrize("value", ["0", str(MAX_THREADS + 1), "2147483647", "3000000000",
                                   "99999999999"])
@pytest.mark.parametrize("tool", ["train_model", "cllm_inference", "cllm_eval",
                                  "cllm_eval --task"])
def test_threads_out_of_range_is_one_line(run, tmp_path, capsys, tool, value):
    main, argv = commands(run, tmp_path / "new")[tool]
    code, out, err = call(capsys, main, *argv, "--threads", value)
    assert_one_error_line(code, err, tool.split()[0], "--threads",
                          f"must be an integer from 1 to {MAX_THREADS}, got {value}")
    assert out == "" and not (tmp_path / "new").exists()


@pytest.mark.parametrize("tool", ["train_model", "cllm_inference", "cllm_eval",
                                  "cllm_eval --task"])
def test_threads_above_the_cores_warn_once(run, tmp_path, capsys, tool):
    main, argv = commands(run, tmp_path / "first")[tool]
    code, out, err = call(capsys, main, *argv, "--threads", CORES + 1)
    assert code == 0, err
    prog = tool.split()[0]
    warnings = [line for line in err.splitlines() if line.startswith(f"{prog}: warning: ")]
    assert warnings == [f"{prog}: warning: --threads {CORES + 1} is more than the {CORES} "
                        f"core{'' if CORES == 1 else 's'} this process may run on: the threads "
                        f"take turns, which is slower (the results are the same)"], err
    main, argv = commands(run, tmp_path / "second")[tool]
    code, _, err = call(capsys, main, *argv, "--threads", CORES)
    assert code == 0 and "--threads" not in err, err


@pytest.mark.parametrize("option, value, bound", [
    ("--max-tokens", "0", "from 1 to 2147483647"),
    ("--max-tokens", "3000000000", "from 1 to 2147483647"),
    ("--top-k", "-1", "from 0 to 2147483647"),
    ("--top-k", "99999999999", "from 0 to 2147483647"),
    ("--seed", "-3", "at least 0"),
])
def test_integer_options_of_inference_are_bounded(run, capsys, option, value, bound):
    _, ck, _ = run
    code, out, err = call(capsys, inference.main, ck, option, value)
    assert_one_error_line(code, err, "cllm_inference", option, f"must be an integer {bound}")
    assert out == ""


@pytest.mark.parametrize("prog", sorted(TOOLS))
def test_version(prog, capsys):
    from importlib.metadata import version
    code, out, err = call(capsys, TOOLS[prog].main, "--version")
    assert code == 0 and err == ""
    assert out == f"{prog} {version('cllm')}\n"


def test_export_force_replaces_only_the_kind_the_format_writes(run, tmp_path, capsys):
    corpus, ck, _ = run
    afile = write(tmp_path / "model-out", "a file of mine\n")
    adir = tmp_path / "dir.gguf"
    write(adir / "keep.txt", "mine\n")
    for out, fmt in ((afile, "hf"), (afile, "peft"), (adir, "gguf")):
        code, stdout, err = call(capsys, export.main, ck, out, "--format", fmt, "--force")
        found, written = ("a directory", "a file") if fmt == "gguf" else ("a file", "a directory")
        assert_one_error_line(code, err, "cllm_export", f"{out} is {found}",
                              f"--force replaces only {written}")
        assert stdout == ""
    assert afile.read_text() == "a file of mine\n" and os.listdir(adir) == ["keep.txt"]
    help_text = " ".join(export.build_parser().format_help().split())
    assert "A file is never replaced by a directory, nor a directory by a file" in help_text

    bpe = tmp_path / "bpe"
    assert train.main([str(corpus), *TINY[2:], "--vocab-size", "300", "--checkpoint-dir",
                       str(bpe)]) == 0
    gguf_file = write(tmp_path / "model.gguf", "an old export\n")
    code, _, err = call(capsys, export.main, bpe, gguf_file, "--force")
    assert code == 0, err
    assert gguf_file.read_bytes()[:4] == b"GGUF"


def test_a_count_of_one_is_singular(run, tmp_path, capsys):
    corpus, ck, items = run
    one = write(tmp_path / "one.jsonl", items.read_text().splitlines()[0] + "\n")
    code, out, err = call(capsys, evaluate.main, ck, "--task", "hellaswag", one)
    assert code == 0, err
    assert out.startswith("hellaswag: 1 item in "), out
    code, out, err = call(capsys, evaluate.main, ck, corpus)
    assert code == 0 and out.splitlines()[1].startswith("1 file "), out
    code, out, err = call(capsys, train.main, corpus, *TINY[:-1], "--warmup-steps", "5",
                          "--checkpoint-dir", tmp_path / "new")
    assert code == 0, err
    assert "covers the whole run of 1 step: " in err, err
    assert "corpus: 1 file, " in out and " 1 step of 4 x 16 tokens, 1 sphere, " in out, out


def test_item_progress_counts_in_the_singular_too():
    from cllm_cli.progress import ItemProgress

    class Screen:
        text = ""

        def isatty(self):
            return True

        def write(self, text):
            self.text += text

        def flush(self):
            pass

    screen = Screen()
    with ItemProgress("evaluating", 1, screen, unit="window") as progress:
        progress.REFRESH = 0.0
        progress.add(1)
        progress.done()
    assert "\revaluating: 1 of 1 window, " in screen.text, screen.text
    assert "\revaluating: 1 window in 0:00, " in screen.text, screen.text


def option_lines(parser):
    """{option: its rendered --help entry, white space collapsed} of every optional action."""
    formatter = parser._get_formatter()
    return {action.option_strings[-1]: " ".join(formatter._format_action(action).split())
            for action in parser._actions if action.option_strings}


@pytest.mark.parametrize("prog", sorted(TOOLS))
def test_every_option_has_help_and_shows_its_default(prog):
    parser = TOOLS[prog].build_parser()
    for action in parser._actions:
        said = re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
        assert said, f"{prog}: {action.option_strings or action.dest} has no help text"
    required = {a.option_strings[-1] for a in parser._actions if a.option_strings and a.required}
    missing = [option for option, line in option_lines(parser).items()
               if option not in ("--help", "--version", *required)
               and not any(word in line for word in ("(default: ", "Default: "))]
    assert not missing, f"{prog} --help shows no default for {', '.join(missing)}"
    assert "(default: None)" not in parser.format_help()
    assert "(default: False)" not in parser.format_help()


# cllm_eval with a progress line drawn at every batch: the text is evaluated in well under the
# 0.2 s between two redraws
EVAL_SCRIPT = """
import sys
from cllm_cli.progress import ByteProgress
ByteProgress.REFRESH = 0.0
from cllm_cli.cli.evaluate import main
sys.exit(main(sys.argv[1:]))
"""


def eval_stderr_on_a_terminal(argv):
    """(status, everything cllm_eval wrote to its stderr, a pseudo-terminal)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", EVAL_SCRIPT, *map(str, argv)],
                                stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        shown = read_terminal(master)
        return proc.wait(), shown
    finally:
        os.close(master)


def test_cllm_eval_shows_a_progress_line_on_a_terminal_only(run):
    corpus, ck, _ = run
    status, shown = eval_stderr_on_a_terminal([ck, corpus, "--threads", "1"])
    assert status == 0, shown
    assert "\revaluating: 4 of " in shown and " windows, " in shown and "ETA" in shown, shown
    last = shown.replace("\r\n", "\n").rstrip("\n").rsplit("\r", 1)[-1]
    assert last.startswith("evaluating: ") and " windows in 0:0" in last, shown
    piped = subprocess.run([sys.executable, "-c", EVAL_SCRIPT, str(ck), str(corpus),
                            "--threads", "1"], capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr


def test_evaluation_in_batches_is_the_engines_sum_to_the_bit(run):
    from cllm_cli import _engine
    from cllm_cli.api import load_model
    from cllm_cli.corpus import eval_windows
    from cllm_cli.evaluation import evaluate_stream, text_stream
    corpus, ck, _ = run
    model, tokenizer, _ = load_model(ck)
    stream, _ = text_stream(tokenizer, [corpus], "strict")
    windows = eval_windows(stream, model.config.seq_len)
    assert len(windows) > 3 * 4, "several batches of 4 windows"
    with _engine.Engine(model.config, model.flat, 2, 2, 4, pad_id=tokenizer.pad_id) as engine:
        whole = engine.evaluate(windows)
    loss_sum, counted, n = evaluate_stream(model, stream, 2, 4, 2, tokenizer.pad_id)
    assert (loss_sum, counted, n) == (*whole, len(windows))
