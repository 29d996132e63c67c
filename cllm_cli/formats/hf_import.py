"""CLLM models from `transformers` GPT-2 directories: load_gpt2_directory -> (CLLMConfig,
flat float32 parameters in the engine's layout, tokenizer).

The tensor names are GPT-2's (gpt2_names.py). Loading refuses, with one line naming the
setting, what our model cannot compute exactly: another model_type or architecture, another
activation, layer_norm_epsilon other than 1e-5, scale_attn_weights false,
scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, cross-attention, n_ctx !=
n_positions, model sizes CLLMConfig refuses, an lm_head.weight that differs from wte (one
equal to it is taken as tied), a missing tensor (GPT-2 without biases), an unexpected one,
float64 weights (float16 and bfloat16 widen to float32 exactly), a tensor holding NaN or
Inf (named), and weights only in
pytorch_model.bin (not read: unpickling can run code). Tensor names may lack the
"transformer." prefix (files saved from GPT2Model, as GPT-2's own), sharded files
(model.safetensors.index.json) are read, and the causal-mask buffers old files carry are left
out. The tokenizer is the directory's tokenizer.json (bpe kind).
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
from cllm_cli.formats.gpt2_names import LAYER_NORM_EPS, gpt2_name, is_conv1d
from cllm_cli.jsonfile import JSONError, loads, read_json
from cllm_cli.model import CLLMConfig, model_config_problem, named_views
from cllm_cli.tokenizers import BPETokenizer

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")   # causal masks old GPT-2 files carry

_SIZES = {"vocab_size": ("vocab_size", 50257), "embed_dim": ("n_embd", 768),
          "num_layers": ("n_layer", 12), "num_heads": ("n_head", 12), "ff_dim": ("n_inner", 0),
          "seq_len": ("n_positions", 1024)}
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
        try:
            begin, end = info["data_offsets"]
            index[name] = (info["dtype"], tuple(int(s) for s in info["shape"]), 8 + n + begin,
                           end - begin)
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: malformed header entry for {name!r}") from None
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


def _check_gpt2_config(path: str | os.PathLike, config: Mapping[str, Any]) -> CLLMConfig:
    """Refuses a config.json our model cannot compute exactly; returns the CLLMConfig."""
    def refuse(what: str) -> NoReturn:
        raise ConversionError(f"{path}: {what}")

    model_type = config.get("model_type")
    if model_type != "gpt2":
        refuse(f"model_type {model_type!r} is not supported (only gpt2)")
    for arch in config.get("architectures") or []:
        if arch not in ("GPT2LMHeadModel", "GPT2Model"):
            refuse(f"architectures {arch!r} is not supported (only GPT2LMHeadModel)")
    act = _setting(config, "activation_function", "gelu_new")
    if act not in GELU_TANH:
        refuse(f"activation_function {act!r} is not supported (only tanh GELU: "
               f"{', '.join(GELU_TANH)})")
    eps = _setting(config, "layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        refuse(f"layer_norm_epsilon {eps} is not supported (only {LAYER_NORM_EPS})")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        value = _setting(config, key, want)
        if value != want:
            refuse(f"{key} {json.dumps(value)} is not supported (only {json.dumps(want)})")
    n_positions = _setting(config, "n_positions", 1024)
    if config.get("n_ctx") is not None and config["n_ctx"] != n_positions:
        refuse(f"n_ctx {config['n_ctx']} differs from n_positions {n_positions}")
    # our size fields, each with its config.json key and GPT-2's default; n_inner 0 or
    # missing is GPT-2's 4 x n_embd, as ff_dim 0 is ours
    values = {field: _setting(config, key, default) for field, (key, default) in _SIZES.items()}
    values["seq_len"] = n_positions
    given = {k: v for k, v in values.items() if not (k == "ff_dim" and v == 0)}
    problem = model_config_problem(given, name=lambda field: _SIZES[field][0])
    if problem:
        refuse(f"model size not supported: {problem}")
    try:
        return CLLMConfig(**values)
    except ValueError as e:          # 4 x n_embd out of range
        refuse(f"model size not supported: {e}")


def load_gpt2_directory(directory: str | os.PathLike) -> tuple[CLLMConfig, NDArray[np.float32], BPETokenizer]:
    directory = Path(directory)
    config_path = directory / "config.json"
    config = _read_json(config_path)
    cfg = _check_gpt2_config(config_path, config)
    tied = _setting(config, "tie_word_embeddings", True)

    files: dict[str, tuple[str, Path, _Entry]] = {}
    for name, where in _weight_files(directory).items():
        short = name[len("transformer."):] if name.startswith("transformer.") else name
        if short.endswith(IGNORED_BUFFERS):
            continue
        files[short] = (name, *where)
    flat = np.empty(num_parameters(cfg), dtype=np.float32)
    for name, view in named_views(cfg, flat).items():
        shape = view.shape
        key = gpt2_name(name)[len("transformer."):]
        if key not in files:
            raise ConversionError(f"{directory}: missing tensor {gpt2_name(name)} (a GPT-2 "
                                  f"without it cannot be represented)")
        full, path, entry = files.pop(key)
        hf_shape = shape[::-1] if is_conv1d(name) else shape
        if entry[1] != tuple(hf_shape):
            raise ConversionError(f"{path}: tensor {full} has shape {list(entry[1])}, "
                                  f"config.json needs {list(hf_shape)}")
        t = _read_tensor(path, full, entry)
        bad = first_non_finite({full: t})
        if bad:
            raise ConversionError(f"{path}: {bad}; a model with NaN or Inf weights cannot be "
                                  f"trained or run")
        view[...] = t.T if is_conv1d(name) else t
    head = files.pop("lm_head.weight", None)
    if head is not None:
        full, path, entry = head
        wte = flat[:cfg.vocab_size * cfg.embed_dim]
        if (entry[1] != (cfg.vocab_size, cfg.embed_dim)
                or not np.array_equal(_read_tensor(path, full, entry).reshape(-1), wte)):
            raise ConversionError(f"{path}: lm_head.weight differs from transformer.wte.weight "
                                  f"(untied output layer is not supported)")
    elif not tied:
        raise ConversionError(f"{config_path}: tie_word_embeddings false and no lm_head.weight "
                              f"(untied output layer is not supported)")
    if files:
        names = sorted(full for full, _, _ in files.values())
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise ConversionError(f"{directory}: unexpected tensor {names[0]}{more}")

    try:
        tokenizer_path = BPETokenizer.source(directory)[0]
    except DataError as e:
        raise ConversionError(str(e)) from None
    tokenizer = BPETokenizer.read(directory)
    if len(tokenizer) > cfg.vocab_size:
        raise ConversionError(f"{tokenizer_path} has {len(tokenizer)} tokens but config.json "
                              f"has vocab_size {cfg.vocab_size}")
    return cfg, flat, tokenizer
