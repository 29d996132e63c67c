"""One token id from a row of logits: temperature, top-k and nucleus (top-p) filtering.

Every accepted option gives an id, whatever the logits hold:

- Finite logits whose scaled values (logits / temperature) are finite take the ordinary path;
  its ids are those of every earlier version for the same generator state.
- Otherwise (a temperature so small that logits / temperature overflows, or non-finite
  logits) the distribution is computed from (logit - max) / temperature, which cannot
  overflow: as the temperature goes to 0 it becomes greedy, shared between exact ties. A NaN
  logit counts as -inf (never chosen); +inf logits share all the probability.
- Temperature 0 is greedy: the first of the highest logits.
- Logits that are all NaN or -inf have no token to choose: SamplingError.
- num_tokens (the tokenizer's size) below the row's length: ids >= num_tokens are never
  chosen, as if their logits were -inf. A model may have more rows than its tokenizer has
  tokens (transformers models pad the vocabulary to a multiple of 64 or 128); those rows
  cannot be decoded. The row is cut to its first num_tokens logits, so that the draw is the
  one of a model without the padding.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cllm_cli.errors import SamplingError


def check_options(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError unless temperature is a finite number >= 0, top_k an int >= 0 and
    0 < top_p <= 1."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_k, numbers.Integral) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_from_logits(logits: ArrayLike, temperature: float, top_k: int, top_p: float,
                       rng: np.random.Generator, num_tokens: int | None = None) -> int:
    """One id from float64 logits with temperature, top-k and nucleus (top-p) filtering,
    drawn with the numpy Generator rng; never an id >= num_tokens (see the module
    docstring)."""
    check_options(temperature, top_k, top_p)
    logits = np.asarray(logits, dtype=np.float64)
    if num_tokens is not None:
        if not 0 < num_tokens:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens!r}")
        logits = logits[:num_tokens]      # the padding rows beyond the tokenizer: -inf
    finite = bool(np.isfinite(logits).all())
    if temperature == 0:
        if finite:
            return int(np.argmax(logits))
        return int(np.argmax(_usable(logits)))
    if finite:
        with np.errstate(over="ignore"):
            scaled = logits / temperature
        if np.isfinite(scaled).all():
            return _draw(scaled, top_k, top_p, rng)
    clean = _usable(logits)
    best = clean.max()
    if best == np.inf:
        shifted = np.where(clean == np.inf, 0.0, -np.inf)
    else:
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            shifted = (clean - best) / temperature    # <= 0, 0 at the maximum
    return _draw(shifted, top_k, top_p, rng)


def _usable(logits: NDArray[np.float64]) -> NDArray[np.float64]:
    """NaN -> -inf; SamplingError when no logit is finite or +inf."""
    clean = np.where(np.isnan(logits), -np.inf, logits)
    if not (clean > -np.inf).any():
        raise SamplingError("the logits hold no finite value (the model's output is NaN or "
                            "-inf everywhere)")
    return clean


def _draw(scaled: NDArray[np.float64], top_k: int, top_p: float,
          rng: np.random.Generator) -> int:
    """Draws from softmax(scaled); scaled holds no NaN and a finite maximum."""
    if top_k and top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < cutoff, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
