"""Corpus -> tokenizer -> token stream -> windows (SPEC section 3).

Every stage of the data's path before the engine lives here:

    collect_files      paths given by the user -> list of text files (sorted, deduplicated)
    read_text          one file -> str (strict UTF-8, or U+FFFD replacement)
    Tokenizer          str -> ids and back; vocab.txt
    prepare_dataset    files -> vocab.txt + dataset.bin (built once, reused while unchanged)
    load_dataset       dataset.bin -> read-only np.memmap of ids
    split_stream       stream -> (train, val) views
    epoch_order, gather_windows, eval_windows
                       stream -> int32 windows of T+1 tokens for the spheres

Choices the SPEC leaves open, written down here:

- Reading text: a leading UTF-8 byte-order mark is dropped and line ends are normalised to
  "\\n" ("\\r\\n" and a lone "\\r"), as Python's text mode does. With encoding_errors="strict"
  the first bad byte wins: a NUL byte is reported as "not a text file", an invalid UTF-8
  sequence as "not valid UTF-8", each with its byte offset in the file.
- Documents: each file is one document ending in <eos>. A file holding no token at all
  (empty or only white space) adds nothing to the stream, not even an <eos>.
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
- vocab.txt: UTF-8, one line per id, "token<TAB>count\\n"; a backslash, tab, newline or
  carriage return inside a token is written as \\\\, \\t, \\n or \\r.
- dataset.bin: a 64-byte little-endian header, then the ids:
      0  magic       8 bytes  b"CLLMDATA"
      8  version     uint32   DATASET_VERSION
     12  dtype code  uint32   2 = uint16 ids, 4 = uint32 ids (the item size)
     16  n_tokens    uint64
     24  key         32 bytes sha256 of the settings, the corpus bytes and, for a given
                              vocabulary, its hash (see prepare_dataset, _stream_key)
     56  vocab_len   uint32   number of ids in vocab.txt
     60  vocab_tag   4 bytes  first 4 bytes of the vocab hash
  The last two fields (the SPEC's padding) tie the stream to its vocab.txt: a vocab.txt that
  does not belong to the stream (an interrupted rebuild, a hand edit) is never reused.
- Preparing a dataset holds one file's text at a time. While a new vocabulary is being built,
  provisional ids (4 bytes a token) are spilled to a temporary file next to dataset.bin,
  so memory does not grow with the corpus.
"""
import contextlib
import hashlib
import itertools
import os
import pathlib
import re
import struct
import tempfile

import numpy as np

from .atomic import atomic_file

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
KINDS = ("word", "char")
ENCODING_ERRORS = ("strict", "replace")

DATASET_MAGIC = b"CLLMDATA"
DATASET_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQ32sI4s")
assert _HEADER.size == HEADER_SIZE
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}

_WORD_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_CHUNK = 1 << 22                      # tokens per chunk when streaming ids between files


class DataError(Exception):
    """A problem with the user's data; the message is one line naming the file and the fault."""


# ---------------------------------------------------------------------------------------
# Files and text
# ---------------------------------------------------------------------------------------

