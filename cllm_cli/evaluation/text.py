"""The loss of a model on text: any text files, or a training run's own split.

    text files (read and checked as train_model reads DATA) -> token stream (each file a
    document ending in <eos>) -> windows of T+1 tokens (as for validation) -> the spheres ->
    loss summed in micro-batch order

    text_stream      files -> (token stream, bytes read)
    split_of_run     a checkpoint's run -> (its val or train split, the corpus's bytes per token)
    records_of_run   an instruction run's split, or .jsonl files -> labelled windows
    evaluate_stream  a token stream -> (summed loss, counted targets, windows)
    evaluate_windows windows (or labelled windows) -> the same
    TextLoss         the figures cllm_eval reports: loss, perplexity, bits per byte
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from cllm_cli._engine import Engine
from cllm_cli.api import CLLMModel
from cllm_cli.corpus import (
    INSTRUCTIONS_FILE,
    Instructions,
    dataset_header,
    eval_windows,
    load_dataset,
    load_instructions,
    read_records,
    split_records,
    split_stream,
    stream_key,
)
from cllm_cli.corpus.files import read_text
from cllm_cli.corpus.instructions import no_records_error, template_tokens
from cllm_cli.errors import DataError, UsageError
from cllm_cli.progress import ItemProgress, perplexity, plural
from cllm_cli.tokenizers import Tokenizer
from cllm_cli.tokenizers.chat_template import ChatTemplate


def text_stream(tokenizer: Tokenizer, files: Sequence[str | os.PathLike],
                encoding_errors: str) -> tuple[NDArray[np.int64], int]:
    """(ids of every file, each a document ending in <eos>; bytes read)."""
    parts: list[NDArray[np.int64]] = []
    size = 0
    for path in files:
        text = read_text(path, encoding_errors)
        size += len(text.encode("utf-8", "surrogatepass"))
        ids = tokenizer.encode(text)
        if ids.size:
            parts.append(tokenizer.encode_document(text))
    if not parts:
        raise DataError(f"no tokens in {len(files)} {plural(len(files), 'file')} ({size} "
                        f"{plural(size, 'byte')})")
    return np.concatenate(parts), size


def split_of_run(checkpoint_path: str | os.PathLike, model: CLLMModel, tokenizer: Tokenizer,
                 split: str) -> tuple[np.ndarray, float | None]:
    """(token stream of the run's split, bytes per token of the run's corpus)."""
    meta = model.meta or {}
    config = meta.get("train_config") or {}
    directory = os.path.dirname(os.path.abspath(checkpoint_path))
    path = os.path.join(directory, "dataset.bin")
    if not os.path.isfile(path):
        raise UsageError(f"--split: no dataset.bin next to {checkpoint_path}")
    header = dataset_header(path)
    key = meta.get("dataset_key")
    if key is None or header["key"] not in (key, stream_key(bytes.fromhex(key), tokenizer).hex()):
        raise UsageError(f"--split: {path} is not the token stream {checkpoint_path} was trained on")
    tokens = load_dataset(path)
    train_part, val_part = split_stream(tokens, config.get("val_fraction", 0.05))
    part = val_part if split == "val" else train_part
    corpus_bytes = meta.get("corpus_bytes")
    bytes_per_token = corpus_bytes / len(tokens) if corpus_bytes else None
    return part, bytes_per_token


def records_of_run(checkpoint_path: str | os.PathLike, model: CLLMModel, tokenizer: Tokenizer,
                   split: str | None, files: Sequence[str | os.PathLike] = ()
                   ) -> tuple[NDArray[np.int32], Instructions | None]:
    """(labelled windows, the Instructions of `files` or None for a split): of the run's
    `split` (val or train, from the instructions.npy next to the checkpoint, cut as
    train_model cuts it), or, with split None, of the records in `files`, rendered with the
    run's chat template (a transformers directory's own, else the default) and cut to the
    model's seq_len (Instructions counts the records cut and left out)."""
    meta = model.meta or {}
    if split is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), INSTRUCTIONS_FILE)
        if not os.path.isfile(path):
            raise UsageError(f"--split: no {INSTRUCTIONS_FILE} next to {checkpoint_path}")
        config = meta.get("train_config") or {}
        train_part, val_part = split_records(load_instructions(path),
                                             config.get("val_fraction", 0.05))
        if train_part.shape[1] != 2 * (model.config.seq_len + 1):
            raise UsageError(f"--split: {path} does not hold {checkpoint_path}'s windows")
        return np.ascontiguousarray(val_part if split == "val" else train_part), None
    source = meta.get("chat_template")
    if source is None and os.path.isdir(checkpoint_path):
        found = ChatTemplate.find(checkpoint_path)
        source = found[0] if found else None
    bos, eos = template_tokens(tokenizer)
    chosen: list[ChatTemplate] = []

    def template() -> ChatTemplate:
        if not chosen:
            chosen.append(ChatTemplate(source, bos, eos) if source
                          else ChatTemplate.default(bos, eos))
        return chosen[0]

    records, _ = read_records(files, template)
    instructions = Instructions.build(records, tokenizer, model.config.seq_len)
    if len(instructions.windows) == 0:
        raise no_records_error(files, instructions)
    return instructions.windows, instructions


