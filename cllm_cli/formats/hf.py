"""Hugging Face interop: CLLM models to and from `transformers` GPT-2 directories (SPEC
section 9).

    export_pretrained   CLLM parameters + tokenizer -> a directory that transformers'
                        AutoModelForCausalLM / AutoTokenizer.from_pretrained load
    load_pretrained     a GPT-2-family directory, or a .cllm file -> (CLLMConfig, flat
                        float32 parameters in SPEC section 1 layout, tokenizer)

Our model is GPT-2 itself (SPEC section 1), so the conversion is a renaming: our `wte`,
`h.{l}.attn.c_attn.weight`, ... are GPT-2's `transformer.wte.weight`,
`transformer.h.{l}.attn.c_attn.weight`, ..., except that GPT-2's Conv1D layers store their
weight as [in, out], the transpose of our [out, in]. The output projection is tied to `wte`
(no `lm_head.weight` is written).

Choices written down here:

- config.json: model_type gpt2, activation gelu_new (tanh GELU), layer_norm_epsilon 1e-5,
  n_positions = n_ctx = seq_len, n_inner = ff_dim, tied embeddings, dropout 0 (export is for
  inference; set the *_pdrop fields to fine-tune with dropout), the tokenizer's special ids.
  generation_config.json: cllm_inference's sampling defaults (temperature 0.8, top-k 40, top-p
  0.95). GPT-2 has no position past seq_len, so prompt + new tokens must fit in it (our
  generate slides its window instead).
- Tokenizers: bpe copies its tokenizer.json. word and char become `tokenizers` WordLevel
  pipelines giving our ids, with <unk> for what the vocabulary lacks. word: Lowercase
  normalizer, then a Split pre-tokenizer keeping `[\\p{L}\\p{N}_]+(?:'[\\p{L}\\p{N}_]+)*|
  [^\\p{L}\\p{N}_\\s]` (Python's `\\w+(?:'\\w+)*|[^\\w\\s]`; the library's own `\\w` would also take
  combining marks); no decoder, so transformers joins words with single spaces, and
  clean_up_tokenization_spaces removes the space before . , ! ? and n't 's 'm 've 're
  (our decode has further rules for brackets, quotes and hyphens). The library lower-cases
  one character at a time, so a final capital sigma becomes σ where Python writes ς. char:
  every character is a token; a Fuse decoder gives the text back unchanged.
  transformers reads special tokens ("<eos>", ...) typed in text as those tokens; our
  tokenizers read them as text.
- Loading refuses, with one line naming the setting, what our model cannot compute exactly:
  another model_type or architecture, another activation, layer_norm_epsilon other than
  1e-5, scale_attn_weights false, scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn,
  cross-attention, n_ctx != n_positions, an lm_head.weight that differs from wte (one equal
  to it is taken as tied), a missing tensor (GPT-2 without biases), an unexpected one,
  float64 weights (float16 and bfloat16 widen to float32 exactly), and weights only in
  pytorch_model.bin (not read: unpickling can run code). Tensor names may lack the
  "transformer." prefix (files saved from GPT2Model, as GPT-2's own), sharded files
  (model.safetensors.index.json) are read, and the causal-mask buffers old files carry are
  left out. The tokenizer is the directory's tokenizer.json (bpe kind).
"""
import contextlib
import json
import math
import os
import secrets
import shutil
import struct
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from cllm_cli._engine import num_parameters
from cllm_cli.config import CLLMConfig
from cllm_cli.errors import ConversionError
from cllm_cli.fileio import fsync_directory, reason
from cllm_cli.formats.checkpoint import load_checkpoint
from cllm_cli.formats.tensorfile import safetensors_header, write_tensors
from cllm_cli.layout import named_views
from cllm_cli.tokenizers import SPECIALS, TOKENIZER_KINDS, UNK, BPETokenizer, Tokenizer, tokenizer_class

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")   # causal masks old GPT-2 files carry
GENERATION = {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.95}

# Python's \w is letters, digits (numeric characters) and "_"; [^\w\s] every other non-space.
WORD_PATTERN = r"[\p{L}\p{N}_]+(?:'[\p{L}\p{N}_]+)*|[^\p{L}\p{N}_\s]"

_WIDEN = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


# ---------------------------------------------------------------------------------------
# Names and layouts
# ---------------------------------------------------------------------------------------

def gpt2_name(name):
    """transformers' GPT2LMHeadModel name of our parameter `name`."""
    return "transformer." + name + ("" if name.startswith(("h.", "ln_f.")) else ".weight")


def _is_conv1d(name):
    return name.endswith(CONV1D)


