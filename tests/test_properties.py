"""Property-based tests (hypothesis) of the loaders, the tokenizers and the sampler.

Whatever bytes a .cllm or vocab.txt file holds (random bytes, a valid file cut short or with one
bit flipped), loading gives the documented one-line error (CheckpointError, DataError) or a
correct result: never another exception, a hang or a crash. The runs are derandomised (the same
examples every time) and have no per-example deadline.
"""
import json
import math

import numpy as np
import pytest
from checkpoint_files import good_metadata, layout_tensors, write_custom
from helpers import call, sentences
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cllm_cli._engine import num_parameters as num_params
from cllm_cli.cli import tokenize as tokenize_cli
from cllm_cli.errors import CheckpointError, DataError, SamplingError
from cllm_cli.formats.checkpoint import save_checkpoint
from cllm_cli.formats.checkpoint_load import load_checkpoint
from cllm_cli.model import CLLMConfig
from cllm_cli.model.sampling import sample_from_logits
from cllm_cli.tokenizers import Tokenizer

CFG = CLLMConfig(vocab_size=7, embed_dim=4, num_layers=1, num_heads=2, seq_len=3)
PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=150,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line_error(error):
    msg = str(error)
    assert msg and "\n" not in msg, repr(msg)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


@pytest.fixture(scope="module")
def valid_cllm(workdir):
    """(bytes of a valid .cllm file with AdamW state, its buffers)."""
    n = num_params(CFG)
    rng = np.random.default_rng(0)
    params, m = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    v = np.abs(rng.standard_normal(n)).astype(np.float32)
    path = workdir / "valid.cllm"
    save_checkpoint(path, CFG, params, m, v, {"state": {"step": 3, "epoch": 0,
                                                        "batch_in_epoch": 3, "adam_t": 3,
                                                        "bad_steps": 0},
                                               "tokenizer": "char", "vocab_hash": "a1" * 32})
    return path.read_bytes(), (params, m, v)


def load_bytes(path, data):
    """load_checkpoint of a file holding `data`: the result, or None after a one-line
    CheckpointError."""
    path.write_bytes(data)
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        one_line_error(e)
        assert str(path) in str(e)
        return None


def assert_same_state(ckpt, buffers):
    for got, want in zip((ckpt.params, ckpt.adam_m, ckpt.adam_v), buffers):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@PROPERTY
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_not_a_checkpoint(workdir, data):
    assert load_bytes(workdir / "random.cllm", data) is None


@PROPERTY
@given(body=st.binary(max_size=1024), header=st.sampled_from(
    [b'{"__metadata__":{"format":"cllm","format_version":"1"}}', b'{"wte":{"dtype":"F32",',
     b'{}', b'[' * 5000, b'{"a":' * 3000]))
def test_random_data_behind_a_plausible_header(workdir, header, body):
    data = len(header).to_bytes(8, "little") + header + body
    assert load_bytes(workdir / "plausible.cllm", data) is None


@PROPERTY
@given(cut=st.integers(min_value=0))
def test_truncated_checkpoint_is_refused(workdir, valid_cllm, cut):
    data, _ = valid_cllm
    assert load_bytes(workdir / "cut.cllm", data[:cut % len(data)]) is None


@PROPERTY
@given(bit=st.integers(min_value=0))
def test_flipped_bit_in_a_checkpoint_is_refused(workdir, valid_cllm, bit):
    data, buffers = valid_cllm
    bit %= len(data) * 8
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    ckpt = load_bytes(workdir / "flipped.cllm", bytes(flipped))
    if ckpt is not None:                # only a change that means nothing may load
        assert_same_state(ckpt, buffers)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
META_KEYS = st.sampled_from(["state", "generator", "tokenizer", "vocab_hash", "dataset_key",
                             "train_config", "step", "other"])
STATE_KEYS = st.sampled_from(["step", "epoch", "batch_in_epoch", "adam_t", "bad_steps", "x"])


@settings(PROPERTY, max_examples=100)
@given(meta=st.dictionaries(META_KEYS, JSON | st.dictionaries(STATE_KEYS, JSON), max_size=6))
def test_any_meta_with_valid_checksums_loads_or_is_refused_by_field(workdir, meta):
    path = workdir / "meta.cllm"
    write_custom(path, layout_tensors(), good_metadata(meta=meta))
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as e:
        one_line_error(e)
        assert "bad meta field" in str(e)
        return
    assert loaded.meta == json.loads(json.dumps(meta))


# --- vocab.txt ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def valid_vocab(workdir):
    """{kind: bytes of a valid vocab.txt} (the char one holds escaped tab and newline)."""
    text = sentences(40, seed=4, punct=".!?\t") + "naïve café\r\n\\"
    out = {}
    for kind in ("word", "char"):
        path = workdir / f"vocab-{kind}.txt"
        Tokenizer.build([text], kind, vocab_size=60).save(path)
        out[kind] = path.read_bytes()
    return out


