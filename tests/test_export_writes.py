"""How cllm_export writes OUT, checked on real processes: a directory that appears at OUT while
an export writes it is never replaced (a user's files, a second export running at the same
time), SIGINT, SIGTERM and SIGHUP leave no temporary directory, and a full disk (a small
tmpfs, mounted in a private mount namespace) ends the export, or the tokenizing of a corpus,
with status 1 and nothing partial. An export is stopped with SIGSTOP as soon as its temporary
directory appears, so that what happens meanwhile happens at a known point."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import assert_one_error_line, checkout_env, finish, sentences, write

from cllm_cli import CLLMConfig, CLLMModel
from cllm_cli.tokenizers import BPETokenizer

BIN = os.path.dirname(sys.executable)
EXPORT = os.path.join(BIN, "cllm_export")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a model of some 60 MB (bpe, so that GGUF can take it too), big
    enough that writing it takes a while."""
    directory = tmp_path_factory.mktemp("run")
    tok = BPETokenizer.train([sentences(400, seed=3, punct=".!?")], 300)
    cfg = CLLMConfig(vocab_size=len(tok), embed_dim=384, num_layers=8, num_heads=8, seq_len=64)
    CLLMModel(cfg, seed=1).save(directory / "final_model.cllm",
                                {"tokenizer": "bpe", "vocab_hash": tok.vocab_hash})
    tok.save(directory / "tokenizer.json")
    return directory


