"""`.cllm` checkpoint files: writing them, and the checkpoint_step_<N>.cllm files of a
checkpoint directory. Reading and validating is checkpoint_load.py.

A `.cllm` file is a plain safetensors file:

* the parameters under the engine's names (``wte``, ``wpe``, ``h.{l}.ln_1.weight``, ...),
  float32, with the shapes of :func:`cllm_cli._engine.parameter_layout`;
* the AdamW moments, when present, as ``adam.m.<name>`` and ``adam.v.<name>`` (same shapes);
* or, for a LoRA run, the adapters instead of the parameters (``h.{l}.attn.c_attn.lora_A``, ...,
  the shapes of :func:`cllm_cli._engine.adapter_layout`) and their moments: the base
  parameters are not stored, the ``lora`` metadata names them;
* string metadata (safetensors ``__metadata__``):

  ``format``          ``"cllm"``
  ``format_version``  ``"1"`` (:data:`FORMAT_VERSION`)
  ``model_config``    JSON of ``CLLMConfig.to_dict()``
  ``meta``            JSON of the caller's dict (training config, tokenizer kind, vocab hash,
                      step, epoch, position in the epoch, generator state, ...)
  ``lora``            (LoRA runs only) JSON of the adapters' settings (``rank``, ``alpha``,
                      ``dropout``, ``sites``) and their base: ``base_sha256``, the sha256 of
                      the base parameters' bytes (:func:`cllm_cli.model.lora.content_hash`), and
                      ``base_path``, where the run read them
  ``checksum``        sha256 hex of all tensor bytes in the order they are stored in the file
                      (that is the whole data section: safetensors leaves no gaps)
  ``header_checksum`` sha256 hex of the rest of the header, so that a damaged metadata value
                      (a step number, a learning rate) is caught too, not only damaged tensors.
                      It is computed over ``json.dumps({"metadata": <all metadata except
                      header_checksum>, "tensors": {name: {"dtype", "shape", "data_offsets"}}},
                      sort_keys=True, separators=(",", ":"))`` encoded as UTF-8.

The file is streamed from the caller's buffers tensor by tensor (tensorfile.py), in the
layout of safetensors' own serializer, so saving adds no copy of the state to memory; its
header is written first with placeholder checksums and rewritten once the tensor bytes have
been hashed on their way out. The AdamW moments may also come as FlatPieces, read piece by
piece as they are written (a many-process run, where each rank holds a share of them). Writes are atomic (:func:`cllm_cli.fileio.atomic_file`): the
bytes go to a temporary file in the destination directory (``.<final name>.<random>.tmp``),
which is flushed, fsync'ed and renamed over the final name, after which the directory is
fsync'ed. A missing directory is created. A failed write (full disk, a parent that is not a
directory, ...) removes the temporary file and raises :class:`CheckpointError`; the final name
then still holds the previous complete file, if there was one, and never a partial one.

Only finite states are written: saving parameters or AdamW moments that hold NaN or Inf
raises :class:`CheckpointError` naming the first such tensor (nothing is written).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Union

import numpy as np
from numpy.typing import NDArray

from cllm_cli._engine import adapter_layout, parameter_layout
from cllm_cli.errors import CheckpointError
from cllm_cli.fileio import atomic_file
from cllm_cli.fileio import reason as _reason
from cllm_cli.formats.tensorfile import FlatPieces, PieceTensor, Tensor, safetensors_header, write_tensors
from cllm_cli.model import CLLMConfig, LoraSpec, adapter_views, named_views

FORMAT_VERSION = 1
FORMAT_NAME = "cllm"

_STEP_RE = re.compile(r"checkpoint_step_(\d+)\.cllm")
_FINITE_CHUNK = 1 << 20


def _json_default(obj: object) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def header_digest(metadata: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 hex of the header content (all metadata but header_checksum, tensor index)."""
    content = {
        "metadata": {k: v for k, v in metadata.items() if k != "header_checksum"},
        "tensors": {name: {"dtype": info["dtype"], "shape": list(info["shape"]),
                           "data_offsets": list(info["data_offsets"])}
                    for name, info in tensors.items()},
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


Moments = Union[NDArray[np.float32], FlatPieces]


def _flat_views(what: str, flat: Moments, cfg: CLLMConfig,
                spec: LoraSpec | None) -> dict[str, Tensor]:
    """{name: view} of a flat float32 buffer (a contiguous copy when it is not contiguous),
    or {name: PieceTensor} of FlatPieces: the parameters', or with spec (a LoraSpec) the
    adapters'."""
    if not isinstance(flat, np.ndarray):
        layout = parameter_layout(cfg) if spec is None else adapter_layout(cfg, spec.rank,
                                                                            spec.mask)
        total = sum(math.prod(shape) for _, shape, _ in layout)
        if flat.size != total:
            raise ValueError(f"{what} has {flat.size} values, the model config needs {total}")
        return {name: PieceTensor(flat, offset, shape) for name, shape, offset in layout}
    if not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)
    views: dict[str, Tensor] = dict(adapter_views(cfg, spec, flat, what) if spec is not None
                                    else named_views(cfg, flat, what, np.float32))
    return views


