"""CLLMModel: the parameters in one flat float32 buffer, with named views; initialisation,
loss and gradients, logits, generation, loading and saving."""
import math

import numpy as np

from cllm_cli._engine import Decoder, forward_logits, loss_and_grads, num_parameters
from cllm_cli.formats import checkpoint_params, load_checkpoint, save_checkpoint
from cllm_cli.model import CLLMConfig, named_views
from cllm_cli.model.sampling import sample_from_logits


class CLLMModel:
    """A CLLM model. `params` maps each tensor's name (layout.py) to a numpy view into `flat`."""

    def __init__(self, config, seed=0):
        if not isinstance(config, CLLMConfig):
            raise TypeError("config must be a CLLMConfig")
        self.config = config
        self.flat = np.zeros(num_parameters(config), dtype=np.float32)
        self.params = named_views(config, self.flat)
        rng = np.random.default_rng(seed)
        proj_std = 0.02 / math.sqrt(2 * config.num_layers)
        for name, view in self.params.items():
            if view.ndim == 2:   # weights N(0, 0.02); both c_proj weights N(0, 0.02/sqrt(2L))
                std = proj_std if name.endswith("c_proj.weight") else 0.02
                view[...] = rng.standard_normal(view.shape, dtype=np.float32) * np.float32(std)
            elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                view[...] = 1.0
        self.meta = {}

    @classmethod
    def from_flat(cls, config, flat, meta=None):
        model = cls.__new__(cls)
        model.config = config
        model.flat = np.ascontiguousarray(flat, dtype=np.float32)
        model.params = named_views(config, model.flat)
        model.meta = dict(meta or {})
        return model

    @classmethod
    def load(cls, path):
        """Loads the parameters of a .cllm checkpoint (CheckpointError when it is bad); a LoRA
        checkpoint's adapters are merged into its base."""
        ckpt = load_checkpoint(path)
        return cls.from_flat(ckpt["config"], checkpoint_params(ckpt, path), ckpt["meta"])

    def save(self, path, meta=None):
        """Writes the parameters (no optimiser state) as a .cllm file, atomically."""
        save_checkpoint(path, self.config, self.flat, None, None, dict(meta or self.meta))

    def num_params(self):
        return self.flat.size

    def _tokens(self, array, name):
        a = np.asarray(array)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] < 1:
            raise ValueError(f"{name} must have shape [B, n] with n >= 1")
        if a.shape[1] > self.config.seq_len:
            raise ValueError(f"{name}: sequence length {a.shape[1]} exceeds seq_len {self.config.seq_len}")
        if a.size and (a.min() < 0 or a.max() >= self.config.vocab_size):
            raise ValueError(f"{name} hold ids outside [0, {self.config.vocab_size})")
        return np.ascontiguousarray(a, dtype=np.int32)

    def loss_and_grads(self, inputs, targets, pad_id=None):
        """Mean loss over the counted targets and its gradient for every parameter.

        pad_id: the id whose targets are left out (the tokenizer's pad_id; -1 or None: every
        target counts; no id is assumed to be a pad, GPT-2's id 0 is "!").
        Returns (loss, {name: gradient}); with no counted target the loss is 0 and so are the
        gradients."""
        inputs, targets = self._tokens(inputs, "inputs"), self._tokens(targets, "targets")
        if inputs.shape != targets.shape:
            raise ValueError("inputs and targets must have the same shape")
        grads = np.empty_like(self.flat)     # the engine writes every element
        loss_sum, counted = loss_and_grads(self.config, self.flat,
                                                   inputs, targets, grads,
                                                   pad_id=-1 if pad_id is None else int(pad_id))
        if counted:
            grads /= np.float32(counted)
            loss_sum /= counted
        return loss_sum, named_views(self.config, grads)

    def logits(self, inputs):
        """Logits [B, n, V] of every position."""
        inputs = self._tokens(inputs, "inputs")
        out = np.empty(inputs.shape + (self.config.vocab_size,), dtype=np.float32)
        forward_logits(self.config, self.flat, inputs, out)
        return out

    def generate(self, prompt_ids, max_tokens=50, temperature=1.0, top_k=0, top_p=1.0,
                 seed=0, stop_ids=(), start_id=None, threads=1, num_tokens=None,
                 precision="fp32"):
        """Yields sampled token ids one at a time. The context is the last seq_len ids.

        temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters. An empty
        prompt starts after start_id: the tokenizer's end-of-text (or begin-of-text) id.
        threads: how many threads share each position's work; the ids do not depend on it.
        num_tokens (the tokenizer's size, when the model's vocabulary is padded beyond it):
        no id >= num_tokens is ever yielded (their logits count as -inf).
        precision: "fp32", or "bf16" (the weights' bf16 copy, bf16-rounded product inputs,
        fp32 sums; load it first with model.precision.require("bf16")).

        The prompt runs as one batched pass that fills a key/value cache (Decoder),
        then each new token runs the model on its position only. Once the context no longer
        fits in seq_len, the window slides: every position moves, so no cached key or value is
        valid any more, and each token runs the whole window again as one batched pass."""
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        ids = [int(i) for i in prompt_ids]
        if not ids:
            if start_id is None:
                raise ValueError("an empty prompt needs start_id (the tokenizer's "
                                 "end-of-text id)")
            ids = [int(start_id)]
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"prompt ids must be in [0, {self.config.vocab_size})")
        rng = np.random.default_rng(seed)
        T = self.config.seq_len
        decoder = Decoder(self.config, self.flat, threads, precision)
        for _ in range(max_tokens):
            if len(ids) > T:
                decoder.reset()
                row = decoder.prefill(ids[-T:])
            elif decoder.length == len(ids) - 1 and decoder.length:
                row = decoder.feed(ids[-1])
            else:
                row = decoder.prefill(ids[decoder.length:])
            next_id = sample_from_logits(row.astype(np.float64), temperature, top_k, top_p, rng,
                                         num_tokens)
            ids.append(next_id)
            yield next_id
            if next_id in stop_ids:
                return
