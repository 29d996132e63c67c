"""The "char" tokenizer: every distinct character, no lower-casing.

- The vocabulary lists every distinct character of the corpus, sorted by code point. When
  there are more distinct characters than vocab_size - 4, the most frequent ones are kept
  (ties: lower code point first), still listed in code-point order; the rest map to <unk>.
- Decoding skips <pad> and <bos>, turns <eos> into a newline and writes <unk> as "<unk>".
- As a tokenizer.json (tokenizer_json): a `tokenizers` WordLevel pipeline in which every
  character is a token; its decoder gives the text our decode gives: the special tokens
  replaced as above (<eos> a newline, <pad> and <bos> nothing), then the tokens joined.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tokenizers
from numpy.typing import ArrayLike, NDArray
from tokenizers import decoders, pre_tokenizers

from cllm_cli.errors import DataError
from cllm_cli.fileio import char_cut
from cllm_cli.tokenizers.base import BOS, EOS, PAD, SPECIALS, UNK
from cllm_cli.tokenizers.vocab import Scanner, VocabTokenizer, word_level_pipeline


class CharTokenizer(VocabTokenizer):
    """Every distinct character, in code-point order; no lower-casing."""

    kind = "char"
    detect_rank = 1         # a vocab.txt of white space or of single characters in order

    def __init__(self, itos: Sequence[str], counts: Sequence[int]) -> None:
        super().__init__(itos, counts)
        self._lut: NDArray[np.int64] | None = None

    @classmethod
    def scanner(cls) -> CharScanner:
        return CharScanner()

    @classmethod
    def recognises(cls, path: str | os.PathLike, what: str) -> bool:
        try:
            vocabulary = cls.read(path)
        except DataError:
            return False
        # A word vocabulary never holds white space, and lists its tokens by frequency; a
        # char vocabulary of a text without white space still lists single characters in
        # code-point order. (A word vocabulary of single characters that happen to be in
        # code-point order reads as char here; the tools that know the run's kind take its
        # own file whatever this says.)
        tokens = vocabulary.itos[len(SPECIALS):]
        return (any(token.isspace() for token in tokens)
                or (all(len(token) == 1 for token in tokens)
                    and all(a < b for a, b in zip(tokens, tokens[1:]))))

    def tokenizer_json(self) -> bytes:
        tk = word_level_pipeline(self)
        tk.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
        # each special token as our decode writes it (a token is replaced whole, so the
        # characters "<", "e", ... of a text that spells "<eos>" stay as they are), then joined
        tk.decoder = decoders.Sequence([decoders.Replace(SPECIALS[EOS], "\n"),
                                        decoders.Replace(SPECIALS[PAD], ""),
                                        decoders.Replace(SPECIALS[BOS], ""), decoders.Fuse()])
        return tk.to_str().encode("utf-8")

    @classmethod
    def _token_error(cls, token: str) -> str | None:
        if len(token) != 1:
            return f"char vocabulary token is not one character: {token!r}"
        return None

    def tokens(self, text: str) -> list[str]:
        return list(text)

    @classmethod
    def block_cut(cls, data: bytes) -> int:
        return char_cut(data)

    def encode(self, text: str) -> NDArray[np.int64]:
        # code points through a lookup table, no Python loop over characters
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        lut = self._code_point_ids()
        out = np.full(cps.shape, UNK, dtype=np.int64)
        inside = cps < len(lut)
        out[inside] = lut[cps[inside]]
        return out

    def decode(self, ids: ArrayLike) -> str:
        return "".join("\n" if i == EOS else self.itos[i]
                       for i in self._check_ids(ids) if i != PAD and i != BOS)

    def _code_point_ids(self) -> NDArray[np.int64]:
        """code point -> id table."""
        if self._lut is None:
            cps = [ord(t) for t in self.itos[len(SPECIALS):]]
            lut: NDArray[np.int64] = np.full(max(cps, default=0) + 1, UNK, dtype=np.int64)
            lut[cps] = np.arange(len(SPECIALS), len(self.itos))
            self._lut = lut
        return self._lut


class CharScanner(Scanner):
    """Provisional id of a character: 4 + its code point."""

    tokenizer_class = CharTokenizer

    def __init__(self) -> None:
        self.max_cp = -1

    @staticmethod
    def scan(text: str) -> NDArray[np.uint32]:
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")

    def merge(self, cps: NDArray[np.uint32]) -> NDArray[np.int32]:
        if cps.size:
            self.max_cp = max(self.max_cp, int(cps.max()))
        return cps.astype(np.int32) + len(SPECIALS)

    def n_provisional(self) -> int:
        return len(SPECIALS) + self.max_cp + 1

    def _itos(self, kept: NDArray[np.intp]) -> tuple[list[str], NDArray[np.intp]]:
        kept = np.sort(kept)                        # code-point order
        return [chr(p - len(SPECIALS)) for p in kept.tolist()], kept
