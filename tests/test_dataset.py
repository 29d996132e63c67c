"""Tests of cllm_cli/corpus/dataset.py and corpus/workers.py: the dataset.bin cache, its
reuse, and damaged files on disk."""
import hashlib
import os
import pty
import subprocess
import sys

import numpy as np
import pytest
from helpers import read_terminal, sentences, tensors, write

from cllm_cli import train
from cllm_cli.corpus import dataset as D
from cllm_cli.corpus.files import collect_files, read_text
from cllm_cli.errors import DataError
from cllm_cli.tokenizers import EOS, SPECIALS, TOKENIZERS, Tokenizer, WordTokenizer

# ---------------------------------------------------------------------------------------
# prepare_dataset / dataset.bin
# ---------------------------------------------------------------------------------------

def make_corpus(tmp_path):
    d = tmp_path / "corpus"
    write(d / "a.txt", "The cat sat on the mat. The cat ran!")
    write(d / "b.txt", "A dog sat; the dog didn't run.")
    write(d / "c.txt", "  \n")                          # no tokens: adds nothing
    return collect_files([d])


def test_prepare_dataset_contents(tmp_path):
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    tok, tokens, info = D.prepare_dataset(files, out, vocab_size=100)
    expected = np.concatenate([tok.encode_document(read_text(f)) for f in files[:2]])
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert np.array_equal(np.asarray(tokens), expected)
    assert (out / "vocab.txt").is_file() and (out / "dataset.bin").is_file()
    assert Tokenizer.load(out / "vocab.txt").itos == tok.itos
    assert tok.itos[4:7] == ["the", "cat", "sat"]             # the: 4, cat/sat/dog tie at 2
    assert tokens[-1] == EOS and int((np.asarray(tokens) == EOS).sum()) == 2
    assert info == {"files": 3, "bytes": sum(f.stat().st_size for f in files),
                    "tokens": len(expected), "reused": False, "key": info["key"],
                    "rebuilt_reason": None}
    assert len(info["key"]) == 64
    assert (out / "dataset.bin").stat().st_size == D.HEADER_SIZE + 2 * len(expected)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.bin", "vocab.txt"]
    assert np.array_equal(np.asarray(D.load_dataset(out / "dataset.bin")), expected)


def test_prepare_dataset_matches_build_of_same_documents(tmp_path):
    files = make_corpus(tmp_path)
    tok, _, _ = D.prepare_dataset(files, tmp_path / "ck", vocab_size=8)
    ref = Tokenizer.build([read_text(f) for f in files], vocab_size=8)
    assert tok.itos == ref.itos and tok.counts == ref.counts
    assert tok.vocab_hash == ref.vocab_hash


def test_prepare_dataset_char(tmp_path):
    files = make_corpus(tmp_path)
    tok, tokens, _ = D.prepare_dataset(files, tmp_path / "ck", kind="char")
    assert tok.kind == "char"
    expected = np.concatenate([tok.encode_document(read_text(f)) for f in files])
    assert np.array_equal(np.asarray(tokens), expected)
    assert "T" in tok.stoi and "t" in tok.stoi


def test_prepare_dataset_reuse_and_rebuild(tmp_path):
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    _, _, first = D.prepare_dataset(files, out, vocab_size=100)
    os.utime(out / "dataset.bin", ns=(1, 1))
    os.utime(out / "vocab.txt", ns=(1, 1))

    tok, tokens, again = D.prepare_dataset(files, out, vocab_size=100)
    assert again["reused"] is True and again["key"] == first["key"]
    assert again["tokens"] == first["tokens"] and again["bytes"] == first["bytes"]
    assert (out / "dataset.bin").stat().st_mtime_ns == 1      # not rewritten
    assert (out / "vocab.txt").stat().st_mtime_ns == 1
    assert tok.itos[:5] == SPECIALS + ["the"]
    assert np.array_equal(np.asarray(tokens)[:3], tok.encode("The cat sat"))

    # other settings: rebuilt
    _, _, other = D.prepare_dataset(files, out, vocab_size=7)
    assert other["reused"] is False and other["key"] != first["key"]
    _, _, other = D.prepare_dataset(files, out, vocab_size=7)
    assert other["reused"] is True
    _, _, other = D.prepare_dataset(files, out, vocab_size=7, encoding_errors="replace")
    assert other["reused"] is False
    _, _, other = D.prepare_dataset(files, out, vocab_size=7, kind="char")
    assert other["reused"] is False

    # changed corpus: rebuilt with the new text
    write(files[1], "A dog sat; the dog didn't run far.")
    tok, tokens, changed = D.prepare_dataset(files, out, vocab_size=100)
    assert changed["reused"] is False and changed["key"] != first["key"]
    assert "far" in tok.stoi and tokens[-2] == tok.stoi["."]
    assert tok.stoi["far"] in np.asarray(tokens)


