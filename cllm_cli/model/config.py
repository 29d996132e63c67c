"""The model configuration: the sizes of a GPT-2-form decoder. The layout of the flat parameter
buffer is the engine's (model/layout.py).

model_config_problem is the one check of model sizes: CLLMConfig runs it on construction, the
checkpoint reader on the raw JSON of a file's model_config, and the training options on the
sizes given on the command line (each naming the fields its own way)."""
from __future__ import annotations

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
    family = "gpt2"          # its model family (model/family.py); the only one so far

    def __post_init__(self) -> None:
        if self.ff_dim == 0:
            object.__setattr__(self, "ff_dim", 4 * self.embed_dim)
        self.validate()

    def validate(self) -> None:
        """ValueError (one line) unless the sizes make a model (model_config_problem)."""
        problem = model_config_problem(self.to_dict())
        if problem:
            raise ValueError(problem)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLLMConfig:
        return cls(**{k: int(d[k]) for k in MODEL_FIELDS})
