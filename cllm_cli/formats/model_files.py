"""A model and its tokenizer from what a user names: a .cllm file, a training run's checkpoint
directory, or a transformers GPT-2 directory. Every command that reads a model reads it here.

    resolve_checkpoint   a run directory -> its final_model.cllm, else its newest
                         checkpoint_step_<N>.cllm; anything else is taken as it is
    load_with_tokenizer  a .cllm file and the tokenizer it was trained with
    load_model_files     any of the three -> ModelFiles (config, flat parameters, tokenizer,
                         meta, tokenizer path)
    checkpoint_params    a loaded checkpoint's parameters (a LoRA one's merged into its base)
    load_lora_base       the base parameters a LoRA checkpoint names, checked by hash

A LoRA checkpoint loads as its base with the adapters merged in: every reader of a model
(inference, evaluation, export, --init-from) gets the fine-tuned model. The base of a LoRA
checkpoint is a full model (a transformers directory or a full .cllm), never another LoRA
checkpoint, so that reading a base never leads to another base (nor back to itself).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
from numpy.typing import NDArray

from cllm_cli.errors import CheckpointError, ConversionError, DataError, UsageError
from cllm_cli.formats.checkpoint import first_non_finite, latest_checkpoint
from cllm_cli.formats.checkpoint_load import Checkpoint, check_vocabulary, load_checkpoint
from cllm_cli.formats.hf_import import load_transformers_directory
from cllm_cli.model import CLLMConfig, content_hash, merge_adapters, named_views, shorten_positions
from cllm_cli.tokenizers import (
    TOKENIZER_KINDS,
    Tokenizer,
    detect_kind,
    load_tokenizer,
    tokenizer_class,
    tokenizer_source,
)


class ModelFiles(NamedTuple):
    """What load_model_files read: the model's config and flat float32 parameters, the
    tokenizer it was trained with, the checkpoint's metadata ({} for a transformers directory),
    the file the tokenizer came from, and for a LoRA checkpoint the base model its adapters
    were merged into."""
    config: CLLMConfig
    flat: np.ndarray
    tokenizer: Tokenizer
    meta: dict[str, Any]
    tokenizer_path: str | os.PathLike      # a Path, or the one the caller gave
    lora_base: str | None = None           # the base_path a LoRA checkpoint records


def is_transformers_directory(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").exists()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The .cllm file a run directory stands for (a file path is returned as it is)."""
    path = Path(path)
    if path.is_dir():
        final = path / "final_model.cllm"
        if final.is_file():
            return final
        newest = latest_checkpoint(path)
        if newest is None:
            raise UsageError(f"{path}: directory holds no final_model.cllm or "
                             f"checkpoint_step_<N>.cllm (nor a transformers config.json)")
        return Path(newest)
    return path


def load_with_tokenizer(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                        full: bool = False) -> ModelFiles:
    """(CLLMConfig, flat params, tokenizer, meta, tokenizer path) of a .cllm file.

    The tokenizer is the checkpoint's kind, read from tokenizer_path or from the file next
    to the checkpoint (vocab.txt, or tokenizer.json for bpe); its hash must be the one the
    checkpoint records. With `full` a LoRA checkpoint is refused (UsageError) instead of
    merged. CheckpointError or UsageError (one line) otherwise."""
    ckpt = load_checkpoint(path)
    if full and ckpt.lora is not None:
        raise UsageError(f"{path} holds LoRA adapters, not a full model")
    cfg, meta = ckpt.config, ckpt.meta
    kind = meta.get("tokenizer", "word")
    if kind not in TOKENIZER_KINDS:
        raise ConversionError(f"{path}: unknown tokenizer kind {kind!r} in the checkpoint")
    name = tokenizer_class(kind).file_name
    if tokenizer_path is None:
        tokenizer_path = Path(path).resolve().parent / name
        if not tokenizer_path.exists():
            raise UsageError(f"no {name} next to {path} (looked for {tokenizer_path}); give "
                             f"the training run's {name} with --vocab")
    elif Path(tokenizer_path).is_file():
        # a regular file of another kind is named as such; anything else (a directory, a
        # FIFO) is left to the kind's own checks
        given = detect_kind(tokenizer_path, "--vocab")
        if given is not None and given != kind and not _is_vocabulary(tokenizer_path, kind,
                                                                       meta.get("vocab_hash")):
            raise UsageError(f"--vocab {tokenizer_path} is a {given} tokenizer's file, but "
                             f"{path} was trained with a {kind} tokenizer: give its {name}")
    tokenizer = load_tokenizer(tokenizer_path, kind, "vocabulary")
    if meta.get("vocab_hash") is not None:      # files saved without one are taken as they are
        check_vocabulary(tokenizer.vocab_hash, tokenizer_path, meta["vocab_hash"], path)
    if len(tokenizer) > cfg.vocab_size:
        raise UsageError(f"{tokenizer_path} has {len(tokenizer)} tokens but the model in {path} "
                         f"has a vocabulary of {cfg.vocab_size}")
    return ModelFiles(cfg, checkpoint_params(ckpt, path), tokenizer, meta, tokenizer_path,
                      ckpt.lora["base_path"] if ckpt.lora is not None else None)


