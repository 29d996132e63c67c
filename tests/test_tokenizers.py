"""Tests of cllm_cli/tokenizers (base, vocab, word, char): the word and char tokenizers,
vocab.txt, the registry of kinds."""
import hashlib

import numpy as np
import pytest
from helpers import write

from cllm_cli.errors import DataError
from cllm_cli.tokenizers import (
    BOS,
    EOS,
    PAD,
    SPECIALS,
    TOKENIZER_KINDS,
    TOKENIZERS,
    UNK,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
)

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
    assert tok.itos == SPECIALS + ["hello"]
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
    assert tok.itos == SPECIALS + ["a", "b"]
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
    ("<pad>\t0\n<unk>\t0\n<bos>\t0\n<eos>\t0\na\t" + "9" * 5000 + "\n", 5),  # 5000 digits
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
# Kinds
# ---------------------------------------------------------------------------------------

def test_kinds_are_declared_once_in_the_registry():
    assert TOKENIZER_KINDS == ("word", "char", "bpe")
    assert all(TOKENIZERS[k].kind == k for k in TOKENIZER_KINDS)
    assert [TOKENIZERS[k].file_name for k in TOKENIZER_KINDS] == ["vocab.txt", "vocab.txt",
                                                                  "tokenizer.json"]
    for bad in ("bytes", "", "Word", ["word"]):
        with pytest.raises(DataError, match="^tokenizer kind must be one of word, char, bpe, got "):
            Tokenizer.load("vocab.txt", bad)


def test_kind_defaults_to_the_class_called(tmp_path):
    docs = ["ab ba"]
    assert type(Tokenizer.build(docs)) is WordTokenizer
    assert type(CharTokenizer.build(docs)) is CharTokenizer
    assert type(Tokenizer.build(docs, "char")) is CharTokenizer
    assert type(CharTokenizer.train(docs, 10)) is CharTokenizer
    path = tmp_path / "vocab.txt"
    CharTokenizer.build(docs).save(path)
    assert type(CharTokenizer.load(path)) is CharTokenizer
    assert type(Tokenizer.load(path, "char")) is CharTokenizer
    assert Tokenizer.load(path, "char").itos[4:] == [" ", "a", "b"]
    assert type(Tokenizer.load(path)) is WordTokenizer        # " " is a token to the word kind too
