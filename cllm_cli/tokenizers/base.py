"""Tokenizers: text <-> ids, and the file each kind keeps its vocabulary in (SPEC section 3).
Second stage of the data's path: files -> tokenizers -> dataset -> batches.

    Tokenizer          what every kind offers; Tokenizer.load / Tokenizer.build pick the kind
    WordTokenizer      "word": lower-cased words and single punctuation marks (the original's)
    CharTokenizer      "char": every distinct character
    BPETokenizer       "bpe": byte-level BPE of the `tokenizers` library (bpe.py)
    TOKENIZERS         kind name -> class; TOKENIZER_KINDS are its keys, in order

The ids 0..3 are <pad> <unk> <bos> <eos> for every kind; a document ends in <eos>.

A new kind is a class with the interface of Tokenizer (kind, file_name, train, read,
check_vocab_size, encode, decode, unknown_tokens, __len__, vocab_hash, save) and one entry in
TOKENIZERS; nothing else changes. Its block_cut (where a corpus file may be cut into blocks)
is optional: without it each file is tokenized whole. prepare_dataset (dataset.py) builds a kind's vocabulary with
train() and then encodes the corpus, or, when the kind gives a scanner() (word and char do),
builds vocabulary and token stream in one pass over the corpus.

Choices the SPEC leaves open, written down here:

- Word tokenizer: the text is lower-cased, then `\\w+(?:'\\w+)*|[^\\w\\s]` is applied (words with
  inner apostrophes such as "don't" stay whole; every other non-space character is a token of
  its own). Ids 4.. go to the most frequent tokens, ties broken by first appearance in the
  corpus (files in order). vocab_size counts the 4 special ids.
- Char tokenizer: no lower-casing; every distinct character, sorted by code point. When there
  are more distinct characters than vocab_size - 4, the most frequent ones are kept (ties:
  lower code point first), still listed in code-point order; the rest map to <unk>.
- Decoding skips <pad> and <bos>, turns <eos> into a newline and writes <unk> as "<unk>".
  Word decoding puts single spaces between tokens except: none before . , ; : ! ? % ' and
  closing brackets, none after opening brackets, none around - and / (hyphenated words come
  back whole), and double quotes alternate between opening (space before, none after) and
  closing (no space before). The text stays lower-case.
- vocab.txt (word and char): UTF-8, one line per id, "token<TAB>count\\n" with the token's
  count in the corpus it was built from (0 for the special ids); a backslash, tab, newline or
  carriage return inside a token is written as \\\\, \\t, \\n or \\r.
"""
import hashlib
import itertools
import pathlib
import re

import numpy as np

from cllm_cli.errors import DataError
from cllm_cli.fileio import atomic_file, char_cut, read_bytes

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


