"""The byte-level BPE tokenizer (cllm_cli/tokenizers/bpe.py): exact round trip on
any text, special ids, tokenizer.json files (ours and GPT-2's layout), determinism across the
library's thread counts, and the parallel encoding of cut texts."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
from helpers import ROOT, sentences
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

from cllm_cli.corpus.files import decode_block
from cllm_cli.errors import DataError
from cllm_cli.tokenizers import SPECIALS, BPETokenizer, Tokenizer, bpe, bpe_cuts

AWKWARD = [
    "",
    "The Old WOMAN met the old woman.",
    "汉字和かなカナ，한국어도 있다。",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "tab\tseparated\tcolumns\t\t\n",
    "windows line\r\nends\r\n\r\nand a lone \r carriage return",
    "long runs" + " " * 40 + "of spaces\n" + " " * 17 + "indented",
    "combining e\u0301 a\u0308 n\u0303 and precomposed é ä ñ; Zalgo z\u0336\u0317\u0353",
    "<eos> <pad> <|endoftext|> are just text here",
    "nul \x00 and control \x07 characters, BOM \ufeff, noncharacter \uffff",
    "\n\n\n",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def awkward_text():
    """Seeded sentences followed by every awkward text above: what the tokenizer is trained on."""
    return sentences(400, seed=3, punct=".!?") + "".join(AWKWARD)


@pytest.fixture(scope="module")
def tok(awkward_text):
    return BPETokenizer.train([awkward_text], 500)


@pytest.mark.parametrize("text", AWKWARD)
def test_round_trip_awkward_text(tok, text):
    ids = tok.encode(text)
    assert ids.dtype == np.int64
    assert tok.decode(ids) == text
    assert not set(ids.tolist()) & set(range(len(SPECIALS))), "text gave a special id"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unknown_tokens(text) == []
    assert not set(ids.tolist()) & set(range(len(SPECIALS)))


def test_case_and_white_space_are_kept(tok):
    lower, upper = tok.encode("the woman"), tok.encode("The Woman")
    assert lower.tolist() != upper.tolist()
    assert tok.decode(upper) == "The Woman"
    assert tok.encode("a  b").tolist() != tok.encode("a b").tolist()


def test_special_ids_and_documents(tok):
    assert [tok.id_to_token(i) for i in range(4)] == SPECIALS
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    doc = tok.encode_document("One doc.")
    assert doc[-1] == 3 and doc[:-1].tolist() == tok.encode("One doc.").tolist()
    # <pad> and <bos> are skipped, <eos> is a newline, as for the word and char kinds
    assert tok.decode([2, *tok.encode("a"), 3, 0, *tok.encode("b")]) == "a\nb"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([len(tok)])


def test_vocab_size_counts_the_special_ids(awkward_text):
    for size in (260, 300, 555):
        t = BPETokenizer.train([awkward_text], size)
        assert len(t) == size
        assert t.kind == "bpe"
    small = BPETokenizer.train(["tiny text"], 5000)       # too little text for 5000 merges
    assert 260 <= len(small) < 5000
    with pytest.raises(DataError, match="at least 260"):
        BPETokenizer.train([awkward_text], 259)


def test_merges_make_tokens_longer_than_bytes(tok, awkward_text):
    ids = tok.encode(awkward_text)
    assert len(ids) < len(awkward_text.encode("utf-8")) / 2


def test_save_load_and_hash(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    data = path.read_bytes()
    assert tok.vocab_hash == hashlib.sha256(data).hexdigest()
    json.loads(data)                                    # a plain tokenizer.json
    again = BPETokenizer.load(path)
    assert again.vocab_hash == tok.vocab_hash and len(again) == len(tok)
    text = "Saved and loaded: 🙂 x\ty"
    assert again.encode(text).tolist() == tok.encode(text).tolist()
    assert os.listdir(tmp_path) == ["tokenizer.json"]  # no temporary file left


def test_load_refuses_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=":1: not valid JSON") as e:
        BPETokenizer.load(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(DataError, match="cannot read"):
        BPETokenizer.load(tmp_path / "missing.json")
    no_eos = tokenizers.Tokenizer(models.BPE())
    no_eos.add_special_tokens(["<pad>"])
    path = tmp_path / "no_eos.json"
    path.write_text(no_eos.to_str())
    with pytest.raises(DataError, match="no end-of-text token"):
        BPETokenizer.load(path)



def test_llama_3s_begin_and_end_of_text_are_found(tmp_path):
    """Llama 3's tokenizer.json names them <|begin_of_text|> and <|end_of_text|>; the ids are
    the file's, wherever they are."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["some text to learn a few merges from, some text"],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=[],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    tk.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    path = tmp_path / "tokenizer.json"
    path.write_text(tk.to_str())
    tok = BPETokenizer.load(path)
    assert (tok.bos_id, tok.eos_id) == (tk.token_to_id("<|begin_of_text|>"),
                                        tk.token_to_id("<|end_of_text|>"))
    assert tok.encode_document("some text")[-1] == tok.eos_id

