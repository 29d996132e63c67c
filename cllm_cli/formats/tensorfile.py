"""safetensors files written tensor by tensor, straight from the caller's arrays: `.cllm`
checkpoints (checkpoint.py) and the model.safetensors of an export (hf_export.py).

    safetensors_header   {name: array} + metadata -> (header bytes, tensor names in file order)
    write_tensors        the tensors' bytes in file order to an open file, through at most
                         one small buffer (only for an array that is not contiguous)
    tensor_chunks        those bytes as a sequence of buffers (hashing, writing)
    PieceTensor          a tensor of a flat buffer that is not held whole (FlatPieces: the
                         AdamW moments shared out over the ranks of a many-process run),
                         read piece by piece as it is written
    well_formed_entry    whether a header's entry for a tensor has the layout's form (the
                         readers: checkpoint_load.py, hf_import.py)

The layout is the one safetensors' own serializer writes (safetensors.numpy.save), so that a
file written here equals one written there byte for byte: 8 bytes of little-endian header
length, then the header, compact JSON padded with spaces to a multiple of 8 bytes, holding
"__metadata__" (when given) and then the tensors sorted by name, each with its dtype, shape
and data_offsets, then the tensor bytes in that order with no gaps. One difference: the
serializer lists metadata keys in an order of its own (a hash map's, not the same from one
run to the next); here they keep the order of the caller's dict.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, Union

import numpy as np
from numpy.typing import NDArray

DTYPES: dict[np.dtype, str] = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<u2"): "U16"}
CHUNK_BYTES = 1 << 20       # the buffer a non-contiguous array is copied through


def well_formed_entry(info: object, data_bytes: int) -> bool:
    """Whether a header entry read from a file is {"dtype": a string, "shape": whole numbers
    >= 0, "data_offsets": [begin, end]} with begin <= end <= data_bytes (the size of the data
    section): anything else would reach numpy as a float, an infinity, a list or an offset
    beyond the file (or beyond what a C long holds)."""
    if not isinstance(info, dict):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    return (isinstance(info.get("dtype"), str) and isinstance(shape, list)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                    for x in shape + offsets)
            and offsets[0] <= offsets[1] <= data_bytes)


class FlatPieces(Protocol):
    """A flat float32 buffer of `size` values that is read in pieces rather than held whole."""
    size: int

    def read(self, start: int, stop: int) -> NDArray[np.float32]:
        """Values [start, stop), valid until the next read."""

    def count_non_finite(self, start: int, stop: int) -> tuple[int, int]:
        """(NaN count, Inf count) of values [start, stop)."""


class PieceTensor:
    """The tensor of `shape` at `offset` in a FlatPieces: its bytes come in pieces of at most
    CHUNK_BYTES."""
    dtype: np.dtype = np.dtype("<f4")

    def __init__(self, pieces: FlatPieces, offset: int, shape: Sequence[int]) -> None:
        self.pieces, self.offset, self.shape = pieces, offset, tuple(shape)
        self.size = math.prod(self.shape)

    def chunks(self) -> Iterator[NDArray[np.uint8]]:
        step = CHUNK_BYTES // self.dtype.itemsize
        for start in range(self.offset, self.offset + self.size, step):
            stop = min(start + step, self.offset + self.size)
            yield self.pieces.read(start, stop).view(np.uint8)

    def count_non_finite(self) -> tuple[int, int]:
        return self.pieces.count_non_finite(self.offset, self.offset + self.size)


Tensor = Union[np.ndarray, PieceTensor]


def safetensors_header(tensors: Mapping[str, Tensor],
                       metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[str]]:
    """(header bytes with its 8-byte length in front, names in file order) for {name: array}."""
    names = sorted(tensors)
    index: dict[str, Any] = {}
    if metadata is not None:
        index["__metadata__"] = metadata
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.size * t.dtype.itemsize
        index[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(index, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, names


def tensor_chunks(array: Tensor) -> Iterator[NDArray[np.uint8]]:
    """The bytes of `array` in C order: the array itself when contiguous, else copies of a few
    rows at a time (at most about CHUNK_BYTES); a PieceTensor's pieces."""
    if isinstance(array, PieceTensor):
        yield from array.chunks()
        return
    if array.flags.c_contiguous:
        yield array.reshape(-1).view(np.uint8)
        return
    row_bytes = max(1, array[0].size * array.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, array.shape[0], step):
        yield np.ascontiguousarray(array[start:start + step]).reshape(-1).view(np.uint8)


def write_tensors(f: BinaryIO, tensors: Mapping[str, Tensor], names: Iterable[str],
                  update: Callable[[NDArray[np.uint8]], object] | None = None) -> None:
    """Writes the bytes of tensors[name] for each name in order; update(chunk) sees each
    chunk as it is written (a hash)."""
    for name in names:
        for chunk in tensor_chunks(tensors[name]):
            f.write(chunk)
            if update is not None:
                update(chunk)
