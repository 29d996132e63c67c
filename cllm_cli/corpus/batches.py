"""The token array cut into what the spheres train on. Last stage of the data's path:
files -> tokenizers -> dataset -> batches.

    split_stream    stream -> (train, val) views
    num_windows     how many windows of T+1 tokens a stream holds
    epoch_order     the order an epoch visits the windows in, seeded by (seed, epoch)
    gather_windows  window ids -> int32 rows of T+1 tokens (a global batch)
    eval_windows    every window of the validation stream

Windows start at multiples of T and overlap by one token (the last target of one is the
first input of the next).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cllm_cli.errors import DataError


def split_stream(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last int(len * val_fraction) tokens are held out. Views, no copy."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(len(tokens) * val_fraction)
    cut = len(tokens) - n_val
    return tokens[:cut], tokens[cut:]


def num_windows(n_tokens: int, T: int) -> int:
    """Windows of T+1 tokens starting at 0, T, 2T, ... that fit in n_tokens."""
    return max(0, (n_tokens - 1) // T)


def epoch_order(seed: int, epoch: int, n_windows: int) -> NDArray[np.int64]:
    """The order in which an epoch visits its windows: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows).astype(np.int64)


def gather_windows(tokens: np.ndarray, window_ids: ArrayLike, T: int) -> NDArray[np.int32]:
    """int32 [len(window_ids), T+1]; row r = tokens[w*T : w*T + T + 1] for w = window_ids[r]."""
    ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
    n = num_windows(len(tokens), T)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise IndexError(f"window id out of range 0..{n - 1}")
    index = ids[:, None] * T + np.arange(T + 1, dtype=np.int64)
    return np.asarray(tokens[index], dtype=np.int32)


def eval_windows(tokens: np.ndarray, T: int) -> NDArray[np.int32]:
    """Every window of the validation stream, as int32 rows of T+1 tokens.

    A stream shorter than T+1 tokens (but of at least 2) gives one shorter window of all of
    it; fewer than 2 tokens give an empty [0, 2] array."""
    n = len(tokens)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int32)
    if n < T + 1:
        return np.asarray(tokens, dtype=np.int32).reshape(1, n)
    return gather_windows(tokens, np.arange(num_windows(n, T)), T)


def spread_windows(windows: NDArray[np.int32], tokens: int,
                   per_window: int | None = None) -> NDArray[np.int32]:
    """The validation windows an evaluation of about `tokens` tokens uses: that many windows'
    worth, evenly spread over the split (fixed, so every evaluation sees the same ones); all
    of them for 0 or more tokens than the split holds. per_window: the tokens a window
    stands for (None: its length - 1; labelled windows say T)."""
    per_window = max(1, windows.shape[1] - 1 if per_window is None else per_window)
    wanted = -(-tokens // per_window)
    if tokens == 0 or wanted >= len(windows):
        return windows
    return windows[np.linspace(0, len(windows) - 1, wanted).round().astype(np.int64)]
