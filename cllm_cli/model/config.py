"""The model configuration: CLLMConfig, the sizes of a GPT-2-form decoder, and LlamaConfig, the
same sizes and the Llama form's own settings. The layout of the flat parameter buffer is the
engine's (model/layout.py).

model_config_problem is the one check of model sizes: CLLMConfig runs it on construction, the
checkpoint reader on the raw JSON of a file's model_config, and the training options on the
sizes given on the command line (each naming the fields its own way)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

MODEL_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "ff_dim", "seq_len")
MAX_SIZE = 2 ** 31          # every size must fit the engine's int32 indices
MIN_VOCAB = 5               # 4 special ids + 1


def model_config_problem(values: Mapping[str, Any],
                         name: Callable[[str], str] = str) -> str | None:
    """The first reason the model sizes `values` ({field: value}, any subset of MODEL_FIELDS)
    cannot make a model, as one line, or None. Every size is an integer (not a bool) in
    1 .. 2**31 - 1, vocab_size at least 5, and embed_dim divisible by num_heads.
    name(field) is how the line names a field (a command-line flag, say)."""
    for field in MODEL_FIELDS:
        if field not in values:
            continue
        value = values[field]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < MAX_SIZE:
            return f"{name(field)} must be a positive integer below 2**31, got {value!r}"
    if "vocab_size" in values and values["vocab_size"] < MIN_VOCAB:
        return (f"{name('vocab_size')} must be at least {MIN_VOCAB} (4 special ids + 1), "
                f"got {values['vocab_size']}")
    if "embed_dim" in values and "num_heads" in values \
            and values["embed_dim"] % values["num_heads"]:
        return (f"{name('embed_dim')} {values['embed_dim']} is not divisible by "
                f"{name('num_heads')} {values['num_heads']}")
    return None


@dataclass(frozen=True)
class CLLMConfig:
    vocab_size: int = 10000
    embed_dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    ff_dim: int = 0          # 0 means 4 * embed_dim
    seq_len: int = 128
    family = "gpt2"          # its model family (model/family.py)

    def __post_init__(self) -> None:
        if self.ff_dim == 0:
            object.__setattr__(self, "ff_dim", 4 * self.embed_dim)
        self.validate()

    def validate(self) -> None:
        """ValueError (one line) unless the sizes make a model (model_config_problem)."""
        problem = model_config_problem(self.to_dict())
        if problem:
            raise ValueError(problem)

    def to_dict(self) -> dict[str, Any]:
        """Its fields as JSON values; a family other than GPT-2 adds "family" (a GPT-2 model's
        dict is what it was before families)."""
        fields = asdict(self)
        if self.family != CLLMConfig.family:
            fields["family"] = self.family
        return fields

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLLMConfig:
        """The config of to_dict's JSON (ValueError, one line, when it cannot make a model)."""
        family = d.get("family", CLLMConfig.family)
        if family == LlamaConfig.family:
            fields: dict[str, Any] = {k: int(d[k]) for k in MODEL_FIELDS}
            fields.update((k, d[k]) for k in LLAMA_FIELDS if k in d)
            return LlamaConfig(**fields)
        if family != CLLMConfig.family:
            raise ValueError(f"family {family!r} is not a model family "
                             f"({CLLMConfig.family}, {LlamaConfig.family})")
        return CLLMConfig(**{k: int(d[k]) for k in MODEL_FIELDS})


LLAMA_FIELDS = ("num_kv_heads", "rope_theta", "tie_embeddings", "attention_bias",
                "rms_norm_eps", "hf_model_type")
LLAMA_MODEL_TYPES = ("llama", "qwen2", "mistral")   # the transformers classes of the form


def swiglu_width(embed_dim: int) -> int:
    """The Llama form's default feed-forward width: 8/3 of embed_dim (two thirds of GPT-2's 4x,
    as the gate and up products share it), rounded up to a multiple of 64."""
    return -(-8 * embed_dim // (3 * 64)) * 64


def default_ff_dim(family: str, embed_dim: int) -> int:
    """What ff_dim 0 stands for in a model of `family`."""
    return swiglu_width(embed_dim) if family == LlamaConfig.family else 4 * embed_dim


@dataclass(frozen=True)
class LlamaConfig(CLLMConfig):
    """A Llama-form model (LlamaForCausalLM, and the same block in Qwen2ForCausalLM and
    MistralForCausalLM): num_heads query heads over num_kv_heads key/value heads (0:
    num_heads), rotary positions of base rope_theta, RMSNorm of rms_norm_eps, the output layer
    tied to the embedding or not, q/k/v biases or not; seq_len is the longest context trained
    or run. hf_model_type: the transformers class it is read from and written as; ff_dim 0
    is swiglu_width(embed_dim)."""
    num_kv_heads: int = 0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    hf_model_type: str = "llama"
    family = "llama"

    def __post_init__(self) -> None:
        if self.ff_dim == 0:
            object.__setattr__(self, "ff_dim", swiglu_width(self.embed_dim))
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        problem = llama_config_problem(asdict(self))
        if problem:
            raise ValueError(problem)


def llama_config_problem(values: Mapping[str, Any], name: Callable[[str], str] = str) -> str | None:
    """The first reason the Llama-form settings `values` (any subset of LLAMA_FIELDS, with
    num_heads and embed_dim) cannot make a model, as one line, or None."""
    def number(key: str) -> bool:
        v = values.get(key)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    kv, heads = values.get("num_kv_heads"), values.get("num_heads")
    if kv is not None:
        if isinstance(kv, bool) or not isinstance(kv, int) or not 1 <= kv < MAX_SIZE:
            return f"{name('num_kv_heads')} must be a positive integer, got {kv!r}"
        if isinstance(heads, int) and heads % kv:
            return f"{name('num_heads')} {heads} is not divisible by {name('num_kv_heads')} {kv}"
    if isinstance(heads, int) and isinstance(values.get("embed_dim"), int) \
            and (values["embed_dim"] // heads) % 2:
        return (f"the head size {values['embed_dim'] // heads} ({name('embed_dim')} / "
                f"{name('num_heads')}) must be even: rotary positions turn pairs")
    if "rope_theta" in values and not (number("rope_theta") and values["rope_theta"] > 1):
        return f"{name('rope_theta')} must be a number above 1, got {values['rope_theta']!r}"
    if "rms_norm_eps" in values and not (number("rms_norm_eps") and 0 < values["rms_norm_eps"] < 1):
        return f"{name('rms_norm_eps')} must be a number in (0, 1), got {values['rms_norm_eps']!r}"
    for key in ("tie_embeddings", "attention_bias"):
        if key in values and not isinstance(values[key], bool):
            return f"{name(key)} must be true or false, got {values[key]!r}"
    if "hf_model_type" in values and values["hf_model_type"] not in LLAMA_MODEL_TYPES:
        return (f"{name('hf_model_type')} must be one of {', '.join(LLAMA_MODEL_TYPES)}, got "
                f"{values['hf_model_type']!r}")
    return None
