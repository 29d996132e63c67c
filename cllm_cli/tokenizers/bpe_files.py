"""Where a BPE tokenizer's files are, and GPT-2's classic pair read as a tokenizer.json.

    tokenizer_source    a path -> (tokenizer.json, None) or (vocab.json, merges.txt)
    vocab_merges_json   vocab.json + merges.txt -> the bytes of the equivalent tokenizer.json
"""
from __future__ import annotations

import os
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from cllm_cli.errors import DataError
from cllm_cli.jsonfile import parse_json

# the names of the begin- and end-of-text tokens, first found first: ours, GPT-2's (and
# Qwen's), sentencepiece's (Llama 2, Mistral), Llama 3's
BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>")
EOS_NAMES = ("<eos>", "<|endoftext|>", "</s>", "<|end_of_text|>")
# what a path that holds no tokenizer lacks (tokenizer_source)
MISSING = "a tokenizer is a tokenizer.json, or a vocab.json with merges.txt next to it"


def _is_vocab_json(path: str | os.PathLike) -> bool:
    """True when `path` is a JSON object of token -> id (vocab.json), not a tokenizer.json
    (whose "model" is an object; GPT-2's vocab.json has a token "model" too). A file that
    cannot be read is left to the reader to report; DataError (one line) when it is not
    JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    spec = parse_json(data, path)
    return isinstance(spec, dict) and not isinstance(spec.get("model"), dict)


def vocab_merges_json(vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> bytes:
    """GPT-2's classic layout: vocab.json (token -> id) and merges.txt, as the tokenizer.json of
    GPT-2's byte-level BPE (ByteLevel pre-tokenizer without prefix space, ByteLevel decoder);
    the end-of-text, begin-of-text, <pad> and <unk> tokens present in the vocabulary are special
    tokens. ValueError (one line) when the files are not such a pair."""
    try:
        vocab, merges = models.BPE.read_file(os.fspath(vocab_path), os.fspath(merges_path))
        tk = tokenizers.Tokenizer(models.BPE(vocab, merges))
    except Exception as e:      # the library's Exception
        why = " ".join(str(e).split())[:200]
        raise ValueError(f"not a vocab.json and merges.txt pair ({why})") from None
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    specials = [name for name in ("<pad>", "<unk>", *BOS_NAMES, *EOS_NAMES) if name in vocab]
    specials.sort(key=vocab.__getitem__)
    tk.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)
                           for name in specials])
    return tk.to_str().encode("utf-8")


def tokenizer_source(path: str | os.PathLike, what: str | None = None) -> tuple[Path, Path | None]:
    """(tokenizer.json, None) or (vocab.json, merges.txt) that `path` names: a
    tokenizer.json, a vocab.json with merges.txt next to it, or a directory holding either
    (tokenizer.json first). DataError (one line: `what` and `path`, what is missing and
    MISSING) when there is neither."""
    path = Path(path)
    named = f"{what} {path}" if what else str(path)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return path / "tokenizer.json", None
        vocab = path / "vocab.json"
    elif path.suffix == ".json" and path.name != "tokenizer.json" and _is_vocab_json(path):
        vocab = path
    else:
        return path, None
    merges = vocab.parent / "merges.txt"
    if path.is_dir() and not vocab.is_file():
        raise DataError(f"{named}: a directory, not a tokenizer file, and it holds none; "
                        f"{MISSING}")
    if not merges.is_file():
        raise DataError(f"{named}: no merges.txt next to {vocab.name}; {MISSING}")
    return vocab, merges
