"""GPT-2's names for our parameters, shared by the transformers export and import.

Our model is GPT-2's architecture with the same parameter names, so converting is a renaming:
our `wte`, `h.{l}.attn.c_attn.weight`, ... are GPT-2's `transformer.wte.weight`,
`transformer.h.{l}.attn.c_attn.weight`, ..., except that GPT-2's Conv1D layers store their
weight as [in, out], the transpose of our [out, in]. The output projection is tied to `wte`.
"""

from __future__ import annotations

LAYER_NORM_EPS = 1e-5       # the engine's layer-norm epsilon; GPT-2's default too
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_name(name: str) -> str:
    """transformers' GPT2LMHeadModel name of our parameter `name`."""
    return "transformer." + name + ("" if name.startswith(("h.", "ln_f.")) else ".weight")


def is_conv1d(name: str) -> bool:
    """Whether GPT-2 stores our parameter `name` transposed (a Conv1D weight)."""
    return name.endswith(CONV1D)