def gpt2_layout(awkward_text, path):
    """A tokenizer.json laid out as GPT-2's: byte-level BPE, <|endoftext|> its only special."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([awkward_text], trainers.BpeTrainer(
        vocab_size=400, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.add_special_tokens(["<|endoftext|>"])
    path.write_text(tk.to_str())
    return tk


def test_gpt2_layout_tokenizer_json(awkward_text, tmp_path):
    lib = gpt2_layout(awkward_text, tmp_path / "tokenizer.json")
    t = BPETokenizer.load(tmp_path / "tokenizer.json")
    end = lib.token_to_id("<|endoftext|>")
    assert end == 400 and len(t) == 401
    assert t.pad_id == -1 and t.eos_id == end and t.bos_id == end
    text = "The miller's 🙂\r\n  text"
    assert t.encode(text).tolist() == lib.encode(text).ids
    assert t.encode_document(text)[-1] == end
    assert t.decode([*t.encode("a"), end, *t.encode("b")]) == "a\nb"
    # the file's own bytes are kept: the hash is that of the file
    assert t.vocab_hash == hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()


def test_unknown_tokens_of_a_word_level_file(tmp_path):
    """Any tokenizer.json loads; one with <unk> reports the pieces it cannot read."""
    words = Tokenizer.build(["the cat sat on the mat."], "word", 100)
    path = tmp_path / "tokenizer.json"
    path.write_bytes(words.tokenizer_json())
    t = BPETokenizer.load(path)
    assert t.unknown_tokens("The dog sat, the bird sat.") == ["dog", ",", "bird"]
    assert t.encode("the cat").tolist() == words.encode("the cat").tolist()


def test_encode_batch(tok):
    texts = ["first text", "", "second 🙂 text\n\nwith paragraphs"]
    got = tok.encode_batch(texts)
    assert [g.tolist() for g in got] == [tok.encode(t).tolist() for t in texts]


# --- cutting long texts for parallel encoding --------------------------------------------

PIECES = st.sampled_from(["a", "Bc", "7", ".", "'", "'s", "é", "汉", "🙂", "\u0301", " ", "  ",
                          "\t", "\n", "\n\n", "\r\n", "-", "_", "\u3000", "\x1c", "\x85"])


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, max_size=60).map("".join))
def test_cut_texts_encode_as_the_whole_text(tok, text):
    whole = tokenizers.Tokenizer.from_str(tok.json_bytes.decode("utf-8"))
    whole.encode_special_tokens = True
    saved = bpe.CHUNK_CHARS
    bpe.CHUNK_CHARS = 2         # pieces of 2 characters: cut wherever the text may be cut
    try:
        ids = tok.encode(text)
    finally:
        bpe.CHUNK_CHARS = saved
    assert ids.tolist() == whole.encode(text, add_special_tokens=False).ids


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(PIECES, st.just("\r")), max_size=60).map("".join))
def test_every_block_cut_of_a_file_encodes_as_the_whole_file(tok, text):
    """A corpus file cut into two blocks at any place block_cut may choose: the two blocks'
    texts (line ends normalised as files.decode_block does) encode to the whole file's ids."""
    data = text.encode("utf-8")
    whole = tok.encode(decode_block("f", data)).tolist()
    for m in bpe_cuts.BLOCK_CUT.finditer(data):
        place = m.start(1)
        assert tok.block_cut(data[:place + 1 + len(m.group(1))]) >= place  # a place it finds
        head, tail = decode_block("f", data[:place]), decode_block("f", data[place:], place)
        assert tok.encode(head).tolist() + tok.encode(tail).tolist() == whole


SPACED = st.sampled_from(["слово", "汉字", "é", "🙂", "«", "»", ",", "a", "7", "'s", " ", "  ",
                          "\u00a0", "\u2028", "\u3000", "\x85", "\x1c", "\t", "\u0301"])


