"""The Llama form, the second model family (LlamaForCausalLM, and the same block in
Qwen2ForCausalLM and MistralForCausalLM without a sliding window): its initialisation and the
names transformers and llama.cpp (GGUF) give its tensors.

Our tensors (the engine's parameter table, model/layout.py) carry transformers' own names
without the leading `model.`: `embed_tokens.weight`, per block `layers.{l}.input_layernorm`,
`layers.{l}.self_attn.{q,k,v,o}_proj`, `layers.{l}.post_attention_layernorm`,
`layers.{l}.mlp.{gate,up,down}_proj`, then `norm.weight` and, when the output layer is not
tied to the embedding, `lm_head.weight` (which transformers keeps outside `model.` too).
Weights are [out, in] as in transformers' nn.Linear. The q/k/v biases exist where the config
has attention_bias (Qwen2 always has them).
- llama.cpp (architecture `llama`, or `qwen2` for a Qwen2 model): `token_embd`,
  `blk.{l}.attn_norm`, `blk.{l}.attn_{q,k,v,output}`, `blk.{l}.ffn_norm`,
  `blk.{l}.ffn_{gate,up,down}`, `output_norm`, `output`; in the llama architecture the rows
  of q and k are reordered within each head (gguf_tensor).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping, NoReturn

import numpy as np

from cllm_cli._engine import ADAPTER_SITES
from cllm_cli.model.config import (
    LLAMA_MODEL_TYPES,
    CLLMConfig,
    LlamaConfig,
    llama_config_problem,
    model_config_problem,
)
from cllm_cli.model.family import Family, gguf_block_name

LLAMA_SITES = ADAPTER_SITES["llama"]      # the engine's adapter sites, in buffer order
HF_PREFIX = "model."
HF_HEAD = "lm_head.weight"
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "mistral": "MistralForCausalLM"}
# our size fields, each with its config.json key
HF_SIZES = {"vocab_size": "vocab_size", "embed_dim": "hidden_size",
            "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "ff_dim": "intermediate_size", "seq_len": "max_position_embeddings",
            "num_kv_heads": "num_key_value_heads", "rope_theta": "rope_theta",
            "rms_norm_eps": "rms_norm_eps"}
LLAMA_ONLY = ("num_kv_heads", "rope_theta", "rms_norm_eps")   # checked by llama_config_problem
GGUF_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def init_parameters(config: CLLMConfig, params: Mapping[str, np.ndarray],
                    rng: np.random.Generator) -> None:
    """transformers' initialisation of the form: weights N(0, 0.02), biases 0, norm weights 1
    (the buffer starts at 0)."""
    for name, view in params.items():
        if view.ndim == 2:
            view[...] = rng.standard_normal(view.shape, dtype=np.float32) * np.float32(0.02)
        elif name.endswith("layernorm.weight") or name == "norm.weight":
            view[...] = 1.0


def hf_name(name: str) -> str:
    """transformers' checkpoint name of our tensor `name`."""
    return name if name == HF_HEAD else HF_PREFIX + name


def hf_config(config: CLLMConfig) -> dict[str, Any]:
    """config.json's model fields of our model as its transformers class."""
    assert isinstance(config, LlamaConfig)
    fields: dict[str, Any] = {
        "architectures": [HF_CLASSES[config.hf_model_type]],
        "model_type": config.hf_model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.ff_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.embed_dim // config.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
    }
    if config.hf_model_type == "llama":
        fields.update(attention_bias=config.attention_bias, mlp_bias=False, pretraining_tp=1)
    elif config.hf_model_type == "mistral":
        fields["sliding_window"] = None
    else:
        fields.update(use_sliding_window=False, sliding_window=None)
    return fields


def _setting(config: Mapping[str, Any], key: str, default: Any) -> Any:
    return config[key] if config.get(key) is not None else default