def collect_files(paths, pattern="*.txt", exclude_dir=None):
    """Expand the user's paths into the list of files to read.

    A file is taken whatever its name. A directory stands for every file below it whose name
    matches `pattern` (searched recursively), sorted by path components, leaving out anything
    inside `exclude_dir` (the checkpoint directory, which holds vocab.txt). A file reached
    twice is kept at its first place.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    excluded = pathlib.Path(exclude_dir).resolve() if exclude_dir is not None else None
    files, seen = [], set()

    def add(path):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for raw in paths:
        path = pathlib.Path(raw)
        if not path.exists():
            raise DataError(f"no such file or directory: {raw}")
        if path.is_file():
            add(path)
        elif path.is_dir():
            found = []
            for match in path.rglob(pattern):
                if not match.is_file():
                    continue
                resolved = match.resolve()
                if excluded is not None and (resolved == excluded or excluded in resolved.parents):
                    continue
                found.append(match)
            if not found:
                where = f" outside {exclude_dir}" if excluded is not None else ""
                raise DataError(f"{raw}: no files matching '{pattern}'{where}")
            for match in sorted(found, key=lambda p: p.parts):
                add(match)
        else:
            raise DataError(f"{raw}: not a regular file or directory")
    return files


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _decode(path, data, encoding_errors):
    """bytes of `path` -> text, checked as read_text documents."""
    if encoding_errors == "strict":
        nul = data.find(b"\x00")
        try:
            text = data.decode("utf-8")
            bad = -1
        except UnicodeDecodeError as e:
            text, bad = None, e.start
        if nul >= 0 and (bad < 0 or nul < bad):
            raise DataError(f"{path}: not a text file (NUL byte at offset {nul})")
        if bad >= 0:
            raise DataError(f"{path}: not valid UTF-8 (bad byte at offset {bad})")
    elif encoding_errors == "replace":
        text = data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    else:
        raise DataError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, "
                        f"got {encoding_errors!r}")
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def read_text(path, encoding_errors="strict"):
    """Read one corpus file as text.

    strict: a NUL byte or invalid UTF-8 raises DataError with the offset of the first bad
    byte. replace: bad sequences and NUL bytes become U+FFFD.
    """
    return _decode(path, _read_bytes(path), encoding_errors)


# ---------------------------------------------------------------------------------------
# Tokenizer
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


# Word decoding: which tokens hug their neighbours.
_NO_SPACE_BEFORE = frozenset(".,;:!?%')]}\u2026")
_NO_SPACE_AFTER = frozenset("([{")
_JOINERS = frozenset("-/")          # no space on either side: "well-known", "and/or"


def _check_vocab_size(vocab_size):
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= len(SPECIALS):
        raise DataError(f"vocab_size must be at least {len(SPECIALS) + 1} "
                        f"({len(SPECIALS)} special ids + 1), got {vocab_size}")


def _check_kind(kind):
    if kind not in KINDS:
        raise DataError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")


class Tokenizer:
    """Word or character tokenizer with the special ids <pad>=0 <unk>=1 <bos>=2 <eos>=3.

    itos[k] is the token of id k, counts[k] its count in the corpus it was built from (0 for
    the special ids), stoi the inverse of itos.
    """

    def __init__(self, itos, counts, kind="word"):
        _check_kind(kind)
        if list(itos[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"the first ids must be {SPECIALS}")
        if len(counts) != len(itos):
            raise ValueError("itos and counts differ in length")
        self.kind = kind
        self.itos = list(itos)
        self.counts = [int(c) for c in counts]
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate token in itos")
        self._hash = None
        self._lut = None

    def __len__(self):
        return len(self.itos)

    def __repr__(self):
        return f"Tokenizer(kind={self.kind!r}, size={len(self)})"

    # -- building -----------------------------------------------------------------------

    @classmethod
    def build(cls, documents, kind="word", vocab_size=10000):
        """Count the tokens of `documents` (an iterable of str) and keep the most frequent."""
        _check_kind(kind)
        _check_vocab_size(vocab_size)
        scanner = _Scanner(kind)
        ids = [scanner.ids(doc) for doc in documents]
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        counts = np.bincount(ids, minlength=scanner.n_provisional())
        tokenizer, _ = scanner.finish(counts, vocab_size)
        return tokenizer

    # -- text <-> ids ---------------------------------------------------------------------

    def tokens(self, text):
        """Split `text` into token strings (no ids, no <eos>)."""
        if self.kind == "word":
            return _WORD_RE.findall(text.lower())
        return list(text)

    def unknown_tokens(self, text):
        """Distinct tokens of `text` missing from the vocabulary, in order of appearance."""
        return list(dict.fromkeys(t for t in self.tokens(text) if t not in self.stoi))

    def encode(self, text):
        """Ids of `text` as int64; unknown tokens -> UNK; no <eos>."""
        if self.kind == "word":
            toks = self.tokens(text)
            return np.fromiter(map(self.stoi.get, toks, itertools.repeat(UNK)),
                               dtype=np.int64, count=len(toks))
        # char: code points through a lookup table, no Python loop over characters
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        lut = self._char_lut()
        out = np.full(cps.shape, UNK, dtype=np.int64)
        inside = cps < len(lut)
        out[inside] = lut[cps[inside]]
        return out

    def encode_document(self, text):
        """encode(text) followed by EOS."""
        return np.append(self.encode(text), np.int64(EOS))

    def decode(self, ids):
        """Ids -> readable text (rules in the module docstring)."""
        ids = np.asarray(ids).reshape(-1).tolist()
        V = len(self.itos)
        for i in ids:
            if not 0 <= i < V:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{V - 1})")
        if self.kind == "char":
            return "".join("\n" if i == EOS else self.itos[i]
                           for i in ids if i != PAD and i != BOS)
        out = []
        glue = True            # no space before the next token
        quote_open = False
        for i in ids:
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

    def _char_lut(self):
        """code point -> id table for the char tokenizer."""
        if self._lut is None:
            cps = [ord(t) for t in self.itos[len(SPECIALS):]]
            lut = np.full(max(cps, default=0) + 1, UNK, dtype=np.int64)
            lut[cps] = np.arange(len(SPECIALS), len(self.itos))
            self._lut = lut
        return self._lut

    # -- vocab.txt --------------------------------------------------------------------------

    def _vocab_bytes(self):
        return "".join(f"{_escape(t)}\t{c}\n" for t, c in zip(self.itos, self.counts)).encode(
            "utf-8", "surrogatepass")

    @property
    def vocab_hash(self):
        """sha256 hex digest of vocab.txt as save() writes it."""
        if self._hash is None:
            self._hash = hashlib.sha256(self._vocab_bytes()).hexdigest()
        return self._hash

    def save(self, path):
        """Write vocab.txt atomically."""
        with atomic_file(pathlib.Path(path), DataError) as f:
            f.write(self._vocab_bytes())

    @classmethod
    def load(cls, path, kind="word"):
        """Read a vocab.txt written by save(); DataError with the line number if malformed."""
        _check_kind(kind)
        data = _read_bytes(path)
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
            if kind == "char" and k > len(SPECIALS) and len(token) != 1:
                raise DataError(f"{where}: char vocabulary token is not one character: {token!r}")
            if token in seen:
                raise DataError(f"{where}: duplicate token {token!r}")
            seen.add(token)
            itos.append(token)
            counts.append(int(count))
        if len(itos) < len(SPECIALS):
            raise DataError(f"{path}: vocabulary has {len(itos)} lines, "
                            f"needs at least the {len(SPECIALS)} special tokens")
        return cls(itos, counts, kind)


class _FirstSeen(dict):
    """token -> provisional id, numbered from 4 in order of first appearance."""

    def __missing__(self, token):
        i = self[token] = len(self) + len(SPECIALS)
        return i


class _Scanner:
    """First pass of a vocabulary build.

    ids(text) gives every token a provisional int32 id without knowing the final vocabulary:
    4 + order of first appearance for words, 4 + code point for characters. Ids 0..3 keep
    their special meaning, so a stream of provisional ids with EOS appended is mapped to the
    final ids by one table look-up (finish() returns the table).
    """

    def __init__(self, kind):
        self.kind = kind
        self.first_seen = _FirstSeen()
        self.max_cp = -1

    def ids(self, text):
        if self.kind == "word":
            toks = _WORD_RE.findall(text.lower())
            return np.fromiter(map(self.first_seen.__getitem__, toks), dtype=np.int32,
                               count=len(toks))
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        if cps.size:
            self.max_cp = max(self.max_cp, int(cps.max()))
        return cps.astype(np.int32) + len(SPECIALS)

    def n_provisional(self):
        if self.kind == "word":
            return len(SPECIALS) + len(self.first_seen)
        return len(SPECIALS) + self.max_cp + 1

    def finish(self, counts, vocab_size):
        """counts[provisional id] -> (Tokenizer, provisional-to-final id table)."""
        n_special = len(SPECIALS)
        counts = np.asarray(counts, dtype=np.int64).copy()
        counts[:n_special] = 0
        present = np.flatnonzero(counts)            # ascending: first appearance / code point
        by_freq = present[np.argsort(-counts[present], kind="stable")]
        kept = by_freq[:vocab_size - n_special]
        if self.kind == "word":
            table = list(self.first_seen)
            itos = [table[p - n_special] for p in kept.tolist()]
        else:
            kept = np.sort(kept)
            itos = [chr(p - n_special) for p in kept.tolist()]
        tokenizer = Tokenizer(SPECIALS + itos, [0] * n_special + counts[kept].tolist(), self.kind)
        remap = np.full(max(len(counts), n_special), UNK, dtype=np.int64)
        remap[:n_special] = np.arange(n_special)
        remap[kept] = np.arange(n_special, n_special + len(kept))
        return tokenizer, remap


# ---------------------------------------------------------------------------------------
# dataset.bin
# ---------------------------------------------------------------------------------------

def _dtype_for(vocab_len):
    return _DTYPES[2] if vocab_len <= 65535 else _DTYPES[4]


def _settings(kind, vocab_size, encoding_errors):
    return (f"CLLMDATA version={DATASET_VERSION} kind={kind} vocab_size={vocab_size} "
            f"encoding_errors={encoding_errors}\n")


def _stream_key(corpus_key, tokenizer):
    """The key stored in dataset.bin: the corpus key for a vocabulary built from the corpus,
    the corpus key combined with the vocab hash for a vocabulary given by the caller."""
    if tokenizer is None:
        return corpus_key
    return hashlib.sha256(corpus_key + tokenizer.vocab_hash.encode("ascii")).digest()


def dataset_header(path):
    """The header of dataset.bin as a dict; DataError if it is not a valid dataset file."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{path}: not a CLLM dataset (file too short for the header)")
    magic, version, code, n_tokens, key, vocab_len, vocab_tag = _HEADER.unpack(raw)
    if magic != DATASET_MAGIC:
        raise DataError(f"{path}: not a CLLM dataset (bad magic)")
    if version != DATASET_VERSION:
        raise DataError(f"{path}: dataset format version {version}, expected {DATASET_VERSION}")
    if code not in _DTYPES:
        raise DataError(f"{path}: unknown id type code {code}")
    expected = HEADER_SIZE + n_tokens * code
    if size != expected:
        raise DataError(f"{path}: truncated or damaged ({size} bytes, header says {expected})")
    if n_tokens == 0:
        raise DataError(f"{path}: dataset holds no tokens")
    return {"version": version, "dtype": _DTYPES[code], "tokens": n_tokens, "key": key.hex(),
            "vocab_len": vocab_len, "vocab_tag": vocab_tag.hex()}


