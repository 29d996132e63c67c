"""The "word" tokenizer: lower-cased words and single punctuation marks.

- The text is lower-cased, then `\\w+(?:'\\w+)*|[^\\w\\s]` is applied (words with inner
  apostrophes such as "don't" stay whole; every other non-space character is a token of its
  own). Ids 4.. go to the most frequent tokens, ties broken by first appearance in the corpus
  (files in order). vocab_size counts the 4 special ids.
- Decoding skips <pad> and <bos>, turns <eos> into a newline and writes <unk> as "<unk>". It
  puts single spaces between tokens except: none before . , ; : ! ? % ' and closing brackets,
  none after opening brackets, none around - and / (hyphenated words come back whole), and
  double quotes alternate between opening (space before, none after) and closing (no space
  before). The text stays lower-case.
- As a tokenizer.json (tokenizer_json, for a transformers directory): a `tokenizers`
  WordLevel pipeline giving our ids, with <unk> for what the vocabulary lacks: a Lowercase
  normalizer, then a Split pre-tokenizer keeping `[\\p{L}\\p{N}_]+(?:'[\\p{L}\\p{N}_]+)*|
  [^\\p{L}\\p{N}_\\s\\x1c-\\x1f]` (Python's `\\w+(?:'\\w+)*|[^\\w\\s]`; the library's own `\\w`
  would also take combining marks, and its `\\s` lacks the separators \\x1c..\\x1f); a
  decoder that gives the text our decode gives (WORD_DECODING: the tokens joined by single
  spaces, then the spaces our rules leave out removed by regular expressions;
  clean_up_tokenization_spaces is off, as it would undo some). Its quote rule
  counts the quotes before each one on the line, a cost that grows with the square of a
  line's length (a line of 20 KB decodes in about 0.1 s). The library lower-cases one
  character at a time, so a final capital sigma becomes σ where Python writes ς.
"""
from __future__ import annotations

import itertools
import os
import re

import numpy as np
import tokenizers
from numpy.typing import ArrayLike, NDArray
from tokenizers import decoders, normalizers, pre_tokenizers

from cllm_cli.tokenizers.base import BOS, EOS, PAD, SPECIALS, UNK
from cllm_cli.tokenizers.vocab import FirstSeen, Scanner, VocabTokenizer, word_level_pipeline

_WORD_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")

# Word decoding: which tokens hug their neighbours.
_NO_SPACE_BEFORE = frozenset(".,;:!?%')]}\u2026")
_NO_SPACE_AFTER = frozenset("([{")
_JOINERS = frozenset("-/")          # no space on either side: "well-known", "and/or"

# Python's \w is letters, digits (numeric characters) and "_"; [^\w\s] every other non-space.
# Python's \s also holds the separators \x1c..\x1f, which the library's \s does not.
WORD_PATTERN = r"[\p{L}\p{N}_]+(?:'[\p{L}\p{N}_]+)*|[^\p{L}\p{N}_\s\x1c-\x1f]"

# The word tokenizer's decoding (tokenizers/word.py) as replacements in the text of the tokens
# joined by single spaces. No token holds a space, so every space lies between two tokens and
# the characters either side of it are the ends of those tokens. _LINE is the text of a line
# outside quotes; a quote with an odd number of quotes before it on its line (itself
# included) opens, the next one closes. The cheap look-arounds first keep the counting to
# the spaces next to a quote.
_LINE = r'[^"\n]*'
WORD_DECODING = (
    (r" <(?:pad|bos)>", ""),                                         # skipped,
    (r"^<(?:pad|bos)> ?", ""),                                       # also first on a line
    (r" ?<eos> ?", "\n"),                                           # a line end
    (rf'(?<=")(?<=^(?:{_LINE}"{_LINE}")*{_LINE}") ', ""),           # after an opening quote
    (rf' (?=")(?<=^(?:{_LINE}"{_LINE}")*{_LINE}"{_LINE} )', ""),    # before a closing quote
    (r" (?=[.,;:!?%')\]}\u2026/-])", ""),                           # before . , ) - / ...
    (r"(?<=[(\[{/-]) ", ""),                                         # after ( [ { - /
)