def to_gpt2_state(cfg, flat):
    """{GPT-2 name: float32 array in GPT-2's layout} of the flat parameters: views of `flat`
    (transposed ones for the Conv1D weights), no copies."""
    state = {}
    for name, t in named_views(cfg, flat).items():
        state[gpt2_name(name)] = t.T if _is_conv1d(name) else t
    return state


def write_safetensors(f, tensors, metadata):
    """{name: array} as a safetensors file in the open file f, streamed tensor by tensor
    (tensorfile.py): equal to safetensors.numpy.save's bytes, without a copy of the model."""
    header, names = safetensors_header(tensors, metadata)
    f.write(header)
    write_tensors(f, tensors, names)


def _special_ids(tokenizer):
    """{"pad", "unk", "bos", "eos"}: ids, -1 where the tokenizer has none."""
    return {"pad": tokenizer.pad_id, "unk": tokenizer.unk_id, "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id}


def _token(tokenizer, i):
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.id_to_token(i)
    return tokenizer.itos[i]


def gpt2_config(cfg, tokenizer):
    """config.json of our model as a transformers GPT-2 (dict)."""
    ids = _special_ids(tokenizer)
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_ctx": cfg.seq_len,
        "n_embd": cfg.embed_dim,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.ff_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }
    for key in ("bos", "eos", "pad"):
        if ids[key] >= 0:
            config[f"{key}_token_id"] = ids[key]
    return config


def generation_config(tokenizer):
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

def word_char_pipeline(tokenizer):
    """A `tokenizers` WordLevel pipeline giving the ids of a word or char Tokenizer."""
    vocab = {t: i for i, t in enumerate(tokenizer.itos)}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[UNK]))
    if tokenizer.kind == "word":
        tk.normalizer = normalizers.Lowercase()
        tk.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(WORD_PATTERN),
                                                behavior="removed", invert=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
        tk.decoder = decoders.Fuse()
    tk.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                           for s in SPECIALS])
    return tk