def load_dataset(path):
    """Memory-map the ids of dataset.bin (read-only, uint16 or uint32)."""
    header = dataset_header(path)
    return np.memmap(path, dtype=header["dtype"], mode="r", offset=HEADER_SIZE,
                     shape=(header["tokens"],))


def _try_reuse(out_dir, corpus_key, kind, tokenizer):
    """(tokenizer, memmap) if out_dir holds the stream of this corpus, else None.

    Without a tokenizer the stream must have been built from the corpus with the same
    settings. With one, it may also have been built (a resumed run passes the vocabulary the
    first run built), as long as vocab.txt is exactly that tokenizer's."""
    bin_path, vocab_path = out_dir / "dataset.bin", out_dir / "vocab.txt"
    if not (bin_path.is_file() and vocab_path.is_file()):
        return None
    accepted = {corpus_key.hex(), _stream_key(corpus_key, tokenizer).hex()}
    try:
        header = dataset_header(bin_path)
        if header["key"] not in accepted:
            return None
        loaded = Tokenizer.load(vocab_path, kind)
    except DataError:
        return None
    if (len(loaded) != header["vocab_len"] or loaded.vocab_hash[:8] != header["vocab_tag"]
            or (tokenizer is not None and loaded.vocab_hash != tokenizer.vocab_hash)):
        return None
    return (tokenizer or loaded), load_dataset(bin_path)


