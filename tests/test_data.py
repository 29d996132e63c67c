"""Tests of cllm_cli/data.py: corpus files, tokenizers, vocab.txt, dataset.bin, windows."""
import hashlib
import os

import numpy as np
import pytest

from cllm_cli import data as D
from cllm_cli.data import BOS, EOS, PAD, UNK, DataError, Tokenizer


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------
# collect_files
# ---------------------------------------------------------------------------------------

def test_collect_directory_recursive_sorted(tmp_path):
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/deeper/a.txt", "z.txt", "notes.md"]:
        write(tmp_path / "corpus" / name, "x")
    files = D.collect_files([tmp_path / "corpus"])
    rel = [p.relative_to(tmp_path / "corpus").as_posix() for p in files]
    assert rel == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/a.txt", "z.txt"]


def test_collect_file_taken_whatever_its_name(tmp_path):
    md = write(tmp_path / "notes.md", "x")
    noext = write(tmp_path / "README", "x")
    assert D.collect_files([md, noext]) == [md, noext]


def test_collect_keeps_argument_order_and_removes_duplicates(tmp_path):
    a = write(tmp_path / "d" / "a.txt", "x")
    b = write(tmp_path / "d" / "b.txt", "x")
    c = write(tmp_path / "c.txt", "x")
    files = D.collect_files([c, tmp_path / "d", a, str(tmp_path / "d" / ".." / "c.txt")])
    assert files == [c, a, b]


def test_collect_glob_pattern(tmp_path):
    write(tmp_path / "a.txt", "x")
    write(tmp_path / "b.md", "x")
    write(tmp_path / "s" / "c.md", "x")
    files = D.collect_files([tmp_path], pattern="*.md")
    assert [p.name for p in files] == ["b.md", "c.md"]


def test_collect_excludes_checkpoint_dir(tmp_path):
    write(tmp_path / "a.txt", "x")
    write(tmp_path / "checkpoints" / "vocab.txt", "<pad>\t0\n")
    write(tmp_path / "checkpoints" / "deep" / "x.txt", "x")
    files = D.collect_files([tmp_path], exclude_dir=tmp_path / "checkpoints")
    assert [p.name for p in files] == ["a.txt"]
    # without the exclusion they would be found
    assert len(D.collect_files([tmp_path])) == 3


def test_collect_only_checkpoint_dir_matches_is_an_error(tmp_path):
    write(tmp_path / "ck" / "vocab.txt", "x")
    with pytest.raises(DataError, match="no files matching"):
        D.collect_files([tmp_path], exclude_dir=tmp_path / "ck")


def test_collect_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*nowhere"):
        D.collect_files([tmp_path / "nowhere"])


def test_collect_directory_without_matches(tmp_path):
    write(tmp_path / "a.md", "x")
    with pytest.raises(DataError, match=r"no files matching '\*\.txt'"):
        D.collect_files([tmp_path])


# ---------------------------------------------------------------------------------------
# read_text
# ---------------------------------------------------------------------------------------

def test_read_text_nul_byte_offset(tmp_path):
    f = write(tmp_path / "bin.txt", b"abc\x00def")
    with pytest.raises(DataError) as e:
        D.read_text(f)
    assert str(e.value) == f"{f}: not a text file (NUL byte at offset 3)"


@pytest.mark.parametrize("raw, offset", [
    (b"h\xc3\xa9llo \xff rest", 7),        # stray byte after a valid 2-byte sequence
    (b"ab\xe2\x82", 2),                      # truncated 3-byte sequence at the end
    (b"\xc0\xafxyz", 0),                     # overlong encoding
    (b"ok\xed\xa0\x80", 2),                  # UTF-16 surrogate
])
def test_read_text_invalid_utf8_offset(tmp_path, raw, offset):
    f = write(tmp_path / "bad.txt", raw)
    with pytest.raises(DataError) as e:
        D.read_text(f)
    assert str(e.value) == f"{f}: not valid UTF-8 (bad byte at offset {offset})"


def test_read_text_reports_first_bad_byte(tmp_path):
    f = write(tmp_path / "both.txt", b"a\xffb\x00")
    with pytest.raises(DataError, match="not valid UTF-8 .*offset 1"):
        D.read_text(f)
    g = write(tmp_path / "both2.txt", b"a\x00b\xff")
    with pytest.raises(DataError, match="NUL byte at offset 1"):
        D.read_text(g)