def _is_vocabulary(path: str | os.PathLike, kind: str, vocab_hash: str | None) -> bool:
    """Whether the file in `path`, read as a `kind` tokenizer, is the vocabulary whose hash
    a checkpoint records: a file that may be of two kinds (a vocab.txt of single characters)
    is the run's own when it is."""
    if vocab_hash is None:
        return False
    try:
        return load_tokenizer(path, kind, "vocabulary").vocab_hash == vocab_hash
    except (DataError, UsageError):
        return False


def checkpoint_params(ckpt: Checkpoint, path: str | os.PathLike) -> NDArray[np.float32]:
    """The parameters of a loaded checkpoint (`path`: its file): its own, or for a LoRA
    checkpoint its base with the adapters merged in."""
    lora = ckpt.lora
    if lora is None:
        return ckpt.params
    base = load_lora_base(lora, ckpt.config, path)
    merged = merge_adapters(ckpt.config, base, lora["spec"], ckpt.params)
    bad = first_non_finite(named_views(ckpt.config, merged))
    if bad:
        raise CheckpointError(f"{path} holds LoRA adapters that, merged into its base, give "
                              f"non-finite weights: {bad}")
    return merged


def load_lora_base(lora: Mapping[str, Any], cfg: CLLMConfig,
                   checkpoint: str | os.PathLike) -> NDArray[np.float32]:
    """The base parameters of a LoRA checkpoint (`lora`: its lora metadata, `cfg`: its model
    config): read from base_path (a full model load_model_files reads), cut to cfg's seq_len
    as the run cut them, and checked against base_sha256. CheckpointError (one line) when the
    base cannot be read, is a LoRA checkpoint, or is another model."""
    base = lora["base_path"]
    try:
        base_model = load_model_files(base, full=True)
    except (CheckpointError, ConversionError, UsageError) as e:
        raise CheckpointError(f"{checkpoint} holds LoRA adapters; its base model {base} cannot "
                              f"be read: {e}") from None
    base_cfg, flat = base_model.config, base_model.flat
    if base_cfg.seq_len > cfg.seq_len:
        base_cfg, flat = shorten_positions(base_cfg, flat, cfg.seq_len)
    if base_cfg != cfg:
        # the same weights may be read under another config (a config.json edited since)
        if base_cfg.family != cfg.family:
            diffs = f"family {base_cfg.family}, not {cfg.family}"
        else:
            theirs = base_cfg.to_dict()
            diffs = ", ".join(f"{k} {theirs[k]}, not {v}" for k, v in cfg.to_dict().items()
                              if theirs[k] != v)
        raise CheckpointError(f"{checkpoint} holds LoRA adapters for another model than its "
                              f"base {base} is now: the base has {diffs}")
    if content_hash(flat) != lora["base_sha256"]:
        raise CheckpointError(f"{checkpoint} holds LoRA adapters for a base with sha256 "
                              f"{lora['base_sha256'][:12]}, but {base} is another model "
                              f"(sha256 {content_hash(flat)[:12]})")
    return flat


def load_model_files(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                     full: bool = False) -> ModelFiles:
    """The ModelFiles (config, flat params, tokenizer, meta, tokenizer path) of a .cllm file, a run
    directory or a transformers GPT-2 directory (whose tokenizer is its tokenizer.json, or
    its vocab.json + merges.txt, and meta empty); with `full` a LoRA checkpoint is refused.
    One line (CheckpointError, ConversionError, UsageError) when it cannot be read."""
    if is_transformers_directory(path):
        if tokenizer_path is not None:
            raise UsageError(f"{path} is a transformers directory: its own tokenizer is used, "
                             f"--vocab does not apply")
        cfg, flat, tokenizer = load_transformers_directory(Path(path))
        return ModelFiles(cfg, flat, tokenizer, {}, tokenizer_source(path)[0])
    path = resolve_checkpoint(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    return load_with_tokenizer(path, tokenizer_path, full)
