"""GPT-2, the first model family: its initialisation, LoRA targets, and the names
transformers, llama.cpp (GGUF) and PEFT give its tensors.

Our tensors (the engine's parameter table, model/layout.py) carry GPT-2's own names: `wte`,
`wpe`, per block `h.{l}.ln_1`, `h.{l}.attn.c_attn`, `h.{l}.attn.c_proj`, `h.{l}.ln_2`,
`h.{l}.mlp.c_fc`, `h.{l}.mlp.c_proj` (each .weight and .bias), and `ln_f`; the output
projection is tied to `wte`.
- transformers (GPT2LMHeadModel): the same names under `transformer.` (the embeddings with
  `.weight`), except that its Conv1D layers store a weight as [in, out], the transpose of our
  [out, in]; files saved from GPT2Model (GPT-2's own) lack the prefix.
- llama.cpp (architecture gpt2): `token_embd`, `position_embd`, `blk.{l}.attn_norm`,
  `blk.{l}.attn_qkv`, `blk.{l}.attn_output`, `blk.{l}.ffn_norm`, `blk.{l}.ffn_up`,
  `blk.{l}.ffn_down`, `output_norm`; weights in our [out, in] layout.
- PEFT: `base_model.model.transformer.h.{l}.<layer>.lora_A/B.weight`, fan_in_fan_out (the
  Conv1D layout).
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping, NoReturn

import numpy as np

from cllm_cli.model.config import CLLMConfig, model_config_problem
from cllm_cli.model.family import Family, gguf_block_name

LAYER_NORM_EPS = 1e-5       # the engine's layer-norm epsilon; GPT-2's default too
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_PREFIX = "transformer."
# our size fields, each with its config.json key and GPT-2's default; n_inner 0 or missing is
# GPT-2's 4 x n_embd, as ff_dim 0 is ours
HF_SIZES = {"vocab_size": ("vocab_size", 50257), "embed_dim": ("n_embd", 768),
            "num_layers": ("n_layer", 12), "num_heads": ("n_head", 12),
            "ff_dim": ("n_inner", 0), "seq_len": ("n_positions", 1024)}
GGUF_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
              "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def init_parameters(config: CLLMConfig, params: Mapping[str, np.ndarray],
                    rng: np.random.Generator) -> None:
    """GPT-2's initialisation: weights N(0, 0.02), both c_proj weights N(0, 0.02/sqrt(2L)),
    biases 0, layer-norm weights 1 (the buffer starts at 0)."""
    proj_std = 0.02 / math.sqrt(2 * config.num_layers)
    for name, view in params.items():
        if view.ndim == 2:
            std = proj_std if name.endswith("c_proj.weight") else 0.02
            view[...] = rng.standard_normal(view.shape, dtype=np.float32) * np.float32(std)
        elif name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
            view[...] = 1.0


def hf_name(name: str) -> str:
    """transformers' GPT2LMHeadModel name of our tensor `name`."""
    return HF_PREFIX + name + ("" if name.startswith(("h.", "ln_f.")) else ".weight")


def hf_transposed(name: str) -> bool:
    """Whether GPT-2 stores our tensor `name` transposed (a Conv1D weight)."""
    return name.endswith(CONV1D)


def hf_config(config: CLLMConfig) -> dict[str, Any]:
    """config.json's model fields of our model as a transformers GPT-2."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.seq_len,
        "n_ctx": config.seq_len,
        "n_embd": config.embed_dim,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.ff_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }


def _setting(config: Mapping[str, Any], key: str, default: Any) -> Any:
    return config[key] if config.get(key) is not None else default


def config_from_hf(config: Mapping[str, Any],
                   refuse: Callable[[str], NoReturn]) -> CLLMConfig:
    """The CLLMConfig of a transformers GPT-2 config.json (dict); refuse(message) for what our
    model cannot compute exactly (another activation, epsilon, attention scaling, cross
    attention, n_ctx != n_positions, sizes CLLMConfig refuses)."""
    act = config.get("activation_function", "gelu_new")    # null names no activation
    if act not in GELU_TANH:
        refuse(f"activation_function {json.dumps(act)} is not supported (only tanh GELU: "
               f"{', '.join(GELU_TANH)})")
    # absent settings take GPT-2's values; a null one names none (transformers refuses it)
    eps = config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        refuse(f"layer_norm_epsilon {json.dumps(eps)} is not supported (only {LAYER_NORM_EPS})")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        value = config.get(key, want)
        if value != want:
            refuse(f"{key} {json.dumps(value)} is not supported (only {json.dumps(want)})")
    n_positions = _setting(config, "n_positions", 1024)
    if config.get("n_ctx") is not None and config["n_ctx"] != n_positions:
        refuse(f"n_ctx {config['n_ctx']} differs from n_positions {n_positions}")
    values = {field: _setting(config, key, default) for field, (key, default) in HF_SIZES.items()}
    values["seq_len"] = n_positions
    given = {k: v for k, v in values.items() if not (k == "ff_dim" and v == 0)}
    problem = model_config_problem(given, name=lambda field: HF_SIZES[field][0])
    if problem:
        refuse(f"model size not supported: {problem}")
    try:
        return CLLMConfig(**values)
    except ValueError as e:          # 4 x n_embd out of range
        refuse(f"model size not supported: {e}")


def gguf_name(name: str) -> str:
    """llama.cpp's GPT-2 tensor name of our tensor `name`."""
    if name == "wte":
        return "token_embd.weight"
    if name == "wpe":
        return "position_embd.weight"
    if name.startswith("ln_f."):
        return "output_norm." + name.split(".")[-1]
    return gguf_block_name(name, GGUF_BLOCK)


def gguf_hparams(writer: Any, config: CLLMConfig) -> None:
    """llama.cpp's gpt2 settings of a model, on a gguf.GGUFWriter."""
    writer.add_context_length(config.seq_len)
    writer.add_embedding_length(config.embed_dim)
    writer.add_feed_forward_length(config.ff_dim)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)


GPT2 = Family(
    name="gpt2",
    init_parameters=init_parameters,
    embedding="wte",
    position_table="wpe",
    lora_targets={"attn": ("attn.c_attn",), "proj": ("attn.c_proj",),
                  "mlp": ("mlp.c_fc", "mlp.c_proj")},
    hf_architectures=("GPT2LMHeadModel", "GPT2Model"),
    hf_model_types=("gpt2",),
    hf_name=hf_name,
    hf_transposed=hf_transposed,
    hf_config=hf_config,
    config_from_hf=config_from_hf,
    hf_head="lm_head.weight",
    hf_prefix=HF_PREFIX,
    hf_ignored=(".attn.bias", ".attn.masked_bias"),      # causal masks old GPT-2 files carry
    gguf_architecture=lambda config: "gpt2",
    gguf_name=gguf_name,
    gguf_hparams=gguf_hparams,
    gguf_tensor=lambda config, name, array: array,
    gguf_output="output.weight",
    peft_prefix="base_model.model." + HF_PREFIX,
    peft_fan_in_fan_out=True,
)
