"""Instruction data: JSON-lines records -> labelled windows, one record per window, the loss
on the answer only. Used by train_model and cllm_eval for files whose name ends in .jsonl.

    is_instruction_data   whether DATA are .jsonl files (a mix with text files is refused)
    read_records          the files -> Records (text pieces, each trained or not), checked
    Instructions.build    Records + tokenizer -> labelled windows, cut and refused counted
    prepare_instructions  files -> (tokenizer, Instructions, info): train_model's data step
    split_records         (train, val) windows: the last records are held out, whole
    INSTRUCTIONS_FILE     where a run keeps its windows (ranks of a many-process run map it)

Records, one JSON object per line (blank lines skipped; a UTF-8 byte order mark at the start
of a file is not part of its first record):

- {"prompt": P, "completion": C}: the text P + C; C is trained.
- {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}: rendered by
  the chat template (tokenizers/chat_template.py); each assistant turn is trained (its
  content and what the template writes after it up to the next turn, ChatML's
  "<|im_end|>\\n"). At least one message, and one from the assistant.
- {"instruction": I, "input": X, "output": O} (Alpaca; "input" may be empty or left out):
  ALPACA_PROMPT (or ALPACA_PROMPT_NO_INPUT) filled in, then O; O is trained.

Every value is a string; a record with another field, a missing one, or a value of another
type is refused with one line "<file>:<line>: <fault>" (DataError).

Tokens: each piece is encoded on its own (Tokenizer.encode_marked: the tokenizer's own special
tokens written in the text, such as a chat model's <|im_start|>, become their ids) and the
pieces' ids are joined; then the tokenizer's end of text (eos_id), trained, so that the model
learns to stop. Encoding the pieces apart is what generation does (the prompt is encoded, the
answer generated after it), so the model trains on the ids it will see; for the default
template and the word, char and byte-level BPE tokenizers they equal the encoding of the whole
text (tested), since every piece boundary falls where those tokenizers split anyway.

Windows: a record's ids fill one window of T + 1 tokens; the rest is padding, eos_id as input
(an id like any other: causal attention keeps it from changing the positions before it) with
labels that never count. Labels: the id where the token is trained, IGNORE_TARGET (-1)
elsewhere; the engine (labelled windows) trains position k on label k + 1, so the first
token of a window is never a target. A record longer than T + 1 tokens loses tokens from the
left of its prompt (what precedes the first trained token), keeping at least one of them;
one whose trained part (from its first trained token to the end) does not fit so is refused.
Both are counted and reported. A record whose prompt and answer give no tokens at all (its
end of text alone, the first token of its window, which nothing predicts) is refused with
its line: it has nothing to train or score. Windows never hold two records.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray

from cllm_cli._engine import IGNORE_TARGET
from cllm_cli.errors import DataError, UsageError
from cllm_cli.fileio import atomic_file, open_regular, reason
from cllm_cli.jsonfile import JSONError, loads
from cllm_cli.tokenizers import BOS, EOS, SPECIALS, Tokenizer, tokenizer_class
from cllm_cli.tokenizers.chat_template import ChatTemplate, ChatTemplateError

SUFFIX = ".jsonl"
INSTRUCTIONS_FILE = "instructions.npy"
ROLES = ("system", "user", "assistant")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# the pieces of one record's text, in order: (text, trained)
Pieces = List[Tuple[str, bool]]


@dataclass
class Record:
    """One record: its text in pieces, and where it was read ("<file>:<line>")."""
    pieces: Pieces
    where: str


def is_instruction_data(files: Sequence[str | os.PathLike]) -> bool:
    """True when every file's name ends in .jsonl (in any case: .JSONL too), False when none
    does; UsageError for a mix (a run trains on text or on records, not both)."""
    jsonl = [str(f).lower().endswith(SUFFIX) for f in files]
    if any(jsonl) and not all(jsonl):
        raise UsageError("DATA mixes .jsonl record files and text files: train on one kind "
                         "at a time")
    return bool(jsonl) and all(jsonl)


def _string(record: dict[str, Any], name: str, where: str, optional: bool = False) -> str:
    value = record.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if name not in record else f"a {_json_type(value)}"
        raise DataError(f"{where}: \"{name}\" must be a string, got {got}")
    return value


def _json_type(value: object) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _check_fields(record: dict[str, Any], allowed: Iterable[str], what: str, where: str) -> None:
    extra = sorted(set(record) - set(allowed))
    if extra:
        article = "an" if what[0] in "AEIOUaeiou" else "a"
        raise DataError(f"{where}: {article} {what} record has no field \"{extra[0]}\"")


def _messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of messages")
    checked = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {i} is a {_json_type(message)}, not an object")
        _check_fields(message, ("role", "content"), "message", f"{where}: message {i}")
        role = _string(message, "role", f"{where}: message {i}")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}, not one of "
                            f"{', '.join(ROLES)}")
        checked.append({"role": role, "content": _string(message, "content",
                                                         f"{where}: message {i}")})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{where}: no assistant message, nothing to train on")
    return checked


def record_pieces(record: Any, where: str, template: Callable[[], ChatTemplate]) -> Pieces:
    """The pieces of one parsed record; DataError naming `where` for a malformed one.
    template() gives the chat template, asked for only by a messages record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record is a JSON object, got a {_json_type(record)}")
    if "messages" in record:
        _check_fields(record, ("messages",), "messages", where)
        messages = _messages(record, where)
        try:
            return template().segments(messages)
        except ChatTemplateError as e:
            raise DataError(f"{where}: {e}") from None
    if "prompt" in record or "completion" in record:
        _check_fields(record, ("prompt", "completion"), "prompt-completion", where)
        return [(_string(record, "prompt", where), False),
                (_string(record, "completion", where), True)]
    if "instruction" in record or "output" in record:
        _check_fields(record, ("instruction", "input", "output"), "Alpaca", where)
        instruction = _string(record, "instruction", where)
        given = _string(record, "input", where, optional=True)
        prompt = (ALPACA_PROMPT.format(instruction=instruction, input=given) if given
                  else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
        return [(prompt, False), (_string(record, "output", where), True)]
    raise DataError(f"{where}: not a record: needs \"prompt\" and \"completion\", "
                    f"\"messages\", or \"instruction\" and \"output\"")


def read_records(files: Sequence[str | os.PathLike],
                 template: Callable[[], ChatTemplate]) -> tuple[list[Record], int]:
    """(records of every file in order, bytes read); DataError "<file>:<line>: ..." for the
    first malformed line."""
    records: list[Record] = []
    size = 0
    for path in files:
        try:
            with open_regular(path) as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"{path}: cannot read ({reason(e)})") from None
        size += len(data)
        if data.startswith(b"\xef\xbb\xbf"):     # a byte order mark, as Windows editors write
            data = data[3:]
        for number, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = loads(line)
            except JSONError as e:
                # a JSON array, or an object spread over lines, as json.dump(indent=...) writes
                spread = line.strip() in (b"[", b"{") or line.lstrip().startswith(b"[")
                hint = " (a .jsonl file holds one JSON object per line)" if spread else ""
                raise DataError(f"{where}: {e}{hint}") from None
            records.append(Record(record_pieces(value, where, template), where))
    return records, size


