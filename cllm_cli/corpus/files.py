"""The corpus on disk: which files to read, and their text. First stage of
the data's path: files -> tokenizers -> dataset (token array) -> batches (windows).

    collect_files   paths given by the user -> list of text files (sorted, deduplicated)
    read_text       one file -> str (strict UTF-8, or U+FFFD replacement)
    read_blocks     one file -> blocks of bytes cut where the tokenizer allows (bounded memory)
    decode_block    one block -> str, checked as read_text checks a whole file

How it is done, and why:

- A file is taken whatever its name; a directory stands for every file below it matching a
  pattern, in sorted path order, never inside the checkpoint directory.
- Reading text: a leading UTF-8 byte-order mark is dropped and line ends are normalised to
  "\\n" ("\\r\\n" and a lone "\\r"), as Python's text mode does. With encoding_errors="strict"
  the first bad byte wins: a NUL byte is reported as "not a text file", an invalid UTF-8
  sequence as "not valid UTF-8", each with its byte offset in the file.
- Large files are read in blocks of about BLOCK_BYTES (read_blocks). A block ends only where
  cutting changes nothing: never inside a UTF-8 character or a "\\r\\n", and never where the
  tokenizer would read the text differently (each kind's block_cut says where), so the blocks'
  texts and tokens joined are exactly those of the whole file, and a fault is reported with
  the same offset. A block grows past BLOCK_BYTES only while it holds no such place (a word
  corpus without a space or a line end, a bpe corpus without a line break between two
  printable ASCII characters).
"""
from __future__ import annotations

import os
import pathlib
from typing import Callable, Iterable, Iterator

from cllm_cli.errors import DataError
from cllm_cli.fileio import read_bytes

ENCODING_ERRORS = ("strict", "replace")
BLOCK_BYTES = 1 << 22          # bytes read at a time by read_blocks (about)


def collect_files(paths: str | os.PathLike | Iterable[str | os.PathLike], pattern: str = "*.txt",
                  exclude_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Expand the user's paths into the list of files to read.

    A file is taken whatever its name. A directory stands for every file below it whose name
    matches `pattern` (searched recursively), sorted by path components, leaving out anything
    inside `exclude_dir` (the checkpoint directory, which holds vocab.txt) and hidden files
    and directories (a name starting with ".", as a shell's * leaves them out: .git, the ._
    files macOS writes beside copies) unless the pattern names them. A file reached twice (by
    another path, or as a hard link) is kept at its first place. A pattern that would reach
    outside the directory is refused (check_pattern).
    """
    given: Iterable[str | os.PathLike] = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    excluded = pathlib.Path(exclude_dir).resolve() if exclude_dir is not None else None
    files: list[pathlib.Path] = []
    seen: set[tuple[int, int]] = set()

    def add(path: pathlib.Path) -> None:
        info = path.stat()       # one file by any path: a link, another spelling, a hard link
        key = (info.st_dev, info.st_ino)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for raw in given:
        if not os.fspath(raw):       # pathlib reads "" as ".": a path left unset, not a choice
            raise DataError("an empty path names no file or directory (give . for the current "
                            "directory)")
        path = pathlib.Path(raw)
        if not path.exists():
            raise DataError(f"no such file or directory: {raw}")
        if path.is_file():
            add(path)
        elif path.is_dir():
            check_pattern(pattern)
            found: list[pathlib.Path] = []
            for match in path.rglob(pattern):
                if not match.is_file() or _hidden_below(match, path, pattern):
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


def _hidden_below(match: pathlib.Path, directory: pathlib.Path, pattern: str) -> bool:
    """Whether a part of `match` below `directory` is hidden (starts with ".") where the
    pattern's part at that depth from the end does not start with "." itself."""
    parts = match.relative_to(directory).parts
    wanted = pathlib.PurePath(pattern).parts
    return any(part.startswith(".") and not (k < len(wanted) and wanted[-1 - k].startswith("."))
               for k, part in enumerate(reversed(parts)))


def check_pattern(pattern: str) -> None:
    """DataError unless `pattern` names files below a directory: not an absolute path, no
    '..' part (pathlib refuses the one and climbs out of the directory with the other)."""
    pure = pathlib.PurePath(pattern)
    if pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"glob pattern {pattern!r} is not a pattern of file names below the "
                        f"directory (no absolute path, no '..'), such as '*.txt'")


def check_encoding_errors(encoding_errors: str) -> None:
    if encoding_errors not in ENCODING_ERRORS:
        raise DataError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, "
                        f"got {encoding_errors!r}")


def decode_block(path: str | os.PathLike, data: bytes, offset: int = 0,
                 encoding_errors: str = "strict") -> str:
    """The bytes `data` found at `offset` in `path` (named in errors) -> text, checked as
    read_text does; offsets in errors count from the start of the file. A byte-order mark is
    dropped only at offset 0. A block cut where read_blocks cuts decodes to exactly its part
    of the whole file's text."""
    check_encoding_errors(encoding_errors)
    if encoding_errors == "strict":
        nul = data.find(b"\x00")
        try:
            text = data.decode("utf-8")
            bad = -1
        except UnicodeDecodeError as e:
            text, bad = "", e.start
        if nul >= 0 and (bad < 0 or nul < bad):
            raise DataError(f"{path}: not a text file (NUL byte at offset {offset + nul})")
        if bad >= 0:
            raise DataError(f"{path}: not valid UTF-8 (bad byte at offset {offset + bad})")
    else:
        text = data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    if offset == 0 and text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def decode_text(path: str | os.PathLike, data: bytes, encoding_errors: str = "strict") -> str:
    """All bytes `data` of `path` -> text (decode_block of a whole file)."""
    return decode_block(path, data, 0, encoding_errors)


def read_blocks(path: str | os.PathLike, cut: Callable[[bytes], int],
                block_size: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes, int, bool]]:
    """The bytes of `path` as (offset, data, size, last): blocks of about block_size bytes,
    each but the last ending at cut(data), the place (0 < place <= len(data), or 0 for none:
    the block then grows) where the caller's tokenizer may split the text; size is the
    file's size. An empty file gives one empty block. DataError (one line) when the file
    cannot be read or changes size while read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset, data, last = 0, b"", False
            while not last:
                # a block holds block_size bytes, unless it had no place to be cut
                chunk = f.read(block_size - len(data) if len(data) < block_size else block_size)
                last = not chunk
                data += chunk
                if last:
                    end = len(data)
                else:
                    end = cut(data)
                    if end <= 0:
                        continue                    # no place to cut yet: read further
                if offset + end > size or (last and offset + end != size):
                    raise DataError(f"{path}: changed while being read")
                yield offset, data[:end], size, last
                offset, data = offset + end, data[end:]
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def read_text(path: str | os.PathLike, encoding_errors: str = "strict") -> str:
    """Read one corpus file as text.

    strict: a NUL byte or invalid UTF-8 raises DataError with the offset of the first bad
    byte. replace: bad sequences and NUL bytes become U+FFFD.
    """
    return decode_text(path, read_bytes(path), encoding_errors)
