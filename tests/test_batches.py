"""Tests of cllm_cli/batches.py: the train/validation split, windows and epochs."""
import numpy as np
import pytest
from helpers import write

from cllm_cli.corpus import batches as B
from cllm_cli.corpus.dataset import prepare_dataset
from cllm_cli.errors import DataError

# ---------------------------------------------------------------------------------------
# Split, windows, epochs
# ---------------------------------------------------------------------------------------

def test_split_stream_views():
    tokens = np.arange(100, dtype=np.uint16)
    train, val = B.split_stream(tokens, 0.05)
    assert len(train) == 95 and len(val) == 5
    assert val.tolist() == [95, 96, 97, 98, 99]
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)
    train, val = B.split_stream(tokens, 0.0)
    assert len(train) == 100 and len(val) == 0
    train, val = B.split_stream(np.arange(10), 0.05)       # int(0.5) == 0
    assert len(val) == 0
    with pytest.raises(DataError):
        B.split_stream(tokens, 1.0)


def test_num_windows():
    assert B.num_windows(0, 4) == 0
    assert B.num_windows(4, 4) == 0          # needs T+1 tokens
    assert B.num_windows(5, 4) == 1
    assert B.num_windows(8, 4) == 1
    assert B.num_windows(9, 4) == 2
    assert B.num_windows(1001, 10) == 100


def test_gather_windows():
    tokens = np.arange(3, 3 + 23, dtype=np.uint16)           # 23 tokens, T=5 -> 4 windows
    T = 5
    assert B.num_windows(len(tokens), T) == 4
    w = B.gather_windows(tokens, np.array([2, 0, 3]), T)
    assert w.dtype == np.int32 and w.shape == (3, T + 1)
    for row, i in zip(w, [2, 0, 3]):
        assert row.tolist() == tokens[i * T:i * T + T + 1].tolist()
    assert B.gather_windows(tokens, np.array([], dtype=np.int64), T).shape == (0, T + 1)
    with pytest.raises(IndexError):
        B.gather_windows(tokens, [4], T)
    with pytest.raises(IndexError):
        B.gather_windows(tokens, [-1], T)


def test_epoch_order_deterministic_and_complete():
    a = B.epoch_order(7, 0, 50)
    assert a.dtype == np.int64
    assert np.array_equal(a, B.epoch_order(7, 0, 50))
    assert np.array_equal(a, np.random.default_rng([7, 0]).permutation(50))
    assert not np.array_equal(a, B.epoch_order(7, 1, 50))
    assert not np.array_equal(a, B.epoch_order(8, 0, 50))
    for epoch in range(3):
        order = B.epoch_order(7, epoch, 50)
        assert sorted(order.tolist()) == list(range(50))      # every window once
    assert B.epoch_order(1, 0, 0).shape == (0,)


def test_epoch_visits_every_training_token_pair_once():
    tokens = np.arange(1000, dtype=np.uint32)
    train, _ = B.split_stream(tokens, 0.1)
    T = 16
    n = B.num_windows(len(train), T)
    windows = B.gather_windows(train, B.epoch_order(3, 0, n), T)
    starts = windows[:, 0]
    assert sorted(starts.tolist()) == [i * T for i in range(n)]
    targets = np.sort(windows[:, 1:].reshape(-1))
    assert np.array_equal(targets, np.arange(1, n * T + 1))   # each target exactly once


def test_eval_windows():
    T = 4
    full = B.eval_windows(np.arange(14, dtype=np.uint16), T)  # 3 windows of 5, 1 left over
    assert full.dtype == np.int32 and full.shape == (3, T + 1)
    assert full.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]]
    exact = B.eval_windows(np.arange(5), T)
    assert exact.tolist() == [[0, 1, 2, 3, 4]]
    short = B.eval_windows(np.arange(3, dtype=np.uint16), T)
    assert short.dtype == np.int32 and short.tolist() == [[0, 1, 2]]
    assert B.eval_windows(np.arange(2), T).tolist() == [[0, 1]]
    for n in (0, 1):
        empty = B.eval_windows(np.arange(n), T)
        assert empty.shape == (0, 2) and empty.dtype == np.int32


def test_windows_from_memmap(tmp_path):
    files = [write(tmp_path / "a.txt", "The cat sat on the mat. The cat ran!"),
             write(tmp_path / "b.txt", "A dog sat; the dog didn't run.")]
    tok, tokens, _ = prepare_dataset(files, tmp_path / "ck", vocab_size=100)
    train, val = B.split_stream(tokens, 0.25)
    T = 3
    n = B.num_windows(len(train), T)
    w = B.gather_windows(train, np.arange(n), T)
    assert w.dtype == np.int32
    assert w[:, 0].tolist() == np.asarray(train)[0:n * T:T].astype(np.int32).tolist()
    assert len(val) == int(len(tokens) * 0.25) >= T + 1
    ev = B.eval_windows(val, T)
    assert ev.shape == (B.num_windows(len(val), T), T + 1)
    assert ev[0].tolist() == np.asarray(val[:T + 1]).tolist()
