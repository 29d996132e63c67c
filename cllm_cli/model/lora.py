"""LoRA adapters: what they are (LoraSpec), their flat buffer and its named tensors, their
initialisation, and merging them into a model's parameters.

An adapter on a linear layer W (out, in) of every block adds scale * B A, A (rank, in) and
B (out, rank), scale = alpha / rank, to W; only the adapters train. The flat buffer is laid
out as the engine's adapter_layout: per block, per adapted layer (site) in the family's order
(ADAPTER_SITES: GPT-2's attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; Llama's
self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj), its lora_A then its lora_B.

--lora-targets names groups of sites, which the model family declares (Family.lora_targets;
``attn`` is PEFT's default in both: GPT-2's c_attn, Llama's q_proj and v_proj).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Mapping

import numpy as np
from numpy.typing import NDArray

from cllm_cli._engine import ADAPTER_SITES, adapter_layout
from cllm_cli._engine import num_adapter_parameters as engine_adapter_parameters
from cllm_cli.model.config import CLLMConfig
from cllm_cli.model.family import FAMILIES, Family, family_of
from cllm_cli.model.layout import named_views

# the largest scale alpha / rank: far above the common 1 to 16, low enough that trained
# adapters stay far from float32's range
MAX_LORA_SCALE = 1024.0


def target_groups(family: Family | None = None) -> dict[str, tuple[str, ...]]:
    """{--lora-targets group: its sites} of a Family (by default the default config's)."""
    return (family or family_of(CLLMConfig)).lora_targets


def parse_targets(text: object, family: Family | None = None) -> tuple[str, ...]:
    """The sites of a --lora-targets value such as "attn,mlp" in a model of `family`, in its
    buffer order (ValueError naming the unknown group). Without a family: in whichever family
    knows every group named (the value's check before the model is known)."""
    groups = [part.strip() for part in str(text).split(",")]
    families = [family] if family is not None else list(FAMILIES.values())
    for candidate in families:
        known = candidate.lora_targets
        if all(group in known for group in groups):
            sites = {site for group in groups for site in known[group]}
            return tuple(site for site in ADAPTER_SITES[candidate.name] if site in sites)
    unknown = next(g for g in groups if g not in families[0].lora_targets)
    choices = ", ".join(dict.fromkeys(g for f in families for g in f.lora_targets))
    raise ValueError(f"unknown LoRA target {unknown!r} (choose from {choices}, "
                     f"comma-separated)")


def _family_sites(sites: tuple[str, ...]) -> tuple[str, ...]:
    """The site list of the family whose sites these are (ValueError when none has them all)."""
    for names in ADAPTER_SITES.values():
        if all(site in names for site in sites):
            return names
    raise ValueError(f"bad LoRA sites {list(sites)!r}")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapters of `rank` on `sites` (one family's ADAPTER_SITES names, in its order), scaled
    by alpha / rank, their inputs dropped with probability `dropout` in training."""
    rank: int
    alpha: float
    dropout: float
    sites: tuple[str, ...]

    @property
    def mask(self) -> int:
        names = _family_sites(self.sites)
        return sum(1 << names.index(site) for site in self.sites)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def engine_args(self) -> tuple[int, int, float, float]:
        """(rank, targets, alpha, dropout) as the engine takes them."""
        return (self.rank, self.mask, float(self.alpha), float(self.dropout))

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "sites": list(self.sites)}

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> LoraSpec:
        """The spec stored in a checkpoint; ValueError when a field is missing or wrong."""
        try:
            rank, alpha = fields["rank"], fields["alpha"]
            dropout, sites = fields["dropout"], tuple(fields["sites"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad LoRA settings ({e})") from None
        if not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank < 2**16):
            raise ValueError(f"bad LoRA rank {rank!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)
                and 0 < alpha <= MAX_LORA_SCALE * rank):
            raise ValueError(f"bad LoRA alpha {alpha!r} (at most {MAX_LORA_SCALE:g} x the "
                             f"rank {rank})")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"bad LoRA dropout {dropout!r}")
        if not sites or not all(isinstance(site, str) for site in sites) \
                or len(set(sites)) != len(sites):
            raise ValueError(f"bad LoRA sites {list(sites)!r}")
        names = _family_sites(sites)
        return cls(rank, float(alpha), float(dropout),
                   tuple(site for site in names if site in sites))


def adapter_shapes(cfg: CLLMConfig, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the adapter tensors, in buffer order."""
    return {name: tuple(shape) for name, shape, _ in
            adapter_layout(cfg, spec.rank, spec.mask)}


def num_adapter_parameters(cfg: CLLMConfig, spec: LoraSpec) -> int:
    return engine_adapter_parameters(cfg, spec.rank, spec.mask)


def adapter_views(cfg: CLLMConfig, spec: LoraSpec, flat: NDArray[np.float32],
                  what: str = "the adapter buffer") -> dict[str, NDArray[np.float32]]:
    """{name: view of its tensor in `flat`}, a 1-D float32 array of num_adapter_parameters
    elements (ValueError naming `what` otherwise)."""
    total = num_adapter_parameters(cfg, spec)
    if not isinstance(flat, np.ndarray) or flat.ndim != 1 or flat.dtype != np.float32 \
            or flat.size != total:
        raise ValueError(f"{what} must be a flat float32 array of {total} elements")
    return {name: flat[offset:offset + math.prod(shape)].reshape(shape)
            for name, shape, offset in adapter_layout(cfg, spec.rank, spec.mask)}


def init_adapters(cfg: CLLMConfig, spec: LoraSpec, seed: int) -> NDArray[np.float32]:
    """A fresh adapter buffer: every B zero (the adapted model starts as the base), every A
    uniform in +-1/sqrt(in), the bound of PEFT's default (Kaiming-uniform with a = sqrt(5)),
    drawn from numpy's generator seeded with `seed` in buffer order."""
    flat = np.zeros(num_adapter_parameters(cfg, spec), dtype=np.float32)
    rng = np.random.default_rng([seed, 0x10FA])
    for name, view in adapter_views(cfg, spec, flat).items():
        if name.endswith("lora_A"):
            bound = 1.0 / math.sqrt(view.shape[1])
            view[...] = rng.uniform(-bound, bound, view.shape).astype(np.float32)
    return flat


def merge_adapters(cfg: CLLMConfig, params: NDArray[np.float32], spec: LoraSpec,
                   adapters: NDArray[np.float32]) -> NDArray[np.float32]:
    """A new parameter buffer: params with scale * B A added to every adapted weight (an
    overflow gives Inf quietly: the caller checks the result)."""
    merged = np.array(params, dtype=np.float32, copy=True)
    weights = named_views(cfg, merged)
    views = adapter_views(cfg, spec, adapters)
    with np.errstate(over="ignore", invalid="ignore"):
        for name, a in views.items():
            if name.endswith(".lora_A"):
                site = name[:-len(".lora_A")]
                b = views[site + ".lora_B"]
                weights[site + ".weight"] += np.float32(spec.scale) * (b @ a)
    return merged


def content_hash(params: NDArray[np.float32]) -> str:
    """sha256 hex of a parameter buffer's bytes (float32, little-endian, layout order): what
    a LoRA checkpoint names its base by."""
    data = np.ascontiguousarray(params, dtype="<f4")
    hasher = hashlib.sha256()
    step = 1 << 24
    for start in range(0, data.size, step):
        hasher.update(data[start:start + step])
    return hasher.hexdigest()
