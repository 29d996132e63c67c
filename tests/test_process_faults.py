"""Faults of whole processes during set-up: train_model killed outright while worker
processes tokenize, a rank of an MPI job killed while rank 0 tokenizes, a stop signal while
bpe encodes a file without line breaks. Real processes and real signals; every wait polls a
real condition (a /proc entry, a file), pytest-timeout guards the hangs."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import ROOT, WORDS, sentences, write

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
SMALL = ["--embed-dim", "16", "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
         "--batch-size", "4", "--max-steps", "2", "--eval-interval", "0", "--seed", "1"]


def train_command(*argv):
    return [sys.executable, "-m", "cllm_cli.cli.train", *map(str, argv)]


def popen(command):
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def alive(pid):
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid):
    """Pids of the living processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return {}


def wait_until(condition, proc):
    """Polls `condition` until it holds; fails if `proc` ends first."""
    while not (result := condition()):
        assert proc.poll() is None, f"the run ended first:\n{proc.communicate()}"
        time.sleep(0.01)   # a pause between polls of a real condition
    return result


def big_corpus(path, megabytes, seed=3):
    """Many lines of words: `megabytes` MB, written fast (a shuffled paragraph repeated)."""
    paragraph = sentences(2000, seed, ".!?").encode()
    rng = random.Random(seed)
    with open(path, "wb") as f:
        written = 0
        while written < megabytes << 20:
            lines = paragraph.splitlines(keepends=True)
            rng.shuffle(lines)
            data = b"".join(lines)
            f.write(data)
            written += len(data)
    return path


# -- 1. kill -9 during multi-process tokenizing -----------------------------------------------

