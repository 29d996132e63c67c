"""JSON from the user's files: every JSON document or JSON line CLLM reads from a file it did
not write itself is parsed here (task files, tokenizer.json, vocab.json, config.json, metrics
files, checkpoint headers, files of ids).

    loads(text)                     the document, or JSONError (the readers of JSON lines
                                    name the file and line themselves: "<file>:<line>: ...")
    parse_json(text, name, error)   the document, or error("<name>:<line>: <fault>")
    read_json(path, error)          parse_json of a regular file's bytes

A fault is one line: text that is not UTF-8, invalid JSON (the parser's message and column; a
number too long for Python to convert; a \\u escape of half a UTF-16 surrogate pair, which
Python's parser takes but no UTF-8 text holds), or a document nested so deeply that Python's parser cannot follow it (a line of 100,000 "["):
that one names the line where the nesting is deepest, instead of a RecursionError.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

from cllm_cli.errors import DataError
from cllm_cli.fileio import open_regular, reason

# a run of digits longer than Python converts to an int (sys.get_int_max_str_digits)
_LONG_NUMBER = re.compile(r"\d{4301,}")
# a JSON string (escapes included) or one bracket: what the nesting depth is counted over
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
# a \u escape of a UTF-16 surrogate (preceded by an even number of backslashes, so a real
# escape): a high one with its low one is one character, anything shorter half of one
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2}"
                               r"(?:\\u[dD][c-fC-F][0-9a-fA-F]{2})?|\\u[dD][c-fC-F][0-9a-fA-F]{2})")


class JSONError(ValueError):
    """A document that cannot be parsed; the message says why (one line), `line` where."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def _deepest(text: str) -> tuple[int, int]:
    """(depth, line) of the deepest nesting in `text`, brackets inside strings not counted."""
    depth = deepest = 0
    where = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        bracket = match.group()
        if bracket in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, match.start()
        elif bracket in "]}":
            depth -= 1
    return deepest, text.count("\n", 0, where) + 1


def loads(text: str | bytes | bytearray | memoryview) -> Any:
    """The JSON document `text` (str, or bytes holding UTF-8); JSONError otherwise."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise JSONError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})",
                            line) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONError(f"not valid JSON ({e.msg} at column {e.colno})", e.lineno) from None
    except RecursionError:
        depth, line = _deepest(text)
        raise JSONError(f"JSON nested too deeply to read ({depth:,} levels)", line) from None
    except ValueError as e:         # a number Python will not convert (over 4,300 digits)
        long_number = _LONG_NUMBER.search(text)
        line = text.count("\n", 0, long_number.start()) + 1 if long_number else 1
        raise JSONError(f"not valid JSON ({e})", line) from None
    half = _half_surrogate(text)
    if half is not None:
        start = half.start(1)
        column = start - (text.rfind("\n", 0, start) + 1) + 1
        raise JSONError(f"not valid JSON ({half.group(1)} is half of a UTF-16 surrogate pair, "
                        f"not a character, at column {column})", text.count("\n", 0, start) + 1)
    return document


def _half_surrogate(text: str) -> re.Match[str] | None:
    """The first \\u escape in `text` of half a surrogate pair (which no UTF-8 text holds),
    or None."""
    if "\\ud" not in text and "\\uD" not in text:        # most documents: no scan
        return None
    return next((m for m in _SURROGATE_ESCAPE.finditer(text) if len(m.group(1)) == 6), None)


def parse_json(text: str | bytes, name: str | os.PathLike,
               error: Callable[[str], Exception] = DataError) -> Any:
    """The JSON document `text` read from file `name`. A fault raises error() with one line
    "<name>:<line>: <fault>", the line of the document where it goes wrong."""
    try:
        return loads(text)
    except JSONError as e:
        raise error(f"{name}:{e.line}: {e}") from None


def read_json(path: str | os.PathLike, error: Callable[[str], Exception] = DataError) -> Any:
    """The JSON document in the regular file `path` (parse_json); a file that cannot be read
    raises error("<path>: cannot read (<reason>)")."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read ({reason(e)})") from None
    return parse_json(data, path, error)
