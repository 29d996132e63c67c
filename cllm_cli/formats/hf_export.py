"""CLLM models as `transformers` directories: export_pretrained writes the parameters and
tokenizer as a directory of the model family's transformers class (model/family.py; GPT-2's:
GPT2LMHeadModel) that AutoModelForCausalLM / AutoTokenizer.from_pretrained load. The tensor
names, their layout and config.json's model fields are the family's; a tied output layer is
not written. hf_import.py reads such directories back.

Choices written down here:

- config.json: the family's fields (GPT-2: model_type gpt2, activation gelu_new (tanh GELU),
  layer_norm_epsilon 1e-5, n_positions = n_ctx = seq_len, n_inner = ff_dim, tied embeddings,
  dropout 0: export is for inference; set the *_pdrop fields to fine-tune with dropout), and
  the tokenizer's special ids. generation_config.json: cllm_inference's sampling defaults
  (temperature 0.8, top-k 40, top-p 0.95). A model with learned positions has none past
  seq_len, so prompt + new tokens must fit in it (our generate slides its window instead).
- Tokenizers: each kind writes its own tokenizer.json (Tokenizer.tokenizer_json): bpe copies
  its file; word and char build `tokenizers` WordLevel pipelines that give our ids and our
  decoding (tokenizers/word.py and char.py say how). transformers reads special tokens
  ("<eos>", ...) typed in text as those tokens; our tokenizers read them as text.
- The directory is written all or nothing (write_directory), and never over a directory that
  appears at OUT while it is written (another export's, a user's). Its temporary directories are
  named `.OUT.<pid>.<host>.<hex>.tmp` (and `.old` for the directory --force replaces): the
  writer's process id and a tag of its host name. A writer killed outright (kill -9, power
  loss) leaves them behind; the next export of the same OUT on the same host removes those
  whose process is gone (and says so), and puts back an `.old` directory when OUT itself is
  missing (the writer died between its two renames), so that no earlier export is lost.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Union

import numpy as np
from numpy.typing import NDArray

from cllm_cli.errors import ConversionError, WriteFailed
from cllm_cli.fileio import fsync_directory, reason, signals_held, write_error
from cllm_cli.formats.tensorfile import safetensors_header, write_tensors
from cllm_cli.model import CLLMConfig, family_of, named_views
from cllm_cli.tokenizers import Tokenizer

# a file of a directory write_directory writes: its bytes, or a function writing them to it
FileContent = Union[bytes, Callable[[BinaryIO], None]]

GENERATION: dict[str, Any] = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}

# ---------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------

def to_hf_state(cfg: CLLMConfig, flat: NDArray[np.float32]) -> dict[str, np.ndarray]:
    """{transformers name: float32 array in transformers' layout} of the flat parameters:
    views of `flat` (transposed ones where the family's transformers class stores [in, out]),
    no copies."""
    family = family_of(cfg)
    return {family.hf_name(name): t.T if family.hf_transposed(name) else t
            for name, t in named_views(cfg, flat).items()}


def write_safetensors(f: BinaryIO, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None) -> None:
    """{name: array} as a safetensors file in the open file f, streamed tensor by tensor
    (tensorfile.py): equal to safetensors.numpy.save's bytes, without a copy of the model."""
    header, names = safetensors_header(tensors, metadata)
    f.write(header)
    write_tensors(f, tensors, names)


def _special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{"pad", "unk", "bos", "eos"}: ids, -1 where the tokenizer has none."""
    return {"pad": tokenizer.pad_id, "unk": tokenizer.unk_id, "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id}


def hf_config(cfg: CLLMConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json of our model as its family's transformers class (dict), with the
    tokenizer's special ids."""
    ids = _special_ids(tokenizer)
    config: dict[str, Any] = family_of(cfg).hf_config(cfg)
    for key in ("bos", "eos", "pad"):
        if ids[key] >= 0:
            config[f"{key}_token_id"] = ids[key]
    return config


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """generation_config.json (dict)."""
    ids = _special_ids(tokenizer)
    config = dict(GENERATION)
    for key in ("bos", "eos", "pad"):
        if ids[key] >= 0:
            config[f"{key}_token_id"] = ids[key]
    return config


# ---------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------

def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def tokenizer_files(tokenizer: Tokenizer, model_max_length: int,
                    chat_template: str | None = None) -> dict[str, bytes]:
    """{file name: bytes}: tokenizer.json, tokenizer_config.json (with the run's
    chat_template, when it has one), special_tokens_map.json."""
    tokenizer_json = tokenizer.tokenizer_json()
    specials = {f"{key}_token": tokenizer.id_to_token(i)
                for key, i in _special_ids(tokenizer).items() if i >= 0}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **specials,
        **({"chat_template": chat_template} if chat_template else {}),
    }
    return {"tokenizer.json": tokenizer_json,
            "tokenizer_config.json": _json_bytes(config),
            "special_tokens_map.json": _json_bytes(specials)}


def hf_files(cfg: CLLMConfig, flat: NDArray[np.float32], tokenizer: Tokenizer,
             chat_template: str | None = None) -> dict[str, FileContent]:
    """{file name: bytes, or a function writing the file to an open file} of the
    transformers directory of a model; chat_template: the run's, written into
    tokenizer_config.json."""
    if len(tokenizer) > cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                              f"{cfg.vocab_size}")
    files: dict[str, FileContent] = {
        "config.json": _json_bytes(hf_config(cfg, tokenizer)),
        "generation_config.json": _json_bytes(generation_config(tokenizer)),
        "model.safetensors": lambda f: write_safetensors(f, to_hf_state(cfg, flat),
                                                         {"format": "pt"}),
    }
    files.update(tokenizer_files(tokenizer, cfg.seq_len, chat_template))
    return files


