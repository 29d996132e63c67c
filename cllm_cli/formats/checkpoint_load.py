"""Reading and validating `.cllm` checkpoint files (the format is described in
checkpoint.py, which writes them), and the one check that a vocabulary is a checkpoint's.

Loading opens only regular files (a FIFO, a device or a directory is refused at once, never
read) and checks the structure of the file, the format and its version, the header checksum,
the model config, every tensor's name, dtype and shape, the metadata fields below, the vocab
hash and the config the caller expects (when given), the tensor checksum and that every value
is finite (and that no ``adam.v`` value is negative), and refuses with a one-line
:class:`CheckpointError` naming the file and the problem (and the field or tensor). Tensors
are read straight into the flat buffers (no intermediate copy of the whole file).

``meta`` fields that are checked when present (others are the caller's business):

  ``state``          object; ``step``, ``epoch``, ``batch_in_epoch``, ``adam_t`` and
                     ``bad_steps`` are required in it, integers in 0 .. 2**63 - 1
  ``generator``      object; ``seed``, ``epoch``, ``batch_in_epoch`` integers >= 0 when present
  ``tokenizer``      one of the tokenizer kinds (:data:`cllm_cli.tokenizers.TOKENIZER_KINDS`)
  ``vocab_hash``     64 lower-case hex digits (sha256)
  ``dataset_key``    64 lower-case hex digits (sha256)
  ``train_config``   object (its settings are checked by the trainer)

``model_config`` must hold sizes that :func:`cllm_cli.model.config.model_config_problem` accepts.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
from numpy.typing import NDArray

from cllm_cli._engine import num_parameters
from cllm_cli.errors import CheckpointError
from cllm_cli.fileio import open_regular
from cllm_cli.fileio import reason as _reason
from cllm_cli.formats.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    first_non_finite,
    header_digest,
)
from cllm_cli.formats.tensorfile import well_formed_entry
from cllm_cli.jsonfile import JSONError, loads
from cllm_cli.model import (
    MODEL_FIELDS,
    CLLMConfig,
    LoraSpec,
    adapter_shapes,
    adapter_views,
    model_config_problem,
    named_views,
    num_adapter_parameters,
    tensor_shapes,
)
from cllm_cli.progress import plural
from cllm_cli.tokenizers import TOKENIZER_KINDS

_MAX_HEADER_BYTES = 100 * 1024 * 1024     # safetensors' own limit
_DTYPE_BYTES = {"F32": 4}
_STATE_FIELDS = ("step", "epoch", "batch_in_epoch", "adam_t", "bad_steps")
_GENERATOR_FIELDS = ("seed", "epoch", "batch_in_epoch")
_MAX_COUNT = 2**63 - 1
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _short_hash(value: object) -> str:
    return str(value)[:12] if value is not None else "none"


def check_vocabulary(vocab_hash: str | None, vocabulary: object, expected_hash: str | None,
                     checkpoint: object) -> None:
    """CheckpointError unless vocab_hash, the hash of `vocabulary` (a tokenizer file, or
    words saying whose it is), is expected_hash, the one `checkpoint` records (a file or words
    saying who expects it). The one message of every "is this the model's vocabulary" check."""
    if vocab_hash != expected_hash:
        raise CheckpointError(f"{vocabulary} is not the vocabulary of {checkpoint} (vocab hash "
                              f"{_short_hash(vocab_hash)}, {checkpoint} has "
                              f"{_short_hash(expected_hash)})")


def _read_exact(f: io.BufferedReader, buf: np.ndarray) -> int:
    """Fill the writable buffer ``buf`` from ``f``; return the number of bytes read."""
    mv = memoryview(buf).cast("B")     # type: ignore[arg-type]  # an ndarray is a buffer
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])
        if not n:
            break
        got += n
    return got


@dataclass
class Checkpoint:
    """A loaded .cllm file: its model config, the trained parameters (a LoRA checkpoint's
    adapters), AdamW's m and v (None in a file saved without them), the metadata, and the
    lora metadata with its LoraSpec under "spec" (None for a full model)."""
    config: CLLMConfig
    params: NDArray[np.float32]
    adam_m: Optional[NDArray[np.float32]]
    adam_v: Optional[NDArray[np.float32]]
    meta: dict[str, Any]
    lora: Optional[dict[str, Any]]


def load_checkpoint(path: str | os.PathLike, cfg: CLLMConfig | None = None,
                    vocab_hash: str | None = None) -> Checkpoint:
    """Read and verify a `.cllm` file.

    Returns ``{"config": CLLMConfig, "params": flat float32, "adam_m": flat or None,
    "adam_v": flat or None, "meta": dict, "lora": None or dict}``; for a LoRA checkpoint
    "lora" is its ``lora`` metadata with "spec" (a LoraSpec) added, and the buffers are the
    adapters'. With ``cfg`` the file's model config must equal
    it; with ``vocab_hash`` the ``meta["vocab_hash"]`` stored in the file must equal it.
    Raises CheckpointError (one line naming the file and the problem) otherwise.
    """
    path = Path(path)

    def fail(problem: object) -> CheckpointError:
        return CheckpointError(f"cannot load checkpoint {path}: {_one_line(problem)}")

    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("it is a directory, not a file") from None
    except OSError as exc:
        raise fail(_reason(exc)) from None
    try:
        with f:
            return _load(f, path, fail, cfg, vocab_hash)
    except OSError as exc:
        raise fail(f"read error: {_reason(exc)}") from None


def _load(f: io.BufferedReader, path: Path, fail: Callable[[object], CheckpointError],
          want_cfg: CLLMConfig | None, want_vocab_hash: str | None) -> Checkpoint:
    file_size = os.fstat(f.fileno()).st_size
    if file_size < 8:
        raise fail(f"file is {file_size} {plural(file_size, 'byte')}, too short for a safetensors header "
                   "(truncated or not a checkpoint)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > _MAX_HEADER_BYTES or header_len + 8 > file_size:
        raise fail(f"header length {header_len} does not fit in the file of {file_size} bytes "
                   "(truncated or not a safetensors file)")
    header_bytes = f.read(header_len)
    if len(header_bytes) != header_len:
        raise fail("file shrank while reading the header")
    try:
        header = loads(header_bytes)
    except JSONError:
        raise fail("safetensors header is not valid JSON (corrupt or not a checkpoint)") from None
    if not isinstance(header, dict):
        raise fail("safetensors header is not a JSON object (corrupt or not a checkpoint)")

    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("no CLLM metadata in the safetensors header (not a .cllm checkpoint)")
    if metadata.get("format") != FORMAT_NAME:
        raise fail(f"format is {metadata.get('format')!r}, expected {FORMAT_NAME!r} "
                   "(not a .cllm checkpoint)")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise fail(f"unsupported format_version {version!r} (this program reads version "
                   f"{FORMAT_VERSION})")

    # Structure of the tensor index: dtype, shape, contiguous offsets covering the data.
    data_len = file_size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not well_formed_entry(info, data_len):
            raise fail(f"malformed header entry for tensor {name!r}")
        begin, end = info["data_offsets"]
        if info["dtype"] not in _DTYPE_BYTES:
            raise fail(f"tensor {name!r} has dtype {info['dtype']}, expected F32")
        if end - begin != math.prod(info["shape"]) * _DTYPE_BYTES[info["dtype"]]:
            raise fail(f"tensor {name!r}: shape {info['shape']} does not match its byte range "
                       f"{begin}..{end} (corrupt header)")
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise fail(f"tensor {name!r} starts at byte {begin}, expected {position} "
                       "(corrupt header)")
        position = end
    if position != data_len:
        if position > data_len:
            raise fail(f"data section is {data_len} bytes but the header describes {position} "
                       "(file truncated)")
        raise fail(f"{data_len - position} unexpected bytes after the tensor data (corrupt file)")

    if metadata.get("header_checksum") != header_digest(metadata, header):
        raise fail("header checksum mismatch (the metadata or tensor index is corrupt)")

    config = _model_config(metadata, fail, n_tensors=len(header))
    try:
        meta = loads(metadata["meta"])
    except (KeyError, JSONError) as exc:
        raise fail(f"bad meta in the metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise fail("bad meta in the metadata: not a JSON object")
    _check_meta(meta, fail)
    if "checksum" not in metadata:
        raise fail("no tensor checksum in the metadata")

    lora = _lora_metadata(metadata, fail)
    # Tensor names and shapes against the model config.
    shapes = tensor_shapes(config) if lora is None else adapter_shapes(config, lora["spec"])
    present = set(header)
    kinds = {"params": ""}
    for kind, prefix in (("adam_m", "adam.m."), ("adam_v", "adam.v.")):
        if any(n.startswith(prefix) for n in present):
            kinds[kind] = prefix
    expected = {prefix + name: shape for prefix in kinds.values() for name, shape in shapes.items()}
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise fail(f"missing tensor {missing[0]!r}{more}")
    extra = sorted(present - set(expected))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise fail(f"unexpected tensor {extra[0]!r}{more}")
    for name, shape in expected.items():
        if tuple(header[name]["shape"]) != tuple(shape):
            raise fail(f"tensor {name!r} has shape {tuple(header[name]['shape'])}, the model "
                       f"config in the file needs {tuple(shape)}")

    if want_cfg is not None and want_cfg != config:
        diffs = ", ".join(f"{k} {v} != {getattr(want_cfg, k)}"
                          for k, v in config.to_dict().items() if getattr(want_cfg, k) != v)
        raise fail(f"checkpoint model config {config.to_dict()} does not match the expected "
                   f"config {want_cfg.to_dict()} ({diffs})")
    if want_vocab_hash is not None:
        try:
            check_vocabulary(want_vocab_hash, "the given vocabulary", meta.get("vocab_hash"),
                             "the checkpoint")
        except CheckpointError as exc:
            raise fail(exc) from None

    # Data: read each tensor straight into its place in the flat buffers, in file order, and
    # hash the bytes in the same order.
    size = num_parameters(config) if lora is None else num_adapter_parameters(config, lora["spec"])
    buffers = {kind: np.empty(size, dtype=np.float32) for kind in kinds}
    targets: dict[str, np.ndarray] = {}
    for kind, prefix in kinds.items():
        views = (named_views(config, buffers[kind]) if lora is None
                 else adapter_views(config, lora["spec"], buffers[kind]))
        for name, view in views.items():
            targets[prefix + name] = view
    hasher = hashlib.sha256()
    f.seek(8 + header_len)
    for begin, end, name in spans:
        dest = targets[name]
        if _read_exact(f, dest) != end - begin:
            raise fail("file shrank while reading the tensor data")
        hasher.update(dest)      # type: ignore[arg-type]  # an ndarray is a buffer
    if hasher.hexdigest() != metadata["checksum"]:
        raise fail("tensor data checksum mismatch (the file is corrupt)")
    if sys.byteorder != "little":
        for buf in buffers.values():
            buf.byteswap(inplace=True)

    bad = first_non_finite({prefix + name: targets[prefix + name]
                             for prefix in kinds.values() for name in shapes})
    if bad:
        raise fail(f"{bad}; the state is not usable")
    if "adam_v" in buffers and (buffers["adam_v"] < 0).any():
        name = next(n for n in shapes if (targets["adam.v." + n] < 0).any())
        raise fail(f"tensor 'adam.v.{name}' holds negative values (a second moment is never "
                   "negative)")

    return Checkpoint(config, buffers["params"], buffers.get("adam_m"), buffers.get("adam_v"),
                      meta, lora)


def _lora_metadata(metadata: Mapping[str, str],
                   fail: Callable[[object], CheckpointError]) -> dict[str, Any] | None:
    """The ``lora`` metadata (with "spec", its LoraSpec), or None for a full checkpoint."""
    if "lora" not in metadata:
        return None
    try:
        lora = loads(metadata["lora"])
        spec = LoraSpec.from_dict(lora)
    except ValueError as exc:      # JSONError, or settings LoraSpec refuses
        raise fail(f"bad lora in the metadata: {exc}") from None
    if not (isinstance(lora.get("base_sha256"), str) and _SHA256_HEX.fullmatch(lora["base_sha256"])
            and isinstance(lora.get("base_path"), str)):
        raise fail("bad lora in the metadata: base_sha256 (64 hex digits) and base_path "
                   "(a string) are needed")
    lora["spec"] = spec
    return lora


def _model_config(metadata: Mapping[str, str], fail: Callable[[object], CheckpointError],
                  n_tensors: int) -> CLLMConfig:
    """The CLLMConfig of the metadata; its raw JSON values must pass model_config_problem
    (so that a string or a float is refused, not converted)."""
    try:
        fields = loads(metadata["model_config"])
    except KeyError:
        raise fail("bad model_config in the metadata: missing") from None
    except JSONError as exc:
        raise fail(f"bad model_config in the metadata: {exc}") from None
    if not isinstance(fields, dict):
        raise fail("bad model_config in the metadata: not a JSON object")
    problem = model_config_problem({name: fields.get(name) for name in MODEL_FIELDS})
    if problem:
        raise fail(f"bad model_config in the metadata: {problem}")
    # every layer has 12 tensors: a num_layers this large cannot match (and listing its
    # tensor names would take forever)
    if fields["num_layers"] > n_tensors:
        raise fail(f"bad model_config in the metadata: num_layers {fields['num_layers']} "
                   f"cannot match the {n_tensors} tensors in the file")
    return CLLMConfig.from_dict(fields)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def _check_meta(meta: Mapping[str, Any], fail: Callable[[object], CheckpointError]) -> None:
    """The meta fields listed in the module docstring, for type and range."""
    def bad(field: str, expected: str, value: object) -> CheckpointError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return fail(f"bad meta field {field}: expected {expected}, got {shown}")

    for group, fields, required in (("state", _STATE_FIELDS, True),
                                    ("generator", _GENERATOR_FIELDS, False)):
        if group not in meta:
            continue
        values = meta[group]
        if not isinstance(values, dict):
            raise bad(group, "an object", values)
        for name in fields:
            if name not in values:
                if required:
                    raise fail(f"bad meta field {group}.{name}: missing")
            elif not _is_count(values[name]):
                raise bad(f"{group}.{name}", f"an integer in 0..{_MAX_COUNT}", values[name])
    if "tokenizer" in meta and meta["tokenizer"] not in TOKENIZER_KINDS:
        raise bad("tokenizer", f"one of {', '.join(TOKENIZER_KINDS)}", meta["tokenizer"])
    for name in ("vocab_hash", "dataset_key"):
        if name in meta and not (isinstance(meta[name], str)
                                 and _SHA256_HEX.fullmatch(meta[name])):
            raise bad(name, "64 lower-case hex digits", meta[name])
    if "train_config" in meta and not isinstance(meta["train_config"], dict):
        raise bad("train_config", "an object", meta["train_config"])

