"""cllm_export: a trained checkpoint as a Hugging Face `transformers` model directory, or as a
GGUF file for llama.cpp.

    checkpoint + its tokenizer file -> hf.export_pretrained   (--format hf, the default)
                                    -> gguf_export.write_gguf (--format gguf)

Choices written down here:

- CHECKPOINT may be a .cllm file or a checkpoint directory (its final_model.cllm, else its
  newest checkpoint_step_<N>.cllm), as for cllm_inference. The tokenizer is the file next to
  the checkpoint (vocab.txt, or tokenizer.json for bpe) unless --vocab says otherwise; its
  hash must be the one the checkpoint records.
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
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: a transformers GPT-2 directory; gguf: one file for llama.cpp "
                        "(bpe tokenizer only)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT when it exists (and, for a directory, is not empty)")
    p.add_argument("--vocab", metavar="PATH", default=None,
                   help="the training run's vocab.txt, or tokenizer.json for bpe (default: the "
                        "one next to the checkpoint)")
    return name_defaults(p)


def _inside(path, directory):
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def run(args):
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: run(args),
                    {(UsageError, DataError, CheckpointError, ConversionError): 2,
                     MissingDependency: 1}, stop_without_output=True)


if __name__ == "__main__":
    sys.exit(main())
