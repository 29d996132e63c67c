"""The corpus on disk: which files to read, and their text (SPEC section 3). First stage of
the data's path: files -> tokenizers -> dataset (token array) -> batches (windows).

    collect_files   paths given by the user -> list of text files (sorted, deduplicated)
    read_text       one file -> str (strict UTF-8, or U+FFFD replacement)

Choices the SPEC leaves open, written down here:

- A file is taken whatever its name; a directory stands for every file below it matching a
  pattern, in sorted path order, never inside the checkpoint directory.
- Reading text: a leading UTF-8 byte-order mark is dropped and line ends are normalised to
  "\\n" ("\\r\\n" and a lone "\\r"), as Python's text mode does. With encoding_errors="strict"
  the first bad byte wins: a NUL byte is reported as "not a text file", an invalid UTF-8
  sequence as "not valid UTF-8", each with its byte offset in the file.
"""
import os
import pathlib

ENCODING_ERRORS = ("strict", "replace")


class DataError(Exception):
    """A problem with the user's data; the message is one line naming the file and the fault."""


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


def read_bytes(path):
    """All bytes of `path`; DataError (one line) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def check_encoding_errors(encoding_errors):
    if encoding_errors not in ENCODING_ERRORS:
        raise DataError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, "
                        f"got {encoding_errors!r}")


def decode_text(path, data, encoding_errors="strict"):
    """The bytes `data` read from `path` (named in errors) -> text, checked as read_text does."""
    check_encoding_errors(encoding_errors)
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
    else:
        text = data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
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
    return decode_text(path, read_bytes(path), encoding_errors)
