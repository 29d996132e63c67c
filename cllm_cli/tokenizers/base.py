"""What every tokenizer kind offers, and the special ids they share.

    Tokenizer          the interface; Tokenizer.load / Tokenizer.build pick the kind by name
    TOKENIZERS         kind name -> class, the registry Tokenizer.load / build look kinds up in
    SPECIALS           <pad> <unk> <bos> <eos>: ids 0..3 of every kind; a document ends in <eos>

The kinds themselves (vocab.py, word.py, char.py, bpe.py) all build on this module, so it
imports none of them: TOKENIZERS starts empty here and the package (__init__.py) fills it once
those modules are imported. Importing anything under cllm_cli.tokenizers runs __init__.py
first, so the registry is complete before any caller can reach it.

A new kind is a class with the interface of Tokenizer (kind, file_name, train, read,
check_vocab_size, encode, decode, unknown_pieces, __len__, vocab_hash, save, and for reading a
file of unknown kind and exporting: recognises, detect_rank, check_files, tokenizer_json) and
one entry in TOKENIZERS; nothing else changes: no other module names a kind. Its block_cut (where a corpus file may be cut into blocks)
is optional: without it each file is tokenized whole. prepare_dataset (corpus/dataset.py)
builds a kind's vocabulary with train() and then encodes the corpus, or, when the kind gives a
scanner() (word and char do), builds vocabulary and token stream in one pass over the corpus.

Every kind decodes alike around the special ids: <pad> and <bos> are skipped, <eos> becomes a
newline.
"""
from __future__ import annotations

import os
import re
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cllm_cli.errors import DataError
from cllm_cli.fileio import check_regular

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]

# kind name -> class, in the order the kinds are offered (word, char, bpe). Filled by the
# package's __init__.py; a test may add a kind of its own for a while.
TOKENIZERS: dict[str, type[Tokenizer]] = {}


_SURROGATES = re.compile("[\ud800-\udfff]+")


def replace_undecodable(text: str) -> tuple[str, Sequence[str | bytes]]:
    """(text, bad): text with its lone surrogates replaced by U+FFFD, and the distinct bytes
    (or surrogates) they stood for, in order of appearance.

    Python carries bytes that are not UTF-8 (in sys.argv, os.fsdecode) as lone surrogates
    U+DC80..U+DCFF (surrogateescape), which are not text: no UTF-8 encoder or tokenizers
    library takes them. They are replaced as bytes.decode("utf-8", "replace") replaces those
    bytes, the way the corpus reader's --encoding-errors replace does; other lone surrogates
    become one U+FFFD each. Text without any is returned as it is."""
    if _SURROGATES.search(text) is None:
        return text, []
    runs = list(dict.fromkeys(m.group() for m in _SURROGATES.finditer(text)))
    bad: Sequence[str | bytes] = runs
    try:
        fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        bad = [run.encode("utf-8", "surrogateescape") for run in runs]
    except UnicodeEncodeError:              # a surrogate that stands for no byte
        fixed = _SURROGATES.sub(lambda m: "\ufffd" * len(m.group()), text)
    return fixed, bad


def detect_kind(path: str | os.PathLike, what: str = "--vocab") -> str | None:
    """The kind of the tokenizer file in `path`: the first kind, by detect_rank, that
    recognises it, or None."""
    ranked = sorted(TOKENIZERS.values(), key=lambda c: c.detect_rank)
    return next((c.kind for c in ranked if c.recognises(path, what)), None)


def load_tokenizer(path: str | os.PathLike, kind: str = "auto", what: str = "--vocab") -> Tokenizer:
    """The tokenizer in `path` (a file, or a directory where a kind reads one): of `kind`, or
    with "auto" of the kind detect_kind finds. One line (DataError, UsageError naming `what`)
    when it cannot be read."""
    path = _vocabulary_in(path)
    if kind == "auto":
        found = detect_kind(path, what)
        if found is None:
            raise DataError(f"{what} {path}: not a tokenizer file of any kind "
                            f"({', '.join(TOKENIZERS)})")
        kind = found
    cls = tokenizer_class(kind)
    cls.check_files(path, what)
    return cls.read(path)


def _vocabulary_in(path: str | os.PathLike) -> str | os.PathLike:
    """A run directory of a word or char tokenizer read as its vocab.txt (one that holds a
    BPE tokenizer's files is read by the bpe kind itself); any other path as it is."""
    if (os.path.isdir(path) and os.path.isfile(os.path.join(path, "vocab.txt"))
            and not any(os.path.exists(os.path.join(path, name))
                        for name in ("tokenizer.json", "vocab.json"))):
        return os.path.join(path, "vocab.txt")
    return path