def encode_pieces(tokenizer: Tokenizer, pieces: Pieces) -> tuple[NDArray[np.int64],
                                                                 NDArray[np.bool_]]:
    """(ids, trained) of a record: each piece encoded on its own, then eos_id (trained)."""
    ids: list[NDArray[np.int64]] = []
    trained: list[NDArray[np.bool_]] = []
    for text, is_trained in pieces:
        piece = np.asarray(tokenizer.encode_marked(text), dtype=np.int64)
        ids.append(piece)
        trained.append(np.full(len(piece), is_trained))
    ids.append(np.array([tokenizer.eos_id], dtype=np.int64))
    trained.append(np.ones(1, dtype=bool))
    return np.concatenate(ids), np.concatenate(trained)


@dataclass
class Instructions:
    """Labelled windows, one per usable record: int32 (R, 2 (T + 1)), the T + 1 input ids
    then their labels; `where` names each record's line; cut and refused count records."""
    windows: NDArray[np.int32]
    where: list[str] = field(default_factory=list)
    cut: int = 0
    refused: int = 0
    tokens: int = 0            # ids of the usable records, padding left out

    @classmethod
    def build(cls, records: Sequence[Record], tokenizer: Tokenizer, T: int) -> Instructions:
        width = T + 1
        rows, where = [], []
        cut = refused = tokens = 0
        for record in records:
            ids, trained = encode_pieces(tokenizer, record.pieces)
            first = int(np.argmax(trained))            # the first trained token
            over = len(ids) - width
            if over > 0:
                if over > max(first - 1, 0):
                    refused += 1
                    continue
                ids, trained = ids[over:], trained[over:]
                cut += 1
            row: NDArray[np.int32] = np.full(2 * width, IGNORE_TARGET, dtype=np.int32)
            row[:width] = tokenizer.eos_id
            row[:len(ids)] = ids
            labels = np.where(trained, ids, IGNORE_TARGET)
            labels[0] = IGNORE_TARGET                   # nothing predicts the first token
            if len(ids) == 1:           # the end of text alone, which nothing predicts
                raise DataError(f"{record.where}: no answer token: the prompt and the answer "
                                f"give no tokens (at least one of them must hold text)")
            row[width:width + len(ids)] = labels
            rows.append(row)
            where.append(record.where)
            tokens += len(ids)
        windows = (np.stack(rows) if rows else np.zeros((0, 2 * width), dtype=np.int32))
        return cls(windows, where, cut, refused, tokens)

    def summary(self) -> str:
        """'R records (c cut from the left, r refused: answer longer than the context)'."""
        n, context = len(self.windows), self.windows.shape[1] // 2 - 1
        return (f"{n:,} record{'s' if n != 1 else ''} ({self.cut:,} cut from the left of the "
                f"prompt, {self.refused:,} refused: answer longer than the context of "
                f"{context:,} tokens)")