def _rope_theta(config: Mapping[str, Any], refuse: Callable[[str], NoReturn]) -> Any:
    """rope_theta of config.json: at the top (as files have it), or in rope_parameters (as
    transformers 5 writes it); anything but plain rotary positions refused by name."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        refuse("rope_parameters per attention layer type is not supported (one rotary "
               "setting for every layer only)")
    for what, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is None:
            continue
        if not isinstance(value, dict):
            refuse(f"{what} {json.dumps(value)} is not supported")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            refuse(f"{what} of rope_type {kind!r} is not supported (only plain rotary "
                   f"positions)")
    # absent: transformers' default; null names no base and is refused as a bad value
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return config.get("rope_theta", 10000.0)


def _flag(config: Mapping[str, Any], key: str, default: bool,
          refuse: Callable[[str], NoReturn]) -> bool:
    """A true/false setting of config.json (absent or null: the default); anything but a JSON
    boolean is refused by name (a string "false" is not false)."""
    value = _setting(config, key, default)
    if not isinstance(value, bool):
        refuse(f"{key} {json.dumps(value)} is not true or false")
    return value


def config_from_hf(config: Mapping[str, Any],
                   refuse: Callable[[str], NoReturn]) -> CLLMConfig:
    """The LlamaConfig of a transformers Llama, Qwen2 or Mistral config.json (dict);
    refuse(message) for what our model cannot compute exactly (another activation, rope
    scaling, a sliding window, MLP biases, a head_dim other than hidden_size / heads, sizes
    the config refuses)."""
    model_type = config.get("model_type")
    act = config.get("hidden_act", "silu")       # null names no activation: not the default
    if act != "silu":
        refuse(f"hidden_act {json.dumps(act)} is not supported (only silu)")
    if _flag(config, "mlp_bias", False, refuse):
        refuse("mlp_bias true is not supported")
    if model_type == "qwen2":
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
    else:
        window = config.get("sliding_window")
    if window is not None:
        refuse(f"sliding_window {json.dumps(window)} is not supported (attention over the whole "
               f"context only)")
    values: dict[str, Any] = {field: config.get(key) for field, key in HF_SIZES.items()}
    values["rope_theta"] = _rope_theta(config, refuse)
    values["num_kv_heads"] = _setting(config, "num_key_value_heads", values["num_heads"])
    values["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6)     # null: refused as a bad value
    values["seq_len"] = _setting(config, "max_position_embeddings", 2048)
    values["tie_embeddings"] = _flag(config, "tie_word_embeddings", False, refuse)
    values["attention_bias"] = (_flag(config, "attention_bias", False, refuse)
                                or model_type == "qwen2")
    values["hf_model_type"] = model_type
    names = {**HF_SIZES, "tie_embeddings": "tie_word_embeddings",
             "attention_bias": "attention_bias", "hf_model_type": "model_type"}
    problem = (model_config_problem({k: v for k, v in values.items() if k in HF_SIZES
                                     and k not in LLAMA_ONLY},
                                    name=lambda field: names[field])
               or llama_config_problem(values, name=lambda field: names[field]))
    if problem:
        refuse(f"model size not supported: {problem}")
    head_dim = config.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int)
                                 or head_dim * values["num_heads"] != values["embed_dim"]):
        refuse(f"head_dim {json.dumps(head_dim)} is not supported (only hidden_size / "
               f"num_attention_heads)")
    try:
        return LlamaConfig(**values)
    except (TypeError, ValueError) as e:
        refuse(f"model size not supported: {e}")


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name of our tensor `name`."""
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == HF_HEAD:
        return "output.weight"
    return gguf_block_name(name, GGUF_BLOCK)


def gguf_architecture(config: CLLMConfig) -> str:
    """llama.cpp's architecture of a model: qwen2 for a Qwen2 model, llama for the others."""
    assert isinstance(config, LlamaConfig)
    return "qwen2" if config.hf_model_type == "qwen2" else "llama"


def gguf_tensor(config: CLLMConfig, name: str, array: np.ndarray) -> np.ndarray:
    """The tensor as llama.cpp reads it. Its llama architecture turns each head's pairs
    (x[2i], x[2i+1]) where transformers turns (x[i], x[i + hs/2]): the rows of q_proj and
    k_proj (weights and biases) are reordered within each head to match, as llama.cpp's own
    converter does. Everything else (and a qwen2 model, which turns halves) is as it is."""
    assert isinstance(config, LlamaConfig)
    if gguf_architecture(config) != "llama" or not name.endswith(("q_proj.weight",
                                                                   "q_proj.bias",
                                                                   "k_proj.weight",
                                                                   "k_proj.bias")):
        return array
    heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
    rows = array.shape[0]
    return (array.reshape(heads, 2, rows // heads // 2, *array.shape[1:])
            .swapaxes(1, 2).reshape(array.shape))


def gguf_hparams(writer: Any, config: CLLMConfig) -> None:
    """llama.cpp's llama / qwen2 settings of a model, on a gguf.GGUFWriter."""
    assert isinstance(config, LlamaConfig)
    writer.add_context_length(config.seq_len)
    writer.add_embedding_length(config.embed_dim)
    writer.add_feed_forward_length(config.ff_dim)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.embed_dim // config.num_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


LLAMA = Family(
    name="llama",
    init_parameters=init_parameters,
    embedding="embed_tokens.weight",
    position_table=None,
    lora_targets={"attn": ("self_attn.q_proj", "self_attn.v_proj"),
                  **{name.split(".")[1]: (name,) for name in LLAMA_SITES},
                  "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    hf_architectures=tuple(HF_CLASSES.values()),
    hf_model_types=LLAMA_MODEL_TYPES,
    hf_name=hf_name,
    hf_transposed=lambda name: False,
    hf_config=hf_config,
    config_from_hf=config_from_hf,
    hf_head=HF_HEAD,
    hf_prefix=HF_PREFIX,
    hf_ignored=("rotary_emb.inv_freq",),        # a buffer older files carry
    gguf_architecture=gguf_architecture,
    gguf_name=gguf_name,
    gguf_hparams=gguf_hparams,
    gguf_tensor=gguf_tensor,
    gguf_output="output.weight",
    peft_prefix="base_model.model." + HF_PREFIX,
    peft_fan_in_fan_out=False,
)