def test_killed_run_leaves_no_tokenizing_worker_and_no_lock(tmp_path):
    corpus = big_corpus(tmp_path / "big.txt", 48)       # 12 blocks of 4 MiB: 2+ workers
    ck = tmp_path / "ck"
    proc = popen(train_command(corpus, *SMALL, "--tokenizer", "word", "--vocab-size", "200",
                               "--checkpoint-dir", ck, "--threads", "1"))
    workers = []
    try:
        workers = wait_until(lambda: children(proc.pid), proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in workers:                     # the workers die with their parent
            while alive(pid):
                time.sleep(0.01)   # a pause between polls of a real condition
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    # the directory is free: a second run on it is not refused as in use
    small = write(tmp_path / "small.txt", sentences(200, 1, "."))
    second = subprocess.run(train_command(small, *SMALL, "--tokenizer", "word",
                                          "--vocab-size", "200", "--checkpoint-dir", ck,
                                          "--overwrite", "--quiet"),
                            cwd=ROOT, capture_output=True, text=True)
    assert "in use by another run" not in second.stderr, second.stderr
    assert second.returncode == 0, second.stderr


# -- 2. kill -9 of rank 0 while it tokenizes -----------------------------------------------

def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def test_rank_0_killed_while_tokenizing_ends_the_job_and_rank_1_waits_without_spinning(
        tmp_path):
    assert os.path.exists(MPIEXEC), "mpiexec missing: make installs the mpich wheel"
    corpus = big_corpus(tmp_path / "big.txt", 64)
    ck = tmp_path / "ck"
    proc = popen([MPIEXEC, "-n", "2", *train_command(
        corpus, *SMALL, "--tokenizer", "word", "--vocab-size", "200", "--checkpoint-dir", ck,
        "--threads", "1")])

    def ranks():
        """{rank: pid} of the two train_model processes, once rank 0's tokenizing workers
        exist."""
        found = {}
        for pid in descendants(proc.pid):
            rank = environ(pid).get(b"PMI_RANK")
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    is_train = b"cllm_cli.cli.train" in f.read()
            except OSError:
                continue
            if rank is not None and is_train:
                found[int(rank)] = pid
        return found if len(found) == 2 else None

    everyone = []
    try:
        pids = wait_until(ranks, proc)
        workers = wait_until(lambda: children(pids[0]), proc)
        everyone = descendants(proc.pid)
        # rank 1 waits for rank 0 without spinning: while rank 0's workers use 1 s of CPU
        # between them, rank 1 uses a small part of that (a blocking MPI wait used a core)
        hz = os.sysconf("SC_CLK_TCK")
        waiting, working = cpu_ticks(pids[1]), sum(map(cpu_ticks, workers))
        while sum(map(cpu_ticks, workers)) - working < hz:
            assert all(map(alive, workers)), "tokenizing ended too soon"
            time.sleep(0.01)   # a pause between polls of a real condition
        spent = cpu_ticks(pids[1]) - waiting
        assert spent < 0.25 * hz, f"rank 1 used {spent / hz:.2f} s of CPU while waiting"

        os.kill(pids[0], signal.SIGKILL)
        out, err = proc.communicate()           # pytest-timeout guards a hang
        assert proc.returncode != 0, out + err
        assert "Traceback" not in err, err
        for pid in everyone:                    # no process is left
            while alive(pid):
                time.sleep(0.01)   # a pause between polls of a real condition
    finally:
        for pid in everyone + descendants(proc.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# -- 3. bpe on a file without line breaks -----------------------------------------------------

def one_line(path, megabytes, seed=5):
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(100_000)]
    chunk = (" ".join(words) + ", ").encode()
    with open(path, "wb") as f:
        for _ in range((megabytes << 20) // len(chunk) + 1):
            f.write(chunk)
    return path


def test_sigterm_during_bpe_of_one_long_line(tmp_path):
    corpus = one_line(tmp_path / "line.txt", 20)
    ck = tmp_path / "ck"
    proc = popen(train_command(corpus, *SMALL, "--tokenizer", "bpe", "--vocab-size", "300",
                               "--checkpoint-dir", ck, "--threads", "1"))
    try:
        # encoding has begun once the vocabulary is saved next to the growing dataset.bin
        wait_until(lambda: (ck / "tokenizer.json").exists(), proc)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["train_model: interrupted by SIGTERM"], err
    assert not ck.exists()           # the run's directory is gone again, temporary files too


def test_bpe_of_one_long_line_in_bounded_memory(tmp_path):
    """The whole tokenizing of a 20 MB line under a 3 GB address-space limit (the library
    alone needed 12 GB for one call on a 50 MB line)."""
    corpus = one_line(tmp_path / "line.txt", 20)
    script = textwrap.dedent(f"""
        import resource, sys
        from cllm_cli.corpus.dataset import prepare_dataset
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        tok, ids, info = prepare_dataset([{str(corpus)!r}], {str(tmp_path / 'out')!r},
                                         kind="bpe", vocab_size=300)
        print(info["tokens"])
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "RAYON_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) > 1_000_000


@pytest.fixture(scope="module")
def bpe():
    from cllm_cli.tokenizers.bpe import BPETokenizer
    text = sentences(3000, 7, ".!?,;") + "x1 2y 3.5 it's don't we're\t tabs  two  spaces\n"
    return BPETokenizer.train([text], 600)


def test_piecewise_encoding_gives_the_ids_of_one_call(bpe, monkeypatch):
    import cllm_cli.tokenizers.bpe as bpe_module
    rng = random.Random(11)
    marks = [" ", "  ", "\t", ", ", ". ", "'s ", "'t ", "-", "--", "42 ", "3.14", "\n",
             "\n\n", " \n ", "é ", "日本 ", "'", "\r\n", "!?", "_", "x9y "]
    pieces = [rng.choice(WORDS + marks) + rng.choice(["", " ", ""]) for _ in range(60_000)]
    multi = sentences(4000, 9, ".!?")
    long_line = "".join(pieces).replace("\n", " ")
    for text in (multi, long_line, "".join(pieces)):
        whole = np.array(bpe._tk.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        for chunk in (bpe_module.CHUNK_CHARS, 997, 61):
            monkeypatch.setattr(bpe_module, "CHUNK_CHARS", chunk)
            assert len(bpe._pieces(text)) > 1 or chunk == bpe_module.CHUNK_CHARS and \
                len(text) < chunk
            np.testing.assert_array_equal(bpe.encode(text), whole)


def test_blocks_of_a_long_line_give_the_ids_of_one_call(bpe, tmp_path):
    """dataset.bin of a file without line breaks, read in small blocks, holds the ids of
    encoding the file in one call."""
    from cllm_cli.corpus.dataset import prepare_dataset
    rng = random.Random(2)
    text = " ".join(rng.choice(WORDS + ["42", "x9", "it's", "a,b", "é", "--"])
                    for _ in range(40_000))
    path = write(tmp_path / "line.txt", text)
    whole = bpe._tk.encode(text, add_special_tokens=False).ids + [bpe.eos_id]
    _, ids, info = prepare_dataset([path], tmp_path / "out", tokenizer=bpe, block_size=4096)
    np.testing.assert_array_equal(np.asarray(ids), whole)
