"""The Python API's model: CLLMModel, the parameters in one flat float32 buffer with named
views; initialisation, loss and gradients, logits and generation (through the model core,
cllm_cli.model), loading and saving (through cllm_cli.formats); and load_model, a model and
its tokenizer from whatever a user names (a .cllm file, a run directory, a transformers
directory), as every command reads one."""
from __future__ import annotations

import numbers
import os
from typing import Any, Container, Iterable, Iterator, Mapping, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cllm_cli._engine import forward_logits, loss_and_grads, num_parameters
from cllm_cli.formats import checkpoint_params, load_checkpoint, load_model_files, save_checkpoint
from cllm_cli.model import CLLMConfig, family_of, named_views
from cllm_cli.model.generation import generate_ids
from cllm_cli.model.precision import require as require_precision
from cllm_cli.tokenizers import Tokenizer


class CLLMModel:
    """A CLLM model. `params` maps each tensor's name (model/layout.py) to a numpy view into
    `flat`."""

    def __init__(self, config: CLLMConfig, seed: int = 0) -> None:
        if not isinstance(config, CLLMConfig):
            raise TypeError("config must be a CLLMConfig")
        self.config = config
        self.flat = np.zeros(num_parameters(config), dtype=np.float32)
        self.params = named_views(config, self.flat)
        family_of(config).init_parameters(config, self.params, np.random.default_rng(seed))
        self.meta: dict[str, Any] = {}

    @classmethod
    def from_flat(cls, config: CLLMConfig, flat: ArrayLike,
                  meta: Mapping[str, Any] | None = None) -> CLLMModel:
        model = cls.__new__(cls)
        model.config = config
        model.flat = np.ascontiguousarray(flat, dtype=np.float32)
        model.params = named_views(config, model.flat)
        model.meta = dict(meta or {})
        return model

    @classmethod
    def load(cls, path: str | os.PathLike) -> CLLMModel:
        """Loads the parameters of a .cllm checkpoint (CheckpointError when it is bad); a LoRA
        checkpoint's adapters are merged into its base."""
        ckpt = load_checkpoint(path)
        return cls.from_flat(ckpt.config, checkpoint_params(ckpt, path), ckpt.meta)

    def save(self, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> None:
        """Writes the parameters (no optimiser state) as a .cllm file, atomically."""
        save_checkpoint(path, self.config, self.flat, None, None, dict(meta or self.meta))

    def num_params(self) -> int:
        return self.flat.size

    def _tokens(self, array: ArrayLike, name: str, labels: bool = False) -> NDArray[np.int32]:
        """`array` as int32 [B, n] ids (with `labels`, a negative value is allowed too: a
        target that is not counted)."""
        a = np.asarray(array)
        if a.size and a.dtype.kind not in "iu":     # a float id would be cut to an integer silently
            raise TypeError(f"{name} must be integer token ids, not {a.dtype}")
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError(f"{name} must have shape [B, n] with B >= 1 and n >= 1")
        if a.shape[1] > self.config.seq_len:
            raise ValueError(f"{name}: sequence length {a.shape[1]} exceeds seq_len {self.config.seq_len}")
        if a.size and ((a.min() < 0 and not labels) or a.max() >= self.config.vocab_size):
            raise ValueError(f"{name} hold ids outside [0, {self.config.vocab_size})")
        if labels and a.dtype.kind == "i":
            a = np.maximum(a, -1)     # so that a target below int32's range stays negative
        return np.ascontiguousarray(a, dtype=np.int32)

    def loss_and_grads(self, inputs: ArrayLike, targets: ArrayLike,
                       pad_id: int | None = None) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss over the counted targets and its gradient for every parameter.

        pad_id: the id whose targets are left out (the tokenizer's pad_id; -1 or None: every
        target counts; no id is assumed to be a pad, GPT-2's id 0 is "!"). A negative target
        is never counted (as PyTorch's ignore_index).
        Returns (loss, {name: gradient}); with no counted target the loss is 0 and so are the
        gradients."""
        input_ids, target_ids = self._tokens(inputs, "inputs"), self._tokens(targets, "targets", labels=True)
        if input_ids.shape != target_ids.shape:
            raise ValueError("inputs and targets must have the same shape")
        if pad_id is None:
            pad_id = -1
        elif (isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral)
                or not -1 <= pad_id < self.config.vocab_size):     # 2.5 would be cut to 2
            raise ValueError(f"pad_id must be an id in [0, {self.config.vocab_size}), or -1 "
                             f"or None for none, not {pad_id!r}")
        grads = np.empty_like(self.flat)     # the engine writes every element
        loss_sum, counted = loss_and_grads(self.config, self.flat,
                                                   input_ids, target_ids, grads,
                                                   pad_id=int(pad_id))
        if counted:
            grads /= np.float32(counted)
            loss_sum /= counted
        return loss_sum, named_views(self.config, grads)

    def logits(self, inputs: ArrayLike) -> NDArray[np.float32]:
        """Logits [B, n, V] of every position."""
        ids = self._tokens(inputs, "inputs")
        out = np.empty(ids.shape + (self.config.vocab_size,), dtype=np.float32)
        forward_logits(self.config, self.flat, ids, out)
        return out

    def generate(self, prompt_ids: Iterable[int], max_tokens: int = 50, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: Container[int] = (), start_id: int | None = None, threads: int = 1,
                 num_tokens: int | None = None, precision: str = "fp32") -> Iterator[int]:
        """Yields sampled token ids one at a time. The context is the last seq_len ids.

        temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters. An empty
        prompt starts after start_id: the tokenizer's end-of-text (or begin-of-text) id.
        threads: how many threads share each position's work; the ids do not depend on it.
        num_tokens (the tokenizer's size, when the model's vocabulary is padded beyond it):
        no id >= num_tokens is ever yielded (their logits count as -inf).
        precision: "fp32", or "bf16" (the weights' bf16 copy, bf16-rounded product inputs,
        fp32 sums; oneDNN, the bf16 extra, is loaded on first use: PrecisionError when the
        CPU or the installation cannot run it).

        The prompt runs as one batched pass that fills a key/value cache (Decoder),
        then each new token runs the model on its position only. Once the context no longer
        fits in seq_len, the window slides: every position moves, so no cached key or value is
        valid any more, and each token runs the whole window again as one batched pass."""
        require_precision(precision)
        return generate_ids(self.config, self.flat, prompt_ids, max_tokens, temperature, top_k,
                            top_p, seed, stop_ids, start_id, threads, num_tokens, precision)


class LoadedModel(NamedTuple):
    """A model as a command reads it: the model, the tokenizer it was trained with, and the
    file that tokenizer came from."""
    model: CLLMModel
    tokenizer: Tokenizer
    tokenizer_path: str | os.PathLike      # a Path, or the one the caller gave


def load_model(checkpoint: str | os.PathLike, vocab_path: str | os.PathLike | None = None) -> LoadedModel:
    """The LoadedModel of a .cllm file, a run directory or a transformers directory, after
    checking that the vocabulary is the model's (formats.load_model_files)."""
    files = load_model_files(checkpoint, vocab_path)
    return LoadedModel(CLLMModel.from_flat(files.config, files.flat, files.meta), files.tokenizer,
                       files.tokenizer_path)
