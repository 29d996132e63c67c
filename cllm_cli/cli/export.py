"""cllm_export: a trained checkpoint as a Hugging Face `transformers` model directory, as a
GGUF file for llama.cpp, or a LoRA run's adapters as a PEFT adapter directory.

    checkpoint + its tokenizer file -> hf.export_pretrained   (--format hf, the default)
                                    -> gguf_export.write_gguf (--format gguf)
    LoRA checkpoint                 -> peft_export.export_peft (--format peft)

Choices written down here:

- CHECKPOINT may be a .cllm file or a checkpoint directory (its final_model.cllm, else its
  newest checkpoint_step_<N>.cllm), as for cllm_inference. The tokenizer is the file next to
  the checkpoint (vocab.txt, or tokenizer.json for bpe) unless --vocab says otherwise; its
  hash must be the one the checkpoint records.
- The format is --format, else OUT's name: a name ending in .gguf is a GGUF file, any other
  a transformers directory. Success prints on stdout what was written, where, and how to load
  it (the Python lines for transformers, the llama-completion line for GGUF, with the context length:
  neither runtime can look past seq_len tokens). What llama.cpp reads differently from the
  tokenizer (gguf_vocab.py: a text that starts with a space, for a Metaspace tokenizer) is
  said in a warning line on stderr.
- OUT is a directory for --format hf, written all at once (a temporary directory renamed into
  place); an existing non-empty OUT is refused unless --force, which replaces it. What
  appears at OUT while the export writes (another export's directory) is never replaced:
  the export is refused then, the other's files left as they are. For --format
  gguf OUT is a file, written atomically, refused when it exists unless --force. --force
  replaces a directory by a directory and a file by a file only: an OUT of the other kind is
  refused whatever --force says. OUT may never hold the checkpoint or its tokenizer, nor a
  LoRA checkpoint's base model (the adapters cannot be read without it).
- A temporary directory left by an export killed outright (kill -9) next to OUT is removed
  by the next export of OUT, saying so in one line on stderr (hf_export.remove_stale).
- A LoRA checkpoint exports as its base with the adapters merged in (hf, gguf), or as the
  adapters alone (--format peft), whose adapter_config.json names the base the run started
  from, which must still be there, the same model (checked by its hash as every reader does); PEFT loads them onto that base as a transformers model (a .cllm base must be exported
  with --format hf first: the printed lines say so).
- Exit status: 0 done, 2 bad usage or input (one line on stderr), 1 a missing optional
  package (gguf) or storage that fails (a full disk), 128 + the signal's number after
  SIGINT, SIGTERM or SIGHUP (one line; no temporary file or directory is left).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from cllm_cli.cli.common import HelpFormatter, Parser, name_defaults, run_main
from cllm_cli.errors import CheckpointError, ConversionError, DataError, MissingDependency, UsageError
from cllm_cli.fileio import special_kind
from cllm_cli.formats import (
    export_peft,
    export_pretrained,
    load_checkpoint,
    load_lora_base,
    load_model_files,
    resolve_checkpoint,
)
from cllm_cli.formats.model_files import is_transformers_directory
from cllm_cli.model import CLLMConfig, family_of

PROG = "cllm_export"
FORMATS = ("hf", "gguf", "peft")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Convert a model trained by train_model into a Hugging Face transformers "
                    "directory of the model's class (config.json, model.safetensors, "
                    "tokenizer.json, ...) that "
                    "AutoModelForCausalLM and AutoTokenizer load, or into a GGUF file for "
                    "llama.cpp.",
        epilog="Example: cllm_export checkpoints/final_model.cllm my-model; then in Python: "
               "AutoModelForCausalLM.from_pretrained('my-model')",
        formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .cllm file, or a checkpoint directory (its final_model.cllm, else "
                        "its newest checkpoint_step_<N>.cllm)")
    p.add_argument("out", metavar="OUT",
                   help="directory to create (--format hf or peft), or file (--format gguf)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="hf: a transformers directory of the model's class (a LoRA run's "
                        "adapters merged in); gguf: one file for llama.cpp (bpe tokenizer "
                        "only); peft: a LoRA run's adapters alone, as a PEFT adapter directory. "
                        "Default: gguf when OUT ends in .gguf, else hf")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT of the kind the format writes: a directory "
                        "(--format hf or peft; a non-empty one too) or a file (--format gguf). "
                        "A file is never replaced by a directory, nor a directory by a file")
    p.add_argument("--vocab", metavar="PATH", default=None,
                   help="the training run's tokenizer file (vocab.txt or tokenizer.json; for "
                        "bpe also GPT-2's vocab.json with merges.txt next to it) (default: the "
                        "one next to the checkpoint)")
    return name_defaults(p)


def _inside(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    real, top = Path(path).resolve(), Path(directory).resolve()
    return real == top or top in real.parents


def check_out_kind(fmt: str, out: str) -> None:
    """UsageError when OUT exists as the other kind of path than `fmt` writes (--force
    replaces only a directory by a directory, a regular file by a file), or as a device,
    pipe or socket, which no export replaces (renaming a file over /dev/null would put a
    file in its place)."""
    if not os.path.lexists(out):
        return
    kind = special_kind(out)
    if kind is not None:
        raise UsageError(f"{out} is {kind}, not a file or directory: an export never "
                         f"replaces it, --force or not; choose another OUT")
    if fmt == "gguf" and os.path.isdir(out):
        raise UsageError(f"{out} is a directory: --format gguf writes a file, and --force "
                         f"replaces only a file")
    if fmt != "gguf" and not os.path.isdir(out):
        raise UsageError(f"{out} is a file: --format {fmt} writes a directory, and --force "
                         f"replaces only a directory (--format gguf, or an OUT ending in "
                         f".gguf, writes a file)")


def output_format(args: argparse.Namespace) -> str:
    """--format, else what OUT's name says: gguf for a name ending in .gguf, else hf."""
    if args.format is not None:
        return args.format
    return "gguf" if Path(args.out).suffix.lower() == ".gguf" else "hf"


