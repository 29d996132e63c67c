"""A CLLM model as a GGUF file for llama.cpp, written with the `gguf` package (an optional
dependency: pip install gguf).

The architecture, its settings, the tensor names and layout are the model family's
(model/family.py), those llama.cpp's own converter writes (for GPT-2, model/gpt2.py:
architecture `gpt2`, `token_embd`, `position_embd`, `blk.{l}.attn_qkv`, ...; for the Llama
form, model/llama.py: `llama` or `qwen2`), plus the output layer as a copy of the token
embedding when it is tied. Linear weights keep our [out, in] layout, which is what llama.cpp
reads (GGUF lists dimensions innermost first, so a [3d, d] array shows as (d, 3d) there). All
tensors stay float32 (file type ALL_F32).

The tokenizer goes into the tokenizer.ggml.* keys as gguf_vocab.py says: byte-level BPE as
llama.cpp's "gpt2" tokenizer model (tokens, merges, the pre-tokenizer by llama.cpp's name of
it), a byte-fallback BPE that writes spaces as "▁" (Llama 2's) as its "llama" (SPM) model
(tokens, scores that make llama.cpp join the pieces the merges join, add_space_prefix,
add_bos_token); what llama.cpp would split differently is refused by name, and word and char
models too (llama.cpp has no word-level tokenizer). When the model has more rows than the
tokenizer has tokens, the rest are listed as "[PAD<id>]" of type UNUSED, as llama.cpp's
converter does.
"""
from __future__ import annotations

import errno
import os

import gguf
import numpy as np
from numpy.typing import NDArray

from cllm_cli.errors import ConversionError, WriteFailed
from cllm_cli.fileio import atomic_path
from cllm_cli.formats.gguf_vocab import GGUFVocab, gguf_vocabulary
from cllm_cli.model import CLLMConfig, family_of, named_views
from cllm_cli.tokenizers import Tokenizer


def _no_space_left(path: str | os.PathLike) -> bool:
    """True when the file system of `path` has no block left for it. numpy's tofile, which
    GGUFWriter writes the tensors with, reports a short write without the system's errno;
    on a file system with no space left that was a full disk."""
    try:
        return os.statvfs(path).f_bavail == 0
    except OSError:
        return False


def _add_vocabulary(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """The tokenizer.ggml.* keys."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if key in vocab.special:
            add(vocab.special[key])
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)


def write_gguf(cfg: CLLMConfig, flat: NDArray[np.float32], tokenizer: Tokenizer, path: str | os.PathLike,
               force: bool = False) -> list[str]:
    """Writes the model as a GGUF file at `path`, atomically (a temporary file next to it,
    renamed over it), and returns what llama.cpp reads differently from the tokenizer (one
    line each, for the command to print). An existing `path` is refused unless force, and
    one that appears while the file is written is never replaced (refused then).
    ConversionError (one line) when the model or tokenizer cannot be expressed or the file
    cannot be written, WriteFailed when the storage fails (a full disk)."""
    path = os.fspath(path)
    existed = os.path.lexists(path)
    if existed and (not force or os.path.isdir(path)):
        what = "is a directory" if os.path.isdir(path) else "exists (--force replaces it)"
        raise ConversionError(f"{path} {what}")
    vocab = gguf_vocabulary(tokenizer, cfg.vocab_size)
    family = family_of(cfg)
    # a file that appears at `path` while this one is written is never replaced
    with atomic_path(path, ConversionError, "cannot write {path}: {reason}",
                     storage_error=WriteFailed, exclusive=not existed) as tmp:
        writer = gguf.GGUFWriter(tmp, family.gguf_architecture(cfg))
        try:
            writer.add_name("cllm")
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            family.gguf_hparams(writer, cfg)
            _add_vocabulary(writer, vocab)
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
    return vocab.notes
