"""The one flat parameter buffer and its named tensors.

Parameters, gradients and AdamW's m and v are each one contiguous float32 buffer laid out as
the engine's parameter_layout(cfg): (name, shape, offset) per tensor, in the order of the model
(for GPT-2: wte, wpe, then per block ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj, and ln_f). Every module that needs a tensor of such a buffer takes it from
named_views.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from numpy.typing import DTypeLike, NDArray

from cllm_cli._engine import num_parameters, parameter_layout
from cllm_cli.model.config import CLLMConfig
from cllm_cli.model.family import family_of


def named_views(cfg: CLLMConfig, flat: np.ndarray, what: str = "the buffer",
                dtype: DTypeLike = None) -> dict[str, np.ndarray]:
    """{name: view of its tensor in `flat`}, in layout order; `flat` must be a 1-D numpy
    array of num_parameters(cfg) elements, of `dtype` when given (ValueError naming `what`
    otherwise)."""
    if not isinstance(flat, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(flat).__name__}")
    if flat.ndim != 1 or (dtype is not None and flat.dtype != dtype):
        raise ValueError(f"{what} must be a flat {np.dtype(dtype or flat.dtype)} array, got {flat.dtype} with shape "
                         f"{flat.shape}")
    total = num_parameters(cfg)
    if flat.size != total:
        raise ValueError(f"{what} has {flat.size} elements, the model config needs {total}")
    return {name: flat[offset:offset + math.prod(shape)].reshape(shape)
            for name, shape, offset in parameter_layout(cfg)}


def tensor_shapes(cfg: CLLMConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor, in layout order."""
    return {name: tuple(shape) for name, shape, _ in parameter_layout(cfg)}


def shorten_positions(config: CLLMConfig, flat: NDArray[np.float32],
                      seq_len: int) -> tuple[CLLMConfig, NDArray[np.float32]]:
    """(config, flat) of the same model with a position table of seq_len rows (its first
    ones): exact for every context of at most seq_len tokens."""
    short = dataclasses.replace(config, seq_len=seq_len)
    out = np.empty(num_parameters(short), dtype=np.float32)
    src, dst = named_views(config, flat), named_views(short, out)
    positions = family_of(config).position_table
    for name, view in dst.items():
        view[...] = src[name][:seq_len] if name == positions else src[name]
    return short, out