def _json_bytes(obj):
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def tokenizer_files(tokenizer, model_max_length):
    """{file name: bytes}: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    if isinstance(tokenizer, BPETokenizer):
        tokenizer_json = tokenizer.json_bytes
    else:
        tokenizer_json = word_char_pipeline(tokenizer).to_str().encode("utf-8")
    specials = {f"{key}_token": _token(tokenizer, i)
                for key, i in _special_ids(tokenizer).items() if i >= 0}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": tokenizer.kind == "word",
        "add_bos_token": False,
        "add_eos_token": False,
        **specials,
    }
    return {"tokenizer.json": tokenizer_json,
            "tokenizer_config.json": _json_bytes(config),
            "special_tokens_map.json": _json_bytes(specials)}


def hf_files(cfg, flat, tokenizer):
    """{file name: bytes, or a function writing the file to an open file} of the
    transformers directory of a model."""
    if len(tokenizer) > cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                              f"{cfg.vocab_size}")
    files = {
        "config.json": _json_bytes(gpt2_config(cfg, tokenizer)),
        "generation_config.json": _json_bytes(generation_config(tokenizer)),
        "model.safetensors": lambda f: write_safetensors(f, to_gpt2_state(cfg, flat),
                                                         {"format": "pt"}),
    }
    files.update(tokenizer_files(tokenizer, cfg.seq_len))
    return files


# ---------------------------------------------------------------------------------------
# Writing a directory atomically
# ---------------------------------------------------------------------------------------

def _is_empty_dir(path):
    with os.scandir(path) as it:
        return next(it, None) is None


def write_directory(outdir, files, force=False):
    """Writes {name: bytes or write(f)} as the directory `outdir`, all or nothing.

    The files go to a temporary directory next to outdir (each fsync'ed), which is then
    renamed to outdir. An existing empty outdir is replaced; a non-empty one only with force
    (it is moved aside, the new one renamed in, then the old one removed). ConversionError
    (one line) when outdir cannot be written; no temporary directory is left behind."""
    outdir = Path(outdir)
    parent = outdir.parent
    if outdir.exists() or outdir.is_symlink():
        if not outdir.is_dir() or outdir.is_symlink():
            raise ConversionError(f"{outdir} exists and is not a directory")
        if not force and not _is_empty_dir(outdir):
            raise ConversionError(f"{outdir} exists and is not empty (--force replaces it)")
    if not parent.is_dir():
        raise ConversionError(f"cannot write {outdir}: {parent} is not a directory")
    tag = secrets.token_hex(6)
    tmp = parent / f".{outdir.name}.{tag}.tmp"
    old = parent / f".{outdir.name}.{tag}.old"
    moved_aside = replaced = False
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
        if outdir.exists() and not _is_empty_dir(outdir):
            os.rename(outdir, old)
            moved_aside = True
        os.rename(tmp, outdir)          # also replaces an empty directory
        replaced = True
        fsync_directory(parent)
    except OSError as e:
        raise ConversionError(f"cannot write {outdir}: {reason(e)}") from None
    finally:                            # also after Ctrl-C
        if moved_aside and not replaced:
            with contextlib.suppress(OSError):
                os.rename(old, outdir)  # put the previous directory back
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced:
            shutil.rmtree(old, ignore_errors=True)


def export_pretrained(cfg, flat, tokenizer, outdir, force=False):
    """Writes the transformers GPT-2 directory of a model (see the module docstring)."""
    write_directory(outdir, hf_files(cfg, flat, tokenizer), force)


# ---------------------------------------------------------------------------------------
# Checkpoints with their tokenizer
# ---------------------------------------------------------------------------------------

def load_checkpoint_with_tokenizer(path, tokenizer_path=None):
    """(CLLMConfig, flat params, tokenizer, meta) of a .cllm file.

    The tokenizer is the checkpoint's kind, read from tokenizer_path or from the file next
    to the checkpoint (vocab.txt, or tokenizer.json for bpe); its hash must be the one the
    checkpoint records. CheckpointError, DataError or ConversionError (one line) otherwise."""
    ckpt = load_checkpoint(path)
    cfg, meta = ckpt["config"], ckpt["meta"]
    kind = meta.get("tokenizer", "word")
    if kind not in TOKENIZER_KINDS:
        raise ConversionError(f"{path}: unknown tokenizer kind {kind!r} in the checkpoint")
    if tokenizer_path is None:
        name = tokenizer_class(kind).file_name
        tokenizer_path = Path(path).resolve().parent / name
        if not tokenizer_path.exists():
            raise ConversionError(f"no {name} next to {path} (looked for "
                                  f"{tokenizer_path})")
    tokenizer = Tokenizer.load(tokenizer_path, kind)
    want = meta.get("vocab_hash")
    if want is not None and tokenizer.vocab_hash != want:
        raise ConversionError(f"{tokenizer_path} is not the tokenizer {path} was trained with "
                              f"(hash {tokenizer.vocab_hash[:12]}, checkpoint expects "
                              f"{str(want)[:12]})")
    if len(tokenizer) > cfg.vocab_size:
        raise ConversionError(f"{tokenizer_path} has {len(tokenizer)} tokens but the model in "
                              f"{path} has a vocabulary of {cfg.vocab_size}")
    return cfg, ckpt["params"], tokenizer, meta


# ---------------------------------------------------------------------------------------
# Loading a transformers GPT-2 directory
# ---------------------------------------------------------------------------------------

def _read_json(path):
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({reason(e)})") from None
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return obj


def _safetensors_index(path):
    """{tensor name: (dtype, shape, absolute byte offset, byte length)} of one file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({reason(e)})") from None
    except (ValueError, UnicodeDecodeError):
        raise ConversionError(f"{path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    index = {}
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            index[name] = (info["dtype"], tuple(int(s) for s in info["shape"]), 8 + n + begin,
                           end - begin)
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: malformed header entry for {name!r}") from None
    return index


def _read_tensor(path, name, entry):
    """float32 array of one tensor; float16 and bfloat16 widen exactly."""
    dtype, shape, offset, length = entry
    if dtype not in _WIDEN:
        raise ConversionError(f"{path}: tensor {name} is {dtype}; only F32, F16 and BF16 "
                              f"convert to float32 exactly")
    count = math.prod(shape)
    if length != count * _WIDEN[dtype].itemsize:
        raise ConversionError(f"{path}: tensor {name}: shape {list(shape)} does not match its "
                              f"{length} bytes")
    try:
        raw = np.fromfile(path, dtype=_WIDEN[dtype], count=count, offset=offset)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({reason(e)})") from None
    if raw.size != count:
        raise ConversionError(f"{path}: truncated in tensor {name}")
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return raw.astype(np.float32).reshape(shape)


def _weight_files(directory):
    """{tensor name: (file, index entry)} of model.safetensors or its shards."""
    single = directory / "model.safetensors"
    index_path = directory / "model.safetensors.index.json"
    if single.exists():
        return {name: (single, e) for name, e in _safetensors_index(single).items()}
    if index_path.exists():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index_path}: no weight_map")
        found = {}
        for shard in sorted(set(weight_map.values())):
            for name, e in _safetensors_index(directory / shard).items():
                found[name] = (directory / shard, e)
        return found
    for other in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"):
        if (directory / other).exists():
            raise ConversionError(f"{directory}: weights only in {other}; only model.safetensors "
                                  f"is read (save the model with safe_serialization)")
    raise ConversionError(f"{directory}: no model.safetensors")


def _setting(config, key, default):
    return config[key] if config.get(key) is not None else default


def _check_gpt2_config(path, config):
    """Refuses a config.json our model cannot compute exactly; returns the CLLMConfig."""
    def refuse(what):
        raise ConversionError(f"{path}: {what}")

    model_type = config.get("model_type")
    if model_type != "gpt2":
        refuse(f"model_type {model_type!r} is not supported (only gpt2)")
    for arch in config.get("architectures") or []:
        if arch not in ("GPT2LMHeadModel", "GPT2Model"):
            refuse(f"architectures {arch!r} is not supported (only GPT2LMHeadModel)")
    act = _setting(config, "activation_function", "gelu_new")
    if act not in GELU_TANH:
        refuse(f"activation_function {act!r} is not supported (only tanh GELU: "
               f"{', '.join(GELU_TANH)})")
    eps = _setting(config, "layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        refuse(f"layer_norm_epsilon {eps} is not supported (only {LAYER_NORM_EPS})")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        value = _setting(config, key, want)
        if value != want:
            refuse(f"{key} {json.dumps(value)} is not supported (only {json.dumps(want)})")
    n_positions = _setting(config, "n_positions", 1024)
    if config.get("n_ctx") is not None and config["n_ctx"] != n_positions:
        refuse(f"n_ctx {config['n_ctx']} differs from n_positions {n_positions}")
    n_embd = _setting(config, "n_embd", 768)
    try:
        return CLLMConfig(vocab_size=_setting(config, "vocab_size", 50257), embed_dim=n_embd,
                          num_layers=_setting(config, "n_layer", 12),
                          num_heads=_setting(config, "n_head", 12),
                          ff_dim=_setting(config, "n_inner", 4 * n_embd), seq_len=n_positions)
    except (TypeError, ValueError) as e:
        refuse(f"model size not supported: {e}")


def _load_gpt2_directory(directory):
    directory = Path(directory)
    config_path = directory / "config.json"
    config = _read_json(config_path)
    cfg = _check_gpt2_config(config_path, config)
    tied = _setting(config, "tie_word_embeddings", True)

    files = {}
    for name, where in _weight_files(directory).items():
        short = name[len("transformer."):] if name.startswith("transformer.") else name
        if short.endswith(IGNORED_BUFFERS):
            continue
        files[short] = (name, *where)
    flat = np.empty(num_parameters(cfg), dtype=np.float32)
    for name, view in named_views(cfg, flat).items():
        shape = view.shape
        key = gpt2_name(name)[len("transformer."):]
        if key not in files:
            raise ConversionError(f"{directory}: missing tensor {gpt2_name(name)} (a GPT-2 "
                                  f"without it cannot be represented)")
        full, path, entry = files.pop(key)
        hf_shape = shape[::-1] if _is_conv1d(name) else shape
        if entry[1] != tuple(hf_shape):
            raise ConversionError(f"{path}: tensor {full} has shape {list(entry[1])}, "
                                  f"config.json needs {list(hf_shape)}")
        t = _read_tensor(path, full, entry)
        view[...] = t.T if _is_conv1d(name) else t
    head = files.pop("lm_head.weight", None)
    if head is not None:
        full, path, entry = head
        wte = flat[:cfg.vocab_size * cfg.embed_dim]
        if (entry[1] != (cfg.vocab_size, cfg.embed_dim)
                or not np.array_equal(_read_tensor(path, full, entry).reshape(-1), wte)):
            raise ConversionError(f"{path}: lm_head.weight differs from transformer.wte.weight "
                                  f"(untied output layer is not supported)")
    elif not tied:
        raise ConversionError(f"{config_path}: tie_word_embeddings false and no lm_head.weight "
                              f"(untied output layer is not supported)")
    if files:
        names = sorted(full for full, _, _ in files.values())
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        raise ConversionError(f"{directory}: unexpected tensor {names[0]}{more}")

    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.exists():
        raise ConversionError(f"{directory}: no tokenizer.json (a fast tokenizer file is needed)")
    tokenizer = BPETokenizer.load(tokenizer_path)
    if len(tokenizer) > cfg.vocab_size:
        raise ConversionError(f"{tokenizer_path} has {len(tokenizer)} tokens but config.json "
                              f"has vocab_size {cfg.vocab_size}")
    return cfg, flat, tokenizer


def load_pretrained(path):
    """(CLLMConfig, flat float32 params in SPEC section 1 layout, tokenizer) of a
    transformers GPT-2-family directory (config.json, model.safetensors, tokenizer.json) or a
    .cllm file (with the tokenizer next to it). Raises ConversionError, CheckpointError or
    DataError with one line naming the file and the setting that cannot be represented."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConversionError(f"{path}: no config.json (not a transformers model "
                                  f"directory; give a .cllm file for a CLLM checkpoint)")
        return _load_gpt2_directory(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    cfg, flat, tokenizer, _ = load_checkpoint_with_tokenizer(path)
    return cfg, flat, tokenizer
