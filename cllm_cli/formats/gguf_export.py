"""A CLLM model as a GGUF file for llama.cpp, written with the `gguf` package (an optional
dependency: pip install gguf).

The architecture, its settings, the tensor names and layout are the model family's
(model/family.py), those llama.cpp's own converter writes (for GPT-2, model/gpt2.py:
architecture `gpt2`, `token_embd`, `position_embd`, `blk.{l}.attn_qkv`, ...; for the Llama
form, model/llama.py: `llama` or `qwen2`), plus the output layer as a copy of the token
embedding when it is tied. Linear weights keep our [out, in] layout, which is what llama.cpp
reads (GGUF lists dimensions innermost first, so a [3d, d] array shows as (d, 3d) there). All
tensors stay float32 (file type ALL_F32).

The tokenizer must be byte-level BPE (llama.cpp's "gpt2" tokenizer model): tokens, merges,
token types (special ids are CONTROL) and the special ids go into the tokenizer.ggml.* keys,
and tokenizer.ggml.pre names the pre-tokenizer the way llama.cpp knows it, read from the
tokenizer.json's own (PRE_TOKENIZERS: GPT-2's, SmolLM's, Qwen2's, Llama 3's); another one is
refused by name, as llama.cpp would split its text differently. llama.cpp has no word-level
tokenizer, so word and char models are refused. When the model has more rows than the
tokenizer has tokens, the rest are listed as "[PAD<id>]" of type UNUSED, as llama.cpp's
converter does.
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

# the splitting regular expressions of byte-level BPE tokenizers, by llama.cpp's name of them
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt-2": "ByteLevel (GPT-2's)", "smollm": "single digits, then ByteLevel",
                  "qwen2": "Qwen2's split, then ByteLevel", "llama-bpe": "Llama 3's split, then ByteLevel"}


def _pre_tokenizer(pre: Any) -> str | None:
    """llama.cpp's name (PRE_TOKENIZERS) of a tokenizer.json's pre_tokenizer, None when it
    is none of them."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps) or not steps:
        return None
    last, first = steps[-1], steps[:-1]
    if last.get("type") != "ByteLevel":
        return None
    if not first:
        return "gpt-2" if last.get("use_regex", True) else None
    if len(first) != 1:
        return None
    step = first[0]
    if step.get("type") == "Digits" and step.get("individual_digits") \
            and last.get("use_regex", True):
        return "smollm"
    pattern = (step.get("pattern") or {}).get("Regex")
    if step.get("type") == "Split" and not last.get("use_regex", True) \
            and step.get("behavior") == "Isolated" and not step.get("invert") \
            and isinstance(pattern, str):
        return {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(pattern)
    return None


def _bpe_vocabulary(tokenizer: Tokenizer,
                    vocab_size: int) -> tuple[list[str], list[Any], list[str], str]:
    """(tokens, token types, merges, llama.cpp's pre-tokenizer name) for the tokenizer.ggml
    keys."""
    if not isinstance(tokenizer, BPETokenizer):
        raise ConversionError(f"--format gguf needs a bpe tokenizer; llama.cpp has no "
                              f"{tokenizer.kind}-level tokenizer")
    spec = json.loads(tokenizer.json_bytes)
    model = spec.get("model") or {}
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None or spec.get("normalizer") is not None:
        raise ConversionError(f"--format gguf needs a byte-level BPE tokenizer.json (model BPE, "
                              f"no normalizer, a pre-tokenizer llama.cpp knows: "
                              f"{'; '.join(PRE_TOKENIZERS.values())})")
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
    return tokens, types, merges, pre


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
    tokens, types, merges, pre = _bpe_vocabulary(tokenizer, cfg.vocab_size)
    family = family_of(cfg)
    # a file that appears at `path` while this one is written is never replaced
    with atomic_path(path, ConversionError, "cannot write {path}: {reason}",
                     storage_error=WriteFailed, exclusive=not existed) as tmp:
        writer = gguf.GGUFWriter(tmp, family.gguf_architecture(cfg))
        try:
            writer.add_name("cllm")
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            family.gguf_hparams(writer, cfg)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                             ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id)):
                if getattr(tokenizer, key) >= 0:
                    add(getattr(tokenizer, key))
            writer.add_add_bos_token(False)
            tensors = named_views(cfg, flat)
            written = set()
            for name, tensor in tensors.items():
                written.add(family.gguf_name(name))
                writer.add_tensor(family.gguf_name(name), family.gguf_tensor(cfg, name, tensor))
            if family.gguf_output not in written:        # tied: the embedding's copy
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