def load_vocab(path, data, kind):
    """Tokenizer.load of a file holding `data`: a tokenizer that works, or None after a
    one-line DataError."""
    path.write_bytes(data)
    try:
        tokenizer = Tokenizer.load(path, kind)
    except DataError as e:
        one_line_error(e)
        return None
    assert tokenizer.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert len(set(tokenizer.itos)) == len(tokenizer)
    ids = tokenizer.encode("the old king, naïve\tcafé")
    assert ((ids >= 0) & (ids < len(tokenizer))).all()
    tokenizer.decode(ids)
    return tokenizer


@PROPERTY
@given(data=st.binary(max_size=512), kind=st.sampled_from(["word", "char"]))
def test_random_bytes_as_vocab(workdir, data, kind):
    load_vocab(workdir / "random-vocab.txt", data, kind)


@PROPERTY
@given(cut=st.integers(min_value=0), kind=st.sampled_from(["word", "char"]))
def test_truncated_vocab(workdir, valid_vocab, cut, kind):
    data = valid_vocab[kind]
    load_vocab(workdir / "cut-vocab.txt", data[:cut % (len(data) + 1)], kind)


@PROPERTY
@given(bit=st.integers(min_value=0), kind=st.sampled_from(["word", "char"]))
def test_flipped_bit_in_vocab(workdir, valid_vocab, bit, kind):
    data = bytearray(valid_vocab[kind])
    bit %= len(data) * 8
    data[bit // 8] ^= 1 << (bit % 8)
    load_vocab(workdir / "flipped-vocab.txt", bytes(data), kind)


@settings(PROPERTY, max_examples=40)
@given(bit=st.integers(min_value=0))
def test_flipped_vocab_through_cllm_tokenize(capsys, workdir, valid_vocab, bit):
    data = bytearray(valid_vocab["word"])
    bit %= len(data) * 8
    data[bit // 8] ^= 1 << (bit % 8)
    vocab, text = workdir / "tool-vocab.txt", workdir / "tool-text.txt"
    vocab.write_bytes(bytes(data))
    text.write_text("the old king saw a dog.\n", encoding="utf-8")
    code, out, err = call(capsys, tokenize_cli.main, text, "--vocab", vocab)
    assert "Traceback" not in err
    if code == 0:
        assert err == "" and all(w.isdigit() for w in out.split())
    else:
        assert code == 2 and len(err.splitlines()) == 1
        assert err.startswith("cllm_tokenize: error: ")


# --- tokenizers --------------------------------------------------------------------------

TEXT = st.text(max_size=200)


@PROPERTY
@given(corpus=TEXT, text=TEXT, kind=st.sampled_from(["word", "char"]))
def test_encode_never_fails(corpus, text, kind):
    tokenizer = Tokenizer.build([corpus], kind, vocab_size=40)
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int64 and ((ids >= 0) & (ids < len(tokenizer))).all()
    assert isinstance(tokenizer.decode(ids), str)


@PROPERTY
@given(text=TEXT)
def test_char_decode_of_encode_gives_the_text_back(workdir, text):
    """A char vocabulary holding every character of the text, also after a trip through
    vocab.txt (escapes of tab, newline, carriage return, backslash)."""
    tokenizer = Tokenizer.build([text], "char", vocab_size=len(set(text)) + 5)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    path = workdir / "char-vocab.txt"
    tokenizer.save(path)
    again = Tokenizer.load(path, "char")
    assert again.itos == tokenizer.itos
    assert again.decode(again.encode(text)) == text


# --- sampling ----------------------------------------------------------------------------

LOGIT = st.floats(width=64) | st.sampled_from([math.nan, math.inf, -math.inf, 0.0])


@PROPERTY
@given(logits=st.lists(LOGIT, min_size=1, max_size=12),
       temperature=st.sampled_from([0.0, 5e-324, 1e-310, 1e-300, 0.8, 1.0, 1e300])
       | st.floats(min_value=0, allow_infinity=False),
       top_k=st.integers(0, 14), top_p=st.floats(min_value=1e-300, max_value=1.0),
       seed=st.integers(0, 2**32))
def test_sampling_gives_a_usable_id_for_every_accepted_option(logits, temperature, top_k, top_p,
                                                              seed):
    logits = np.array(logits, dtype=np.float64)
    usable = ~np.isnan(logits) & (logits > -np.inf)
    rng = np.random.default_rng(seed)
    if not usable.any():
        with pytest.raises(SamplingError):
            sample_from_logits(logits, temperature, top_k, top_p, rng)
        return
    i = sample_from_logits(logits, temperature, top_k, top_p, rng)
    assert 0 <= i < logits.size and usable[i]
    if temperature == 0 or (logits == np.inf).any():
        assert logits[i] == np.nanmax(logits)
