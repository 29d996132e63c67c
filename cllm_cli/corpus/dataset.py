"""The token array: a corpus tokenised once into dataset.bin and memory-mapped. Third stage
of the data's path: files -> tokenizers -> dataset -> batches.

    prepare_dataset    files -> vocabulary file + dataset.bin (built once, reused while the
                       corpus and settings are unchanged and the file is intact)
    load_dataset       dataset.bin -> read-only np.memmap of ids, checked
    dataset_header     the header of dataset.bin as a dict

How it is done, and why:

- Documents: each file is one document ending in <eos>. A file holding no token at all
  (empty or only white space) adds nothing to the stream, not even an <eos>.
- dataset.bin: a 96-byte little-endian header, then the ids:
      0  magic       8 bytes  b"CLLMDATA"
      8  version     uint32   DATASET_VERSION
     12  dtype code  uint32   2 = uint16 ids, 4 = uint32 ids (the item size)
     16  n_tokens    uint64
     24  key         32 bytes sha256 of the settings, the corpus bytes and, for a given
                              vocabulary, its hash (see prepare_dataset, stream_key)
     56  vocab_len   uint32   number of ids in the vocabulary
     60  vocab_tag   4 bytes  first 4 bytes of the vocab hash
     64  ids_sha256  32 bytes sha256 of the id bytes that follow the header
  vocab_len and vocab_tag tie the stream to its vocabulary file: one that does not belong to
  the stream (an interrupted rebuild, a hand edit) is never reused. ids_sha256 and vocab_len
  catch damaged ids: a stream whose ids do not hash to it, or hold an id >= vocab_len, is
  refused by load_dataset and rebuilt by prepare_dataset (info["rebuilt_reason"] says why).
  Checking costs one read of the ids: about 0.15 s for 100 MB (50M uint16 ids) on one core.
  A file of another format version is rebuilt too.
- Preparing a dataset reads each file in blocks of about BLOCK_BYTES (4 MiB; files.py says
  where a block may end), so memory depends on neither the corpus nor its largest file.
  The blocks are decoded and tokenized by worker processes (workers.py: one per usable
  core; none for a corpus of one block, and none for bpe, whose library encodes on every
  core itself), at most 2 blocks per worker in flight, the results taken in block order, so the
  stream is the same whatever the block size and the number of workers. While a new
  vocabulary is being built, provisional ids (4 bytes a token) are counted and spilled to a
  temporary file next to dataset.bin, then read back (not memory-mapped) and mapped to the
  final ids 4 Mi tokens at a time.
  A word build keeps its distinct words in memory. A bpe vocabulary is learned from at most
  the kind's train_bytes of evenly spread blocks (bpe.py: the library's trainer grows with
  what it learns from: 1.7 GB at 12 MB, 20 GB at 120 MB), so its peak is bounded too;
  encoding with a given or learned bpe vocabulary is bounded like the rest.
- On a terminal (stderr a tty) each pass over the corpus (reading it for its key,
  tokenizing, learning a bpe vocabulary) shows a progress line on stderr with the bytes
  done, MB/s and the time left; nothing is shown elsewhere.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pathlib
import struct
import tempfile
from typing import Any, Callable, Iterable, Iterator, cast

import numpy as np
from numpy.typing import NDArray

from cllm_cli.corpus.files import BLOCK_BYTES, check_encoding_errors, read_blocks
from cllm_cli.corpus.workers import BlockRunner
from cllm_cli.errors import DataError, WriteFailed
from cllm_cli.fileio import atomic_file, write_error
from cllm_cli.progress import ByteProgress, plural
from cllm_cli.tokenizers import EOS, Tokenizer, tokenizer_class
from cllm_cli.tokenizers.vocab import Scanner

DATASET_MAGIC = b"CLLMDATA"
DATASET_VERSION = 2
HEADER_SIZE = 96
_HEADER = struct.Struct("<8sIIQ32sI4s32s")
assert _HEADER.size == HEADER_SIZE
_DTYPES: dict[int, np.dtype] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
# The recipe of the corpus key (settings line, then each file's length and bytes). It names
# a token stream, not a file layout: it changes only when the same corpus and settings would
# give other ids, so that checkpoints keep matching their corpus across format versions.
_KEY_VERSION = 1
_CHUNK = 1 << 22                      # tokens per chunk when streaming ids between files


def _dtype_for(vocab_len: int) -> np.dtype:
    return _DTYPES[2] if vocab_len <= 65535 else _DTYPES[4]


def _settings(kind: str | None, vocab_size: int, encoding_errors: str) -> str:
    return (f"CLLMDATA version={_KEY_VERSION} kind={kind} vocab_size={vocab_size} "
            f"encoding_errors={encoding_errors}\n")


def stream_key(corpus_key: bytes, tokenizer: Tokenizer | None) -> bytes:
    """The key stored in dataset.bin: the corpus key for a vocabulary built from the corpus,
    the corpus key combined with the vocab hash for a vocabulary given by the caller."""
    if tokenizer is None:
        return corpus_key
    return hashlib.sha256(corpus_key + tokenizer.vocab_hash.encode("ascii")).digest()


# ---------------------------------------------------------------------------------------
# Reading dataset.bin
# ---------------------------------------------------------------------------------------

def dataset_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of dataset.bin as a dict; DataError if it is not a valid dataset file (the
    ids are not read: load_dataset checks them)."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) < 12:
        raise DataError(f"{path}: not a CLLM dataset (file too short for the header)")
    if raw[:8] != DATASET_MAGIC:
        raise DataError(f"{path}: not a CLLM dataset (bad magic)")
    version = int.from_bytes(raw[8:12], "little")
    if version != DATASET_VERSION:
        raise DataError(f"{path}: dataset format version {version}, expected {DATASET_VERSION}")
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{path}: not a CLLM dataset (file too short for the header)")
    _, _, code, n_tokens, key, vocab_len, vocab_tag, ids_sha256 = _HEADER.unpack(raw)
    if code not in _DTYPES:
        raise DataError(f"{path}: unknown id type code {code}")
    expected = HEADER_SIZE + n_tokens * code
    if size != expected:
        raise DataError(f"{path}: truncated or damaged ({size} bytes, header says {expected})")
    if n_tokens == 0:
        raise DataError(f"{path}: dataset holds no tokens")
    return {"version": version, "dtype": _DTYPES[code], "tokens": n_tokens, "key": key.hex(),
            "vocab_len": vocab_len, "vocab_tag": vocab_tag.hex(), "ids_sha256": ids_sha256.hex()}


def _memmap(path: str | os.PathLike, header: dict[str, Any]) -> np.memmap:
    return np.memmap(path, dtype=header["dtype"], mode="r", offset=HEADER_SIZE,
                     shape=(header["tokens"],))


def _checked_ids(path: str | os.PathLike, header: dict[str, Any]) -> np.memmap:
    """The ids of dataset.bin after checking them against the header: their sha256, and
    every id below vocab_len. DataError (one line) when either fails."""
    ids = _memmap(path, header)
    h, top = hashlib.sha256(), 0
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        h.update(chunk)          # type: ignore[arg-type]  # an ndarray is a buffer
        top = max(top, int(chunk.max()))
    if h.hexdigest() != header["ids_sha256"]:
        raise DataError(f"{path}: damaged (the token ids do not match the header's checksum)")
    if top >= header["vocab_len"]:
        where = int(np.argmax(ids >= header["vocab_len"]))
        raise DataError(f"{path}: damaged (token id {top} at position {where} is beyond the "
                        f"vocabulary of {header['vocab_len']} ids)")
    return ids


def load_dataset(path: str | os.PathLike) -> np.memmap:
    """Memory-map the ids of dataset.bin (read-only, uint16 or uint32), checked as the
    module docstring says; DataError (one line) for a damaged or foreign file."""
    return _checked_ids(path, dataset_header(path))


def _try_reuse(out_dir: pathlib.Path, corpus_key: bytes, kind: str | None, tokenizer: Tokenizer | None
               ) -> tuple[tuple[Tokenizer, np.memmap] | None, str | None]:
    """((tokenizer, memmap) or None, reason or None): the stored stream if out_dir holds the
    stream of this corpus, intact.

    Without a tokenizer the stream must have been built from the corpus with the same
    settings. With one, it may also have been built (a resumed run passes the vocabulary the
    first run built), as long as the vocabulary file is exactly that tokenizer's. reason is
    one line when a stored stream is not reused because it is damaged (or of another format
    version); a stream of another corpus, other settings or another vocabulary is no damage.
    """
    vocab_name = tokenizer_class(kind).file_name
    bin_path, vocab_path = out_dir / "dataset.bin", out_dir / vocab_name
    if not bin_path.is_file():
        return None, None
    accepted = {corpus_key.hex(), stream_key(corpus_key, tokenizer).hex()}
    try:
        header = dataset_header(bin_path)
        if header["key"] not in accepted:
            return None, None
        if not vocab_path.is_file():
            return None, f"{vocab_path}: missing"
        loaded = tokenizer_class(kind).read(vocab_path)
        if len(loaded) != header["vocab_len"] or loaded.vocab_hash[:8] != header["vocab_tag"]:
            return None, f"{vocab_path} does not belong to {bin_path}"
        if tokenizer is not None and loaded.vocab_hash != tokenizer.vocab_hash:
            return None, None
        return ((tokenizer or loaded), _checked_ids(bin_path, header)), None
    except DataError as e:
        return None, str(e)


# ---------------------------------------------------------------------------------------
# Writing dataset.bin
# ---------------------------------------------------------------------------------------

def prepare_dataset(files: Iterable[str | os.PathLike], out_dir: str | os.PathLike, kind: str | None = "word",
                    vocab_size: int = 10000, encoding_errors: str = "strict",
                    tokenizer: Tokenizer | None = None, block_size: int = BLOCK_BYTES,
                    workers: int | None = None) -> tuple[Tokenizer, np.memmap, dict[str, Any]]:
    """Tokenise `files` into out_dir's vocabulary file (vocab.txt) and out_dir/dataset.bin.

    Each file is a document ending in EOS. With `tokenizer` given its vocabulary is used
    (and its kind overrides `kind`); otherwise one is built from the corpus. If out_dir
    already holds the stream of the same bytes and settings, intact, it is reused without
    tokenising. Returns (tokenizer, memmap of the ids, info) with info = {"files", "bytes",
    "tokens", "reused", "key", "rebuilt_reason"}; rebuilt_reason is None, or one line saying
    why a stored stream of this corpus was found damaged and rebuilt.

    info["key"] is the corpus key: sha256 over the settings (key version, kind, vocab_size,
    encoding_errors) and each file's length and bytes. It does not depend on whether the
    vocabulary was built or given, so a resumed run that passes the saved tokenizer gets the
    key the first run recorded. The vocabulary is identified by tokenizer.vocab_hash;
    dataset.bin stores a stream key that also covers it when it was given (see stream_key),
    and a 4-byte tag of it, so a stream is never reused with a vocabulary it was not encoded
    with.

    Files are read in blocks of about `block_size` bytes and tokenized by `workers` processes
    (None: one per core the process may use, fewer for a small corpus; 1: in this process);
    neither changes the result. On a terminal each pass shows a progress line on stderr.
    """
    paths = [pathlib.Path(f) for f in files]
    if tokenizer is not None:
        kind = tokenizer.kind
    cls = tokenizer_class(kind)
    if tokenizer is None:           # a given tokenizer has the size it has
        cls.check_vocab_size(vocab_size)
    check_encoding_errors(encoding_errors)
    if not paths:
        raise DataError("corpus is empty: no input files")
    out_dir = pathlib.Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create directory ({e.strerror or e})") from None

    # Pass 1: hash the corpus; reuse the stored stream if nothing changed.
    corpus = _Corpus(_settings(kind, vocab_size, encoding_errors), paths, block_size)
    total = sum(_size(path) for path in paths)
    with ByteProgress("reading", total) as progress:
        for _, _, data, _ in corpus.blocks(len):
            progress.add(len(data))
        progress.done()
    reused, reason = _try_reuse(out_dir, corpus.finished_key(), kind, tokenizer)
    info: dict[str, Any] = {"files": len(paths), "bytes": corpus.bytes, "reused": False,
            "key": corpus.finished_key().hex(),
            "rebuilt_reason": reason}
    if reused is not None:
        tokenizer, tokens = reused
        info.update(tokens=len(tokens), reused=True)
        return tokenizer, tokens, info

    # Pass 2: tokenise. The key is hashed again from the bytes actually tokenised.
    total = corpus.bytes
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        workers = min(cores or os.cpu_count() or 1, total // block_size + 1)
    run = BlockRunner(corpus, encoding_errors, total, workers)
    scanner = cls.scanner()
    if tokenizer is not None:
        n_tokens = _encode_and_write(run, tokenizer, out_dir, given=True)
    elif scanner is not None:
        tokenizer, n_tokens = _build_and_write(run, cls, scanner, vocab_size, out_dir)
    else:
        # a kind learned otherwise than by counting: learn it, then encode (two passes)
        _check_not_empty(total, corpus)    # no byte: nothing to learn from, no token
        every = math.ceil(total / cls.train_bytes) if cls.train_bytes else 1
        with ByteProgress("learning the vocabulary", total) as progress:
            texts = (text for i, (text, _) in enumerate(run.texts(cls.block_cut, progress))
                     if i % every == 0)
            tokenizer = cls.train(texts, vocab_size)
            progress.done()
        n_tokens = _encode_and_write(run, tokenizer, out_dir, given=False)
    info.update(bytes=corpus.bytes, tokens=n_tokens, key=corpus.finished_key().hex())
    # the checksum was taken from the bytes as they were written: no need to read them back
    path = out_dir / "dataset.bin"
    return tokenizer, _memmap(path, dataset_header(path)), info


def _size(path: pathlib.Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0                          # read_blocks reports the file


class _Corpus:
    """The files of a corpus read in order, in blocks, their bytes hashed into the dataset key.

    key = sha256 over the settings line, then each file's length (8 bytes) and bytes. File
    names do not enter the key: renaming a file does not change the stream. key and bytes
    are complete once an iteration of blocks() has run to the end."""

    def __init__(self, settings: str, files: list[pathlib.Path], block_size: int) -> None:
        self.settings, self.files, self.block_size = settings, files, block_size
        self.key: bytes | None = None
        self.bytes = 0

    def blocks(self, cut: Callable[[bytes], int]) -> Iterator[tuple[pathlib.Path, int, bytes, bool]]:
        """(path, offset, data, last) of every block of every file, cut by cut(data) (see
        files.read_blocks); last marks a file's last block."""
        h = hashlib.sha256(self.settings.encode("utf-8"))
        self.key, self.bytes = None, 0
        for path in self.files:
            for offset, data, size, last in read_blocks(path, cut, self.block_size):
                if offset == 0:
                    h.update(struct.pack("<Q", size))
                h.update(data)
                self.bytes += len(data)
                yield path, offset, data, last
        self.key = h.digest()

    def finished_key(self) -> bytes:
        """key, once an iteration of blocks() has run to the end."""
        if self.key is None:
            raise RuntimeError("the corpus key is read before the corpus")
        return self.key


