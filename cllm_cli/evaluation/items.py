"""The items of a task file, read and checked line by line.

    HellaSwag   a JSON object per line: "ctx" (a string), "endings" (a non-empty list of
                non-empty strings), "label" (an integer index into endings, or its decimal
                digits as a string, as Hugging Face's copy of the dataset writes it); other
                keys are ignored (the dataset's own jsonl has ind, activity_label, ctx_a, ...)
    LAMBADA     a passage per line; the target is its last word: what follows the last space,
                as lm-evaluation-harness's lambada_openai splits text on " ". A file named
                *.jsonl or *.json (in any case), or whose first line is a JSON object, holds a
                JSON object per line instead, the passage in "text" (the form
                lambada_openai's own lambada_test.jsonl has)

Lines holding only white space are skipped. Every fault is one DataError naming the file and
the line: text that is not UTF-8, invalid JSON, a missing key or one of the wrong type, a label
outside the endings, an empty ending, a passage of one word, a file without any item.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence, TypeVar

from cllm_cli.errors import DataError
from cllm_cli.fileio import open_regular, reason
from cllm_cli.jsonfile import JSONError, loads


@dataclasses.dataclass(frozen=True)
class HellaSwagItem:
    """A context, its candidate endings and the index of the right one. `where` ("file:line")
    names the item in messages."""
    context: str
    endings: tuple[str, ...]
    label: int
    where: str = "item"


@dataclasses.dataclass(frozen=True)
class LambadaItem:
    """A passage without its last word, and that word."""
    context: str
    word: str
    where: str = "item"

    @classmethod
    def from_passage(cls, text: str, where: str = "item") -> LambadaItem:
        """The item of a passage: the target is what follows the last space."""
        text = text.strip()
        context, space, word = text.rpartition(" ")
        if not space or not context.strip():
            raise DataError(f"{where}: a LAMBADA passage needs at least two words separated "
                            f"by a space (the last one is the target), got {_short(text)}")
        return cls(context, word, where)


_Item = TypeVar("_Item")


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of `path` that is not blank; DataError for a file
    that cannot be read and for a line that is not UTF-8."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({reason(e)})") from None
    if data.startswith(b"\xef\xbb\xbf"):        # a byte order mark, as Windows editors write
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                            f"column {e.start + 1})") from None
        if line.strip():
            yield number, line


def _nonempty(items: list[_Item], path: str | os.PathLike, what: str) -> list[_Item]:
    if not items:
        raise DataError(f"{path}: no {what} in the file (it is empty or blank)")
    return items


def _json_object(line: str, where: str, keys: Sequence[str], what: str) -> dict[str, Any]:
    """The JSON object on `line`, holding every one of `keys`."""
    try:
        doc = loads(line)
    except JSONError as e:
        raise DataError(f"{where}: {e}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected a JSON object with {', '.join(keys)}, got "
                        f"{type(doc).__name__}")
    missing = [key for key in keys if key not in doc]
    if missing:
        raise DataError(f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} ({what} has {', '.join(keys)})")
    return doc


def hellaswag_item(line: str, where: str) -> HellaSwagItem:
    """The HellaSwagItem of one jsonl line (DataError naming `where` otherwise)."""
    doc = _json_object(line, where, ("ctx", "endings", "label"), "a HellaSwag item")
    context, endings, label = doc["ctx"], doc["endings"], doc["label"]
    if not isinstance(context, str):
        raise DataError(f"{where}: ctx must be a string, got {type(context).__name__}")
    if not isinstance(endings, list) or not endings:
        raise DataError(f"{where}: endings must be a non-empty list of strings, got "
                        f"{_short(json.dumps(endings))}")
    for i, ending in enumerate(endings):
        if not isinstance(ending, str) or not ending.strip():
            raise DataError(f"{where}: ending {i} is {'empty' if isinstance(ending, str) else 'not a string'}"
                            f" ({_short(json.dumps(ending))})")
    if isinstance(label, str) and label.isascii() and label.isdigit():
        try:
            label = int(label)
        except ValueError:      # more digits than Python converts (4,300): no index either
            raise DataError(f"{where}: label {_short(label)} is not the index of one of its "
                            f"endings (0 to {len(endings) - 1})") from None
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: label must be an integer (the index of the right ending), "
                        f"got {_short(json.dumps(label))}")
    if not 0 <= label < len(endings):
        raise DataError(f"{where}: label {label} is not the index of one of its endings (0 to "
                        f"{len(endings) - 1})")
    return HellaSwagItem(context, tuple(endings), label, where)


def read_hellaswag(path: str | os.PathLike) -> list[HellaSwagItem]:
    """[HellaSwagItem] of a HellaSwag jsonl file."""
    return _nonempty([hellaswag_item(line, f"{path}:{number}") for number, line in _lines(path)],
                     path, "HellaSwag items")


def lambada_passage(line: str, where: str, jsonl: bool) -> str:
    """The passage of one line: the line itself, or for jsonl its object's "text"."""
    if not jsonl:
        return line
    text = _json_object(line, where, ("text",), "a LAMBADA jsonl line")["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: text must be a string, got {type(text).__name__}")
    return text


def is_json_lines(path: str | os.PathLike, first_line: str) -> bool:
    """True when a task file holds JSON lines: its name ends in .jsonl or .json (in any
    case), or its first line that is not blank is a JSON object ({...})."""
    if os.path.splitext(str(path))[1].lower() in (".jsonl", ".json"):
        return True
    first = first_line.strip()
    return first.startswith("{") and first.endswith("}")


def read_lambada(path: str | os.PathLike) -> list[LambadaItem]:
    """[LambadaItem] of a file of passages, one per line, or of {"text": ...} objects, one
    per line (is_json_lines)."""
    lines = list(_lines(path))
    jsonl = bool(lines) and is_json_lines(path, lines[0][1])
    return _nonempty([LambadaItem.from_passage(lambada_passage(line, f"{path}:{number}", jsonl),
                                               f"{path}:{number}")
                      for number, line in lines], path, "LAMBADA passages")
