"""CLLM models from `transformers` directories: load_transformers_directory -> (CLLMConfig,
flat float32 parameters in the engine's layout, tokenizer).

config.json's model_type picks the model family (model/family.py); the tensor names, their
layout and the config's meaning are the family's. Loading refuses, with one line naming the
setting, what our model cannot compute exactly: a model_type or architecture of no family,
what the family refuses (for GPT-2: another activation, layer_norm_epsilon other than 1e-5,
scale_attn_weights false, scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn,
cross-attention, n_ctx != n_positions; for the Llama form: rope scaling, a sliding window,
another activation, MLP biases, another head_dim), model sizes the config refuses, a GPT-2
output layer that differs from the embedding (one equal to it is taken as tied; the Llama
form's may be a tensor of its own), a missing tensor (GPT-2 without biases), an unexpected one, float64 weights (float16 and bfloat16 widen to float32
exactly), a tensor holding NaN or Inf (named), and weights only in pytorch_model.bin (not
read: unpickling can run code). Tensor names may lack the family's prefix (GPT-2's
"transformer.": files saved from GPT2Model, as GPT-2's own), sharded files
(model.safetensors.index.json) are read, and the buffers the family names (GPT-2's causal
masks in old files) are left out. The tokenizer is the directory's tokenizer.json (bpe kind).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping, NoReturn

import numpy as np
from numpy.typing import NDArray

from cllm_cli._engine import num_parameters
from cllm_cli.errors import ConversionError, DataError
from cllm_cli.fileio import reason
from cllm_cli.formats.checkpoint import first_non_finite
from cllm_cli.formats.tensorfile import well_formed_entry
from cllm_cli.jsonfile import JSONError, loads, read_json
from cllm_cli.model import FAMILIES, CLLMConfig, Family, named_views
from cllm_cli.tokenizers import BPETokenizer, tokenizer_source

# a tensor in a safetensors file: (dtype, shape, absolute byte offset, byte length)
_Entry = tuple[str, tuple[int, ...], int, int]

_WIDEN: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


# ---------------------------------------------------------------------------------------
# Loading a transformers GPT-2 directory
# ---------------------------------------------------------------------------------------

def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    obj = read_json(path, ConversionError)
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return obj


def _safetensors_index(path: str | os.PathLike) -> dict[str, _Entry]:
    """{tensor name: (dtype, shape, absolute byte offset, byte length)} of one file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError("bad header length")
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({reason(e)})") from None
    except ValueError:
        raise ConversionError(f"{path}: not a safetensors file (bad header)") from None
    try:
        header = loads(raw)
    except JSONError as e:
        raise ConversionError(f"{path}: not a safetensors file (bad header: {e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    index: dict[str, _Entry] = {}
    for name, info in header.items():
        if not well_formed_entry(info, size - 8 - n):
            raise ConversionError(f"{path}: malformed header entry for {name!r}")
        begin, end = info["data_offsets"]
        index[name] = (info["dtype"], tuple(info["shape"]), 8 + n + begin, end - begin)
    return index


def _read_tensor(path: str | os.PathLike, name: str, entry: _Entry) -> NDArray[np.float32]:
    """float32 array of one tensor; float16 and bfloat16 widen exactly."""
    dtype, shape, offset, length = entry
    if dtype not in _WIDEN:
        raise ConversionError(f"{path}: tensor {name} is {dtype}; only F32, F16 and BF16 "
                              f"convert to float32 exactly")
    count = math.prod(shape)
    if length != count * _WIDEN[dtype].itemsize:
        raise ConversionError(f"{path}: tensor {name}: shape {list(shape)} does not match its "
                              f"{length} bytes")
    try:
        raw = np.fromfile(path, dtype=_WIDEN[dtype], count=count, offset=offset)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({reason(e)})") from None
    if raw.size != count:
        raise ConversionError(f"{path}: truncated in tensor {name}")
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return raw.astype(np.float32).reshape(shape)


def _weight_files(directory: Path) -> dict[str, tuple[Path, _Entry]]:
    """{tensor name: (file, index entry)} of model.safetensors or its shards."""
    single = directory / "model.safetensors"
    index_path = directory / "model.safetensors.index.json"
    if single.exists():
        return {name: (single, e) for name, e in _safetensors_index(single).items()}
    if index_path.exists():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index_path}: no weight_map")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise ConversionError(f"{index_path}: weight_map gives {name!r} the file "
                                      f"{json.dumps(shard)}, not a file name")
        found: dict[str, tuple[Path, _Entry]] = {}
        for shard in sorted(set(weight_map.values())):
            for name, e in _safetensors_index(directory / shard).items():
                found[name] = (directory / shard, e)
        return found
    for other in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"):
        if (directory / other).exists():
            raise ConversionError(f"{directory}: weights only in {other}; only model.safetensors "
                                  f"is read (save the model with safe_serialization)")
    raise ConversionError(f"{directory}: no model.safetensors")