def how_to_load(fmt: str, out: str, cfg: CLLMConfig, base: str | None = None) -> str:
    """What success prints on stdout: what was written, where, and how to load it (base:
    the base model of a PEFT adapter directory)."""
    if fmt == "peft":
        hf_base = base if is_transformers_directory(base) else "BASE-HF"   # type: ignore[arg-type]
        first = "" if hf_base == base else (
            f"its base {base} is a .cllm model: export it first with\n"
            f"  cllm_export {shlex.quote(str(base))} BASE-HF\n")
        return (f"wrote a PEFT LoRA adapter directory to {out}\n{first}"
                f"load it in Python with:\n"
                f"  from transformers import AutoModelForCausalLM\n"
                f"  from peft import PeftModel\n"
                f"  model = PeftModel.from_pretrained("
                f"AutoModelForCausalLM.from_pretrained({hf_base!r}), {str(out)!r})\n")
    if fmt == "gguf":
        return (f"wrote a GGUF file (llama.cpp) to {out}; context length {cfg.seq_len} tokens\n"
                f"run it with: llama-completion -m {shlex.quote(str(out))} -c {cfg.seq_len} "
                f"-no-cnv -p '...'\n")
    model_class = family_of(cfg).hf_config(cfg)["architectures"][0]
    return (f"wrote a transformers {model_class} directory to {out}; context length "
            f"{cfg.seq_len} tokens\n"
            f"load it in Python with:\n"
            f"  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"  model, tokenizer = AutoModelForCausalLM.from_pretrained({str(out)!r}), "
            f"AutoTokenizer.from_pretrained({str(out)!r})\n")


def check_base_outside(base: str, out: str) -> None:
    """UsageError when OUT holds the base model of a LoRA checkpoint: --force would replace
    it, and the checkpoint's adapters would have nothing to apply to."""
    if _inside(base, out):
        raise UsageError(f"{out} holds {base}, the base model of the LoRA checkpoint: "
                         f"choose another OUT")


def run_peft(args: argparse.Namespace) -> None:
    """--format peft: the adapters of a LoRA checkpoint."""
    if is_transformers_directory(args.checkpoint):
        raise UsageError(f"{args.checkpoint} is a transformers directory, not a LoRA run's "
                         f"checkpoint: --format peft writes adapters")
    path = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    if ckpt.lora is None:
        raise UsageError(f"{path} holds no LoRA adapters (train with --lora-rank); "
                         f"--format hf or gguf exports the whole model")
    if _inside(path, args.out):
        raise UsageError(f"{args.out} holds {path}: choose another OUT")
    check_base_outside(ckpt.lora["base_path"], args.out)
    load_lora_base(ckpt.lora, ckpt.config, path)    # the base the adapters name is there
    export_peft(ckpt.config, ckpt.lora, ckpt.params, args.out, force=args.force)
    sys.stdout.write(how_to_load("peft", args.out, ckpt.config, ckpt.lora["base_path"]))
    sys.stdout.flush()


def run(args: argparse.Namespace) -> None:
    fmt = args.format = output_format(args)
    check_out_kind(fmt, args.out)
    if fmt == "peft":
        return run_peft(args)
    files = load_model_files(args.checkpoint, args.vocab)
    cfg, flat, tokenizer = files.config, files.flat, files.tokenizer
    for source in (args.checkpoint, files.tokenizer_path):
        if _inside(source, args.out):
            raise UsageError(f"{args.out} holds {source}: choose another OUT")
    if files.lora_base is not None:
        check_base_outside(files.lora_base, args.out)
    if args.format == "hf":
        stale = export_pretrained(cfg, flat, tokenizer, args.out, force=args.force,
                                  chat_template=files.meta.get("chat_template"))
        if stale:
            named = ", ".join(f"{path.name} ({done}, pid {pid})" for path, pid, done in stale)
            print(f"{PROG}: cleaned up {len(stale)} temporary director"
                  f"{'y' if len(stale) == 1 else 'ies'} of killed exports of {args.out}: {named}",
                  file=sys.stderr, flush=True)
    else:
        try:
            from cllm_cli.formats.gguf_export import write_gguf
        except ImportError as e:
            raise MissingDependency(f"--format gguf needs the gguf package ({e}): "
                                    f"pip install gguf") from None
        for note in write_gguf(cfg, flat, tokenizer, args.out, force=args.force):
            print(f"{PROG}: warning: {note}", file=sys.stderr, flush=True)
    sys.stdout.write(how_to_load(fmt, args.out, cfg))
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: run(args),
                    {(UsageError, DataError, CheckpointError, ConversionError): 2,
                     MissingDependency: 1}, stop_without_output=True, announce_signals=True,
                    command_line=argv is None)


if __name__ == "__main__":
    sys.exit(main())
