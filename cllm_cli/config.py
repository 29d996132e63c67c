"""Model configuration and the layout of the flat parameter buffer (SPEC section 1)."""
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
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
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


def param_shapes(cfg):
    """[(name, shape)] in buffer order; [out, in] for linear weights."""
    V, C, T, F = cfg.vocab_size, cfg.embed_dim, cfg.seq_len, cfg.ff_dim
    shapes = [("wte", (V, C)), ("wpe", (T, C))]
    for l in range(cfg.num_layers):
        p = f"h.{l}."
        shapes += [
            (p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
            (p + "attn.c_attn.weight", (3 * C, C)), (p + "attn.c_attn.bias", (3 * C,)),
            (p + "attn.c_proj.weight", (C, C)), (p + "attn.c_proj.bias", (C,)),
            (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
            (p + "mlp.c_fc.weight", (F, C)), (p + "mlp.c_fc.bias", (F,)),
            (p + "mlp.c_proj.weight", (C, F)), (p + "mlp.c_proj.bias", (C,)),
        ]
    shapes += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return shapes


def param_layout(cfg):
    """[(name, shape, offset)] with offsets in float32 elements into the flat buffer."""
    layout, offset = [], 0
    for name, shape in param_shapes(cfg):
        size = 1
        for s in shape:
            size *= s
        layout.append((name, shape, offset))
        offset += size
    return layout


def num_params(cfg):
    name, shape, offset = param_layout(cfg)[-1]
    return offset + shape[0]