def test_read_text_replace_mode(tmp_path):
    f = write(tmp_path / "bad.txt", b"a\xffb\x00c")
    assert D.read_text(f, encoding_errors="replace") == "a\ufffdb\ufffdc"


def test_read_text_bom_and_newlines(tmp_path):
    f = write(tmp_path / "w.txt", b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert D.read_text(f) == "one\ntwo\nthree\n"


def test_read_text_unreadable(tmp_path):
    with pytest.raises(DataError, match=r"cannot read \("):
        D.read_text(tmp_path)           # a directory
    with pytest.raises(DataError, match="cannot read"):
        D.read_text(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------
# Word tokenizer
# ---------------------------------------------------------------------------------------

def test_word_split_contractions_and_punctuation():
    tok = Tokenizer.build(["x"])
    assert tok.tokens("Don't stop, it's 3 o'clock!") == \
        ["don't", "stop", ",", "it's", "3", "o'clock", "!"]
    assert tok.tokens("'quoted' (x)... a-b rock'n'roll dogs'") == \
        ["'", "quoted", "'", "(", "x", ")", ".", ".", ".", "a", "-", "b", "rock'n'roll",
         "dogs", "'"]


def test_word_lower_cases():
    tok = Tokenizer.build(["Hello HELLO hello hElLo"])
    assert tok.itos == D.SPECIALS + ["hello"]
    assert tok.counts == [0, 0, 0, 0, 4]
    assert tok.encode("HELLO").tolist() == [4]


def test_word_ids_by_frequency_ties_by_first_appearance():
    # zeta and alpha tie (2 each): zeta appeared first, so it gets the smaller id even
    # though alpha sorts first; across documents the first document wins.
    tok = Tokenizer.build(["mid zeta alpha zeta alpha", "late late late late other"])
    assert tok.itos[4:] == ["late", "zeta", "alpha", "mid", "other"]
    assert tok.counts[4:] == [4, 2, 2, 1, 1]
    assert tok.counts[:4] == [0, 0, 0, 0]
    assert tok.stoi == {t: i for i, t in enumerate(tok.itos)}


def test_word_vocab_size_cap_counts_specials():
    tok = Tokenizer.build(["a a a b b c d"], vocab_size=6)
    assert len(tok) == 6
    assert tok.itos == D.SPECIALS + ["a", "b"]
    assert tok.encode("a b c d").tolist() == [4, 5, UNK, UNK]
    with pytest.raises(DataError, match="vocab_size must be at least 5"):
        Tokenizer.build(["a"], vocab_size=4)


def test_encode_and_encode_document():
    tok = Tokenizer.build(["the cat sat"])
    ids = tok.encode("The dog sat")
    assert ids.dtype == np.int64
    assert ids.tolist() == [tok.stoi["the"], UNK, tok.stoi["sat"]]
    doc = tok.encode_document("The dog sat")
    assert doc.dtype == np.int64
    assert doc.tolist() == ids.tolist() + [EOS]
    assert tok.encode("").tolist() == []
    assert tok.encode_document("").tolist() == [EOS]


def test_word_decode_readable():
    text = 'He said, "Don\'t go (now)." Well-known: 50% of [them]; yes! And/or what?'
    tok = Tokenizer.build([text])
    assert tok.decode(tok.encode(text)) == \
        'he said, "don\'t go (now)." well-known: 50% of [them]; yes! and/or what?'


def test_word_decode_specials():
    tok = Tokenizer.build(["a b ."])
    a, b, dot = tok.stoi["a"], tok.stoi["b"], tok.stoi["."]
    ids = [BOS, a, PAD, b, UNK, dot, EOS, a, b, EOS]
    assert tok.decode(ids) == "a b <unk>.\na b\n"
    assert tok.decode(np.array(ids, dtype=np.int32)) == "a b <unk>.\na b\n"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([len(tok)])


# ---------------------------------------------------------------------------------------
# Char tokenizer
# ---------------------------------------------------------------------------------------

def test_char_tokenizer_sorted_by_code_point_no_lower_casing():
    tok = Tokenizer.build(["baA\u00e9 \n", "Zb"], kind="char")
    assert tok.kind == "char"
    assert tok.itos[4:] == ["\n", " ", "A", "Z", "a", "b", "\u00e9"]
    assert tok.counts[4:] == [1, 1, 1, 1, 1, 2, 1]
    text = "Zab\n\u00e9"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a?").tolist() == [tok.stoi["a"], UNK]
    assert tok.encode("\U0001F600").tolist() == [UNK]       # beyond the look-up table
    assert tok.encode_document("a").tolist() == [tok.stoi["a"], EOS]


def test_char_vocab_cap_keeps_most_frequent_in_code_point_order():
    tok = Tokenizer.build(["zzzz yyy xx a b"], kind="char", vocab_size=4 + 3)
    # counts: z4 y3 ' '4 x2 a1 b1 -> keep ' ', z, y; listed by code point
    assert tok.itos[4:] == [" ", "y", "z"]
    assert tok.encode("xyz").tolist() == [UNK, tok.stoi["y"], tok.stoi["z"]]


# ---------------------------------------------------------------------------------------
# vocab.txt
# ---------------------------------------------------------------------------------------

def test_vocab_round_trip_word(tmp_path):
    tok = Tokenizer.build(["One two two, three: \\ back\\slash"], vocab_size=100)
    path = tmp_path / "vocab.txt"
    tok.save(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[:4] == ["<pad>\t0", "<unk>\t0", "<bos>\t0", "<eos>\t0"]
    assert lines[4] == "two\t2"
    assert "\\\\\t2" in lines                 # the backslash token, escaped
    back = Tokenizer.load(path)
    assert back.itos == tok.itos and back.counts == tok.counts and back.kind == "word"
    assert back.vocab_hash == tok.vocab_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not [p for p in tmp_path.iterdir() if p.name != "vocab.txt"]   # no temp file left


def test_vocab_round_trip_char_with_tab_newline_backslash(tmp_path):
    text = "a\tb\nc\\d\re\\t"
    tok = Tokenizer.build([text], kind="char")
    assert {"\t", "\n", "\\"} <= set(tok.itos)
    path = tmp_path / "vocab.txt"
    tok.save(path)
    raw = path.read_bytes()
    assert raw.count(b"\n") == len(tok)       # one physical line per id
    assert b"\\t\t1\n" in raw and b"\\n\t1\n" in raw and b"\\\\\t2\n" in raw
    back = Tokenizer.load(path, kind="char")
    assert back.itos == tok.itos and back.counts == tok.counts
    assert back.decode(back.encode(text)) == text
    assert back.vocab_hash == tok.vocab_hash


def test_vocab_hash_depends_on_content():
    a = Tokenizer.build(["a b c"])
    b = Tokenizer.build(["a b d"])
    c = Tokenizer.build(["a b b"])
    assert len({a.vocab_hash, b.vocab_hash, c.vocab_hash}) == 3
    assert a.vocab_hash == Tokenizer.build(["a b c"]).vocab_hash


@pytest.mark.parametrize("content, line", [
    ("<pad>\t0\n<unk>\t0\n<bos>\t0\n<eos>\t0\nword\n", 5),             # no tab
    ("<pad>\t0\n<unk>\t0\n<bos>\t0\n<eos>\t0\nword\tmany\n", 5),       # bad count
    ("<pad>\t0\n<unk>\t0\n<bos>\t0\n<eos>\t0\nw\t1\nbad\\q\t1\n", 6),  # bad escape
    ("<pad>\t0\n<unk>\t0\n<bos>\t0\n<eos>\t0\n\t1\n", 5),              # empty token
    ("<pad>\t0\n<unk>\t0\n<eos>\t0\n<bos>\t0\n", 3),                   # specials out of order
    ("<pad>\t0\n<unk>\t0\n<bos>\t0\n<eos>\t0\nw\t1\nw\t2\n", 6),       # duplicate
    ("<pad>\t0\n<unk>\t0\n<bos>\t0\n<eos>\t0\na\t1\n\nb\t1\n", 6),     # empty line
    ("<pad>\t0\n<unk>\t0\n<bos>\t0\n<eos>\t0\na\t1\t2\n", 5),          # two tabs
])
def test_vocab_load_malformed_names_line(tmp_path, content, line):
    path = write(tmp_path / "vocab.txt", content)
    with pytest.raises(DataError, match=f"vocab.txt:{line}: "):
        Tokenizer.load(path)


def test_vocab_load_other_errors(tmp_path):
    with pytest.raises(DataError, match="at least the 4 special tokens"):
        Tokenizer.load(write(tmp_path / "v1.txt", "<pad>\t0\n"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        Tokenizer.load(write(tmp_path / "v2.txt", b"<pad>\t0\n\xff\t1\n"))
    char_vocab = "<pad>\t0\n<unk>\t0\n<bos>\t0\n<eos>\t0\nab\t1\n"
    with pytest.raises(DataError, match=":5: char vocabulary token is not one character"):
        Tokenizer.load(write(tmp_path / "v3.txt", char_vocab), kind="char")
    with pytest.raises(DataError, match="cannot read"):
        Tokenizer.load(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------
# prepare_dataset / dataset.bin
# ---------------------------------------------------------------------------------------

def make_corpus(tmp_path):
    d = tmp_path / "corpus"
    write(d / "a.txt", "The cat sat on the mat. The cat ran!")
    write(d / "b.txt", "A dog sat; the dog didn't run.")
    write(d / "c.txt", "  \n")                          # no tokens: adds nothing
    return D.collect_files([d])


def test_prepare_dataset_contents(tmp_path):
    files = make_corpus(tmp_path)
    out = tmp_path / "ck"
    tok, tokens, info = D.prepare_dataset(files, out, vocab_size=100)
    expected = np.concatenate([tok.encode_document(D.read_text(f)) for f in files[:2]])
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert np.array_equal(np.asarray(tokens), expected)
    assert (out / "vocab.txt").is_file() and (out / "dataset.bin").is_file()
    assert Tokenizer.load(out / "vocab.txt").itos == tok.itos
    assert tok.itos[4:7] == ["the", "cat", "sat"]             # the: 4, cat/sat/dog tie at 2
    assert tokens[-1] == EOS and int((np.asarray(tokens) == EOS).sum()) == 2
    assert info == {"files": 3, "bytes": sum(f.stat().st_size for f in files),
                    "tokens": len(expected), "reused": False, "key": info["key"]}
    assert len(info["key"]) == 64
    assert (out / "dataset.bin").stat().st_size == D.HEADER_SIZE + 2 * len(expected)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.bin", "vocab.txt"]
    assert np.array_equal(np.asarray(D.load_dataset(out / "dataset.bin")), expected)


def test_prepare_dataset_matches_build_of_same_documents(tmp_path):
    files = make_corpus(tmp_path)
    tok, _, _ = D.prepare_dataset(files, tmp_path / "ck", vocab_size=8)
    ref = Tokenizer.build([D.read_text(f) for f in files], vocab_size=8)
    assert tok.itos == ref.itos and tok.counts == ref.counts
    assert tok.vocab_hash == ref.vocab_hash


def test_prepare_dataset_char(tmp_path):
    files = make_corpus(tmp_path)
    tok, tokens, _ = D.prepare_dataset(files, tmp_path / "ck", kind="char")
    assert tok.kind == "char"
    expected = np.concatenate([tok.encode_document(D.read_text(f)) for f in files])
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
    assert tok.itos[:5] == D.SPECIALS + ["the"]
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
    Tokenizer(swapped, tok.counts).save(out / "vocab.txt")
    tok2, tokens2, info = D.prepare_dataset(files, out, vocab_size=100)
    assert info["reused"] is False
    assert tok2.itos == tok.itos and np.array_equal(np.asarray(tokens2), np.asarray(tokens))


def test_prepare_dataset_with_given_tokenizer(tmp_path):
    files = make_corpus(tmp_path)
    given = Tokenizer.build(["the dog"])
    tok, tokens, info = D.prepare_dataset(files, tmp_path / "ck", tokenizer=given)
    assert tok is given
    expected = np.concatenate([given.encode_document(D.read_text(f)) for f in files[:2]])
    assert np.array_equal(np.asarray(tokens), expected)
    assert Tokenizer.load(tmp_path / "ck" / "vocab.txt").vocab_hash == given.vocab_hash
    _, _, again = D.prepare_dataset(files, tmp_path / "ck", tokenizer=given)
    assert again["reused"] is True and again["key"] == info["key"]
    other_tok = Tokenizer.build(["dog the"])
    _, tokens, other = D.prepare_dataset(files, tmp_path / "ck", tokenizer=other_tok)
    assert other["reused"] is False
    assert np.array_equal(np.asarray(tokens), np.concatenate(
        [other_tok.encode_document(D.read_text(f)) for f in files[:2]]))
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
        [other.encode_document(D.read_text(f)) for f in files[:2]]))
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


# ---------------------------------------------------------------------------------------
# Split, windows, epochs
# ---------------------------------------------------------------------------------------

def test_split_stream_views():
    tokens = np.arange(100, dtype=np.uint16)
    train, val = D.split_stream(tokens, 0.05)
    assert len(train) == 95 and len(val) == 5
    assert val.tolist() == [95, 96, 97, 98, 99]
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)
    train, val = D.split_stream(tokens, 0.0)
    assert len(train) == 100 and len(val) == 0
    train, val = D.split_stream(np.arange(10), 0.05)       # int(0.5) == 0
    assert len(val) == 0
    with pytest.raises(DataError):
        D.split_stream(tokens, 1.0)


def test_num_windows():
    assert D.num_windows(0, 4) == 0
    assert D.num_windows(4, 4) == 0          # needs T+1 tokens
    assert D.num_windows(5, 4) == 1
    assert D.num_windows(8, 4) == 1
    assert D.num_windows(9, 4) == 2
    assert D.num_windows(1001, 10) == 100


def test_gather_windows():
    tokens = np.arange(3, 3 + 23, dtype=np.uint16)           # 23 tokens, T=5 -> 4 windows
    T = 5
    assert D.num_windows(len(tokens), T) == 4
    w = D.gather_windows(tokens, np.array([2, 0, 3]), T)
    assert w.dtype == np.int32 and w.shape == (3, T + 1)
    for row, i in zip(w, [2, 0, 3]):
        assert row.tolist() == tokens[i * T:i * T + T + 1].tolist()
    assert D.gather_windows(tokens, np.array([], dtype=np.int64), T).shape == (0, T + 1)
    with pytest.raises(IndexError):
        D.gather_windows(tokens, [4], T)
    with pytest.raises(IndexError):
        D.gather_windows(tokens, [-1], T)


def test_epoch_order_deterministic_and_complete():
    a = D.epoch_order(7, 0, 50)
    assert a.dtype == np.int64
    assert np.array_equal(a, D.epoch_order(7, 0, 50))
    assert np.array_equal(a, np.random.default_rng([7, 0]).permutation(50))
    assert not np.array_equal(a, D.epoch_order(7, 1, 50))
    assert not np.array_equal(a, D.epoch_order(8, 0, 50))
    for epoch in range(3):
        order = D.epoch_order(7, epoch, 50)
        assert sorted(order.tolist()) == list(range(50))      # every window once
    assert D.epoch_order(1, 0, 0).shape == (0,)


def test_epoch_visits_every_training_token_pair_once():
    tokens = np.arange(1000, dtype=np.uint32)
    train, _ = D.split_stream(tokens, 0.1)
    T = 16
    n = D.num_windows(len(train), T)
    windows = D.gather_windows(train, D.epoch_order(3, 0, n), T)
    starts = windows[:, 0]
    assert sorted(starts.tolist()) == [i * T for i in range(n)]
    targets = np.sort(windows[:, 1:].reshape(-1))
    assert np.array_equal(targets, np.arange(1, n * T + 1))   # each target exactly once


def test_eval_windows():
    T = 4
    full = D.eval_windows(np.arange(14, dtype=np.uint16), T)  # 3 windows of 5, 1 left over
    assert full.dtype == np.int32 and full.shape == (3, T + 1)
    assert full.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]]
    exact = D.eval_windows(np.arange(5), T)
    assert exact.tolist() == [[0, 1, 2, 3, 4]]
    short = D.eval_windows(np.arange(3, dtype=np.uint16), T)
    assert short.dtype == np.int32 and short.tolist() == [[0, 1, 2]]
    assert D.eval_windows(np.arange(2), T).tolist() == [[0, 1]]
    for n in (0, 1):
        empty = D.eval_windows(np.arange(n), T)
        assert empty.shape == (0, 2) and empty.dtype == np.int32


def test_windows_from_memmap(tmp_path):
    files = make_corpus(tmp_path)
    tok, tokens, _ = D.prepare_dataset(files, tmp_path / "ck", vocab_size=100)
    train, val = D.split_stream(tokens, 0.25)
    T = 3
    n = D.num_windows(len(train), T)
    w = D.gather_windows(train, np.arange(n), T)
    assert w.dtype == np.int32
    assert w[:, 0].tolist() == np.asarray(train)[0:n * T:T].astype(np.int32).tolist()
    assert len(val) == int(len(tokens) * 0.25) >= T + 1
    ev = D.eval_windows(val, T)
    assert ev.shape == (D.num_windows(len(val), T), T + 1)
    assert ev[0].tolist() == np.asarray(val[:T + 1]).tolist()
