"""`.cllm` checkpoint files (SPEC section 5).

A `.cllm` file is a plain safetensors file:

* the parameters under the names of SPEC section 1 (``wte``, ``wpe``, ``h.{l}.ln_1.weight``,
  ...), float32, with the shapes of :func:`cllm_cli._engine.parameter_layout`;
* the AdamW moments, when present, as ``adam.m.<name>`` and ``adam.v.<name>`` (same shapes);
* string metadata (safetensors ``__metadata__``):

  ``format``          ``"cllm"``
  ``format_version``  ``"1"`` (:data:`FORMAT_VERSION`)
  ``model_config``    JSON of ``CLLMConfig.to_dict()``
  ``meta``            JSON of the caller's dict (training config, tokenizer kind, vocab hash,
                      step, epoch, position in the epoch, generator state, ...)
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
been hashed on their way out. Writes are atomic (:func:`cllm_cli.fileio.atomic_file`): the
bytes go to a temporary file in
the destination directory (``.<final name>.<random>.tmp``), which is flushed, fsync'ed and
renamed over the final name, after which the directory is fsync'ed. A missing directory is
created. A failed write (full disk, a parent that is not a directory, ...) removes the temporary
file and raises :class:`CheckpointError`; the final name then still holds the previous complete
file, if there was one, and never a partial one.

Only finite states are written or read: saving parameters or AdamW moments that hold NaN or
Inf raises :class:`CheckpointError` naming the first such tensor (nothing is written), and so
does loading them (also from a hand-made file with valid checksums), or a negative ``adam.v``.

Loading opens only regular files (a FIFO, a device or a directory is refused at once, never
read) and checks the structure of the file, the format and its version, the header checksum,
the model config, every tensor's name, dtype and shape, the metadata fields below, the vocab
hash and the config the caller expects (when given), the tensor checksum and that every value
is finite, and refuses with a one-line :class:`CheckpointError` naming the file and the
problem (and the field or tensor). Tensors are read straight into the flat buffers (no
intermediate copy of the whole file).

``meta`` fields that are checked when present (others are the caller's business):

  ``state``          object; ``step``, ``epoch``, ``batch_in_epoch``, ``adam_t`` and
                     ``bad_steps`` are required in it, integers in 0 .. 2**63 - 1
  ``generator``      object; ``seed``, ``epoch``, ``batch_in_epoch`` integers >= 0 when present
  ``tokenizer``      one of the tokenizer kinds (:data:`cllm_cli.tokenizers.TOKENIZER_KINDS`)
  ``vocab_hash``     64 lower-case hex digits (sha256)
  ``dataset_key``    64 lower-case hex digits (sha256)
  ``train_config``   object (its settings are checked by the trainer)

``model_config`` must hold ``vocab_size`` (>= 5), ``embed_dim``, ``num_layers``,
``num_heads``, ``ff_dim`` and ``seq_len`` as integers >= 1, with ``embed_dim`` divisible by
``num_heads``.
"""
import hashlib
import json
import math
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np

from cllm_cli._engine import num_parameters
from cllm_cli.config import CLLMConfig
from cllm_cli.errors import CheckpointError
from cllm_cli.fileio import atomic_file, open_regular
from cllm_cli.fileio import reason as _reason
from cllm_cli.formats.tensorfile import safetensors_header, write_tensors
from cllm_cli.layout import named_views, tensor_shapes
from cllm_cli.tokenizers import TOKENIZER_KINDS

FORMAT_VERSION = 1
FORMAT_NAME = "cllm"

_STEP_RE = re.compile(r"checkpoint_step_(\d+)\.cllm")
_MAX_HEADER_BYTES = 100 * 1024 * 1024     # safetensors' own limit
_DTYPE_BYTES = {"F32": 4}
_MODEL_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "ff_dim", "seq_len")
_STATE_FIELDS = ("step", "epoch", "batch_in_epoch", "adam_t", "bad_steps")
_GENERATOR_FIELDS = ("seed", "epoch", "batch_in_epoch")
_MAX_COUNT = 2**63 - 1
_FINITE_CHUNK = 1 << 20
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _one_line(text):
    return " ".join(str(text).split())


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _header_digest(metadata, tensors):
    """sha256 hex of the header content (all metadata but header_checksum, tensor index)."""
    content = {
        "metadata": {k: v for k, v in metadata.items() if k != "header_checksum"},
        "tensors": {name: {"dtype": info["dtype"], "shape": list(info["shape"]),
                           "data_offsets": list(info["data_offsets"])}
                    for name, info in tensors.items()},
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flat_views(what, flat, cfg):
    """{name: view} of a flat float32 buffer (a contiguous copy when it is not contiguous)."""
    if isinstance(flat, np.ndarray) and not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)
    return named_views(cfg, flat, what, np.float32)


