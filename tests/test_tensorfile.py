"""The streaming safetensors writer (cllm_cli/tensorfile.py) against safetensors' own
serializer: the same bytes for the same tensors, from contiguous and transposed arrays."""
import io
import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from cllm_cli.formats import tensorfile
from cllm_cli.formats.tensorfile import safetensors_header, tensor_chunks, write_tensors


def streamed(tensors, metadata):
    f = io.BytesIO()
    header, names = safetensors_header(tensors, metadata)
    f.write(header)
    write_tensors(f, tensors, names)
    return f.getvalue()


def metadata_order(blob):
    """The metadata of a safetensors file as a dict in the order it is written."""
    (n,) = struct.unpack("<Q", blob[:8])
    pairs = json.loads(blob[8:8 + n], object_pairs_hook=list)
    return dict(dict(pairs)["__metadata__"])


def awkward_tensors(seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((7, 5)).astype(np.float32)
    return {
        "b.weight": base.T,                                   # not contiguous
        "a": rng.standard_normal(3).astype(np.float32),
        "h.10.x": np.zeros((0, 4), np.float32),               # empty
        "h.2.x": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "b.bias": base[:, 1:4].T,                             # a strided view
    }


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"k": "x" * 5}, {"é": "naïve \u2028\n\t\"\\"}])
def test_same_bytes_as_safetensors(metadata):
    tensors = awkward_tensors(1)
    theirs = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                    metadata=metadata)
    assert streamed(tensors, metadata) == theirs


def test_same_bytes_with_several_metadata_keys():
    """safetensors lists metadata keys in a hash map's order: given that order, the bytes
    are the same."""
    tensors = awkward_tensors(2)
    metadata = {f"key{i}": f"value {i}" * i for i in range(6)}
    theirs = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                    metadata=metadata)
    assert streamed(tensors, metadata_order(theirs)) == theirs


def test_non_contiguous_arrays_go_through_a_bounded_buffer(monkeypatch):
    monkeypatch.setattr(tensorfile, "CHUNK_BYTES", 64)
    big = np.arange(40 * 30, dtype=np.float32).reshape(40, 30)
    chunks = list(tensor_chunks(big.T))
    assert len(chunks) > 1 and max(len(c) for c in chunks) <= 64 + 4 * 40
    assert b"".join(bytes(c) for c in chunks) == np.ascontiguousarray(big.T).tobytes()
    contiguous = list(tensor_chunks(big))
    assert len(contiguous) == 1 and np.shares_memory(np.frombuffer(contiguous[0], np.uint8), big)


def test_exported_model_safetensors_is_what_safetensors_writes():
    """cllm_export's model.safetensors, streamed from views of the flat parameters (the
    Conv1D weights transposed on the way), equals safetensors' file of the copied state."""
    from cllm_cli import CLLMConfig, CLLMModel
    from cllm_cli.formats.hf_export import to_hf_state, write_safetensors
    cfg = CLLMConfig(vocab_size=11, embed_dim=8, num_layers=2, num_heads=2, ff_dim=24,
                     seq_len=5)
    flat = CLLMModel(cfg, seed=3).flat
    state = to_hf_state(cfg, flat)
    assert all(np.shares_memory(t, flat) for t in state.values())       # no copies
    theirs = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in state.items()},
                                    metadata={"format": "pt"})
    f = io.BytesIO()
    write_safetensors(f, state, {"format": "pt"})
    assert f.getvalue() == theirs
