"""The .cllm checkpoint format, written by cllm_cli/formats/checkpoint.py and read by
cllm_cli/formats/checkpoint_load.py: bit-exact round trips, atomic writes, and one-line
refusals of damaged, crafted or mismatched files."""
import errno
import hashlib
import json
import os
import struct

import numpy as np
import pytest
import safetensors.numpy
from checkpoint_files import (
    CFG,
    LAYOUT_SHAPES,
    N_PARAMS,
    good_metadata,
    layout_tensors,
    split_file,
    write_custom,
)
from safetensors import safe_open

from cllm_cli._engine import parameter_layout
from cllm_cli.errors import CheckpointError
from cllm_cli.formats import checkpoint as ck
from cllm_cli.formats import tensorfile
from cllm_cli.formats.checkpoint import (
    FORMAT_VERSION,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from cllm_cli.formats.checkpoint_load import load_checkpoint
from cllm_cli.model import CLLMConfig


def flat_buffer(seed):
    """A flat float32 buffer with awkward finite values: -0.0, subnormals, the extremes
    (NaN and Inf are never stored: test_faults.py)."""
    rng = np.random.default_rng(seed)
    buf = rng.standard_normal(N_PARAMS).astype(np.float32)
    bits = buf.view(np.uint32)
    bits[0] = 0x80000000          # -0.0
    bits[1] = 0x00000001          # smallest subnormal
    bits[2] = 0x7F7FFFFF          # largest float32
    bits[3] = 0x80800000          # smallest negative normal
    return buf


def make_meta():
    return {
        "step": 42, "epoch": 3, "position_in_epoch": 17,
        "tokenizer": "word", "vocab_hash": "ab" * 32,
        "training": {"learning_rate": 3e-4, "batch_size": 4, "betas": [0.9, 0.95],
                     "corpus": ["données.txt", "b.txt"]},
        "rng_state": np.random.default_rng(7).bit_generator.state,   # 128-bit integers
        "loss": np.float32(2.5), "steps_done": np.int64(42),         # numpy scalars allowed
    }


def bits_equal(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(a.view(np.uint32), b.view(np.uint32)))


@pytest.fixture
def saved(tmp_path):
    """Path of a checkpoint with Adam state, and the buffers that went into it."""
    params, m, v = flat_buffer(1), flat_buffer(2), np.abs(flat_buffer(3))
    path = checkpoint_path(tmp_path, 42)
    save_checkpoint(path, CFG, params, m, v, make_meta())
    return path, params, m, v


def refused(path, *words, **kwargs):
    """load_checkpoint must raise one line naming the file and containing all `words`."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for word in words:
        assert word.lower() in msg.lower(), msg
    return msg


# ------------------------------------------------------------------------------ round trip

def test_round_trip_bit_exact(saved):
    path, params, m, v = saved
    out = load_checkpoint(path)
    assert out.config == CFG
    for key, ref in (("params", params), ("adam_m", m), ("adam_v", v)):
        got = getattr(out, key)
        assert got.ndim == 1 and got.dtype == np.float32 and got.flags.c_contiguous
        assert got.flags.writeable
        assert bits_equal(got, ref), key
    expected_meta = json.loads(json.dumps(make_meta(), default=lambda o: o.item()))
    assert out.meta == expected_meta
    assert out.meta["rng_state"]["state"]["state"] > 2 ** 64     # big ints survive
    assert out.meta["training"]["corpus"][0] == "données.txt"


def test_round_trip_without_adam(tmp_path):
    params = flat_buffer(5)
    path = tmp_path / "final_model.cllm"
    save_checkpoint(path, CFG, params, None, None, {"step": 7})
    out = load_checkpoint(path, cfg=CFG)
    assert bits_equal(out.params, params)
    assert out.adam_m is None and out.adam_v is None
    assert out.meta == {"step": 7}
    with safe_open(str(path), framework="numpy") as f:
        assert not any(k.startswith("adam.") for k in f.keys())


class ArrayPieces:
    """FlatPieces over an array (as a rank's shares are read), recording each piece read."""

    def __init__(self, values):
        self.values, self.size, self.reads = values, values.size, []

    def read(self, start, stop):
        self.reads.append((start, stop))
        return self.values[start:stop].copy()

    def count_non_finite(self, start, stop):
        return ck.count_non_finite(self.values[start:stop])


def test_moments_read_in_pieces_write_the_file_of_the_whole_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorfile, "CHUNK_BYTES", 64)
    params, m, v = flat_buffer(1), flat_buffer(2), np.abs(flat_buffer(3))
    whole, pieces = tmp_path / "whole.cllm", tmp_path / "pieces.cllm"
    save_checkpoint(whole, CFG, params, m, v, make_meta())
    m_pieces, v_pieces = ArrayPieces(m), ArrayPieces(v)
    save_checkpoint(pieces, CFG, params, m_pieces, v_pieces, make_meta())
    assert pieces.read_bytes() == whole.read_bytes()
    for read in (m_pieces.reads, v_pieces.reads):
        assert max(stop - start for start, stop in read) == 16
        covered = sorted(read)          # every value read once, in pieces of a tensor
        assert covered[0][0] == 0 and covered[-1][1] == N_PARAMS
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_a_non_finite_moment_in_pieces_is_refused_by_name(tmp_path):
    params, m, v = flat_buffer(1), flat_buffer(2), np.abs(flat_buffer(3))
    name, shape, offset = parameter_layout(CFG)[3]
    v[offset + 1] = np.nan
    v[offset + 2] = np.inf
    path = tmp_path / "bad.cllm"
    with pytest.raises(CheckpointError, match=rf"'adam\.v\.{name}'.*1 NaN, 1 Inf"):
        save_checkpoint(path, CFG, params, ArrayPieces(m), ArrayPieces(v), make_meta())
    assert list(tmp_path.iterdir()) == []


def test_params_are_not_views_of_each_other(saved):
    path, params, m, v = saved
    out = load_checkpoint(path)
    out.params[:] = 0
    assert bits_equal(out.adam_m, m) and bits_equal(out.adam_v, v)
    again = load_checkpoint(path)
    assert bits_equal(again.params, params)


def test_overwrite_replaces_whole_file(tmp_path):
    path = tmp_path / "x.cllm"
    save_checkpoint(path, CFG, flat_buffer(1), flat_buffer(2), flat_buffer(3), {"step": 1})
    save_checkpoint(path, CFG, flat_buffer(9), None, None, {"step": 2})
    out = load_checkpoint(path)
    assert bits_equal(out.params, flat_buffer(9)) and out.adam_m is None
    assert out.meta["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.cllm"]


def test_save_rejects_wrong_buffers(tmp_path):
    path = tmp_path / "x.cllm"
    with pytest.raises(ValueError):
        save_checkpoint(path, CFG, np.zeros(N_PARAMS - 1, np.float32), None, None, {})
    with pytest.raises(ValueError):
        save_checkpoint(path, CFG, np.zeros(N_PARAMS, np.float64), None, None, {})
    with pytest.raises(ValueError):
        save_checkpoint(path, CFG, flat_buffer(1), np.zeros(3, np.float32), None, {})
    with pytest.raises(ValueError):
        save_checkpoint(path, CFG, flat_buffer(1), None, None, {"x": object()})
    assert not path.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- plain safetensors reader

def test_readable_by_plain_safetensors(saved):
    path, params, m, v = saved
    tensors = safetensors.numpy.load_file(str(path))
    expected_names = (set(LAYOUT_SHAPES) | {"adam.m." + n for n in LAYOUT_SHAPES}
                      | {"adam.v." + n for n in LAYOUT_SHAPES})
    assert set(tensors) == expected_names
    for name, shape, offset in parameter_layout(CFG):
        size = int(np.prod(shape))
        for prefix, buf in (("", params), ("adam.m.", m), ("adam.v.", v)):
            t = tensors[prefix + name]
            assert t.dtype == np.float32 and t.shape == LAYOUT_SHAPES[name]
            assert bits_equal(t.reshape(-1), buf[offset:offset + size]), prefix + name
    with safe_open(str(path), framework="numpy") as f:
        md = f.metadata()
    assert md["format"] == "cllm"
    assert md["format_version"] == str(FORMAT_VERSION) == "1"
    assert CLLMConfig.from_dict(json.loads(md["model_config"])) == CFG
    assert json.loads(md["meta"])["vocab_hash"] == "ab" * 32
    # checksum: sha256 of all tensor bytes in stored order = the whole data section
    n, header, body = split_file(path.read_bytes())
    spans = sorted(tuple(e["data_offsets"]) for k, e in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(body)
    assert b"".join(body[a:b] for a, b in spans) == body
    assert md["checksum"] == hashlib.sha256(body).hexdigest()
    assert len(md["header_checksum"]) == 64


# ------------------------------------------------------------------------------ atomicity

def files_in(d):
    return sorted(p.name for p in d.iterdir())


def test_successful_save_leaves_no_temp_file(saved):
    path, *_ = saved
    assert files_in(path.parent) == [path.name]


@pytest.mark.parametrize("victim", ["replace", "fsync", "write", "fdopen"])
def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch, victim):
    path = tmp_path / "checkpoint_step_3.cllm"
    real_fdopen = os.fdopen

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    class HalfWriter:
        """Writes some bytes, then the disk is full."""
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            self.f.write(bytes(chunk)[:len(chunk) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    if victim == "write":
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(os, victim, boom)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, CFG, flat_buffer(1), flat_buffer(2), flat_buffer(3), {"step": 3})
    msg = str(info.value)
    assert msg.startswith(f"cannot write checkpoint {path}: ") and "\n" not in msg
    assert "No space left" in msg
    monkeypatch.undo()
    assert files_in(tmp_path) == []


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "final_model.cllm"
    save_checkpoint(path, CFG, flat_buffer(1), None, None, {"step": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointError):
        save_checkpoint(path, CFG, flat_buffer(2), flat_buffer(2), flat_buffer(2), {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["final_model.cllm"]
    assert load_checkpoint(path).meta == {"step": 1}


def test_final_name_untouched_until_rename(tmp_path, monkeypatch):
    """While the bytes are written and fsync'ed, they go to a temporary file in the SAME
    directory (so the rename is atomic) and the final name still holds the old file."""
    path = tmp_path / "checkpoint_step_1.cllm"
    save_checkpoint(path, CFG, flat_buffer(1), None, None, {"step": 1})
    old = path.read_bytes()
    real_fsync, real_replace = os.fsync, os.replace
    seen = []

    def spy_fsync(fd):
        seen.append(("fsync", path.read_bytes() == old, files_in(tmp_path)))
        return real_fsync(fd)

    def spy_replace(src, dst):
        seen.append(("replace", os.path.dirname(os.fspath(src)) == os.fspath(tmp_path),
                     os.fspath(dst) == os.fspath(path)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    save_checkpoint(path, CFG, flat_buffer(2), None, None, {"step": 2})
    monkeypatch.undo()
    first = seen[0]
    assert first[0] == "fsync" and first[1] and len(first[2]) == 2     # old file + temp file
    temp_name = [n for n in first[2] if n != path.name][0]
    assert temp_name.startswith(".") and not list_checkpoints(tmp_path)[0][1].name == temp_name
    assert ("replace", True, True) in seen
    assert seen.index(("replace", True, True)) > 0                    # fsync before rename
    assert files_in(tmp_path) == [path.name]
    assert load_checkpoint(path).meta == {"step": 2}


def test_interrupted_save_removes_temp_file(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "a.cllm", CFG, flat_buffer(1), None, None, {})
    monkeypatch.undo()
    assert files_in(tmp_path) == []


def test_parent_is_a_regular_file(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    for path in (blocker / "checkpoint_step_1.cllm", blocker / "sub" / "c.cllm"):
        with pytest.raises(CheckpointError) as info:
            save_checkpoint(path, CFG, flat_buffer(1), None, None, {})
        msg = str(info.value)
        assert msg.startswith(f"cannot write checkpoint {path}: ") and "\n" not in msg
        assert "not a directory" in msg
    assert files_in(tmp_path) == ["not_a_dir"] and blocker.read_text() == "x"


def test_save_creates_missing_directory(tmp_path):
    path = tmp_path / "a" / "b" / "checkpoint_step_1.cllm"
    save_checkpoint(path, CFG, flat_buffer(1), None, None, {})
    assert files_in(path.parent) == [path.name]


# ------------------------------------------------------------------------------- refusals

def test_missing_file_and_directory(tmp_path):
    refused(tmp_path / "nope.cllm", "no such file")
    refused(tmp_path, "directory")


@pytest.mark.parametrize("cut", ["empty", 4, 7, 8, 9, 100, "header-1", "header", "header+5",
                                 "half", "end-4", "end-1"])
def test_truncated_file(saved, cut):
    path, *_ = saved
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    size = {"empty": 0, "header-1": 8 + n - 1, "header": 8 + n, "header+5": 8 + n + 5,
            "half": len(data) // 2, "end-4": len(data) - 4, "end-1": len(data) - 1}.get(cut, cut)
    path.write_bytes(data[:size])
    refused(path)


def test_trailing_garbage(saved):
    path, *_ = saved
    path.write_bytes(path.read_bytes() + b"\0\0\0\0")
    refused(path, "unexpected bytes")


def test_flipped_byte_in_tensor_data(saved):
    path, *_ = saved
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    start = 8 + n
    for pos in (start, start + 1, (start + len(data)) // 2, len(data) - 1):
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= mask
            path.write_bytes(bytes(bad))
            refused(path, "checksum")
    path.write_bytes(data)
    load_checkpoint(path)           # the original still loads


@pytest.mark.slow
def test_flipped_byte_anywhere_in_header(saved):
    """Every single-bit flip in the length prefix and the JSON header is refused, including
    flips that keep the JSON valid (a digit of the step number, a letter of a name)."""
    path, *_ = saved
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    bad = bytearray(data)
    not_refused = []
    # every byte of the length prefix, the metadata and the first tensor entries; then every
    # 5th byte of the (repetitive) tensor index, and the trailing padding
    positions = sorted(set(range(min(8 + n, 1200))) | set(range(1200, 8 + n, 5))
                       | set(range(8 + n - 16, 8 + n)))
    for pos in positions:
        for mask in (0x01, 0x04):
            bad[pos] ^= mask
            path.write_bytes(bad)
            try:
                load_checkpoint(path)
                not_refused.append((pos, mask))
            except CheckpointError as exc:
                assert str(path) in str(exc) and "\n" not in str(exc)
            bad[pos] ^= mask
    assert not_refused == []


def test_flipped_meta_digit_is_refused(saved):
    path, *_ = saved
    data = path.read_bytes()
    needle = b'\\"step\\": 42'
    assert data.count(needle) == 1
    path.write_bytes(data.replace(needle, b'\\"step\\": 43'))
    refused(path, "header checksum")


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_file(tmp_path, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "random.cllm"
    body = rng.integers(0, 256, size=int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()
    if seed % 2:        # a plausible header length, so the JSON parser gets random bytes
        body = struct.pack("<Q", min(len(body), 100)) + body
    path.write_bytes(body)
    refused(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.cllm"
    path.write_text("this is not a checkpoint\n" * 20)
    refused(path)


def test_plain_safetensors_without_cllm_metadata(tmp_path):
    path = tmp_path / "plain.cllm"
    safetensors.numpy.save_file(layout_tensors(), str(path))
    refused(path, "not a .cllm")
    safetensors.numpy.save_file(layout_tensors(), str(path), metadata={"format": "pt"})
    refused(path, "format", "not a .cllm")


def test_wrong_format_version(tmp_path, monkeypatch):
    path = tmp_path / "v2.cllm"
    monkeypatch.setattr(ck, "FORMAT_VERSION", 2)
    save_checkpoint(path, CFG, flat_buffer(1), None, None, {})
    monkeypatch.undo()
    refused(path, "unsupported format_version", "'2'")
    for version in ("0", "1.0", "x"):
        write_custom(path, layout_tensors(), good_metadata(version=version))
        refused(path, "unsupported format_version")


def test_custom_writer_is_accepted(tmp_path):
    """Guard for the tests below: a well-formed hand-made file does load, so they fail for
    the reason they name."""
    path = tmp_path / "ok.cllm"
    t = layout_tensors(adam=True)
    write_custom(path, t, good_metadata())
    out = load_checkpoint(path, cfg=CFG)
    for name, shape, offset in parameter_layout(CFG):
        size = int(np.prod(shape))
        assert bits_equal(out.params[offset:offset + size], t[name].reshape(-1))
        assert bits_equal(out.adam_v[offset:offset + size], t["adam.v." + name].reshape(-1))


def test_shape_mismatch(tmp_path):
    path = tmp_path / "bad.cllm"
    t = layout_tensors()
    t["h.1.mlp.c_fc.weight"] = np.zeros((32, 9), np.float32)
    write_custom(path, t, good_metadata())
    refused(path, "h.1.mlp.c_fc.weight", "shape")
    # tensors of a bigger model under a config that says smaller
    t = layout_tensors()
    write_custom(path, t, good_metadata(cfg=CLLMConfig(vocab_size=14, embed_dim=8, num_layers=2,
                                                       num_heads=2, seq_len=6)))
    refused(path, "wte", "shape")


def test_missing_extra_and_wrong_dtype_tensors(tmp_path):
    path = tmp_path / "bad.cllm"
    t = layout_tensors()
    del t["ln_f.bias"]
    write_custom(path, t, good_metadata())
    refused(path, "missing tensor", "ln_f.bias")

    t = layout_tensors()
    t["h.2.ln_1.weight"] = np.ones(8, np.float32)
    write_custom(path, t, good_metadata())
    refused(path, "unexpected tensor", "h.2.ln_1.weight")

    t = layout_tensors()
    t["wpe"] = t["wpe"].astype(np.float64)
    write_custom(path, t, good_metadata())
    refused(path, "wpe", "dtype")

    t = layout_tensors(adam=True)
    del t["adam.v.h.0.attn.c_proj.bias"]
    write_custom(path, t, good_metadata())
    refused(path, "missing tensor", "adam.v.h.0.attn.c_proj.bias")


def test_bad_model_config(tmp_path):
    path = tmp_path / "bad.cllm"
    md = good_metadata()
    md["model_config"] = json.dumps(dict(CFG.to_dict(), num_heads=3))
    write_custom(path, layout_tensors(), md)
    refused(path, "model_config")
    md["model_config"] = "{not json"
    write_custom(path, layout_tensors(), md)
    refused(path, "model_config")
    del md["model_config"]
    write_custom(path, layout_tensors(), md)
    refused(path, "model_config")


def test_wrong_checksums_in_hand_made_file(tmp_path):
    path = tmp_path / "bad.cllm"
    write_custom(path, layout_tensors(), good_metadata(), fix_checksums=False)
    refused(path, "checksum")


def test_config_mismatch(saved):
    path, *_ = saved
    other = CLLMConfig(vocab_size=13, embed_dim=8, num_layers=3, num_heads=2, seq_len=6)
    msg = refused(path, "checkpoint model config", "does not match", "num_layers", cfg=other)
    assert "num_layers 2 != 3" in msg
    load_checkpoint(path, cfg=CLLMConfig(vocab_size=13, embed_dim=8, num_layers=2,
                                         num_heads=2, seq_len=6, ff_dim=32))


def test_vocab_hash_mismatch(saved):
    path, *_ = saved
    refused(path, "vocab hash", vocab_hash="cd" * 32)
    assert load_checkpoint(path, vocab_hash="ab" * 32).meta["step"] == 42
    no_hash = path.parent / "nohash.cllm"
    save_checkpoint(no_hash, CFG, flat_buffer(1), None, None, {"step": 1})
    refused(no_hash, "vocab hash", vocab_hash="ab" * 32)


# ---------------------------------------------------------------- list / latest / prune

def test_checkpoint_path(tmp_path):
    assert checkpoint_path(tmp_path, 120) == tmp_path / "checkpoint_step_120.cllm"
    assert checkpoint_path(str(tmp_path), 0) == tmp_path / "checkpoint_step_0.cllm"


def populate(d):
    for step in (5, 10, 2, 100, 30):
        checkpoint_path(d, step).write_bytes(b"x")
    for name in ("final_model.cllm", ".checkpoint_step_200.cllm.0a1b2c.tmp",
                 "checkpoint_step_300.cllm.tmp", "checkpoint_step_x.cllm", "checkpoint_step_.cllm",
                 "checkpoint_step_7.cllm.bak", "vocab.txt", "dataset.bin"):
        (d / name).write_bytes(b"y")
    (d / "checkpoint_step_999.cllm").mkdir()


def test_list_and_latest(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    populate(tmp_path)
    found = list_checkpoints(tmp_path)
    assert found == [(s, tmp_path / f"checkpoint_step_{s}.cllm") for s in (2, 5, 10, 30, 100)]
    assert all(isinstance(s, int) for s, _ in found)
    assert latest_checkpoint(str(tmp_path)) == tmp_path / "checkpoint_step_100.cllm"


@pytest.mark.parametrize("keep,left", [(0, [2, 5, 10, 30, 100]), (-1, [2, 5, 10, 30, 100]),
                                       (1, [100]), (2, [30, 100]), (5, [2, 5, 10, 30, 100]),
                                       (9, [2, 5, 10, 30, 100])])
def test_prune(tmp_path, keep, left):
    populate(tmp_path)
    others = set(files_in(tmp_path)) - {f"checkpoint_step_{s}.cllm" for s in (2, 5, 10, 30, 100)}
    prune_checkpoints(tmp_path, keep)
    assert [s for s, _ in list_checkpoints(tmp_path)] == left
    assert set(files_in(tmp_path)) - {f"checkpoint_step_{s}.cllm" for s in left} == others


def test_prune_missing_directory_is_left_missing(tmp_path):
    prune_checkpoints(tmp_path / "missing", 3)
    assert list(tmp_path.iterdir()) == []


def test_real_checkpoints_listed_and_pruned(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(checkpoint_path(tmp_path, step), CFG, flat_buffer(step), None, None,
                        {"step": step})
        prune_checkpoints(tmp_path, 2)
    save_checkpoint(tmp_path / "final_model.cllm", CFG, flat_buffer(0), None, None, {})
    prune_checkpoints(tmp_path, 1)
    assert files_in(tmp_path) == ["checkpoint_step_30.cllm", "final_model.cllm"]
    assert load_checkpoint(latest_checkpoint(tmp_path)).meta["step"] == 30


def test_streamed_file_is_what_safetensors_writes(saved):
    """The streamed checkpoint equals safetensors' own serializer's file of the same tensors
    and metadata (what this module wrote before it streamed): same header length, same
    tensor index in the same order, same metadata, same data bytes. Only the order of the
    metadata keys may differ: safetensors takes it from a hash map."""
    path, *_ = saved
    ours = path.read_bytes()
    tensors = safetensors.numpy.load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    theirs = safetensors.numpy.save(tensors, metadata=metadata)
    assert len(theirs) == len(ours)
    n_ours, header_ours, body_ours = split_file(ours)
    n_theirs, header_theirs, body_theirs = split_file(theirs)
    assert n_ours == n_theirs and body_ours == body_theirs
    assert header_ours == header_theirs
    assert list(header_ours) == list(header_theirs)         # tensor order
    assert list(header_ours["__metadata__"]) == ["format", "format_version", "model_config",
                                                 "meta", "checksum", "header_checksum"]