def evaluate_stream(model: CLLMModel, stream: np.ndarray, threads: int, batch_size: int,
                    micro_batch: int, pad_id: int, precision: str = "fp32",
                    matmul: str = "blas") -> tuple[float, int, int]:
    """(summed loss, counted targets, windows) of the validation windows of `stream`. The
    windows go to the engine a batch at a time, as Engine.evaluate hands them out, and the
    micro-batch losses are added up in the same order, so the sum is Engine.evaluate's to
    the bit; between two batches the progress line (on a terminal) counts the windows."""
    windows = eval_windows(stream, model.config.seq_len)
    if len(windows) == 0:
        raise DataError(f"too little text: {len(stream)} {plural(len(stream), 'token')}, need "
                        f"at least 2")
    return evaluate_windows(model, windows, threads, batch_size, micro_batch, pad_id, precision,
                            matmul=matmul)


def evaluate_windows(model: CLLMModel, windows: NDArray[np.int32], threads: int,
                     batch_size: int, micro_batch: int, pad_id: int, precision: str = "fp32",
                     labelled: bool = False, matmul: str = "blas") -> tuple[float, int, int]:
    """(summed loss, counted targets, windows) of `windows` (labelled: the engine's labelled
    windows of records, ids then labels), as evaluate_stream sums them."""
    loss_sum, counted = 0.0, 0
    with Engine(model.config, model.flat, threads, min(micro_batch, batch_size),
                batch_size, pad_id=pad_id, precision=precision, labelled=labelled,
                matmul=matmul) as engine, \
            ItemProgress("evaluating", len(windows), unit="window") as progress:
        for start in range(0, len(windows), engine.max_windows):
            part = windows[start:start + engine.max_windows]
            engine.evaluate(part)
            for loss, tokens, *_ in engine.results():
                loss_sum += loss
                counted += tokens
            progress.add(len(part))
        progress.done()
    return loss_sum, counted, len(windows)


@dataclass(frozen=True)
class TextLoss:
    """What cllm_eval reports of text: `what` was evaluated (from `files` files, or None for a
    run's split), its tokens and windows, the counted targets, the mean loss, its perplexity
    and bits per byte (the loss in bits per token spread over the bytes the tokens stand for;
    None without the bytes)."""
    what: str
    files: Optional[int]
    tokens: int
    windows: int
    counted: int
    loss: float
    ppl: float
    bpb: Optional[float]

    @classmethod
    def of(cls, what: str, files: int | None, tokens: int, loss_sum: float, counted: int,
           windows: int, bytes_per_token: float | None) -> TextLoss:
        loss = loss_sum / counted if counted else math.nan
        ppl = perplexity(loss) if counted else math.nan
        bpb = loss / math.log(2) / bytes_per_token if counted and bytes_per_token else None
        return cls(what, files, int(tokens), windows, counted, loss, ppl, bpb)