# ---------------------------------------------------------------------------------------
# Writing a directory atomically
# ---------------------------------------------------------------------------------------

def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _process_gone(pid: int) -> bool:
    """True when no process `pid` runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:                     # EPERM: it runs, as another user
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def remove_stale(outdir: str | os.PathLike) -> list[tuple[Path, int, str]]:
    """Removes the temporary directories of earlier writes of `outdir` on this host whose
    writer is gone (.OUT.<pid>.<host>.<hex>.tmp / .old); an .old one is renamed back to outdir
    when outdir is missing. Returns [(path, pid, what was done)]."""
    outdir = Path(outdir)
    pattern = re.compile(rf"\.{re.escape(outdir.name)}\.(\d+)\.{_host_tag()}\.[0-9a-f]+"
                         rf"\.(tmp|old)")
    try:
        names = sorted(os.listdir(outdir.parent))
    except OSError:
        return []
    done: list[tuple[Path, int, str]] = []
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or not _process_gone(int(m.group(1))):
            continue
        path = outdir.parent / name
        if m.group(2) == "old" and not (outdir.exists() or outdir.is_symlink()):
            with contextlib.suppress(OSError):
                os.rename(path, outdir)
                done.append((path, int(m.group(1)), "put back"))
                continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            done.append((path, int(m.group(1)), "removed"))
    return done


def _identity(path: str | os.PathLike) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def _appeared(outdir: str | os.PathLike) -> ConversionError:
    return ConversionError(f"{outdir} appeared while this export was writing it (another "
                           f"export?); it is left as it is: choose another OUT or try again")


def _into_free_name(tmp: str | os.PathLike, outdir: str | os.PathLike, claim: bool) -> None:
    """Renames directory tmp to outdir and never over anything that holds files: rename(2)
    replaces an empty directory but fails on a non-empty one or a file. With claim (outdir was
    absent at the start) outdir is first created empty here, and the rename goes over that
    one: mkdir fails when anything has appeared there meanwhile, even an empty directory."""
    created = False
    try:
        if claim:
            os.mkdir(outdir)
            created = True
        os.rename(tmp, outdir)
    except OSError as e:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(outdir)            # still the empty one made here: remove it
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(outdir) from None
        raise


def _over_previous(tmp: str | os.PathLike, outdir: str | os.PathLike, old: str | os.PathLike, previous: tuple[int, int]) -> None:
    """Replaces the directory `previous` (its identity) at outdir with tmp: outdir moved
    aside to `old`, tmp renamed in, `old` removed. When outdir is no longer that directory
    (another export replaced it meanwhile), it is put back and nothing is replaced."""
    try:
        os.rename(outdir, old)
    except FileNotFoundError:              # gone meanwhile: nothing left to replace
        _into_free_name(tmp, outdir, claim=True)
        return
    try:
        if _identity(old) != previous:
            raise _appeared(outdir)
        _into_free_name(tmp, outdir, claim=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, outdir)          # put the directory back
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_directory(outdir: str | os.PathLike, files: Mapping[str, FileContent],
                    force: bool = False) -> list[tuple[Path, int, str]]:
    """Writes {name: bytes or write(f)} as the directory `outdir`, all or nothing.

    The files go to a temporary directory next to outdir (each fsync'ed), which is then
    renamed to outdir. An existing empty outdir is replaced; a non-empty one only with force,
    and only the directory found there at the start (it is moved aside, the new one renamed
    in, then the old one removed). Anything else found at outdir when the files are written
    (another export's directory, a user's files) is never replaced: ConversionError, the
    other's files left as they are. ConversionError (one line) when outdir cannot be written,
    WriteFailed when the storage fails (a full disk); no temporary directory is left behind,
    also after SIGINT, SIGTERM or SIGHUP, and those of earlier writers killed outright are
    cleaned up first (remove_stale). Returns what remove_stale did."""
    outdir = Path(outdir)
    parent = outdir.parent
    stale = remove_stale(outdir) if parent.is_dir() else []
    previous: tuple[int, int] | None = None     # the identity of a non-empty outdir to replace
    absent = not (outdir.exists() or outdir.is_symlink())
    if not absent:
        if not outdir.is_dir() or outdir.is_symlink():
            raise ConversionError(f"{outdir} exists and is not a directory")
        if not _is_empty_dir(outdir):
            if not force:
                raise ConversionError(f"{outdir} exists and is not empty (--force replaces it)")
            previous = _identity(outdir)
    if not parent.is_dir():
        raise ConversionError(f"cannot write {outdir}: {parent} is not a directory")
    tag = f"{os.getpid()}.{_host_tag()}.{secrets.token_hex(6)}"
    tmp = parent / f".{outdir.name}.{tag}.tmp"
    old = parent / f".{outdir.name}.{tag}.old"
    try:
        os.mkdir(tmp)
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                if callable(data):
                    data(f)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_directory(tmp)
        with signals_held():
            if previous is None:
                _into_free_name(tmp, outdir, claim=absent)
            else:
                _over_previous(tmp, outdir, old, previous)
        fsync_directory(parent)
    except OSError as e:
        raise write_error(e, ConversionError, f"cannot write {outdir}: {reason(e)}",
                          WriteFailed) from None
    finally:                            # also after a signal: the partial files go
        with signals_held():
            shutil.rmtree(tmp, ignore_errors=True)
    return stale


def export_pretrained(cfg: CLLMConfig, flat: NDArray[np.float32], tokenizer: Tokenizer,
                      outdir: str | os.PathLike, force: bool = False,
                      chat_template: str | None = None) -> list[tuple[Path, int, str]]:
    """Writes the transformers directory of a model (see the module docstring), with the
    run's chat_template in tokenizer_config.json when given; returns the leftovers of killed
    exports it cleaned up (remove_stale)."""
    return write_directory(outdir, hf_files(cfg, flat, tokenizer, chat_template), force)