def prepare_dataset(files, out_dir, kind="word", vocab_size=10000, encoding_errors="strict",
                    tokenizer=None):
    """Tokenise `files` into out_dir/vocab.txt and out_dir/dataset.bin.

    Each file is a document ending in EOS. With `tokenizer` given its vocabulary is used
    (and its kind overrides `kind`); otherwise one is built from the corpus. If out_dir
    already holds the stream of the same bytes and settings it is reused without tokenising.
    Returns (tokenizer, memmap of the ids, info) with info = {"files", "bytes", "tokens",
    "reused", "key"}.

    info["key"] is the corpus key: sha256 over the settings (format version, kind,
    vocab_size, encoding_errors) and each file's length and bytes. It does not depend on
    whether the vocabulary was built or given, so a resumed run that passes the saved
    tokenizer gets the key the first run recorded. The vocabulary is identified by
    tokenizer.vocab_hash; dataset.bin stores a stream key that also covers it when it was
    given (see _stream_key), and a 4-byte tag of it, so a stream is never reused with a
    vocabulary it was not encoded with.
    """
    files = [pathlib.Path(f) for f in files]
    if tokenizer is not None:
        kind = tokenizer.kind
    _check_kind(kind)
    _check_vocab_size(vocab_size)
    if encoding_errors not in ENCODING_ERRORS:
        raise DataError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, "
                        f"got {encoding_errors!r}")
    if not files:
        raise DataError("corpus is empty: no input files")
    out_dir = pathlib.Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create directory ({e.strerror or e})") from None

    # Pass 1: hash the corpus; reuse the stored stream if nothing changed.
    corpus = _Corpus(_settings(kind, vocab_size, encoding_errors), files)
    for _ in corpus.raw():
        pass
    info = {"files": len(files), "bytes": corpus.bytes, "reused": False, "key": corpus.key.hex()}
    reused = _try_reuse(out_dir, corpus.key, kind, tokenizer)
    if reused is not None:
        tokenizer, tokens = reused
        info.update(tokens=len(tokens), reused=True)
        return tokenizer, tokens, info

    # Pass 2: tokenise. The key is hashed again from the bytes actually tokenised.
    if tokenizer is None:
        tokenizer, n_tokens = _build_and_write(corpus, encoding_errors, kind, vocab_size, out_dir)
    else:
        n_tokens = _encode_and_write(corpus, encoding_errors, tokenizer, out_dir)
    info.update(bytes=corpus.bytes, tokens=n_tokens, key=corpus.key.hex())
    return tokenizer, load_dataset(out_dir / "dataset.bin"), info


