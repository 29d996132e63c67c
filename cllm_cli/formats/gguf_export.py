"""A CLLM model as a GGUF file for llama.cpp, written with the `gguf` package (an optional
dependency: pip install gguf).

The architecture, its settings and the tensor names are the model family's (model/family.py),
those llama.cpp's own converter writes (for GPT-2, model/gpt2.py: architecture `gpt2`,
`token_embd`, `position_embd`, `blk.{l}.attn_qkv`, ...), plus the output layer as a copy of
the token embedding (the tie). Linear weights keep our [out, in] layout, which is what
llama.cpp reads (GGUF lists dimensions innermost first, so a [3d, d] array shows as (d, 3d)
there). All tensors stay float32 (file type ALL_F32).

The tokenizer must be byte-level BPE (llama.cpp's "gpt2" tokenizer model with GPT-2's
pre-tokenizer): tokens, merges, token types (special ids are CONTROL) and the special ids go
into the tokenizer.ggml.* keys. llama.cpp has no word-level tokenizer, so word and char
models are refused. When the model has more rows than the tokenizer has tokens, the rest are
listed as "[PAD<id>]" of type UNUSED, as llama.cpp's converter does.
"""
from __future__ import annotations

import errno
import json
import os
from typing import Any

import gguf
import numpy as np
from numpy.typing import NDArray

from cllm_cli.errors import ConversionError, WriteFailed
from cllm_cli.fileio import atomic_path
from cllm_cli.model import CLLMConfig, family_of, named_views
from cllm_cli.tokenizers import BPETokenizer, Tokenizer


def _bpe_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[Any], list[str]]:
    """(tokens, token types, merges) for the tokenizer.ggml keys."""
    if not isinstance(tokenizer, BPETokenizer):
        raise ConversionError(f"--format gguf needs a bpe tokenizer; llama.cpp has no "
                              f"{tokenizer.kind}-level tokenizer")
    spec = json.loads(tokenizer.json_bytes)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise ConversionError("--format gguf needs a byte-level BPE tokenizer.json (model BPE, "
                              "pre-tokenizer ByteLevel)")
    special = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
    tokens: list[str] = []
    types: list[Any] = []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i) if i < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges


def _no_space_left(path: str | os.PathLike) -> bool:
    """True when the file system of `path` has no block left for it. numpy's tofile, which
    GGUFWriter writes the tensors with, reports a short write without the system's errno;
    on a file system with no space left that was a full disk."""
    try:
        return os.statvfs(path).f_bavail == 0
    except OSError:
        return False


def write_gguf(cfg: CLLMConfig, flat: NDArray[np.float32], tokenizer: Tokenizer, path: str | os.PathLike,
               force: bool = False) -> None:
    """Writes the model as a GGUF file at `path`, atomically (a temporary file next to it,
    renamed over it). An existing `path` is refused unless force, and one that appears while
    the file is written is never replaced (refused then). ConversionError (one line)
    when the model or tokenizer cannot be expressed or the file cannot be written,
    WriteFailed when the storage fails (a full disk)."""
    path = os.fspath(path)
    existed = os.path.lexists(path)
    if existed and (not force or os.path.isdir(path)):
        what = "is a directory" if os.path.isdir(path) else "exists (--force replaces it)"
        raise ConversionError(f"{path} {what}")
    tokens, types, merges = _bpe_vocabulary(tokenizer, cfg.vocab_size)
    family = family_of(cfg)
    # a file that appears at `path` while this one is written is never replaced
    with atomic_path(path, ConversionError, "cannot write {path}: {reason}",
                     storage_error=WriteFailed, exclusive=not existed) as tmp:
        writer = gguf.GGUFWriter(tmp, family.gguf_architecture)
        try:
            writer.add_name("cllm")
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            family.gguf_hparams(writer, cfg)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("gpt-2")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                             ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id)):
                if getattr(tokenizer, key) >= 0:
                    add(getattr(tokenizer, key))
            writer.add_add_bos_token(False)
            tensors = named_views(cfg, flat)
            for name, tensor in tensors.items():
                writer.add_tensor(family.gguf_name(name), tensor)
            writer.add_tensor(family.gguf_output, tensors[family.embedding])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except OSError as e:
            if e.errno is None and _no_space_left(tmp):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            raise
        finally:
            writer.close()
