"""Checkpoint files built by hand for the format tests: a small configuration, its tensors
named and shaped without the engine's help, and safetensors files with arbitrary tensors and
metadata but valid checksums."""
import hashlib
import json
import struct

import numpy as np
import safetensors.numpy

from cllm_cli.formats.checkpoint import FORMAT_VERSION
from cllm_cli.model import CLLMConfig

CFG = CLLMConfig(vocab_size=13, embed_dim=8, num_layers=2, num_heads=2, seq_len=6)

# The parameter tensors of CFG (V=13, d=8, F=32, T=6, L=2), their names and shapes written out
# by hand so that a mistake shared by the engine's parameter table and the checkpoint code
# would still be caught.
LAYOUT_SHAPES = {"wte": (13, 8), "wpe": (6, 8), "ln_f.weight": (8,), "ln_f.bias": (8,)}
for _l in range(2):
    LAYOUT_SHAPES.update({
        f"h.{_l}.ln_1.weight": (8,), f"h.{_l}.ln_1.bias": (8,),
        f"h.{_l}.attn.c_attn.weight": (24, 8), f"h.{_l}.attn.c_attn.bias": (24,),
        f"h.{_l}.attn.c_proj.weight": (8, 8), f"h.{_l}.attn.c_proj.bias": (8,),
        f"h.{_l}.ln_2.weight": (8,), f"h.{_l}.ln_2.bias": (8,),
        f"h.{_l}.mlp.c_fc.weight": (32, 8), f"h.{_l}.mlp.c_fc.bias": (32,),
        f"h.{_l}.mlp.c_proj.weight": (8, 32), f"h.{_l}.mlp.c_proj.bias": (8,),
    })
N_PARAMS = sum(int(np.prod(s)) for s in LAYOUT_SHAPES.values())



def split_file(data):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def write_custom(path, tensors, metadata, fix_checksums=True):
    """Write a safetensors file with arbitrary tensors/metadata, with VALID checksums computed
    as cllm_cli.formats.checkpoint computes them, so the loader must refuse it for another reason."""
    md = dict(metadata)
    md.setdefault("checksum", "0" * 64)
    md.setdefault("header_checksum", "1" * 64)
    data = safetensors.numpy.save(tensors, metadata=md)
    if fix_checksums:
        n, header, body = split_file(data)
        meta = header.pop("__metadata__")
        old_sum, old_hsum = meta["checksum"], meta["header_checksum"]
        meta["checksum"] = hashlib.sha256(body).hexdigest()
        content = {"metadata": {k: v for k, v in meta.items() if k != "header_checksum"},
                   "tensors": header}
        hsum = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"))
                              .encode()).hexdigest()
        head = data[8:8 + n].replace(old_sum.encode(), meta["checksum"].encode())
        head = head.replace(old_hsum.encode(), hsum.encode())
        data = data[:8] + head + body
    path.write_bytes(data)


def good_metadata(cfg=CFG, meta=None, version=FORMAT_VERSION, fmt="cllm"):
    return {"format": fmt, "format_version": str(version),
            "model_config": json.dumps(cfg.to_dict()),
            "meta": json.dumps(meta if meta is not None else {"step": 1})}


def layout_tensors(seed=0, adam=False):
    rng = np.random.default_rng(seed)
    t = {n: rng.standard_normal(s).astype(np.float32) for n, s in LAYOUT_SHAPES.items()}
    if adam:
        for n, s in LAYOUT_SHAPES.items():
            t["adam.m." + n] = rng.standard_normal(s).astype(np.float32)
            t["adam.v." + n] = np.abs(rng.standard_normal(s)).astype(np.float32)
    return t