@settings(max_examples=300, deadline=None)
@given(st.lists(SPACED, max_size=60).map("".join))
def test_every_word_cut_of_a_line_encodes_as_the_whole_line(tok, text):
    """A line cut at any end of a word that cut_points or block_cut may choose (white space of
    every kind around, letters that are not ASCII): the parts encode to the whole line's ids."""
    whole = tokenizers.Tokenizer.from_str(tok.json_bytes.decode("utf-8"))
    whole.encode_special_tokens = True
    ids = whole.encode(text, add_special_tokens=False).ids
    for m in bpe_cuts.WORD_CUT.finditer(text):
        head, tail = text[:m.end()], text[m.end():]
        assert tok.encode(head).tolist() + tok.encode(tail).tolist() == ids
    data = text.encode("utf-8")
    for m in bpe_cuts.BLOCK_WORD_CUT.finditer(data):
        head, tail = decode_block("f", data[:m.end()]), decode_block("f", data[m.end():], m.end())
        assert tok.encode(head).tolist() + tok.encode(tail).tolist() == ids


def test_a_long_line_of_words_without_ascii_letters_is_cut(tok, monkeypatch):
    """A line of words in another script, spaced, with no newline: cut into pieces and blocks
    of bounded size at the ends of its words, so the library never encodes it in one call
    (6.9 MB of Russian took 1 GB)."""
    line = " ".join(["слово", "汉字", "«да»", "🙂", "ещё,"] * 4000)
    monkeypatch.setattr(bpe_cuts, "LINE_CHARS", 1000)
    assert len(bpe_cuts.cut_points(line, 1000)) > 50
    data = line.encode("utf-8")
    assert 0 < tok.block_cut(data[:5000]) <= 5000
    whole = tokenizers.Tokenizer.from_str(tok.json_bytes.decode("utf-8"))
    monkeypatch.setattr(bpe, "CHUNK_CHARS", 1000)
    assert tok.encode(line).tolist() == whole.encode(line, add_special_tokens=False).ids


def test_a_tokenizer_that_cannot_be_cut_reads_files_whole(tok):
    spec = json.loads(tok.json_bytes)
    spec["normalizer"] = {"type": "Lowercase"}
    lowered = BPETokenizer(json.dumps(spec).encode())
    assert tok.block_cut(b"one.\ntwo") == 4 and lowered.block_cut(b"one.\ntwo") == 0


def test_long_text_is_cut_and_encodes_the_same(tok, awkward_text, monkeypatch):
    text = awkward_text * 3
    assert len(bpe_cuts.cut_points(text, 1000)) > 10             # premise: the text is cut
    monkeypatch.setattr(bpe, "CHUNK_CHARS", 1000)
    whole = tokenizers.Tokenizer.from_str(tok.json_bytes.decode("utf-8"))
    whole.encode_special_tokens = True
    assert tok.encode(text).tolist() == whole.encode(text, add_special_tokens=False).ids


# --- determinism -------------------------------------------------------------------------

TRAIN_SCRIPT = """
import sys
from cllm_cli.tokenizers import bpe
text = open(sys.argv[1], encoding="utf-8").read()
tok = bpe.BPETokenizer.train([text, text.upper()], 900)
bpe.CHUNK_CHARS = 1000                  # many pieces to encode in parallel
sys.stdout.buffer.write(tok.json_bytes + b"\\0" + tok.encode(text).tobytes())   # JSON holds no NUL
"""


def train_in_subprocess(corpus_path, threads, parallel):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM=parallel,
               PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(corpus_path)], env=env,
                       capture_output=True, check=True)
    return p.stdout


def test_training_and_encoding_are_deterministic_across_thread_counts(tmp_path):
    corpus = sentences(3000, seed=11, punct=".!?,;") + "".join(AWKWARD) * 20
    path = tmp_path / "corpus.txt"
    path.write_text(corpus, encoding="utf-8")
    runs = [train_in_subprocess(path, threads, parallel)
            for threads, parallel in ((1, "false"), (1, "true"), (2, "true"), (2, "true"))]
    tokenizer_json, ids = runs[0].split(b"\0", 1)
    assert len(json.loads(tokenizer_json)["model"]["merges"]) > 500     # premise: real training
    assert len(ids) > 8 * 1000                                         # and real encoding
    assert all(r == runs[0] for r in runs[1:])
    other = tmp_path / "other.txt"
    other.write_text(corpus[::-1], encoding="utf-8")
    assert train_in_subprocess(other, 2, "true") != runs[0]        # the bytes do depend on text