class Tokenizer:
    """The interface of every tokenizer kind; the trainer, inference and the dataset cache use
    nothing else. Build one with Tokenizer.build(documents, kind, vocab_size) or read one with
    Tokenizer.load(path, kind)."""

    kind = None            # its name in TOKENIZERS
    file_name = None       # the file save() writes in a checkpoint directory
    # special ids: those of SPECIALS; a tokenizer.json may lack <pad> (-1) or put them elsewhere
    pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    # -- choosing a kind: `kind` names it; left out, it is the class's own ("word" on Tokenizer)

    @classmethod
    def build(cls, documents, kind=None, vocab_size=10000):
        """A vocabulary of at most vocab_size ids learned from `documents` (strings)."""
        return cls._kind_class(kind).train(documents, vocab_size)

    @classmethod
    def load(cls, path, kind=None):
        """The tokenizer of `kind` saved in `path`; DataError (one line) if the file is bad."""
        return cls._kind_class(kind).read(path)

    @classmethod
    def _kind_class(cls, kind):
        return tokenizer_class((cls.kind or "word") if kind is None else kind)

    # -- what each kind implements ---------------------------------------------------------------

    @classmethod
    def check_vocab_size(cls, vocab_size):
        """DataError unless vocab_size is a size this kind can build."""
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= len(SPECIALS):
            raise DataError(f"vocab_size must be at least {len(SPECIALS) + 1} "
                            f"({len(SPECIALS)} special ids + 1), got {vocab_size}")

    @classmethod
    def train(cls, documents, vocab_size):
        """A new vocabulary learned from `documents` (an iterable of str)."""
        raise NotImplementedError

    @classmethod
    def read(cls, path):
        """The tokenizer save() wrote to `path`; DataError (one line) if the file is bad."""
        raise NotImplementedError

    @classmethod
    def scanner(cls):
        """A scanner for the one-pass build of prepare_dataset (see _Scanner), or None."""
        return None

    # True when encode() itself runs on all cores (then prepare_dataset uses no workers)
    encodes_on_all_cores = False
    # bytes of the corpus a kind learned otherwise than by counting (bpe) learns from at most:
    # evenly spread blocks (prepare_dataset); None learns from all of it
    train_bytes = None

    @classmethod
    def block_cut(cls, data):
        """Where bytes `data` of a corpus file may end a block (files.read_blocks): a place
        0 < i <= len(data) such that data[:i] and what follows decode and tokenize to the
        whole text's tokens, or 0 when there is none (here: a kind that does not say reads
        each file whole)."""
        return 0

    def __len__(self):
        raise NotImplementedError

    def encode(self, text):
        """Ids of `text` as int64, no <eos>."""
        raise NotImplementedError

    def encode_document(self, text):
        """encode(text) followed by <eos>."""
        return np.append(self.encode(text), np.int64(EOS))

    def decode(self, ids):
        """Ids -> readable text; ValueError for an id outside the vocabulary."""
        raise NotImplementedError

    def unknown_tokens(self, text):
        """Distinct pieces of `text` that would be encoded as <unk>, in order of appearance."""
        raise NotImplementedError

    @property
    def vocab_hash(self):
        """sha256 hex digest of the file save() writes."""
        raise NotImplementedError

    def save(self, path):
        """Write the vocabulary file atomically."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(size={len(self)})"


def tokenizer_class(kind):
    """The class of tokenizer `kind`; DataError for an unknown kind."""
    try:
        return TOKENIZERS[kind]
    except (KeyError, TypeError):
        raise DataError(f"tokenizer kind must be one of {', '.join(TOKENIZER_KINDS)}, "
                        f"got {kind!r}") from None


# ---------------------------------------------------------------------------------------
# Vocabularies listed token by token in vocab.txt: word and char
# ---------------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}
_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]")
_VALID_ESCAPED = re.compile(r"(?:[^\\]|\\[\\tnr])+", re.S)
_ESCAPE_SEQ = re.compile(r"\\([\\tnr])")


def _escape(token):
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group()], token)


def _unescape(field):
    return _ESCAPE_SEQ.sub(lambda m: _UNESCAPES[m.group(1)], field)


class VocabTokenizer(Tokenizer):
    """A tokenizer whose vocabulary is a list of token strings with their corpus counts.

    itos[k] is the token of id k, counts[k] its count in the corpus it was built from (0 for
    the special ids), stoi the inverse of itos. Subclasses say how text splits into tokens
    (tokens, encode, decode) and give the scanner of their one-pass build.
    """

    file_name = "vocab.txt"

    def __init__(self, itos, counts):
        if list(itos[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"the first ids must be {SPECIALS}")
        if len(counts) != len(itos):
            raise ValueError("itos and counts differ in length")
        self.itos = list(itos)
        self.counts = [int(c) for c in counts]
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate token in itos")
        self._hash = None

    def __len__(self):
        return len(self.itos)

    @classmethod
    def train(cls, documents, vocab_size):
        """Count the tokens of `documents` (an iterable of str) and keep the most frequent."""
        cls.check_vocab_size(vocab_size)
        scanner = cls.scanner()
        ids = [scanner.ids(doc) for doc in documents]
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        counts = np.bincount(ids, minlength=scanner.n_provisional())
        tokenizer, _ = scanner.finish(counts, vocab_size)
        return tokenizer

    def tokens(self, text):
        """Split `text` into token strings (no ids, no <eos>)."""
        raise NotImplementedError

    def id_to_token(self, i):
        """The vocabulary's string for id i."""
        return self.itos[i]

    def unknown_tokens(self, text):
        return list(dict.fromkeys(t for t in self.tokens(text) if t not in self.stoi))

    def _check_ids(self, ids):
        """ids as a list of ints, each checked to be in the vocabulary."""
        ids = np.asarray(ids).reshape(-1).tolist()
        V = len(self.itos)
        for i in ids:
            if not 0 <= i < V:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{V - 1})")
        return ids

    # -- vocab.txt --------------------------------------------------------------------------

    def _vocab_bytes(self):
        return "".join(f"{_escape(t)}\t{c}\n" for t, c in zip(self.itos, self.counts)).encode(
            "utf-8", "surrogatepass")

    @property
    def vocab_hash(self):
        if self._hash is None:
            self._hash = hashlib.sha256(self._vocab_bytes()).hexdigest()
        return self._hash

    def save(self, path):
        with atomic_file(pathlib.Path(path), DataError) as f:
            f.write(self._vocab_bytes())

    @classmethod
    def _token_error(cls, token):
        """Why `token` (not a special one) cannot be in this kind's vocabulary, or None."""
        return None

    @classmethod
    def read(cls, path):
        """Read a vocab.txt written by save(); DataError with the line number if malformed."""
        data = read_bytes(path)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 (bad byte at offset {e.start})") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        itos, counts, seen = [], [], set()
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
            counts.append(int(count))
        if len(itos) < len(SPECIALS):
            raise DataError(f"{path}: vocabulary has {len(itos)} lines, "
                            f"needs at least the {len(SPECIALS)} special tokens")
        return cls(itos, counts)