def test_prepare_dataset_does_not_reuse_foreign_vocab(tmp_path):
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    tok, tokens, _ = D.prepare_dataset(files, out, vocab_size=100)
    # same size, two ids swapped: only the vocab tag in the header tells them apart
    swapped = list(tok.itos)
    swapped[4], swapped[5] = swapped[5], swapped[4]
    WordTokenizer(swapped, tok.counts).save(out / "vocab.txt")
    tok2, tokens2, info = D.prepare_dataset(files, out, vocab_size=100)
    assert info["reused"] is False
    assert tok2.itos == tok.itos and np.array_equal(np.asarray(tokens2), np.asarray(tokens))


def test_prepare_dataset_with_given_tokenizer(tmp_path):
    files = make_corpus(tmp_path)
    given = Tokenizer.build(["the dog"])
    tok, tokens, info = D.prepare_dataset(files, tmp_path / "ck", tokenizer=given)
    assert tok is given
    expected = np.concatenate([given.encode_document(read_text(f)) for f in files[:2]])
    assert np.array_equal(np.asarray(tokens), expected)
    assert Tokenizer.load(tmp_path / "ck" / "vocab.txt").vocab_hash == given.vocab_hash
    _, _, again = D.prepare_dataset(files, tmp_path / "ck", tokenizer=given)
    assert again["reused"] is True and again["key"] == info["key"]
    other_tok = Tokenizer.build(["dog the"])
    _, tokens, other = D.prepare_dataset(files, tmp_path / "ck", tokenizer=other_tok)
    assert other["reused"] is False
    assert np.array_equal(np.asarray(tokens), np.concatenate(
        [other_tok.encode_document(read_text(f)) for f in files[:2]]))
    # a stream encoded with a given vocabulary is not reused when building one
    built, tokens, own = D.prepare_dataset(files, tmp_path / "ck")
    assert own["reused"] is False and len(built) > len(other_tok)


def test_prepare_dataset_resume_with_saved_tokenizer(tmp_path):
    """A resumed run passes the vocabulary the first run built: same key, stream reused;
    and if dataset.bin is gone, it is rebuilt under the same key."""
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    tok, tokens, first = D.prepare_dataset(files, out, "word", 100)
    saved = Tokenizer.load(out / "vocab.txt")
    _, again, info = D.prepare_dataset(files, out, "word", 100, tokenizer=saved)
    assert info["reused"] is True and info["key"] == first["key"]
    (out / "dataset.bin").unlink()
    _, rebuilt, info = D.prepare_dataset(files, out, "word", 100, tokenizer=saved)
    assert info["reused"] is False and info["key"] == first["key"]
    assert np.array_equal(np.asarray(rebuilt), np.asarray(again))
    # a changed corpus still changes the key
    write(files[0], "The cat sat on the mat.")
    _, _, info = D.prepare_dataset(files, out, "word", 100, tokenizer=saved)
    assert info["key"] != first["key"]


def test_prepare_dataset_built_stream_not_reused_with_other_vocab(tmp_path):
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    _, _, first = D.prepare_dataset(files, out, "word", 100)
    other = Tokenizer.build(["cat dog"])
    _, encoded, info = D.prepare_dataset(files, out, "word", 100, tokenizer=other)
    assert info["reused"] is False and info["key"] == first["key"]
    assert np.array_equal(np.asarray(encoded), np.concatenate(
        [other.encode_document(read_text(f)) for f in files[:2]]))
    assert Tokenizer.load(out / "vocab.txt").vocab_hash == other.vocab_hash


