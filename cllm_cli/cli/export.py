"""cllm_export: a trained checkpoint as a Hugging Face `transformers` model directory, or as a
GGUF file for llama.cpp.

    checkpoint + its tokenizer file -> hf.export_pretrained   (--format hf, the default)
                                    -> gguf_export.write_gguf (--format gguf)

Choices written down here:

- CHECKPOINT may be a .cllm file or a checkpoint directory (its final_model.cllm, else its
  newest checkpoint_step_<N>.cllm), as for cllm_inference. The tokenizer is the file next to
  the checkpoint (vocab.txt, or tokenizer.json for bpe) unless --vocab says otherwise; its
  hash must be the one the checkpoint records.
- The format is --format, else OUT's name: a name ending in .gguf is a GGUF file, any other
  a transformers directory. Success prints on stdout what was written, where, and how to load
  it (the Python lines for transformers, the llama-cli line for GGUF, with the context length:
  neither runtime can look past seq_len tokens).
- OUT is a directory for --format hf, written all at once (a temporary directory renamed into
  place); an existing non-empty OUT is refused unless --force, which replaces it. For --format
  gguf OUT is a file, written atomically, refused when it exists unless --force. OUT may
  never hold the checkpoint or its tokenizer.
- A temporary directory left by an export killed outright (kill -9) next to OUT is removed
  by the next export of OUT, saying so in one line on stderr (hf_export.remove_stale).
- Exit status: 0 done, 2 bad usage or input (one line on stderr), 1 a missing optional
  package (gguf), 130 Ctrl-C.
"""
import sys
from pathlib import Path

from cllm_cli.cli.common import HelpFormatter, Parser, name_defaults, run_main
from cllm_cli.errors import CheckpointError, ConversionError, DataError, MissingDependency, UsageError
from cllm_cli.formats import export_pretrained, load_model_files

PROG = "cllm_export"
FORMATS = ("hf", "gguf")


def build_parser():
    p = Parser(
        prog=PROG,
        description="Convert a model trained by train_model into a Hugging Face transformers "
                    "GPT-2 directory (config.json, model.safetensors, tokenizer.json, ...) that "
                    "AutoModelForCausalLM and AutoTokenizer load, or into a GGUF file for "
                    "llama.cpp.",
        epilog="Example: cllm_export checkpoints/final_model.cllm my-model; then in Python: "
               "AutoModelForCausalLM.from_pretrained('my-model')",
        formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .cllm file, or a checkpoint directory (its final_model.cllm, else "
                        "its newest checkpoint_step_<N>.cllm)")
    p.add_argument("out", metavar="OUT",
                   help="directory to create (--format hf), or file (--format gguf)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="hf: a transformers GPT-2 directory; gguf: one file for llama.cpp "
                        "(bpe tokenizer only). Default: gguf when OUT ends in .gguf, else hf")
    p.add_argument("--force", action="store_true",
                   help="replace OUT when it exists (and, for a directory, is not empty)")
    p.add_argument("--vocab", metavar="PATH", default=None,
                   help="the training run's tokenizer file (vocab.txt or tokenizer.json; for "
                        "bpe also GPT-2's vocab.json with merges.txt next to it) (default: the "
                        "one next to the checkpoint)")
    return name_defaults(p)


def _inside(path, directory):
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def output_format(args):
    """--format, else what OUT's name says: gguf for a name ending in .gguf, else hf."""
    if args.format is not None:
        return args.format
    return "gguf" if Path(args.out).suffix.lower() == ".gguf" else "hf"


def how_to_load(fmt, out, cfg):
    """What success prints on stdout: what was written, where, and how to load it."""
    if fmt == "gguf":
        return (f"wrote a GGUF file (llama.cpp) to {out}; context length {cfg.seq_len} tokens\n"
                f"run it with: llama-cli -m {out} -c {cfg.seq_len}\n")
    return (f"wrote a transformers GPT-2 directory to {out}; context length {cfg.seq_len} "
            f"tokens (n_positions)\n"
            f"load it in Python with:\n"
            f"  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"  model, tokenizer = AutoModelForCausalLM.from_pretrained({str(out)!r}), "
            f"AutoTokenizer.from_pretrained({str(out)!r})\n")


def run(args):
    fmt = args.format = output_format(args)
    cfg, flat, tokenizer, _, tokenizer_file = load_model_files(args.checkpoint, args.vocab)
    for source in (args.checkpoint, tokenizer_file):
        if _inside(source, args.out):
            raise UsageError(f"{args.out} holds {source}: choose another OUT")
    if args.format == "hf":
        stale = export_pretrained(cfg, flat, tokenizer, args.out, force=args.force)
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
        write_gguf(cfg, flat, tokenizer, args.out, force=args.force)
    sys.stdout.write(how_to_load(fmt, args.out, cfg))
    sys.stdout.flush()


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: run(args),
                    {(UsageError, DataError, CheckpointError, ConversionError): 2,
                     MissingDependency: 1}, stop_without_output=True)


if __name__ == "__main__":
    sys.exit(main())