def save_checkpoint(path, cfg, params, adam_m, adam_v, meta):
    """Write a `.cllm` file atomically.

    ``params``, ``adam_m``, ``adam_v`` are flat float32 buffers laid out as
    ``parameter_layout(cfg)``; ``adam_m`` / ``adam_v`` may be None (then they are not stored).
    ``meta`` is any JSON-serialisable dict (numpy scalars and arrays are converted).
    Raises CheckpointError on any I/O failure (no partial file is left under ``path``) and
    for parameters or moments holding NaN or Inf (nothing is written), ValueError for buffers
    that do not match ``cfg`` or a ``meta`` that is not serialisable.
    """
    path = Path(path)
    if not isinstance(cfg, CLLMConfig):
        raise ValueError(f"cfg must be a CLLMConfig, got {type(cfg).__name__}")
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")

    tensors = dict(_flat_views("params", params, cfg))
    for prefix, buf in (("adam.m.", adam_m), ("adam.v.", adam_v)):
        if buf is not None:
            for name, view in _flat_views(prefix.rstrip("."), buf, cfg).items():
                tensors[prefix + name] = view

    bad = _first_non_finite(tensors)
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
        "checksum": "0" * 64,
        "header_checksum": "0" * 64,
    }
    placeholder, names = safetensors_header(tensors, metadata)

    def write(f):
        f.write(placeholder)
        hasher = hashlib.sha256()
        write_tensors(f, tensors, names, hasher.update)
        metadata["checksum"] = hasher.hexdigest()
        index = json.loads(placeholder[8:])
        del index["__metadata__"]
        metadata["header_checksum"] = _header_digest(metadata, index)
        header, _ = safetensors_header(tensors, metadata)
        if len(header) != len(placeholder):       # cannot happen: hex digests of fixed length
            raise RuntimeError("checkpoint header changed length")
        f.seek(0)
        f.write(header)

    _atomic_write(path, write)


def _first_non_finite(tensors):
    """Text naming the first tensor of {name: array} holding NaN or Inf, or None. Looks at
    _FINITE_CHUNK values at a time, so that no temporary is as large as a tensor."""
    for name, values in tensors.items():
        flat = values.reshape(-1)
        nan = inf = 0
        for start in range(0, flat.size, _FINITE_CHUNK):
            part = flat[start:start + _FINITE_CHUNK]
            if not np.isfinite(part).all():
                nan += int(np.isnan(part).sum())
                inf += int(np.isinf(part).sum())
        if nan or inf:
            return (f"tensor {name!r} holds non-finite values ({nan} NaN, {inf} Inf of "
                    f"{values.size})")
    return None


def _atomic_write(path, write):
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


# ----------------------------------------------------------------------------------- loading

def _read_exact(f, buf):
    """Fill the writable buffer ``buf`` from ``f``; return the number of bytes read."""
    mv = memoryview(buf).cast("B")
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])
        if not n:
            break
        got += n
    return got


def load_checkpoint(path, cfg=None, vocab_hash=None):
    """Read and verify a `.cllm` file.

    Returns ``{"config": CLLMConfig, "params": flat float32, "adam_m": flat or None,
    "adam_v": flat or None, "meta": dict}``. With ``cfg`` the file's model config must equal
    it; with ``vocab_hash`` the ``meta["vocab_hash"]`` stored in the file must equal it.
    Raises CheckpointError (one line naming the file and the problem) otherwise.
    """
    path = Path(path)

    def fail(problem):
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