def temporaries(parent, name):
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def state(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def stopped_export(run_dir, out, *options):
    """An export of run_dir to out, stopped (SIGSTOP) as soon as its temporary directory
    exists: it has looked at OUT and not yet renamed anything into place."""
    proc = subprocess.Popen([EXPORT, str(run_dir), str(out), *options], env=checkout_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not temporaries(out.parent, out.name):
        pass
    proc.send_signal(signal.SIGSTOP)
    while proc.poll() is None and state(proc.pid) != "T":
        pass
    assert proc.poll() is None, "the export ended before it could be stopped"
    assert [n.endswith(".tmp") for n in temporaries(out.parent, out.name)] == [True]
    return proc


def resume(proc):
    proc.send_signal(signal.SIGCONT)
    out, err = finish(proc)
    return proc.returncode, out, err


def export(run_dir, out, *options):
    p = subprocess.run([EXPORT, str(run_dir), str(out), *options], capture_output=True,
                       text=True, env=checkout_env())
    return p.returncode, p.stdout, p.stderr


def snapshot(directory):
    """{name: (inode, bytes)} of the files in a directory."""
    return {name: (os.stat(directory / name).st_ino, (directory / name).read_bytes())
            for name in sorted(os.listdir(directory))}


# --- a directory that appears at OUT meanwhile ---------------------------------------------

def test_a_directory_appearing_at_out_is_never_replaced(run_dir, tmp_path):
    out = tmp_path / "exported"
    proc = stopped_export(run_dir, out)
    write(out / "notes.txt", "mine")                    # the user's, made meanwhile
    code, stdout, err = resume(proc)
    assert_one_error_line(code, err, "cllm_export", str(out), "appeared")
    assert stdout == ""
    assert snapshot(out) == {"notes.txt": (os.stat(out / "notes.txt").st_ino, b"mine")}
    assert temporaries(tmp_path, "exported") == []


def test_an_empty_directory_appearing_at_out_is_kept_too(run_dir, tmp_path):
    out = tmp_path / "exported"
    proc = stopped_export(run_dir, out, "--force")      # --force: OUT was not there
    out.mkdir()
    code, _, err = resume(proc)
    assert_one_error_line(code, err, "cllm_export", "appeared")
    assert os.listdir(out) == [] and temporaries(tmp_path, "exported") == []


def test_two_exports_to_one_out_at_once(run_dir, tmp_path):
    out = tmp_path / "exported"
    first = stopped_export(run_dir, out)
    code, stdout, err = export(run_dir, out)            # the second one, run to its end
    assert code == 0, err
    assert "wrote a transformers GPT2LMHeadModel directory" in stdout
    second = snapshot(out)
    assert "model.safetensors" in second
    code, _, err = resume(first)
    assert_one_error_line(code, err, "cllm_export", "appeared")
    assert snapshot(out) == second                      # the second export's, untouched
    assert temporaries(tmp_path, "exported") == []


def test_force_replaces_only_the_directory_found_at_the_start(run_dir, tmp_path):
    out = tmp_path / "exported"
    write(out / "old.txt", "an earlier export")
    first = stopped_export(run_dir, out, "--force")
    code, _, err = export(run_dir, out, "--force")      # replaces old.txt's directory
    assert code == 0, err
    second = snapshot(out)
    assert "old.txt" not in second
    code, _, err = resume(first)
    assert_one_error_line(code, err, "cllm_export", "appeared")
    assert snapshot(out) == second
    assert temporaries(tmp_path, "exported") == []

    # OUT removed meanwhile: nothing is left to replace, the export goes in
    proc = stopped_export(run_dir, out, "--force")
    shutil.rmtree(out)
    code, _, err = resume(proc)
    assert code == 0, err
    assert "config.json" in os.listdir(out) and temporaries(tmp_path, "exported") == []

    # with nobody else at work, --force replaces what it found
    write(out / "old.txt", "again")
    code, _, err = resume(stopped_export(run_dir, out, "--force"))
    assert code == 0, err
    assert "old.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert temporaries(tmp_path, "exported") == []


def test_a_file_appearing_at_a_gguf_out_is_never_replaced(run_dir, tmp_path):
    out = tmp_path / "model.gguf"
    proc = stopped_export(run_dir, out)
    out.write_text("mine")
    code, _, err = resume(proc)
    assert_one_error_line(code, err, "cllm_export", str(out), "appeared")
    assert out.read_text() == "mine" and temporaries(tmp_path, "model.gguf") == []


# --- signals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_writing_leaves_nothing(run_dir, tmp_path, signum):
    out = tmp_path / "exported"
    proc = stopped_export(run_dir, out)
    proc.send_signal(signum)                            # delivered when it runs again
    code, stdout, err = resume(proc)
    assert code == 128 + signum, err
    assert err.splitlines() == [f"cllm_export: interrupted by {signal.Signals(signum).name}"]
    assert stdout == ""
    assert os.listdir(tmp_path) == []


# --- a full disk -----------------------------------------------------------------------------

def on_small_tmpfs(tmp_path, size, *command):
    """Runs command with a tmpfs of `size` mounted at tmp_path/mnt, in a mount namespace of its
    own; (status, stderr, the paths left on the tmpfs afterwards)."""
    mnt, left = tmp_path / "mnt", tmp_path / "left.txt"
    mnt.mkdir()
    script = ('mount -t tmpfs -o size="$SIZE" cllm-test "$MNT" || exit 99\n'
              '"$@" >/dev/null; status=$?\n'
              '(cd "$MNT" && find . -mindepth 1 | sort) >"$LEFT"\n'
              'exit $status\n')
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        script, "sh", *map(str, command)], stderr=subprocess.PIPE, text=True,
                       env=checkout_env(MNT=str(mnt), SIZE=size, LEFT=str(left)))
    assert p.returncode != 99, f"could not mount a tmpfs: {p.stderr}"
    return p.returncode, p.stderr, left.read_text().split()


@pytest.mark.parametrize("form", ["hf", "gguf"])
def test_a_full_disk_during_an_export(run_dir, tmp_path, form):
    name = "model.gguf" if form == "gguf" else "exported"
    code, err, left = on_small_tmpfs(tmp_path, "2m", EXPORT, run_dir, tmp_path / "mnt" / name)
    assert_one_error_line(code, err, "cllm_export", name, "No space left on device", status=1)
    assert left == []


@pytest.mark.parametrize("size", ["512k", "1700k"])
def test_a_full_disk_while_writing_the_dataset(tmp_path, size):
    """512k: the provisional ids (4 bytes a token) fill it; 1700k: they fit, dataset.bin does not."""
    corpus = write(tmp_path / "corpus.txt", sentences(40000, seed=2, punct=".!?"))
    run = tmp_path / "mnt" / "run"
    code, err, left = on_small_tmpfs(tmp_path, size, os.path.join(BIN, "train_model"), corpus,
                                     "--checkpoint-dir", run, "--tokenizer", "word",
                                     "--max-steps", "1", "--quiet")
    line = assert_one_error_line(code, err, "train_model", "No space left on device", status=1)
    # premise: the write that failed is the one the size aims at
    assert ("dataset.bin" in line) == (size == "1700k"), line
    # a set-up that fails leaves the directory as it found it (absent): no partial file
    assert left == [], left