def _check_not_empty(n_words: int, corpus: _Corpus) -> None:
    if n_words == 0:
        n = len(corpus.files)
        raise DataError(f"corpus is empty: no tokens in {n} {plural(n, 'file')} "
                        f"({corpus.bytes} {plural(corpus.bytes, 'byte')}), first "
                        f"{corpus.files[0]}")


def _pack_header(dtype: np.dtype, n_tokens: int, key: bytes, tokenizer: Tokenizer,
                 ids_sha256: bytes) -> bytes:
    return _HEADER.pack(DATASET_MAGIC, DATASET_VERSION, dtype.itemsize, n_tokens, key,
                        len(tokenizer), bytes.fromhex(tokenizer.vocab_hash[:8]), ids_sha256)


def _encode_and_write(run: BlockRunner, tokenizer: Tokenizer, out_dir: pathlib.Path,
                      given: bool) -> int:
    """Encode every block with `tokenizer` straight into dataset.bin. given: the
    vocabulary came from the caller, not from this corpus (see stream_key)."""
    corpus = cast(_Corpus, run.corpus)
    dtype = _dtype_for(len(tokenizer))
    eos = tokenizer.encode_document("")[-1:].astype(dtype).tobytes()
    if tokenizer.encodes_on_all_cores:
        run.workers = 1
    with atomic_file(out_dir / "dataset.bin", DataError, storage_error=WriteFailed) as f, \
            ByteProgress("tokenizing", run.total) as progress:
        f.write(bytes(HEADER_SIZE))              # placeholder until the count is known
        h = hashlib.sha256()
        n_tokens = in_file = 0
        blocks = run.results(tokenizer.block_cut, None, progress, tokenizer)
        with contextlib.closing(blocks):         # workers end at once on a fault or signal
            for ids, last in blocks:
                if ids.size:
                    data = ids.astype(dtype).tobytes()
                    f.write(data)
                    h.update(data)
                    in_file += ids.size
                if last and in_file:             # a document with tokens ends in EOS
                    f.write(eos)
                    h.update(eos)
                    n_tokens += in_file + 1
                    in_file = 0
        _check_not_empty(n_tokens, corpus)
        tokenizer.save(out_dir / tokenizer.file_name)   # only once there is a stream
        key = stream_key(corpus.finished_key(), tokenizer if given else None)
        f.seek(0)
        f.write(_pack_header(dtype, n_tokens, key, tokenizer, h.digest()))
        progress.done()
    return n_tokens