def test_prepare_dataset_uint32_for_large_vocab(tmp_path):
    n = 65600
    words = " ".join(f"w{i}" for i in range(n))
    f = write(tmp_path / "big.txt", words)
    tok, tokens, _ = D.prepare_dataset([f], tmp_path / "ck", vocab_size=n + 10)
    assert len(tok) == n + 4
    assert tokens.dtype == np.uint32
    assert np.array_equal(np.asarray(tokens), np.append(np.arange(4, n + 4), EOS))


def test_prepare_dataset_empty_corpus(tmp_path):
    f = write(tmp_path / "empty.txt", " \n\t\n")
    g = write(tmp_path / "zero.txt", "")
    with pytest.raises(DataError, match="^corpus is empty: "):
        D.prepare_dataset([f, g], tmp_path / "ck")
    with pytest.raises(DataError, match="^corpus is empty: "):
        D.prepare_dataset([], tmp_path / "ck")
    assert not (tmp_path / "ck" / "dataset.bin").exists()
    assert list((tmp_path / "ck").iterdir()) == []            # no temporary files left


def test_prepare_dataset_bad_file(tmp_path):
    good = write(tmp_path / "good.txt", "hello world")
    bad = write(tmp_path / "bad.txt", b"hello \xff world")
    with pytest.raises(DataError, match=f"{bad}: not valid UTF-8 \\(bad byte at offset 6\\)"):
        D.prepare_dataset([good, bad], tmp_path / "ck")
    assert not (tmp_path / "ck" / "dataset.bin").exists()
    tok, tokens, _ = D.prepare_dataset([good, bad], tmp_path / "ck", encoding_errors="replace")
    assert "\ufffd" in tok.stoi
    assert len(tokens) == 2 + 1 + 3 + 1


def test_load_dataset_rejects_bad_files(tmp_path):
    files = make_corpus(tmp_path)
    D.prepare_dataset(files, tmp_path / "ck")
    good = (tmp_path / "ck" / "dataset.bin").read_bytes()
    header = D.dataset_header(tmp_path / "ck" / "dataset.bin")
    assert header["version"] == D.DATASET_VERSION and header["dtype"] == np.uint16
    cases = {
        "magic": b"NOTCLLM!" + good[8:],
        "version": good[:8] + (99).to_bytes(4, "little") + good[12:],
        "truncated": good[:-1],
        "short": good[:10],
        "dtype": good[:12] + (3).to_bytes(4, "little") + good[16:],
    }
    messages = {"magic": "bad magic", "version": "format version 99", "truncated": "truncated",
                "short": "too short", "dtype": "type code 3"}
    for name, raw in cases.items():
        path = write(tmp_path / f"{name}.bin", raw)
        with pytest.raises(DataError, match=messages[name]):
            D.load_dataset(path)


def test_load_dataset_reads_back_what_was_written(tmp_path):
    files = make_corpus(tmp_path)
    _, tokens, _ = D.prepare_dataset(files, tmp_path / "ck", vocab_size=100)
    path = tmp_path / "ck" / "dataset.bin"
    header = D.dataset_header(path)
    raw = path.read_bytes()
    assert header["ids_sha256"] == hashlib.sha256(raw[D.HEADER_SIZE:]).hexdigest()
    assert header["vocab_len"] == len(Tokenizer.load(tmp_path / "ck" / "vocab.txt"))
    assert np.array_equal(np.asarray(D.load_dataset(path)), np.asarray(tokens))


# ---------------------------------------------------------------------------------------
# Damaged dataset.bin on disk: refused by load_dataset, rebuilt by prepare_dataset
# ---------------------------------------------------------------------------------------

def damage(path, how):
    """Damage the ids of a dataset.bin written by prepare_dataset, in place."""
    raw = bytearray(path.read_bytes())
    if how == "flipped":        # the low bit of every 7th id, where the id stays a word's
        vocab_len = D.dataset_header(path)["vocab_len"]
        flipped = 0
        for at in range(D.HEADER_SIZE, len(raw), 14):
            if 4 <= (raw[at] ^ 1) + 256 * raw[at + 1] < vocab_len:
                raw[at] ^= 1
                flipped += 1
        assert flipped
    elif how == "beyond vocabulary":
        at = D.HEADER_SIZE + 2 * ((len(raw) - D.HEADER_SIZE) // 4)
        raw[at:at + 2] = (60000).to_bytes(2, "little")
    elif how == "truncated":
        del raw[-3:]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, reason", [("flipped", "checksum"),
                                         ("beyond vocabulary", "checksum"),
                                         ("truncated", "truncated")])