class _Corpus:
    """The files of a corpus read in order, their bytes hashed into the dataset key.

    key = sha256 over the settings line, then each file's length (8 bytes) and bytes. File
    names do not enter the key: renaming a file does not change the stream. key and bytes
    are complete once an iteration of raw() or documents() has run to the end."""

    def __init__(self, settings, files):
        self.settings, self.files = settings, files
        self.key, self.bytes = None, 0

    def raw(self):
        h = hashlib.sha256(self.settings.encode("utf-8"))
        self.key, self.bytes = None, 0
        for path in self.files:
            data = _read_bytes(path)
            h.update(struct.pack("<Q", len(data)))
            h.update(data)
            self.bytes += len(data)
            yield path, data
        self.key = h.digest()

    def documents(self, encoding_errors):
        for path, data in self.raw():
            yield _decode(path, data, encoding_errors)


def _check_not_empty(n_words, corpus):
    if n_words == 0:
        n = len(corpus.files)
        raise DataError(f"corpus is empty: no tokens in {n} file{'s' if n != 1 else ''} "
                        f"({corpus.bytes} bytes), first {corpus.files[0]}")


def _pack_header(dtype, n_tokens, key, tokenizer):
    return _HEADER.pack(DATASET_MAGIC, DATASET_VERSION, dtype.itemsize, n_tokens, key,
                        len(tokenizer), bytes.fromhex(tokenizer.vocab_hash[:8]))