def save_checkpoint(path: str | os.PathLike, cfg: CLLMConfig, params: NDArray[np.float32],
                    adam_m: Moments | None, adam_v: Moments | None, meta: dict[str, Any],
                    lora: dict[str, Any] | None = None) -> None:
    """Write a `.cllm` file atomically.

    ``params``, ``adam_m``, ``adam_v`` are flat float32 buffers laid out as
    ``parameter_layout(cfg)``; ``adam_m`` / ``adam_v`` may be None (then they are not stored),
    or FlatPieces (read in pieces while the file is written).
    ``meta`` is any JSON-serialisable dict (numpy scalars and arrays are converted).
    ``lora``: None, or the ``lora`` metadata of a LoRA run (LoraSpec.to_dict() with
    ``base_sha256`` and ``base_path``); then the buffers are the adapters'.
    Raises CheckpointError on any I/O failure (no partial file is left under ``path``) and
    for parameters or moments holding NaN or Inf (nothing is written), ValueError for buffers
    that do not match ``cfg`` or a ``meta`` that is not serialisable.
    """
    path = Path(path)
    if not isinstance(cfg, CLLMConfig):
        raise ValueError(f"cfg must be a CLLMConfig, got {type(cfg).__name__}")
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")

    spec = LoraSpec.from_dict(lora) if lora is not None else None
    tensors = dict(_flat_views("params", params, cfg, spec))
    for prefix, buf in (("adam.m.", adam_m), ("adam.v.", adam_v)):
        if buf is not None:
            for name, view in _flat_views(prefix.rstrip("."), buf, cfg, spec).items():
                tensors[prefix + name] = view

    bad = first_non_finite(tensors)
    if bad:
        raise CheckpointError(f"cannot write checkpoint {path}: {bad}; a non-finite state is "
                              "never saved")

    try:
        meta_json = json.dumps(meta, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta is not JSON serialisable: {exc}") from None

    # The file is streamed tensor by tensor from the buffers (no copy of the state): the
    # header goes first with checksums of the right length but unknown value, is rewritten
    # once the tensor bytes have been hashed on their way to the file.
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "model_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "meta": meta_json,
        **({"lora": json.dumps(lora, sort_keys=True)} if lora is not None else {}),
        "checksum": "0" * 64,
        "header_checksum": "0" * 64,
    }
    placeholder, names = safetensors_header(tensors, metadata)

    def write(f: BinaryIO) -> None:
        f.write(placeholder)
        hasher = hashlib.sha256()
        write_tensors(f, tensors, names, hasher.update)
        metadata["checksum"] = hasher.hexdigest()
        index = json.loads(placeholder[8:])
        del index["__metadata__"]
        metadata["header_checksum"] = header_digest(metadata, index)
        header, _ = safetensors_header(tensors, metadata)
        if len(header) != len(placeholder):       # cannot happen: hex digests of fixed length
            raise RuntimeError("checkpoint header changed length")
        f.seek(0)
        f.write(header)

    _atomic_write(path, write)


def count_non_finite(values: np.ndarray) -> tuple[int, int]:
    """(NaN count, Inf count) of an array, _FINITE_CHUNK values at a time, so that no
    temporary is as large as the array."""
    flat = values.reshape(-1)
    nan = inf = 0
    for start in range(0, flat.size, _FINITE_CHUNK):
        part = flat[start:start + _FINITE_CHUNK]
        if not np.isfinite(part).all():
            nan += int(np.isnan(part).sum())
            inf += int(np.isinf(part).sum())
    return nan, inf


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """Text naming the first tensor of {name: array or PieceTensor} holding NaN or Inf, or
    None."""
    for name, values in tensors.items():
        nan, inf = (values.count_non_finite() if isinstance(values, PieceTensor)
                    else count_non_finite(values))
        if nan or inf:
            return (f"tensor {name!r} holds non-finite values ({nan} NaN, {inf} Inf of "
                    f"{values.size})")
    return None


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """write(f) into a temporary file renamed over `path` (atomic_file), creating the
    directory; CheckpointError for any failure."""
    directory = path.parent
    try:
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"cannot write checkpoint {path}: {directory} is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError:
        raise CheckpointError(f"cannot write checkpoint {path}: a parent of {directory} is not "
                              "a directory") from None
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {_reason(exc)}") from None
    with atomic_file(path, CheckpointError, "cannot write checkpoint {path}: {reason}") as f:
        write(f)



# ------------------------------------------------------------------------- checkpoint dirs

def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """``ckpt_dir / "checkpoint_step_<step>.cllm"``."""
    return Path(ckpt_dir) / f"checkpoint_step_{int(step)}.cllm"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(step, path)] of the ``checkpoint_step_<N>.cllm`` files in ``ckpt_dir``, by step.

    Temporary files and ``final_model.cllm`` are not listed; a missing directory gives [].
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        entries = list(ckpt_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[tuple[int, Path]] = []
    for entry in entries:
        m = _STEP_RE.fullmatch(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    found.sort(key=lambda item: (item[0], item[1].name))
    return found


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """Path of the step checkpoint with the highest step, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``keep <= 0`` keeps all).

    ``final_model.cllm`` and other files are never touched.
    """
    if keep <= 0:
        return
    for _, path in list_checkpoints(ckpt_dir)[:-keep]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CheckpointError(f"cannot remove old checkpoint {path}: {_reason(exc)}") \
                from None