def test_damaged_dataset_is_refused_and_rebuilt(tmp_path, how, reason):
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    tok, tokens, _ = D.prepare_dataset(files, out, vocab_size=100)
    good = (out / "dataset.bin").read_bytes()
    expected = np.asarray(tokens).copy()
    del tokens
    damage(out / "dataset.bin", how)
    assert (out / "dataset.bin").read_bytes() != good
    with pytest.raises(DataError) as e:
        D.load_dataset(out / "dataset.bin")
    assert reason in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{out / 'dataset.bin'}: ")

    tok2, rebuilt, info = D.prepare_dataset(files, out, vocab_size=100)
    assert info["reused"] is False
    assert info["rebuilt_reason"] == str(e.value)
    assert np.array_equal(np.asarray(rebuilt), expected)
    assert tok2.vocab_hash == tok.vocab_hash
    assert (out / "dataset.bin").read_bytes() == good
    _, _, again = D.prepare_dataset(files, out, vocab_size=100)
    assert again["reused"] is True and again["rebuilt_reason"] is None


def test_every_bit_flip_and_truncation_is_refused_or_harmless(tmp_path):
    """load_dataset of a dataset.bin with any one bit flipped, or cut at any length, raises
    DataError with one line naming the file, or returns the very ids that were written (a
    flip in the key or the vocab tag, which only prepare_dataset's reuse looks at)."""
    files = make_corpus(tmp_path)
    _, tokens, _ = D.prepare_dataset(files, tmp_path / "ck", vocab_size=100)
    expected = np.asarray(tokens).copy()
    good = (tmp_path / "ck" / "dataset.bin").read_bytes()
    path = tmp_path / "damaged.bin"
    variants = [good[:n] for n in range(len(good))]
    for pos in range(len(good)):
        for bit in range(8):
            flipped = bytearray(good)
            flipped[pos] ^= 1 << bit
            variants.append(bytes(flipped))
    harmless = set()
    for raw in variants:
        path.write_bytes(raw)
        try:
            ids = D.load_dataset(path)
        except DataError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
            continue
        assert np.array_equal(np.asarray(ids), expected)
        harmless.add(next(i for i in range(len(raw)) if raw[i] != good[i]))
        del ids
    assert harmless <= set(range(24, 64))            # key, vocab_len, vocab_tag


def test_ids_beyond_the_vocabulary_with_a_valid_checksum_are_refused(tmp_path):
    """A crafted file whose checksum matches its ids: the id range is checked too."""
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    _, tokens, _ = D.prepare_dataset(files, out, vocab_size=100)
    expected = np.asarray(tokens).copy()
    del tokens
    path = out / "dataset.bin"
    raw = bytearray(path.read_bytes())
    vocab_len = D.dataset_header(path)["vocab_len"]
    at = D.HEADER_SIZE + 2 * 5
    raw[at:at + 2] = vocab_len.to_bytes(2, "little")
    raw[64:96] = hashlib.sha256(raw[D.HEADER_SIZE:]).digest()
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"token id {vocab_len} at position 5 is beyond the "
                                        f"vocabulary of {vocab_len} ids"):
        D.load_dataset(path)
    _, rebuilt, info = D.prepare_dataset(files, out, vocab_size=100)
    assert "beyond the vocabulary" in info["rebuilt_reason"]
    assert np.array_equal(np.asarray(rebuilt), expected)


def test_dataset_of_an_older_format_is_rebuilt(tmp_path):
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    _, tokens, _ = D.prepare_dataset(files, out, vocab_size=100)
    expected = np.asarray(tokens).copy()
    del tokens
    path = out / "dataset.bin"
    raw = path.read_bytes()
    # version 1: the same fields without the checksum, a 64-byte header
    path.write_bytes(raw[:8] + (1).to_bytes(4, "little") + raw[12:64] + raw[D.HEADER_SIZE:])
    _, rebuilt, info = D.prepare_dataset(files, out, vocab_size=100)
    assert info["reused"] is False
    assert info["rebuilt_reason"].endswith("dataset format version 1, expected 2")
    assert np.array_equal(np.asarray(rebuilt), expected)