def _build_and_write(run: BlockRunner, cls: type[Tokenizer], scanner: Scanner, vocab_size: int,
                     out_dir: pathlib.Path) -> tuple[Tokenizer, int]:
    """Build the vocabulary and the stream with one tokenising pass: provisional ids (see
    cllm_cli.tokenizers.vocab.Scanner) are counted and go to a spill file, which is then read
    back in chunks (not mapped: its pages would count as the process's memory) and mapped to the
    final ids into dataset.bin."""
    corpus = cast(_Corpus, run.corpus)
    eos = np.array([EOS], dtype=np.int32)
    try:
        fd, spill_path = tempfile.mkstemp(dir=out_dir, prefix=".dataset.ids.", suffix=".tmp")
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write ({e.strerror or e})") from None
    try:
        counts: NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        with os.fdopen(fd, "wb") as spill, ByteProgress("tokenizing", run.total) as progress:
            n_tokens = in_file = 0
            blocks = run.results(cls.block_cut, scanner.scan, progress)
            with contextlib.closing(blocks):     # workers end at once on a fault or signal
                for scanned, last in blocks:
                    ids = scanner.merge(scanned)
                    if last and (in_file or ids.size):   # a document with tokens ends in EOS
                        ids = np.concatenate([ids, eos])
                    if ids.size:
                        spill.write(ids.tobytes())
                        block_counts = np.bincount(ids)
                        if len(block_counts) > len(counts):
                            counts = np.pad(counts, (0, len(block_counts) - len(counts)))
                        counts[:len(block_counts)] += block_counts
                        in_file += ids.size
                    if last:
                        n_tokens += in_file
                        in_file = 0
            progress.done()
        _check_not_empty(n_tokens, corpus)
        tokenizer, remap = scanner.finish(counts, vocab_size)
        dtype = _dtype_for(len(tokenizer))
        remap = remap.astype(dtype)
        tokenizer.save(out_dir / tokenizer.file_name)
        with atomic_file(out_dir / "dataset.bin", DataError, storage_error=WriteFailed) as f, \
                open(spill_path, "rb") as spill:
            f.write(bytes(HEADER_SIZE))          # placeholder until the checksum is known
            h = hashlib.sha256()
            while (chunk := np.fromfile(spill, dtype=np.int32, count=_CHUNK)).size:
                data = remap[chunk].tobytes()
                f.write(data)
                h.update(data)
            f.seek(0)
            f.write(_pack_header(dtype, n_tokens, corpus.finished_key(), tokenizer, h.digest()))
    except OSError as e:
        raise write_error(e, DataError, f"{out_dir}: cannot write ({e.strerror or e})",
                          WriteFailed) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(spill_path)
    return tokenizer, n_tokens
