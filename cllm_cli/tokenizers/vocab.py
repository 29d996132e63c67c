"""Vocabularies listed token by token in vocab.txt (the word and char kinds), and the
one-pass build that counts their tokens.

    VocabTokenizer     itos / counts / stoi, vocab.txt read and written, unknown tokens
    Scanner            first pass of a vocabulary build by counting (WordScanner, CharScanner)
    FirstSeen          token -> number in order of first appearance

vocab.txt is UTF-8, one line per id, "token<TAB>count\\n" with the token's count in the corpus
it was built from (0 for the special ids); a backslash, tab, newline or carriage return inside
a token is written as \\\\, \\t, \\n or \\r.

Which tokens a counted vocabulary keeps (Scanner.finish): the most frequent, ties broken by
the order of the provisional ids (first appearance for words, code point for characters);
vocab_size counts the 4 special ids.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Any, ClassVar, Dict, Iterable, Sequence

import numpy as np
import tokenizers
from numpy.typing import ArrayLike, NDArray
from tokenizers import models

from cllm_cli.errors import DataError, WriteFailed
from cllm_cli.fileio import atomic_file, read_bytes
from cllm_cli.progress import plural
from cllm_cli.tokenizers.base import SPECIALS, UNK, Tokenizer

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}
_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]")
_VALID_ESCAPED = re.compile(r"(?:[^\\]|\\[\\tnr])+", re.S)
_ESCAPE_SEQ = re.compile(r"\\([\\tnr])")


def _escape(token: str) -> str:
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group()], token)


def _unescape(field: str) -> str:
    return _ESCAPE_SEQ.sub(lambda m: _UNESCAPES[m.group(1)], field)


def word_level_pipeline(vocabulary: VocabTokenizer) -> tokenizers.Tokenizer:
    """A `tokenizers` WordLevel model over a VocabTokenizer's tokens (our ids, <unk> for what
    the vocabulary lacks) with the special tokens added; each kind adds its normalizer,
    pre-tokenizer and decoder (tokenizer_json)."""
    tk = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocabulary.itos)},
                                               unk_token=SPECIALS[UNK]))
    tk.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                           for s in SPECIALS])
    return tk


class VocabTokenizer(Tokenizer):
    """A tokenizer whose vocabulary is a list of token strings with their corpus counts.

    itos[k] is the token of id k, counts[k] its count in the corpus it was built from (0 for
    the special ids), stoi the inverse of itos. Subclasses say how text splits into tokens
    (tokens, encode, decode) and give the scanner of their one-pass build.
    """

    file_name = "vocab.txt"

    def __init__(self, itos: Sequence[str], counts: Sequence[int]) -> None:
        if list(itos[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"the first ids must be {SPECIALS}")
        if len(counts) != len(itos):
            raise ValueError("itos and counts differ in length")
        self.itos = list(itos)
        self.counts = [int(c) for c in counts]
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate token in itos")
        self._hash: str | None = None

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int) -> VocabTokenizer:
        """Count the tokens of `documents` (an iterable of str) and keep the most frequent."""
        cls.check_vocab_size(vocab_size)
        scanner = cls.scanner()
        blocks = [scanner.ids(doc) for doc in documents]
        ids = np.concatenate(blocks) if blocks else np.zeros(0, np.int32)
        counts = np.bincount(ids, minlength=scanner.n_provisional())
        tokenizer, _ = scanner.finish(counts, vocab_size)
        return tokenizer

    def tokens(self, text: str) -> list[str]:
        """Split `text` into token strings (no ids, no <eos>)."""
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        """The vocabulary's string for id i."""
        return self.itos[i]

    def unknown_pieces(self, text: str) -> list[str]:
        return [t for t in self.tokens(text) if t not in self.stoi]

    def _check_ids(self, ids: ArrayLike) -> list[int]:
        """ids as a list of ints, each checked to be in the vocabulary."""
        checked: list[int] = np.asarray(ids).reshape(-1).tolist()
        V = len(self.itos)
        for i in checked:
            if not 0 <= i < V:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{V - 1})")
        return checked

    # -- vocab.txt --------------------------------------------------------------------------

    def _vocab_bytes(self) -> bytes:
        return "".join(f"{_escape(t)}\t{c}\n" for t, c in zip(self.itos, self.counts)).encode(
            "utf-8", "surrogatepass")

    @property
    def vocab_hash(self) -> str:
        if self._hash is None:
            self._hash = hashlib.sha256(self._vocab_bytes()).hexdigest()
        return self._hash

    def save(self, path: str | os.PathLike) -> None:
        with atomic_file(pathlib.Path(path), DataError, storage_error=WriteFailed) as f:
            f.write(self._vocab_bytes())

    @classmethod
    def _token_error(cls, token: str) -> str | None:
        """Why `token` (not a special one) cannot be in this kind's vocabulary, or None."""
        return None

    @classmethod
    def read(cls, path: str | os.PathLike) -> VocabTokenizer:
        """Read a vocab.txt written by save(); DataError with the line number if malformed."""
        data = read_bytes(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 (bad byte at offset {e.start})") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        itos: list[str] = []
        counts: list[int] = []
        seen: set[str] = set()
        for k, line in enumerate(lines, start=1):
            where = f"{path}:{k}"
            if line.endswith("\r"):
                line = line[:-1]
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(f"{where}: expected 'token<TAB>count'")
            field, count = fields
            if not _VALID_ESCAPED.fullmatch(field):
                raise DataError(f"{where}: empty token or bad escape sequence")
            if not count.isdigit() or not count.isascii():
                raise DataError(f"{where}: count is not a non-negative integer: {count!r}")
            try:
                number = int(count)
            except ValueError:      # more digits than Python converts (4,300)
                raise DataError(f"{where}: count of {len(count):,} digits is too long to "
                                f"read") from None
            token = _unescape(field)
            if k <= len(SPECIALS) and token != SPECIALS[k - 1]:
                raise DataError(f"{where}: expected special token {SPECIALS[k - 1]}, got {token!r}")
            problem = cls._token_error(token) if k > len(SPECIALS) else None
            if problem:
                raise DataError(f"{where}: {problem}")
            if token in seen:
                raise DataError(f"{where}: duplicate token {token!r}")
            seen.add(token)
            itos.append(token)
            counts.append(number)
        if len(itos) < len(SPECIALS):
            raise DataError(f"{path}: vocabulary has {len(itos)} {plural(len(itos), 'line')}, "
                            f"needs at least the {len(SPECIALS)} special tokens")
        return cls(itos, counts)


class Scanner:
    """First pass of a vocabulary build by counting.

    ids(text) gives every token a provisional int32 id without knowing the final vocabulary
    (each subclass says how). Ids 0..3 keep their special meaning, so a stream of provisional
    ids with EOS appended is mapped to the final ids by one table look-up, which finish()
    returns with the tokenizer.

    ids(text) is merge(scan(text)): scan, a static method, does the work that needs no state
    (prepare_dataset runs it in worker processes, a block of text each), merge turns its
    result into provisional ids in block order.
    """

    tokenizer_class: ClassVar[type[VocabTokenizer]]     # the kind it builds

    @staticmethod
    def scan(text: str) -> Any:
        raise NotImplementedError

    def merge(self, scanned: Any) -> NDArray[np.int32]:
        raise NotImplementedError

    def ids(self, text: str) -> NDArray[np.int32]:
        return self.merge(self.scan(text))

    def n_provisional(self) -> int:
        """Provisional ids given so far: the length of the counts finish() takes."""
        raise NotImplementedError

    def _itos(self, kept: NDArray[np.intp]) -> tuple[list[str], NDArray[np.intp]]:
        """The tokens of the provisional ids `kept` (most frequent first), in id order, with
        those ids in the same order."""
        raise NotImplementedError

    def finish(self, counts: ArrayLike,
               vocab_size: int) -> tuple[VocabTokenizer, NDArray[np.int64]]:
        """counts[provisional id] -> (tokenizer, provisional-to-final id table)."""
        n_special = len(SPECIALS)
        counts = np.asarray(counts, dtype=np.int64).copy()
        counts[:n_special] = 0
        present = np.flatnonzero(counts)            # ascending: first appearance / code point
        by_freq = present[np.argsort(-counts[present], kind="stable")]
        itos, kept = self._itos(by_freq[:vocab_size - n_special])
        tokenizer = self.tokenizer_class(SPECIALS + itos,
                                         [0] * n_special + counts[kept].tolist())
        remap: NDArray[np.int64] = np.full(max(len(counts), n_special), UNK, dtype=np.int64)
        remap[:n_special] = np.arange(n_special)
        remap[kept] = np.arange(n_special, n_special + len(kept))
        return tokenizer, remap


class FirstSeen(Dict[Any, int]):
    """token -> number, from `start` on in order of first appearance."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.start = start

    def __missing__(self, token: Any) -> int:
        i = self[token] = len(self) + self.start
        return i