def test_foreign_vocab_is_a_rebuild_reason_other_settings_are_not(tmp_path):
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    tok, _, _ = D.prepare_dataset(files, out, vocab_size=100)
    WordTokenizer(tok.itos[:-1], tok.counts[:-1]).save(out / "vocab.txt")
    _, _, info = D.prepare_dataset(files, out, vocab_size=100)
    assert info["rebuilt_reason"] == f"{out / 'vocab.txt'} does not belong to {out / 'dataset.bin'}"
    (out / "vocab.txt").write_text("garbage\n")
    _, _, info = D.prepare_dataset(files, out, vocab_size=100)
    assert info["rebuilt_reason"].startswith(f"{out / 'vocab.txt'}:1: ")
    # another vocabulary size is another stream, not a damaged one
    _, _, info = D.prepare_dataset(files, out, vocab_size=7)
    assert info["reused"] is False and info["rebuilt_reason"] is None


def test_training_on_a_damaged_cache_uses_the_corpus(tmp_path):
    """train_model after the ids of its cached dataset.bin were overwritten: the cache is
    rebuilt, and the model is the one the undamaged data gives."""
    corpus = write(tmp_path / "corpus.txt", sentences(150, 3, punct=(".", "!")))
    options = dict(tokenizer="word", embed_dim=16, num_layers=1, num_heads=2, seq_len=16,
                   batch_size=8, micro_batch=2, max_steps=3, warmup_steps=1, vocab_size=60, threads=1, eval_interval=0,
                   quiet=True)
    first = train([str(corpus)], checkpoint_dir=str(tmp_path / "a"), **options)
    ck = tmp_path / "b"
    train([str(corpus)], checkpoint_dir=str(ck), **options)
    good = (ck / "dataset.bin").read_bytes()
    for how in ("flipped", "beyond vocabulary"):
        damage(ck / "dataset.bin", how)
        again = train([str(corpus)], checkpoint_dir=str(ck), overwrite=True, **options)
        assert (ck / "dataset.bin").read_bytes() == good
        a, b = tensors(first["final_model"]), tensors(again["final_model"])
        assert sorted(a) == sorted(b)
        assert all(a[k].tobytes() == b[k].tobytes() for k in a), how


# ---------------------------------------------------------------------------------------
# A third tokenizer kind slots in through the registry
# ---------------------------------------------------------------------------------------

class SpaceTokenizer(Tokenizer):
    """A toy kind learned without a scanner: pieces between spaces, kept in order of first
    appearance, the vocabulary file one piece per line."""

    kind = "space"
    file_name = "pieces.txt"

    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.ids = {p: i for i, p in enumerate(self.pieces, start=len(SPECIALS))}

    @classmethod
    def train(cls, documents, vocab_size):
        seen = {}
        for doc in documents:
            seen.update(dict.fromkeys(doc.split()))
        return cls(list(seen)[:vocab_size - len(SPECIALS)])

    @classmethod
    def read(cls, path):
        return cls(read_text(path).split("\n")[:-1])

    def __len__(self):
        return len(SPECIALS) + len(self.pieces)

    def encode(self, text):
        return np.array([self.ids.get(p, 1) for p in text.split()], dtype=np.int64)

    def decode(self, ids):
        return " ".join(self.pieces[i - len(SPECIALS)] for i in ids)

    def unknown_tokens(self, text):
        return [p for p in text.split() if p not in self.ids]

    @property
    def vocab_hash(self):
        return hashlib.sha256("".join(p + "\n" for p in self.pieces).encode()).hexdigest()

    def save(self, path):
        path.write_text("".join(p + "\n" for p in self.pieces))


def test_a_new_kind_needs_only_its_class_and_a_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(TOKENIZERS, "space", SpaceTokenizer)
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    tok, tokens, info = D.prepare_dataset(files, out, kind="space", vocab_size=100)
    assert isinstance(tok, SpaceTokenizer) and info["reused"] is False
    assert (out / "pieces.txt").read_text().split("\n")[:3] == ["The", "cat", "sat"]
    expected = np.concatenate([tok.encode_document(read_text(f)) for f in files[:2]])
    assert np.array_equal(np.asarray(tokens), expected)
    loaded = Tokenizer.load(out / "pieces.txt", "space")
    assert loaded.vocab_hash == tok.vocab_hash
    assert loaded.decode(loaded.encode("The cat sat")) == "The cat sat"
    _, again, info = D.prepare_dataset(files, out, kind="space", vocab_size=100)
    assert info["reused"] is True and np.array_equal(np.asarray(again), expected)
    _, _, info = D.prepare_dataset(files, out, kind="space", vocab_size=100, tokenizer=loaded)
    assert info["reused"] is True


