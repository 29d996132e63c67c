"""cllm_inference: text from a trained checkpoint, streamed while it is generated.

    checkpoint + tokenizer file -> Tokenizer, CLLMModel -> prompt ids -> model.generate -> stdout

Choices written down here:

- CHECKPOINT may be a .cllm file or a checkpoint directory (its final_model.cllm, else its
  newest checkpoint_step_<N>.cllm). The vocabulary is the tokenizer file next to the
  checkpoint (vocab.txt or tokenizer.json) unless --vocab says otherwise; it must be the one the model was trained with (its hash is
  compared with the one the checkpoint records), and the tokenizer kind is the checkpoint's.
- The prompt is echoed as typed (for the word tokenizer without trailing white space), then
  the continuation follows. Text is decoded incrementally: after each token the whole
  sequence is decoded again and only what was not yet printed is written, so the spacing
  rules of Tokenizer.decode hold across tokens. Decoding is prefix-stable, so nothing printed
  ever has to be taken back.
- Tokens come from CLLMModel.generate: a key/value cache runs the model on the new position
  only while the context fits in seq_len; once the window slides, every token runs the whole
  window again. The tokens are those of generation without the cache.
- --precision bf16 reads the weights' bf16 copy (half the bytes per token) and rounds the
  inputs of every product with a weight to bf16, with fp32 sums; the attention stays fp32.
  The default is the precision the model was trained in (fp32 for a transformers directory).
- Generation stops at <eos> (not printed) or after --max-tokens; the output ends with one
  newline. The same checkpoint, prompt, options and --seed give the same text.
- Exit status: 0 done, 2 bad usage or input (one line on stderr), 1 a runtime failure
  (standard output lost, a model whose logits are NaN everywhere), 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cllm_cli.api import load_model
from cllm_cli.cli.common import (
    HelpFormatter,
    Parser,
    add_sampling_options,
    add_seed_option,
    add_vocab_option,
    check_sampling_options,
    end_line,
    int_option,
    name_defaults,
    products_precision,
    run_main,
    warn_threads,
)
from cllm_cli.model.generation import stream
from cllm_cli.threads import default_threads

PROG = "cllm_inference"
MAX_LISTED_UNKNOWN = 8      # unknown prompt words named in the warning


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Generate text with a model trained by train_model, printing each token "
                    "as it is produced. The same seed gives the same text.",
        epilog="Example: cllm_inference checkpoints/final_model.cllm --prompt 'the old king' "
               "--max-tokens 40 --seed 7",
        formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .cllm file (a LoRA run's: its base with the adapters), a "
                        "checkpoint directory (its final_model.cllm, else its newest "
                        "checkpoint_step_<N>.cllm) or a transformers directory (GPT-2, Llama, "
                        "Qwen2, Mistral)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", metavar="TEXT", default="",
                   help="text the model continues (default: empty: the start of a new "
                        "document)")
    g.add_argument("--max-tokens", metavar="N", type=int_option(1), default=50,
                   help="tokens to generate at most; generation also stops at <eos> "
                        "(default: %(default)s)")
    add_seed_option(g)
    add_sampling_options(p.add_argument_group("sampling"))
    g = p.add_argument_group("files")
    add_vocab_option(g)
    return name_defaults(p)


def unknown_warning(unknown: Sequence[str]) -> str:
    named = ", ".join(repr(t) for t in unknown[:MAX_LISTED_UNKNOWN])
    more = len(unknown) - MAX_LISTED_UNKNOWN
    if more > 0:
        named += f" and {more} more"
    s = "s" if len(unknown) > 1 else ""
    return f"{PROG}: warning: prompt token{s} not in the vocabulary, read as <unk>: {named}"


def replaced_warning(replaced: Sequence[str | bytes]) -> str:
    """The warning for prompt bytes that are not UTF-8 (after "<tool>: warning: ")."""
    named = ", ".join(repr(b) for b in replaced[:MAX_LISTED_UNKNOWN])
    more = len(replaced) - MAX_LISTED_UNKNOWN
    if more > 0:
        named += f" and {more} more"
    return f"the prompt holds bytes that are not UTF-8, read as U+FFFD: {named}"


def run(args: argparse.Namespace) -> None:
    check_sampling_options(args)
    warn_threads(PROG, args.threads)
    model, tokenizer, _ = load_model(args.checkpoint, args.vocab)
    products = products_precision(args, model.meta)
    unknown = tokenizer.unknown_tokens(args.prompt)
    if unknown:
        print(unknown_warning(unknown), file=sys.stderr, flush=True)
    replaced = tokenizer.replaced_bytes(args.prompt)
    if replaced:
        print(f"{PROG}: warning: {replaced_warning(replaced)}", file=sys.stderr, flush=True)
    stream(model, tokenizer, args.prompt, sys.stdout, args.max_tokens, args.temperature,
           args.top_k, args.top_p, args.seed, args.threads or default_threads(), products)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: run(args), on_interrupt=end_line, stop_without_output=True,
                    command_line=argv is None)


if __name__ == "__main__":
    sys.exit(main())