def _encode_and_write(corpus, encoding_errors, tokenizer, out_dir):
    """Encode every document with a given tokenizer straight into dataset.bin."""
    dtype = _dtype_for(len(tokenizer))
    tokenizer.save(out_dir / "vocab.txt")
    with atomic_file(out_dir / "dataset.bin", DataError) as f:
        f.write(bytes(HEADER_SIZE))              # placeholder until the count is known
        n_tokens = n_words = 0
        for text in corpus.documents(encoding_errors):
            ids = tokenizer.encode(text)
            if ids.size:
                f.write(np.append(ids, EOS).astype(dtype).tobytes())
                n_tokens += ids.size + 1
                n_words += ids.size
        _check_not_empty(n_words, corpus)
        f.seek(0)
        f.write(_pack_header(dtype, n_tokens, _stream_key(corpus.key, tokenizer), tokenizer))
    return n_tokens


def _build_and_write(corpus, encoding_errors, kind, vocab_size, out_dir):
    """Build the vocabulary and the stream with one tokenising pass: provisional ids (see
    _Scanner) go to a spill file, are counted, then mapped to the final ids into dataset.bin."""
    scanner = _Scanner(kind)
    eos = np.array([EOS], dtype=np.int32).tobytes()
    try:
        fd, spill_path = tempfile.mkstemp(dir=out_dir, prefix=".dataset.ids.", suffix=".tmp")
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as spill:
            n_tokens = n_words = 0
            for text in corpus.documents(encoding_errors):
                ids = scanner.ids(text)
                if ids.size:
                    spill.write(ids.tobytes())
                    spill.write(eos)
                    n_tokens += ids.size + 1
                    n_words += ids.size
        _check_not_empty(n_words, corpus)
        provisional = np.memmap(spill_path, dtype=np.int32, mode="r", shape=(n_tokens,))
        n_prov = scanner.n_provisional()
        counts = np.zeros(n_prov, dtype=np.int64)
        for start in range(0, n_tokens, _CHUNK):
            counts += np.bincount(provisional[start:start + _CHUNK], minlength=n_prov)
        tokenizer, remap = scanner.finish(counts, vocab_size)
        dtype = _dtype_for(len(tokenizer))
        remap = remap.astype(dtype)
        tokenizer.save(out_dir / "vocab.txt")
        with atomic_file(out_dir / "dataset.bin", DataError) as f:
            f.write(_pack_header(dtype, n_tokens, corpus.key, tokenizer))
            for start in range(0, n_tokens, _CHUNK):
                f.write(remap[provisional[start:start + _CHUNK]].tobytes())
        del provisional
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(spill_path)
    return tokenizer, n_tokens


# ---------------------------------------------------------------------------------------
# Splits and windows
# ---------------------------------------------------------------------------------------

def split_stream(tokens, val_fraction):
    """(train, val): the last int(len * val_fraction) tokens are held out. Views, no copy."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(len(tokens) * val_fraction)
    cut = len(tokens) - n_val
    return tokens[:cut], tokens[cut:]


def num_windows(n_tokens, T):
    """Windows of T+1 tokens starting at 0, T, 2T, ... that fit in n_tokens."""
    return max(0, (n_tokens - 1) // T)


def epoch_order(seed, epoch, n_windows):
    """The order in which an epoch visits its windows: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows).astype(np.int64)


def gather_windows(tokens, window_ids, T):
    """int32 [len(window_ids), T+1]; row r = tokens[w*T : w*T + T + 1] for w = window_ids[r]."""
    window_ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
    n = num_windows(len(tokens), T)
    if window_ids.size and (window_ids.min() < 0 or window_ids.max() >= n):
        raise IndexError(f"window id out of range 0..{n - 1}")
    index = window_ids[:, None] * T + np.arange(T + 1, dtype=np.int64)
    return np.asarray(tokens[index], dtype=np.int32)


def eval_windows(tokens, T):
    """Every window of the validation stream, as int32 rows of T+1 tokens.

    A stream shorter than T+1 tokens (but of at least 2) gives one shorter window of all of
    it; fewer than 2 tokens give an empty [0, 2] array."""
    n = len(tokens)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int32)
    if n < T + 1:
        return np.asarray(tokens, dtype=np.int32).reshape(1, n)
    return gather_windows(tokens, np.arange(num_windows(n, T)), T)
