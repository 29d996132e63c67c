"""Byte-level BPE tokenizer, trained and run by the `tokenizers` library; the file format
is the library's standard tokenizer.json.

    BPETokenizer.train(documents, vocab_size)   corpus -> merges (the library's BpeTrainer)
    BPETokenizer.load(path) / save(path)        tokenizer.json (ours, GPT-2's, any other)
    BPETokenizer.read(path)                     also GPT-2's classic vocab.json + merges.txt
                                                (given as the vocab.json or their directory:
                                                bpe_files.py)
    encode / encode_document / encode_batch     text -> int64 ids, on all cores
    decode                                      ids -> text

Choices written down here:

- The pipeline is GPT-2's: no normalizer, the ByteLevel pre-tokenizer (GPT-2's split regex,
  no prefix space) and the ByteLevel decoder. Every byte is in the alphabet, so no text is
  ever <unk>, case and white space are kept and decode(encode(text)) == text.
- Ids 0..3 are <pad> <unk> <bos> <eos>, as for the word and char tokenizers, then the 256
  byte tokens, then the merges; vocab_size counts all of them (at least 260). A corpus too
  small to give that many merges gives a smaller vocabulary. A pair is merged only when it
  occurs at least twice (MIN_FREQUENCY).
- vocab_size is at most MAX_VOCAB_SIZE (1,000,000; GPT-2 has 50,257 ids, the largest
  common vocabularies about 256,000): the library's trainer reserves memory in proportion to
  the size asked for before it looks at the text, and aborts the whole process (SIGABRT)
  when that allocation fails (1e9 asks for some 70 GB). Below that bound the size handed to
  the library is also capped by what the text can give: each merge removes at least one
  symbol, so a text of n UTF-8 bytes gives at most n merges (the result is the same, only
  the reservation is smaller).
- Text that is not Unicode text, the lone surrogates by which Python carries bytes that are
  not UTF-8 (a prompt typed as $'ab\\xff' reaches sys.argv so), is encoded with those bytes
  replaced by U+FFFD, as the corpus reader's --encoding-errors replace does; replaced_bytes()
  names them so that the tools can warn.
- Special tokens are never read from text: "<eos>" typed in a document is the five characters,
  encoded as text. (transformers' own tokenizer does match them in text.)
- Determinism: the same corpus gives the same tokenizer.json bytes, and the same ids, whatever
  RAYON_NUM_THREADS / TOKENIZERS_PARALLELISM say: word counts are sums and the library breaks
  ties between merges by the pairs' ids. tests/test_bpe.py checks 1 and 2 threads in
  separate processes.
- Parallelism: a long text is cut into pieces of about CHUNK_CHARS characters before the
  last newline of a run of newlines between two letters, digits or ASCII punctuation marks
  (a paragraph or line break). GPT-2's regex gives that newline a piece of its own, so the
  pieces encode to exactly the ids of the whole text; they then go through the library's
  batch encoder on all cores (12 MB: 3.6 s on 2 cores, against 15 s for one call on the
  whole text). Only tokenizers with that pre-tokenizer and no normalizer are cut; any other
  tokenizer.json is encoded one whole text per call (several texts still in parallel).
  Corpus files are read in blocks cut at the same places (block_cut, restricted to printable
  ASCII on either side so that it can look at bytes); a tokenizer that cannot be cut reads
  each file whole.
- Long lines: where no such newline comes within LINE_CHARS characters (a file without line
  breaks), a piece or a block is cut right after an ASCII letter followed by an ASCII
  character that is not a letter, or after an ASCII digit followed by an ASCII character that
  is not a digit, or before a single space between two characters that are not white space
  (the end of a word or a number: "dog| ran", "dog|, ", "42| ", "x|9", "слово| мир"). GPT-2's
  regex ends a piece there whatever follows, and BPE never merges across its pieces, so these
  cuts do not change the ids either. So a line of any length is encoded in pieces of bounded
  size (memory: the library needed 12 GB for one call on a 50 MB line), block by block, and a
  stop signal acts between two blocks. Text with no such place (one "word" of non-ASCII
  letters megabytes long, or no single space between words) is still encoded whole. A tokenizer.json with added tokens that
  are not special (the library matches them in text, across any cut) is not cut.
- Bounded memory: the library's trainer holds every distinct word of what it learns from, with
  its pairs (12 MB of generated text: 0.8 GB; 120 MB: 20 GB). So the vocabulary is learned
  from at most TRAIN_BYTES of the corpus: every k-th block, k = ceil(corpus / TRAIN_BYTES),
  the same blocks whatever the thread count; a corpus up to TRAIN_BYTES is learned whole.
  Encoding covers the whole corpus.
- A tokenizer.json is read when its model is BPE, or WordLevel (the form cllm_export gives
  word and char vocabularies, decoded as those kinds decode). Any other model type
  (Unigram, WordPiece) is refused, naming it: its pieces joined as bpe joins them would give
  wrong text ("T o   b e ,").
- A loaded tokenizer.json may lack <pad> or name its end of text differently: pad_id is the
  id of <pad> (-1 if none), eos_id that of <eos>, <|endoftext|>, </s> or <|end_of_text|>
  (GPT-2: 50256), bos_id that of <bos>, <s> or <|begin_of_text|>, else eos_id. A file
  without an end-of-text token is refused, since documents end in one. vocab_hash is the sha256 of the file's bytes, and save() writes
  those same bytes back.
- Decoding skips <pad> and <bos> (when it differs from <eos>) and turns the end-of-text token
  into a newline, as the other kinds do. Ids that stop inside a multi-byte UTF-8 character
  decode that partial character as U+FFFD.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from numpy.typing import ArrayLike, NDArray
from tokenizers import decoders, models, pre_tokenizers, trainers

from cllm_cli.errors import DataError, WriteFailed
from cllm_cli.fileio import atomic_file, check_regular
from cllm_cli.jsonfile import JSONError, loads
from cllm_cli.tokenizers.base import SPECIALS, Tokenizer, replace_undecodable
from cllm_cli.tokenizers.bpe_cuts import (
    BLOCK_CUT,
    BLOCK_WORD_CUT,
    cut_points,
    last_place,
    whole_file,
)
from cllm_cli.tokenizers.bpe_files import BOS_NAMES, EOS_NAMES, tokenizer_source, vocab_merges_json

N_BYTES = 256
MIN_VOCAB_SIZE = len(SPECIALS) + N_BYTES
MAX_VOCAB_SIZE = 1_000_000
MIN_FREQUENCY = 2
CHUNK_CHARS = 1 << 16
TRAIN_BYTES = 8 << 20

# the tokenizer.json model types read: BPE, and WordLevel (cllm_export's word and char files)
MODEL_TYPES = ("BPE", "WordLevel")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF = {c: b for b, c in _byte_symbols().items()}     # byte-level symbol -> byte


class BPETokenizer(Tokenizer):
    """A tokenizer.json run by the `tokenizers` library; kind "bpe".

    Built by train() (byte-level BPE with <pad> <unk> <bos> <eos> at ids 0..3) or read()
    (that, or another BPE or WordLevel tokenizer.json, such as GPT-2's)."""

    kind = "bpe"
    file_name = "tokenizer.json"
    detect_rank = 0         # a directory, a .json file, or a file that starts as JSON
    train_bytes = TRAIN_BYTES
    min_vocab_size = MIN_VOCAB_SIZE
    max_vocab_size = MAX_VOCAB_SIZE

    def __init__(self, json_bytes: bytes) -> None:
        """From the bytes of a tokenizer.json; ValueError (one line) when they are not one."""
        self._json = bytes(json_bytes)
        spec = loads(self._json)        # JSONError (a ValueError) naming the line
        try:
            self._tk = tokenizers.Tokenizer.from_str(self._json.decode("utf-8"))
        except Exception as e:      # the library's Exception
            raise ValueError(f"not a tokenizer.json ({_one_line(e)[:200]})") from None
        model = type(self._tk.model).__name__
        if model not in MODEL_TYPES:
            raise ValueError(f"a {model} tokenizer (model type {model}): only BPE tokenizers "
                             f"(and the WordLevel ones cllm_export writes for word and char "
                             f"models) can be read")
        self._tk.encode_special_tokens = True       # "<eos>" in text is text
        self._hash = hashlib.sha256(self._json).hexdigest()
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values(), default=-1) + 1

        def first_id(names: Iterable[str]) -> int:
            return next((vocab[n] for n in names if n in vocab), -1)

        self.pad_id = first_id(("<pad>",))
        self.unk_id = first_id(("<unk>",))
        self.eos_id = first_id(EOS_NAMES)
        self.bos_id = first_id(BOS_NAMES)
        if self.bos_id < 0:
            self.bos_id = self.eos_id
        if self.eos_id < 0:
            raise ValueError(f"no end-of-text token ({', '.join(EOS_NAMES)}) in its vocabulary")
        added = [t.get("content", "") for t in spec.get("added_tokens") or []
                 if not t.get("special")]
        pre = spec.get("pre_tokenizer") or {}
        self._cuttable = (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
                          and pre.get("use_regex", True) and not pre.get("add_prefix_space")
                          and not added)
        if not self._cuttable:
            self.block_cut = whole_file    # type: ignore[method-assign]

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"BPETokenizer(size={len(self)})"

    @property
    def model_name(self) -> str:
        """The library's name of the file's model: "BPE", or "WordLevel" for a word or char
        vocabulary that cllm_export wrote, ..."""
        return type(self._tk.model).__name__

    encodes_on_all_cores = True

    @classmethod
    def block_cut(cls, data: bytes) -> int:
        """The last BLOCK_CUT place in `data`, looked for near its end first; without one,
        the last end of a word (BLOCK_WORD_CUT: a file without line breaks). A tokenizer
        that cannot be cut replaces this by whole_file."""
        return (last_place(data, BLOCK_CUT, lambda m: m.start(1), CHUNK_CHARS)
                or last_place(data, BLOCK_WORD_CUT, lambda m: m.end(), CHUNK_CHARS))

    # -- building -----------------------------------------------------------------------

    @classmethod
    def check_vocab_size(cls, vocab_size: int) -> None:
        if (not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool)
                or vocab_size < MIN_VOCAB_SIZE):
            raise DataError(f"vocab_size must be at least {MIN_VOCAB_SIZE} for bpe "
                            f"({len(SPECIALS)} special ids + {N_BYTES} bytes), got {vocab_size}")
        if vocab_size > MAX_VOCAB_SIZE:
            raise DataError(f"vocab_size must be at most {MAX_VOCAB_SIZE:,} for bpe (the "
                            f"tokenizers library reserves memory in proportion to it), got "
                            f"{vocab_size:,}")

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Byte-level BPE trained on `documents` (an iterable of str) with at most vocab_size
        ids, the 4 special ids and the 256 bytes included."""
        cls.check_vocab_size(vocab_size)
        documents = list(documents)           # at most TRAIN_BYTES when a corpus is read
        n_bytes = sum(len(doc.encode("utf-8", "surrogatepass")) for doc in documents)
        vocab_size = min(vocab_size, MIN_VOCAB_SIZE + n_bytes)   # no more merges than bytes
        tk = tokenizers.Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size), min_frequency=MIN_FREQUENCY, show_progress=False,
            special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

        def pieces() -> Iterator[str]:
            for doc in documents:
                start = 0
                for cut in cut_points(doc, CHUNK_CHARS):
                    yield doc[start:cut]
                    start = cut
                yield doc[start:]

        tk.train_from_iterator(pieces(), trainer)
        return cls(tk.to_str().encode("utf-8"))

    # -- text <-> ids ---------------------------------------------------------------------

    def _pieces(self, text: str) -> list[str]:
        if not self._cuttable:
            return [text]
        bounds = [0, *cut_points(text, CHUNK_CHARS), len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:])]

    def encode_batch(self, texts: Iterable[str]) -> list[NDArray[np.int64]]:
        """[int64 ids of each text]; all pieces of all texts in one parallel library call."""
        texts = [replace_undecodable(t)[0] for t in texts]   # bytes not UTF-8 -> U+FFFD
        pieces = [self._pieces(t) for t in texts]
        flat = [p for ps in pieces for p in ps]
        encoded = self._tk.encode_batch_fast(flat, add_special_tokens=False) if flat else []
        out: list[NDArray[np.int64]] = []
        k = 0
        for ps in pieces:
            out.append(np.concatenate([np.array(e.ids, dtype=np.int64)
                                       for e in encoded[k:k + len(ps)]]))
            k += len(ps)
        return out

    def encode(self, text: str) -> NDArray[np.int64]:
        """Ids of `text` as int64, no <eos>."""
        return self.encode_batch([text])[0]

    def encode_document(self, text: str) -> NDArray[np.int64]:
        """encode(text) followed by the end-of-text id."""
        return np.append(self.encode(text), np.int64(self.eos_id))

    def encode_marked(self, text: str) -> NDArray[np.int64]:
        """Ids of `text` with the tokenizer's added tokens written in it (a chat model's
        <|im_start|>) read as their ids, as transformers' tokenizer reads them."""
        marked = getattr(self, "_marked", None)
        if marked is None:
            marked = self._marked = tokenizers.Tokenizer.from_str(self._json.decode("utf-8"))
        text = replace_undecodable(text)[0]
        return np.asarray(marked.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def unknown_pieces(self, text: str) -> list[str]:
        """The pieces of `text` read as <unk>, in order (byte-level: none)."""
        if self.unk_id < 0:
            return []
        text = replace_undecodable(text)[0]
        enc = self._tk.encode(text, add_special_tokens=False)
        return [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == self.unk_id]

    def replaced_bytes(self, text: str) -> Sequence[str | bytes]:
        """The distinct bytes of `text` that are not UTF-8 (lone surrogates, as sys.argv
        carries them), which encode reads as U+FFFD."""
        return replace_undecodable(text)[1]

    def decode(self, ids: ArrayLike) -> str:
        """Ids -> text: <pad> and <bos> skipped, end of text -> newline."""
        V = len(self)
        skip = {self.pad_id, self.bos_id} - {self.eos_id, -1}
        out: list[str] = []
        run: list[int] = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if not 0 <= i < V:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{V - 1})")
            if i in skip:
                continue
            if i == self.eos_id:
                out.append(self._tk.decode(run, skip_special_tokens=False) + "\n")
                run = []
            else:
                run.append(i)
        out.append(self._tk.decode(run, skip_special_tokens=False))
        return "".join(out)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary's string for id i (byte-level tokens show bytes as GPT-2's
        printable characters)."""
        return self._tk.id_to_token(int(i))

    def token_text(self, i: int) -> str | None:
        """The text id i stands for, as a reader would see it (" the", "\\n"): the decoded
        token; special tokens by name; a token that stops inside a UTF-8 character shows its
        bytes as \\xNN escapes."""
        i = int(i)
        if i in self._special_ids():
            return self.id_to_token(i)
        text = self._tk.decode([i], skip_special_tokens=False)
        symbol = self.id_to_token(i) or ""
        if "\ufffd" in text and symbol and all(c in _BYTE_OF for c in symbol):
            text = bytes(_BYTE_OF[c] for c in symbol).decode("utf-8", "backslashreplace")
        return text

    def _special_ids(self) -> set[int]:
        ids = getattr(self, "_specials", None)
        if ids is None:
            added = self._tk.get_added_tokens_decoder()
            ids = self._specials = {k for k, t in added.items() if t.special}
        return ids

    # -- tokenizer.json ---------------------------------------------------------------------

    @property
    def json_bytes(self) -> bytes:
        """The tokenizer.json bytes save() writes."""
        return self._json

    @property
    def vocab_hash(self) -> str:
        """sha256 hex digest of tokenizer.json as save() writes it."""
        return self._hash

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically."""
        with atomic_file(os.fspath(path), DataError, storage_error=WriteFailed) as f:
            f.write(self._json)

    @classmethod
    def from_vocab_merges(cls, vocab_path: str | os.PathLike,
                          merges_path: str | os.PathLike) -> BPETokenizer:
        """GPT-2's classic layout, vocab.json and merges.txt, as a tokenizer (vocab_merges_json
        says how); ValueError (one line) when the files are not such a pair."""
        return cls(vocab_merges_json(vocab_path, merges_path))

    @classmethod
    def recognises(cls, path: str | os.PathLike, what: str) -> bool:
        path = Path(path)
        if path.is_dir() or path.suffix == ".json":
            return True
        check_regular(path, what)
        try:
            with open(path, "rb") as f:
                start = f.read(64)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        return start.lstrip().startswith(b"{")

    def tokenizer_json(self) -> bytes:
        return self.json_bytes

    @classmethod
    def check_files(cls, path: str | os.PathLike, what: str) -> Path:
        """The file read() reads for `path` (tokenizer.json or vocab.json), after checking that
        it (and merges.txt) open as regular files: UsageError naming `what` otherwise,
        DataError when `path` holds no tokenizer."""
        first, merges = tokenizer_source(path, what)
        for name in (first, merges):
            if name is not None:
                check_regular(name, what)
        return first

    @classmethod
    def read(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a tokenizer: a tokenizer.json, a vocab.json (merges.txt next to it) or a
        directory holding either (source); DataError (one line naming the file) when it is not
        usable."""
        first, merges = tokenizer_source(path)
        if merges is not None:
            try:
                return cls.from_vocab_merges(first, merges)
            except ValueError as e:
                raise DataError(f"{first}: {e}") from None
        try:
            with open(first, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"{first}: cannot read ({e.strerror or e})") from None
        try:
            return cls(data)
        except JSONError as e:
            raise DataError(f"{first}:{e.line}: {e}") from None
        except ValueError as e:
            raise DataError(f"{first}: {e}") from None