# ---------------------------------------------------------------------------------------
# Blocks and workers: the same files whatever the block size and the number of workers
# ---------------------------------------------------------------------------------------

def awkward_corpus(tmp_path):
    """Files whose small blocks get cut inside words, multi-byte characters and CRLFs."""
    d = tmp_path / "corpus"
    write(d / "a.txt", "\ufeff" + sentences(60, seed=1, punct=".,;!?").replace(". ", ".\r\n"))
    write(d / "b.txt", "ΟΔΟΣ ΣΑΣ café's naïve 汉字🙂\r\rdon't\n\nstop.\r\n\r\nend" * 7)
    write(d / "c.txt", " \n\t")                       # no tokens for word
    write(d / "d.txt", "")
    write(d / "e.txt", "Παράγραφος ένα.\n\nParagraph two, 12 apples!\r\n\r\n" * 30)
    return collect_files([d])


def prepared(files, out, kind, **kwargs):
    vocab_size = 300 if kind == "bpe" else 60
    tok, tokens, info = D.prepare_dataset(files, out, kind=kind, vocab_size=vocab_size, **kwargs)
    names = sorted(p.name for p in out.iterdir())
    return {name: (out / name).read_bytes() for name in names}, info


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_blocks_and_workers_give_the_same_files(tmp_path, kind):
    """dataset.bin and the vocabulary file are the same bytes for every block size, from 7
    bytes (cut inside nearly every word and character) to whole files, and with 2 worker
    processes."""
    files = awkward_corpus(tmp_path)
    whole, info = prepared(files, tmp_path / "whole", kind, block_size=1 << 20, workers=1)
    assert set(whole) == {"dataset.bin", TOKENIZERS[kind].file_name}
    for size, workers in ((7, 1), (64, 1), (1000, 1), (64, 2)):
        got, info_b = prepared(files, tmp_path / f"b{size}.{workers}", kind, block_size=size,
                               workers=workers)
        assert got == whole, (size, workers)
        assert info_b == info


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_given_vocabulary_encodes_the_same_in_blocks(tmp_path, kind):
    files = awkward_corpus(tmp_path)
    tok, _, _ = D.prepare_dataset(files, tmp_path / "first", kind=kind,
                                  vocab_size=300 if kind == "bpe" else 40)
    whole = D.prepare_dataset(files, tmp_path / "whole", tokenizer=tok, block_size=1 << 20,
                              workers=1)[1]
    for size, workers in ((5, 1), (64, 2)):
        again = D.prepare_dataset(files, tmp_path / f"b{size}", tokenizer=tok,
                                  block_size=size, workers=workers)[1]
        assert np.array_equal(np.asarray(again), np.asarray(whole))
        assert (tmp_path / f"b{size}" / "dataset.bin").read_bytes() == \
            (tmp_path / "whole" / "dataset.bin").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_fault_in_a_later_block_is_reported_by_its_offset(tmp_path, workers):
    files = awkward_corpus(tmp_path)
    bad = files[2]
    bad.write_bytes(("word " * 300).encode() + b"\xc3(" + b" more" * 10)
    with pytest.raises(DataError) as whole:
        read_text(bad)
    assert "offset 1500" in str(whole.value)
    with pytest.raises(DataError) as blocked:
        D.prepare_dataset(files, tmp_path / "ck", block_size=16, workers=workers)
    assert str(blocked.value) == str(whole.value)
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.endswith(".tmp")]


PROGRESS_SCRIPT = """
import sys
from cllm_cli.corpus.dataset import prepare_dataset
from cllm_cli.progress import ByteProgress
ByteProgress.REFRESH = 0.0          # draw at every block: the corpus is read in well under 0.2 s
prepare_dataset([sys.argv[1]], sys.argv[2], block_size=1 << 16, workers=1)
"""


def run_with_stderr(stderr, corpus, out):
    return subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT, str(corpus), str(out)],
                          stderr=stderr, stdout=subprocess.DEVNULL)