_WORD_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")

# Word decoding: which tokens hug their neighbours.
_NO_SPACE_BEFORE = frozenset(".,;:!?%')]}\u2026")
_NO_SPACE_AFTER = frozenset("([{")
_JOINERS = frozenset("-/")          # no space on either side: "well-known", "and/or"


class WordTokenizer(VocabTokenizer):
    """Lower-cased words and single punctuation marks (rules in the module docstring)."""

    kind = "word"

    @classmethod
    def scanner(cls):
        return _WordScanner()

    def tokens(self, text):
        return _WORD_RE.findall(text.lower())

    @classmethod
    def block_cut(cls, data):
        # after the last space or line end: no token, and no lower-casing context (a final
        # sigma), goes across white space
        return max(data.rfind(b" "), data.rfind(b"\n")) + 1

    def encode(self, text):
        toks = self.tokens(text)
        return np.fromiter(map(self.stoi.get, toks, itertools.repeat(UNK)),
                           dtype=np.int64, count=len(toks))

    def decode(self, ids):
        out = []
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


class CharTokenizer(VocabTokenizer):
    """Every distinct character, in code-point order; no lower-casing."""

    kind = "char"

    def __init__(self, itos, counts):
        super().__init__(itos, counts)
        self._lut = None

    @classmethod
    def scanner(cls):
        return _CharScanner()

    @classmethod
    def _token_error(cls, token):
        if len(token) != 1:
            return f"char vocabulary token is not one character: {token!r}"
        return None

    def tokens(self, text):
        return list(text)

    @classmethod
    def block_cut(cls, data):
        return char_cut(data)

    def encode(self, text):
        # code points through a lookup table, no Python loop over characters
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        lut = self._code_point_ids()
        out = np.full(cps.shape, UNK, dtype=np.int64)
        inside = cps < len(lut)
        out[inside] = lut[cps[inside]]
        return out

    def decode(self, ids):
        return "".join("\n" if i == EOS else self.itos[i]
                       for i in self._check_ids(ids) if i != PAD and i != BOS)

    def _code_point_ids(self):
        """code point -> id table."""
        if self._lut is None:
            cps = [ord(t) for t in self.itos[len(SPECIALS):]]
            lut = np.full(max(cps, default=0) + 1, UNK, dtype=np.int64)
            lut[cps] = np.arange(len(SPECIALS), len(self.itos))
            self._lut = lut
        return self._lut


# ---------------------------------------------------------------------------------------
# One-pass build of a counted vocabulary
# ---------------------------------------------------------------------------------------