def split_records(windows: NDArray[np.int32], val_fraction: float) -> tuple[NDArray[np.int32],
                                                                             NDArray[np.int32]]:
    """(train, val): the last int(records x val_fraction) records are held out, whole."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cut = len(windows) - int(len(windows) * val_fraction)
    return windows[:cut], windows[cut:]


def instructions_key(files: Sequence[str | os.PathLike], settings: str) -> str:
    """sha256 hex over `settings` and each file's length and bytes: what a resumed run checks
    it reads the same records with."""
    h = hashlib.sha256(b"cllm-instructions-1\0" + settings.encode("utf-8") + b"\0")
    for path in files:
        data = pathlib.Path(path).read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def no_records_error(files: Sequence[str | os.PathLike], instructions: Instructions) -> DataError:
    return DataError(f"no usable records in {len(files)} .jsonl file"
                     f"{'s' if len(files) != 1 else ''}: {instructions.summary()}")


def template_tokens(tokenizer: Tokenizer | None) -> tuple[str, str]:
    """(bos_token, eos_token) strings a chat template is rendered with: the tokenizer's, or
    the names of the special ids a tokenizer built from the records will have."""
    if tokenizer is None:
        return SPECIALS[BOS], SPECIALS[EOS]
    return tokenizer.id_to_token(tokenizer.bos_id) or "", tokenizer.id_to_token(tokenizer.eos_id) or ""


def prepare_instructions(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                         kind: str | None, vocab_size: int, T: int,
                         tokenizer: Tokenizer | None = None,
                         template_text: str | None = None,
                         ) -> tuple[Tokenizer, Instructions, dict[str, Any]]:
    """train_model's data step for record files: the records read and checked, the
    tokenizer (given, or built from the records' text and saved in out_dir), the labelled
    windows (also written to out_dir/INSTRUCTIONS_FILE for the other ranks) and info =
    {"files", "bytes", "tokens", "reused", "key", "records"}. template_text: the chat
    template's Jinja text (None: the default), compiled when a messages record needs it."""
    paths = [pathlib.Path(f) for f in files]
    if not paths:
        raise DataError("corpus is empty: no input files")
    if tokenizer is not None:
        kind = tokenizer.kind
    cls = tokenizer_class(kind)
    if tokenizer is None:           # a given tokenizer has the size it has
        cls.check_vocab_size(vocab_size)
    bos, eos = template_tokens(tokenizer)
    compiled: list[ChatTemplate] = []

    def template() -> ChatTemplate:
        if not compiled:
            compiled.append(ChatTemplate.default(bos, eos) if template_text is None
                            else ChatTemplate(template_text, bos, eos))
        return compiled[0]

    records, size = read_records(paths, template)
    out = pathlib.Path(out_dir)
    if tokenizer is None:
        tokenizer = cls.train(("".join(text for text, _ in r.pieces) for r in records),
                              vocab_size)
    tokenizer.save(out / cls.file_name)
    instructions = Instructions.build(records, tokenizer, T)
    if len(instructions.windows) == 0:
        raise no_records_error(paths, instructions)
    with atomic_file(out / INSTRUCTIONS_FILE, DataError) as f:
        np.save(f, instructions.windows)
    settings = f"{kind}\0{vocab_size}\0{T}\0{template_text}"
    info = {"files": len(paths), "bytes": size, "tokens": instructions.tokens, "reused": False,
            "key": instructions_key(paths, settings), "rebuilt_reason": None,
            "records": instructions.summary(), "file": INSTRUCTIONS_FILE}
    return tokenizer, instructions, info


def load_instructions(path: str | os.PathLike) -> NDArray[np.int32]:
    """The labelled windows prepare_instructions wrote (memory-mapped)."""
    try:
        windows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the records' windows ({e})") from None
    if windows.dtype != np.int32 or windows.ndim != 2:
        raise DataError(f"{path}: not the records' windows")
    return windows
