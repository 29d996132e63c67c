"""The model configuration: vocabulary, width, depth, heads, feed-forward width, context.
The layout of the flat parameter buffer is the engine's (layout.py)."""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CLLMConfig:
    vocab_size: int = 10000
    embed_dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    ff_dim: int = 0          # 0 means 4 * embed_dim
    seq_len: int = 128

    def __post_init__(self):
        if self.ff_dim == 0:
            object.__setattr__(self, "ff_dim", 4 * self.embed_dim)
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "ff_dim", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value < 2 ** 31:
                raise ValueError(f"{name} must be a positive integer below 2**31, got {value!r}")
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size must be at least 5 (4 special ids + 1), got {self.vocab_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: int(d[k]) for k in ("vocab_size", "embed_dim", "num_layers",
                                              "num_heads", "ff_dim", "seq_len")})