class _Scanner:
    """First pass of a vocabulary build by counting.

    ids(text) gives every token a provisional int32 id without knowing the final vocabulary
    (each subclass says how). Ids 0..3 keep their special meaning, so a stream of provisional
    ids with EOS appended is mapped to the final ids by one table look-up, which finish()
    returns with the tokenizer.

    ids(text) is merge(scan(text)): scan, a static method, does the work that needs no state
    (prepare_dataset runs it in worker processes, a block of text each), merge turns its
    result into provisional ids in block order.
    """

    tokenizer_class = None

    @staticmethod
    def scan(text):
        raise NotImplementedError

    def merge(self, scanned):
        raise NotImplementedError

    def ids(self, text):
        return self.merge(self.scan(text))

    def n_provisional(self):
        """Provisional ids given so far: the length of the counts finish() takes."""
        raise NotImplementedError

    def _itos(self, kept):
        """The tokens of the provisional ids `kept` (most frequent first), in id order, with
        those ids in the same order."""
        raise NotImplementedError

    def finish(self, counts, vocab_size):
        """counts[provisional id] -> (tokenizer, provisional-to-final id table)."""
        n_special = len(SPECIALS)
        counts = np.asarray(counts, dtype=np.int64).copy()
        counts[:n_special] = 0
        present = np.flatnonzero(counts)            # ascending: first appearance / code point
        by_freq = present[np.argsort(-counts[present], kind="stable")]
        itos, kept = self._itos(by_freq[:vocab_size - n_special])
        tokenizer = self.tokenizer_class(SPECIALS + itos,
                                         [0] * n_special + counts[kept].tolist())
        remap = np.full(max(len(counts), n_special), UNK, dtype=np.int64)
        remap[:n_special] = np.arange(n_special)
        remap[kept] = np.arange(n_special, n_special + len(kept))
        return tokenizer, remap


class _FirstSeen(dict):
    """token -> number, from `start` on in order of first appearance."""

    def __init__(self, start):
        super().__init__()
        self.start = start

    def __missing__(self, token):
        i = self[token] = len(self) + self.start
        return i


class _WordScanner(_Scanner):
    """Provisional id of a word: 4 + its order of first appearance."""

    tokenizer_class = WordTokenizer

    def __init__(self):
        self.first_seen = _FirstSeen(len(SPECIALS))

    @staticmethod
    def scan(text):
        """(local ids, distinct words): each word of `text` numbered from 0 in order of first
        appearance in the text."""
        toks = _WORD_RE.findall(text.lower())
        local = _FirstSeen(0)
        ids = np.fromiter(map(local.__getitem__, toks), dtype=np.int32, count=len(toks))
        return ids, list(local)

    def merge(self, scanned):
        ids, words = scanned
        table = np.fromiter(map(self.first_seen.__getitem__, words), dtype=np.int32,
                            count=len(words))
        return table[ids]

    def n_provisional(self):
        return len(SPECIALS) + len(self.first_seen)

    def _itos(self, kept):
        table = list(self.first_seen)
        return [table[p - len(SPECIALS)] for p in kept.tolist()], kept


class _CharScanner(_Scanner):
    """Provisional id of a character: 4 + its code point."""

    tokenizer_class = CharTokenizer

    def __init__(self):
        self.max_cp = -1

    @staticmethod
    def scan(text):
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")

    def merge(self, cps):
        if cps.size:
            self.max_cp = max(self.max_cp, int(cps.max()))
        return cps.astype(np.int32) + len(SPECIALS)

    def n_provisional(self):
        return len(SPECIALS) + self.max_cp + 1

    def _itos(self, kept):
        kept = np.sort(kept)                        # code-point order
        return [chr(p - len(SPECIALS)) for p in kept.tolist()], kept


TOKENIZERS = {"word": WordTokenizer, "char": CharTokenizer}

from cllm_cli.tokenizers.bpe import BPETokenizer  # noqa: E402  (bpe.py builds on the classes above)

TOKENIZERS["bpe"] = BPETokenizer
TOKENIZER_KINDS = tuple(TOKENIZERS)