class Tokenizer:
    """The interface of every tokenizer kind; the trainer, inference and the dataset cache use
    nothing else. Build one with Tokenizer.build(documents, kind, vocab_size) or read one with
    Tokenizer.load(path, kind)."""

    kind: str | None = None            # its name in TOKENIZERS
    file_name: ClassVar[str]            # the file save() writes in a checkpoint directory
    detect_rank = 0        # load_tokenizer(kind="auto") asks the kinds in this order
    # special ids: those of SPECIALS; a tokenizer.json may lack <pad> (-1) or put them elsewhere
    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    # -- choosing a kind: `kind` names it; left out, it is the class's own ("word" on Tokenizer)

    @classmethod
    def build(cls, documents: Iterable[str], kind: str | None = None,
              vocab_size: int = 10000) -> Tokenizer:
        """A vocabulary of at most vocab_size ids learned from `documents` (strings)."""
        return cls._kind_class(kind).train(documents, vocab_size)

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str | None = None) -> Tokenizer:
        """The tokenizer of `kind` saved in `path`; DataError (one line) if the file is bad."""
        return cls._kind_class(kind).read(path)

    @classmethod
    def _kind_class(cls, kind: str | None) -> type[Tokenizer]:
        return tokenizer_class((cls.kind or "word") if kind is None else kind)

    # -- what each kind implements ---------------------------------------------------------------

    @classmethod
    def check_vocab_size(cls, vocab_size: int) -> None:
        """DataError unless vocab_size is a size this kind can build."""
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= len(SPECIALS):
            raise DataError(f"vocab_size must be at least {len(SPECIALS) + 1} "
                            f"({len(SPECIALS)} special ids + 1), got {vocab_size}")

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int) -> Tokenizer:
        """A new vocabulary learned from `documents` (an iterable of str)."""
        raise NotImplementedError

    @classmethod
    def read(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer save() wrote to `path`; DataError (one line) if the file is bad."""
        raise NotImplementedError

    @classmethod
    def check_files(cls, path: str | os.PathLike, what: str) -> str | os.PathLike:
        """The file read() reads for `path`, checked to open as a regular file: UsageError
        naming `what` otherwise."""
        check_regular(path, what)
        return path

    @classmethod
    def recognises(cls, path: str | os.PathLike, what: str) -> bool:
        """Whether `path` holds a tokenizer of this kind (load_tokenizer with kind "auto")."""
        return False

    def shown_prompt(self, prompt: str) -> str:
        """The prompt as generation echoes it before the continuation."""
        return prompt

    def tokenizer_json(self) -> bytes:
        """This tokenizer as a `tokenizers` tokenizer.json (bytes), for a transformers
        directory."""
        raise NotImplementedError

    @classmethod
    def scanner(cls) -> Any:
        """A scanner for the one-pass build of prepare_dataset (see vocab.Scanner), or None."""
        return None

    # True when encode() itself runs on all cores (then prepare_dataset uses no workers)
    encodes_on_all_cores = False
    # bytes of the corpus a kind learned otherwise than by counting (bpe) learns from at most:
    # evenly spread blocks (prepare_dataset); None learns from all of it
    train_bytes: int | None = None

    @classmethod
    def block_cut(cls, data: bytes) -> int:
        """Where bytes `data` of a corpus file may end a block (files.read_blocks): a place
        0 < i <= len(data) such that data[:i] and what follows decode and tokenize to the
        whole text's tokens, or 0 when there is none (here: a kind that does not say reads
        each file whole)."""
        return 0

    def __len__(self) -> int:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary's string for id i (None: no token has that id)."""
        raise NotImplementedError

    def token_text(self, i: int) -> str | None:
        """The text id i stands for, as cllm_tokenize --stats shows it (bpe: the decoded token,
        not its byte-level symbols); here the vocabulary's string."""
        return self.id_to_token(i)

    def encode(self, text: str) -> NDArray[np.int64]:
        """Ids of `text` as int64, no <eos>."""
        raise NotImplementedError

    def encode_document(self, text: str) -> NDArray[np.int64]:
        """encode(text) followed by <eos>."""
        return np.append(self.encode(text), np.int64(EOS))

    def encode_marked(self, text: str) -> NDArray[np.int64]:
        """Ids of `text` in which the tokenizer's special tokens written out (a chat
        template writes them so: "<eos>") stand for their ids; encode() reads them as text.
        Here the names of SPECIALS; bpe: its special (added) tokens."""
        parts = re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text)
        ids = [np.array([SPECIALS.index(part)], dtype=np.int64) if i % 2 else self.encode(part)
               for i, part in enumerate(parts) if part]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def decode(self, ids: ArrayLike) -> str:
        """Ids -> readable text; ValueError for an id outside the vocabulary."""
        raise NotImplementedError

    def unknown_pieces(self, text: str) -> list[str]:
        """Every piece of `text` that would be encoded as <unk>, in order, repeats included."""
        raise NotImplementedError

    def unknown_tokens(self, text: str) -> list[str]:
        """Distinct pieces of `text` that would be encoded as <unk>, in order of appearance."""
        return list(dict.fromkeys(self.unknown_pieces(text)))

    def replaced_bytes(self, text: str) -> Sequence[str | bytes]:
        """What encode(text) reads as U+FFFD: the distinct bytes that are not UTF-8 (see
        replace_undecodable). Kinds with <unk> read them as <unk> instead (unknown_tokens
        names them), so this is empty for them."""
        return []

    @property
    def vocab_hash(self) -> str:
        """sha256 hex digest of the file save() writes."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary file atomically."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={len(self)})"


def tokenizer_class(kind: str | None) -> type[Tokenizer]:
    """The class of tokenizer `kind`; DataError for an unknown kind."""
    try:
        return TOKENIZERS[kind]        # type: ignore[index]  # None: the KeyError below
    except (KeyError, TypeError):
        raise DataError(f"tokenizer kind must be one of {', '.join(TOKENIZERS)}, "
                        f"got {kind!r}") from None