def _load(f, path, fail, want_cfg, want_vocab_hash):
    file_size = os.fstat(f.fileno()).st_size
    if file_size < 8:
        raise fail(f"file is {file_size} bytes, too short for a safetensors header "
                   "(truncated or not a checkpoint)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > _MAX_HEADER_BYTES or header_len + 8 > file_size:
        raise fail(f"header length {header_len} does not fit in the file of {file_size} bytes "
                   "(truncated or not a safetensors file)")
    header_bytes = f.read(header_len)
    if len(header_bytes) != header_len:
        raise fail("file shrank while reading the header")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
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
    spans = []
    for name, info in header.items():
        if (not isinstance(info, dict) or not isinstance(info.get("dtype"), str)
                or not isinstance(info.get("shape"), list)
                or not isinstance(info.get("data_offsets"), list)
                or len(info["data_offsets"]) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                           for x in info["shape"] + info["data_offsets"])):
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

    if metadata.get("header_checksum") != _header_digest(metadata, header):
        raise fail("header checksum mismatch (the metadata or tensor index is corrupt)")

    config = _model_config(metadata, fail, n_tensors=len(header))
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError, RecursionError) as exc:
        raise fail(f"bad meta in the metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise fail("bad meta in the metadata: not a JSON object")
    _check_meta(meta, fail)
    if "checksum" not in metadata:
        raise fail("no tensor checksum in the metadata")

    # Tensor names and shapes against the model config.
    shapes = tensor_shapes(config)
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
    if want_vocab_hash is not None and meta.get("vocab_hash") != want_vocab_hash:
        raise fail(f"vocab hash mismatch: checkpoint has {meta.get('vocab_hash')!r}, expected "
                   f"{want_vocab_hash!r} (the vocabulary differs from the one it was trained "
                   "with)")

    # Data: read each tensor straight into its place in the flat buffers, in file order, and
    # hash the bytes in the same order.
    buffers = {kind: np.empty(num_parameters(config), dtype=np.float32) for kind in kinds}
    targets = {}
    for kind, prefix in kinds.items():
        for name, view in named_views(config, buffers[kind]).items():
            targets[prefix + name] = view
    hasher = hashlib.sha256()
    f.seek(8 + header_len)
    for begin, end, name in spans:
        dest = targets[name]
        if _read_exact(f, dest) != end - begin:
            raise fail("file shrank while reading the tensor data")
        hasher.update(dest)
    if hasher.hexdigest() != metadata["checksum"]:
        raise fail("tensor data checksum mismatch (the file is corrupt)")
    if sys.byteorder != "little":
        for buf in buffers.values():
            buf.byteswap(inplace=True)

    bad = _first_non_finite({prefix + name: targets[prefix + name]
                             for prefix in kinds.values() for name in shapes})
    if bad:
        raise fail(f"{bad}; the state is not usable")
    if "adam_v" in buffers and (buffers["adam_v"] < 0).any():
        name = next(n for n in shapes if (targets["adam.v." + n] < 0).any())
        raise fail(f"tensor 'adam.v.{name}' holds negative values (a second moment is never "
                   "negative)")

    return {"config": config, "params": buffers["params"], "adam_m": buffers.get("adam_m"),
            "adam_v": buffers.get("adam_v"), "meta": meta}


def _model_config(metadata, fail, n_tensors):
    """The CLLMConfig of the metadata, each field checked for type and range."""
    try:
        fields = json.loads(metadata["model_config"])
    except KeyError:
        raise fail("bad model_config in the metadata: missing") from None
    except (ValueError, RecursionError) as exc:
        raise fail(f"bad model_config in the metadata: {exc}") from None
    if not isinstance(fields, dict):
        raise fail("bad model_config in the metadata: not a JSON object")
    for name in _MODEL_FIELDS:
        value = fields.get(name)
        if not _is_count(value) or value < 1:
            raise fail(f"bad model_config in the metadata: {name} must be an integer >= 1, "
                       f"got {value!r}")
    # every layer has 12 tensors: a num_layers this large cannot match (and listing its
    # tensor names would take forever)
    if fields["num_layers"] > n_tensors:
        raise fail(f"bad model_config in the metadata: num_layers {fields['num_layers']} "
                   f"cannot match the {n_tensors} tensors in the file")
    try:
        return CLLMConfig.from_dict(fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"bad model_config in the metadata: {exc}") from None


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def _check_meta(meta, fail):
    """The meta fields listed in the module docstring, for type and range."""
    def bad(field, expected, value):
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


# ------------------------------------------------------------------------- checkpoint dirs

def checkpoint_path(ckpt_dir, step):
    """``ckpt_dir / "checkpoint_step_<step>.cllm"``."""
    return Path(ckpt_dir) / f"checkpoint_step_{int(step)}.cllm"


def list_checkpoints(ckpt_dir):
    """[(step, path)] of the ``checkpoint_step_<N>.cllm`` files in ``ckpt_dir``, by step.

    Temporary files and ``final_model.cllm`` are not listed; a missing directory gives [].
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        entries = list(ckpt_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        m = _STEP_RE.fullmatch(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    found.sort(key=lambda item: (item[0], item[1].name))
    return found


def latest_checkpoint(ckpt_dir):
    """Path of the step checkpoint with the highest step, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_dir, keep):
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