class WordTokenizer(VocabTokenizer):
    """Lower-cased words and single punctuation marks (rules in the module docstring)."""

    kind = "word"
    detect_rank = 2         # any vocab.txt that no other kind recognises

    @classmethod
    def scanner(cls) -> WordScanner:
        return WordScanner()

    @classmethod
    def recognises(cls, path: str | os.PathLike, what: str) -> bool:
        return True

    def shown_prompt(self, prompt: str) -> str:
        return prompt.rstrip()

    def tokenizer_json(self) -> bytes:
        tk = word_level_pipeline(self)
        tk.normalizer = normalizers.Lowercase()
        tk.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(WORD_PATTERN),
                                                behavior="removed", invert=True)
        # WordPiece with a prefix no token has: the tokens joined by single spaces
        tk.decoder = decoders.Sequence(
            [decoders.WordPiece(prefix="\x00", cleanup=False), decoders.Fuse()]
            + [decoders.Replace(tokenizers.Regex(pattern), text) for pattern, text in WORD_DECODING])
        return tk.to_str().encode("utf-8")

    def tokens(self, text: str) -> list[str]:
        return _WORD_RE.findall(text.lower())

    @classmethod
    def block_cut(cls, data: bytes) -> int:
        # after the last space or line end: no token, and no lower-casing context (a final
        # sigma), goes across white space
        return max(data.rfind(b" "), data.rfind(b"\n")) + 1

    def encode(self, text: str) -> NDArray[np.int64]:
        toks = self.tokens(text)
        return np.fromiter(map(self.stoi.get, toks, itertools.repeat(UNK)),
                           dtype=np.int64, count=len(toks))

    def decode(self, ids: ArrayLike) -> str:
        out: list[str] = []
        glue = True            # no space before the next token
        quote_open = False
        for i in self._check_ids(ids):
            if i == PAD or i == BOS:
                continue
            if i == EOS:
                out.append("\n")
                glue, quote_open = True, False
                continue
            tok = self.itos[i]
            if tok == '"':
                if quote_open:                  # closing quote hugs the text before it
                    out.append(tok)
                    glue = False
                else:                           # opening quote hugs the text after it
                    out.append(tok if glue else ' "')
                    glue = True
                quote_open = not quote_open
                continue
            if glue or tok in _NO_SPACE_BEFORE or tok in _JOINERS:
                out.append(tok)
            else:
                out.append(" " + tok)
            glue = tok in _NO_SPACE_AFTER or tok in _JOINERS
        return "".join(out)


class WordScanner(Scanner):
    """Provisional id of a word: 4 + its order of first appearance."""

    tokenizer_class = WordTokenizer

    def __init__(self) -> None:
        self.first_seen = FirstSeen(len(SPECIALS))

    @staticmethod
    def scan(text: str) -> tuple[NDArray[np.int32], list[str]]:
        """(local ids, distinct words): each word of `text` numbered from 0 in order of first
        appearance in the text."""
        toks = _WORD_RE.findall(text.lower())
        local = FirstSeen(0)
        ids = np.fromiter(map(local.__getitem__, toks), dtype=np.int32, count=len(toks))
        return ids, list(local)

    def merge(self, scanned: tuple[NDArray[np.int32], list[str]]) -> NDArray[np.int32]:
        ids, words = scanned
        table = np.fromiter(map(self.first_seen.__getitem__, words), dtype=np.int32,
                            count=len(words))
        return table[ids]

    def n_provisional(self) -> int:
        return len(SPECIALS) + len(self.first_seen)

    def _itos(self, kept: NDArray[np.intp]) -> tuple[list[str], NDArray[np.intp]]:
        table = list(self.first_seen)
        return [table[p - len(SPECIALS)] for p in kept.tolist()], kept