def test_progress_line_on_a_terminal_only(tmp_path):
    corpus = write(tmp_path / "big.txt", sentences(4000, seed=3, punct="."))
    master, slave = pty.openpty()
    try:
        assert run_with_stderr(slave, corpus, tmp_path / "a").returncode == 0
        os.close(slave)
        shown = read_terminal(master)
    finally:
        os.close(master)
    assert "\rtokenizing: " in shown and " MB/s, ETA " in shown, shown
    lines = shown.replace("\r\n", "\n").split("\n")
    assert any(line.rsplit("\r", 1)[-1].startswith("tokenizing: ") and " MB in " in line
               for line in lines), shown
    piped = run_with_stderr(subprocess.PIPE, corpus, tmp_path / "b")
    assert piped.returncode == 0 and piped.stderr == b""


class FakeTerminal:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.mark.parametrize("finished", [True, False])
def test_progress_line_is_left_done_or_wiped(monkeypatch, finished):
    from cllm_cli.progress import ByteProgress
    monkeypatch.setattr(ByteProgress, "REFRESH", 0.0)
    screen = FakeTerminal(True)
    with ByteProgress("tokenizing", 3_000_000, screen) as progress:
        progress.add(1_000_000)
        assert screen.text.startswith("\rtokenizing: 1.0 of 3.0 MB, ") and "ETA" in screen.text
        progress.add(2_000_000)
        if finished:
            progress.done()
    last = screen.text.rsplit("\r", 1)[-1]
    if finished:
        assert last.startswith("tokenizing: 3.0 MB in 0:00, ") and last.endswith("MB/s\x1b[K\n")
    else:
        assert last == "\x1b[K"                      # a fault or a signal: the line is wiped
    piped = FakeTerminal(False)
    with ByteProgress("tokenizing", 10, piped) as progress:
        progress.add(10)
        progress.done()
    assert piped.text == ""


def test_workers_from_a_script_without_a_main_guard(tmp_path):
    """The Python API from a plain script (no `if __name__ == "__main__":`): the workers must
    not run the script again."""
    corpus = write(tmp_path / "c.txt", sentences(300, seed=4, punct="."))
    script = write(tmp_path / "plain.py", (
        "import sys\n"
        "from cllm_cli.corpus.dataset import prepare_dataset\n"
        "_, ids, _ = prepare_dataset([sys.argv[1]], sys.argv[2], block_size=512, workers=2)\n"
        "print(len(ids))\n"))
    done = subprocess.run([sys.executable, str(script), str(corpus), str(tmp_path / "ck")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    whole = D.prepare_dataset([corpus], tmp_path / "whole", workers=1)[1]
    assert int(done.stdout) == len(whole)
    assert (tmp_path / "ck" / "dataset.bin").read_bytes() == \
        (tmp_path / "whole" / "dataset.bin").read_bytes()


def test_bpe_learns_from_evenly_spread_blocks_of_a_large_corpus(tmp_path, monkeypatch):
    """A corpus over BPETokenizer.train_bytes teaches the vocabulary every k-th block only
    (k = ceil(bytes / train_bytes)), so the library's trainer does not grow with the corpus;
    every block is still encoded."""
    from cllm_cli.corpus.files import decode_block, read_blocks
    from cllm_cli.tokenizers import BPETokenizer
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] + str(i % (j + 2)) for j in range(8))
             for i in range(400)]
    corpus = write(tmp_path / "big.txt", "\n".join(lines) + "\n")
    block = 1500
    blocks = [decode_block(corpus, data, offset)
              for offset, data, _, _ in read_blocks(corpus, BPETokenizer.block_cut, block)]
    monkeypatch.setattr(BPETokenizer, "train_bytes", 4 * block)
    every = -(-corpus.stat().st_size // (4 * block))
    assert every >= 3 and len(blocks) > 2 * every, "the premise: a corpus of many samples"
    tokenizer, tokens, _ = D.prepare_dataset([corpus], tmp_path / "ck", "bpe", 400,
                                             block_size=block, workers=1)
    sampled = BPETokenizer.train(blocks[::every], 400)
    assert tokenizer.json_bytes == sampled.json_bytes
    assert tokenizer.json_bytes != BPETokenizer.train(blocks, 400).json_bytes
    assert np.array_equal(np.asarray(tokens)[:-1], sampled.encode("".join(blocks)))