def _setting(config: Mapping[str, Any], key: str, default: Any) -> Any:
    return config[key] if config.get(key) is not None else default


def _check_config(path: str | os.PathLike,
                  config: Mapping[str, Any]) -> tuple[Family, CLLMConfig]:
    """(Family, CLLMConfig) of a config.json; refuses, with one line naming the setting, a
    model_type or architecture of no family, and what the family's model cannot compute
    exactly."""
    def refuse(what: str) -> NoReturn:
        raise ConversionError(f"{path}: {what}")

    model_type = config.get("model_type")
    families = {kind: f for f in FAMILIES.values() for kind in f.hf_model_types}
    if not isinstance(model_type, str) or model_type not in families:
        refuse(f"model_type {model_type!r} is not supported (only {', '.join(families)})")
    family = families[model_type]
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        refuse(f"architectures {json.dumps(architectures)} is not a list of class names")
    for arch in architectures:
        if arch not in family.hf_architectures:
            refuse(f"architectures {arch!r} is not supported (only "
                   f"{family.hf_architectures[0]})")
    return family, family.config_from_hf(config, refuse)


def load_transformers_directory(directory: str | os.PathLike,
                                ) -> tuple[CLLMConfig, NDArray[np.float32], BPETokenizer]:
    """(CLLMConfig, flat float32 parameters, tokenizer) of a transformers directory of a model
    family we compute (see the module docstring for what is refused)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    config = _read_json(config_path)
    family, cfg = _check_config(config_path, config)
    prefix = family.hf_prefix

    files: dict[str, tuple[str, Path, _Entry]] = {}
    for name, where in _weight_files(directory).items():
        short = name[len(prefix):] if name.startswith(prefix) else name
        if short.endswith(family.hf_ignored):
            continue
        files[short] = (name, *where)
    flat = np.empty(num_parameters(cfg), dtype=np.float32)
    views = named_views(cfg, flat)
    for name, view in views.items():
        shape = view.shape
        hf_name = family.hf_name(name)
        key = hf_name[len(prefix):] if hf_name.startswith(prefix) else hf_name
        if key not in files:
            raise ConversionError(f"{directory}: missing tensor {hf_name} (a "
                                  f"{family.hf_architectures[0]} without it cannot be "
                                  f"represented)")
        full, path, entry = files.pop(key)
        hf_shape = shape[::-1] if family.hf_transposed(name) else shape
        if entry[1] != tuple(hf_shape):
            raise ConversionError(f"{path}: tensor {full} has shape {list(entry[1])}, "
                                  f"config.json needs {list(hf_shape)}")
        t = _read_tensor(path, full, entry)
        bad = first_non_finite({full: t})
        if bad:
            raise ConversionError(f"{path}: {bad}; a model with NaN or Inf weights cannot be "
                                  f"trained or run")
        view[...] = t.T if family.hf_transposed(name) else t
    # an output layer of its own is a tensor of the model, read above; a tied one may still
    # be in the file, as a copy of the embedding
    untied = any(family.hf_name(name) == family.hf_head for name in views)
    head = None if untied else files.pop(family.hf_head, None)
    embedding = views[family.embedding]
    tied = _setting(config, "tie_word_embeddings", True)
    if head is not None:
        full, path, entry = head
        if (entry[1] != embedding.shape
                or not np.array_equal(_read_tensor(path, full, entry), embedding)):
            # a family with a tie setting reads an output layer of its own when the config
            # says so; GPT-2's is always the embedding
            why = ("tie_word_embeddings is true" if hasattr(cfg, "tie_embeddings")
                   else "untied output layer is not supported")
            raise ConversionError(f"{path}: {family.hf_head} differs from "
                                  f"{family.hf_name(family.embedding)} ({why})")
    elif not tied and not untied:
        raise ConversionError(f"{config_path}: tie_word_embeddings false and no "
                              f"{family.hf_head} (untied output layer is not supported)")
    if files:
        names = sorted(full for full, _, _ in files.values())
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise ConversionError(f"{directory}: unexpected tensor {names[0]}{more}")

    try:
        tokenizer_path = tokenizer_source(directory)[0]
    except DataError as e:
        raise ConversionError(str(e)) from None
    tokenizer = BPETokenizer.read(directory)
    if len(tokenizer) > cfg.vocab_size:
        raise ConversionError(f"{tokenizer_path} has {len(tokenizer)} tokens but config.json "
                              f"has vocab_size {cfg.vocab_size}")
    return cfg, flat, tokenizer
