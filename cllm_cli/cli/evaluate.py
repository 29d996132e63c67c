"""cllm_eval: loss, perplexity and bits per byte of a trained model on any text, or its
zero-shot accuracy on HellaSwag or LAMBADA (--task).

    checkpoint + its vocabulary -> text files (read and checked as train_model reads DATA)
    -> token stream (each file a document ending in <eos>) -> windows of T+1 tokens (as for
    validation) -> the spheres -> loss summed in micro-batch order

    --task: model + tokenizer -> the task file's items (cllm_cli/evaluation) -> each candidate
    continuation's summed log-probability through the Decoder -> acc, acc_norm or perplexity

Choices written down here:

- `--split val` (or `train`) evaluates a run's own split, read from the dataset.bin next to
  the checkpoint and cut with the run's --val-fraction. The windows, the batch size and the
  micro-batch are the run's, so `--split val` reproduces train_model's validation loss
  exactly.
- Bits per byte = (summed loss / ln 2) / counted targets x tokens / bytes of the evaluated
  text: the loss in bits per token, spread over the bytes the tokens stand for. For files the
  bytes are the UTF-8 bytes read; for a split of a run they are the corpus's bytes per token,
  as train_model reports it. It compares models whatever their tokenizer.
- .jsonl DATA are records (train_model's instruction data): each one window, the loss on
  the answers' tokens only, the messages rendered with the run's chat template; `--split`
  of an instruction run evaluates its held-out (or training) records, so it reproduces
  train_model's validation loss too. Bits per byte are not reported for records. Records
  of files are cut to the model's context as train_model cuts them; how many were cut, and
  left out (an answer longer than the context), is one warning on stderr and in --json.
- The batch size and micro-batch (how the loss is grouped) are the checkpoint's training
  settings; --threads only changes speed.
- The matrix products run in the precision the model was trained in (--precision to choose),
  and on the kernel it was trained with (its --matmul), so a bf16 or oneDNN run's
  `--split val` is its validation loss too.
- --task scores in fp32 (the Decoder's precision) whatever the model was trained in, and
  takes exactly one file; what is scored and how is written down in cllm_cli/evaluation. The
  progress line (stderr, only on a terminal) counts items, and without --task the windows
  evaluated; --json prints one object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Mapping, Sequence, TextIO

from cllm_cli.api import load_model
from cllm_cli.cli.common import (
    HelpFormatter,
    Parser,
    name_defaults,
    run_main,
    threads_option,
    warn_threads,
)
from cllm_cli.corpus import collect_files, is_instruction_data
from cllm_cli.corpus.files import ENCODING_ERRORS
from cllm_cli.errors import PrecisionError, UsageError
from cllm_cli.evaluation import (
    TASKS,
    TextLoss,
    evaluate_stream,
    evaluate_task,
    evaluate_windows,
    read_items,
    records_of_run,
    split_of_run,
    text_stream,
)
from cllm_cli.formats import resolve_checkpoint
from cllm_cli.model import precision
from cllm_cli.progress import ItemProgress, duration, fmt_loss, plural
from cllm_cli.threads import MAX_THREADS, default_threads

PROG = "cllm_eval"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Loss, perplexity and bits per byte of a model trained by train_model, on "
                    "any text files or on its run's own validation split; or its zero-shot "
                    "accuracy on HellaSwag or LAMBADA, scored as lm-evaluation-harness does.",
        epilog="Examples: cllm_eval checkpoints/final_model.cllm notes/*.txt --json; "
               "cllm_eval gpt2/ --task hellaswag hellaswag_val.jsonl",
        formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .cllm file (a LoRA run's: its base with the adapters), a "
                        "checkpoint directory (its final_model.cllm, else its newest "
                        "checkpoint_step_<N>.cllm) or a transformers directory (GPT-2, Llama, "
                        "Qwen2, Mistral)")
    p.add_argument("data", nargs="*", metavar="DATA",
                   help="text files, or directories (every file matching --glob below them); "
                        "with --task, the one task file")
    g = p.add_argument_group("what is evaluated")
    g.add_argument("--task", choices=tuple(TASKS), default=None,
                   help="score the zero-shot task in DATA instead: hellaswag (a jsonl file of "
                        "ctx, endings, label: acc and acc_norm) or lambada (a passage per line, "
                        "or JSON lines of {\"text\": passage}: a file named *.jsonl or *.json, "
                        "or whose first line is a JSON object; the target is its "
                        "last word: acc and perplexity) (default: none: the loss on DATA)")
    g.add_argument("--split", choices=("val", "train"), default=None,
                   help="evaluate the run's own validation or training split (dataset.bin next "
                        "to the checkpoint) instead of DATA (default: none: DATA)")
    g = p.add_argument_group("text files")
    g.add_argument("--glob", default="*.txt", help="file pattern inside directories "
                   "(default: %(default)s)")
    g.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                   help="refuse non-UTF-8 or binary files, or replace bad bytes with U+FFFD "
                        "(default: %(default)s)")
    g = p.add_argument_group("model")
    g.add_argument("--vocab", metavar="PATH", default=None,
                   help="tokenizer file (vocab.txt or tokenizer.json; for bpe also GPT-2's "
                        "vocab.json with merges.txt next to it, or their directory) the model "
                        "was trained with (default: the one next to the checkpoint)")
    g.add_argument("--threads", metavar="N", type=threads_option, default=None,
                   help="worker spheres, or with --task the threads that share each pass, 1 "
                        "to %d (default: all cores); the results do not depend on it"
                        % MAX_THREADS)
    g.add_argument("--precision", choices=precision.PRECISIONS, default=None,
                   help="of the matrix products (default: the one the model was trained in)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return name_defaults(p)


def check_task_options(args: argparse.Namespace) -> None:
    if len(args.data) != 1:
        raise UsageError(f"--task {args.task} takes one task file, got {len(args.data)}")
    # what each option is about, which a task does not have: it scores one UTF-8 file in fp32
    given = [(name, why) for name, value, default, why in (
        ("--split", args.split, None, "a task scores its own items, not a run's split"),
        ("--glob", args.glob, "*.txt", "a task reads one file, not a directory"),
        ("--encoding-errors", args.encoding_errors, "strict", "task files are UTF-8"),
        ("--precision", args.precision, None, "tasks are scored in fp32")) if value != default]
    if given:
        raise UsageError(f"{given[0][0]} does not apply with --task ({given[0][1]})")


def write_json(out: TextIO, record: Mapping[str, Any]) -> None:
    """One JSON object on a line; a number that is not finite becomes null."""
    out.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                          for k, v in record.items()}) + "\n")


def run_task(args: argparse.Namespace, out: TextIO) -> None:
    check_task_options(args)
    items = read_items(args.task, args.data[0])
    model, tokenizer, _ = load_model(args.checkpoint, args.vocab)
    result = evaluate_task(args.task, model, tokenizer, items,
                           args.threads or default_threads(),
                           lambda total: ItemProgress(args.task, total))
    summary = result.summary(args.checkpoint)
    if args.json:
        write_json(out, summary)
    else:
        out.write(f"{args.task}: {result.items:,} {plural(result.items, 'item')} in "
                  f"{duration(result.seconds)} "
                  f"({result.seconds_per_item:.3g} s per item)\n")
        for name, (value, stderr) in result.figures.items():
            spread = "" if stderr is None else f" ± {stderr:.4f}"
            out.write(f"{name:<11} {value:.4f}{spread}\n")
    out.flush()


def run(args: argparse.Namespace, out: TextIO) -> None:
    warn_threads(PROG, args.threads)
    if args.task:
        return run_task(args, out)
    if bool(args.data) == bool(args.split):
        raise UsageError("give DATA files or --split, not both" if args.data
                         else "nothing to evaluate: give DATA files or --split val")
    model, tokenizer, _ = load_model(args.checkpoint, args.vocab)
    config = (model.meta or {}).get("train_config") or {}
    files = collect_files(args.data, args.glob) if args.data else []
    if (model.meta or {}).get("records") and args.split or is_instruction_data(files):
        return run_records(args, out, model, tokenizer, files, config)
    if args.split:
        if not model.meta:
            raise UsageError(f"--split evaluates a training run's own split, and "
                             f"{args.checkpoint} is a transformers directory: give DATA files")
        stream, bytes_per_token = split_of_run(resolve_checkpoint(args.checkpoint), model,
                                               tokenizer, args.split)
        what, n_files = f"{args.split} split", None
    else:
        stream, size = text_stream(tokenizer, files, args.encoding_errors)
        bytes_per_token = size / len(stream)
        what, n_files = f"{len(files)} {plural(len(files), 'file')}", len(files)
    threads = args.threads or default_threads()
    products = args.precision or config.get("precision", "fp32")
    precision.require(products)
    kernel = run_kernel(config)
    loss_sum, counted, n_windows = evaluate_stream(
        model, stream, threads, int(config.get("batch_size", 32)),
        int(config.get("micro_batch", 4)), tokenizer.pad_id, products, kernel)
    result = TextLoss.of(what, n_files, len(stream), loss_sum, counted, n_windows,
                         bytes_per_token)
    if args.json:
        write_json(out, dataclasses.asdict(result))
    else:
        out.write(f"{'evaluated':<14} {'tokens':>10} {'windows':>8} {'loss':>8} {'ppl':>10} "
                  f"{'bits/byte':>9}\n")
        bpb = 'n/a' if result.bpb is None else f'{result.bpb:.4f}'
        out.write(f"{what:<14} {result.tokens:>10,} {n_windows:>8,} {fmt_loss(result.loss):>8} "
                  f"{result.ppl:>10.2f} {bpb:>9}\n")
    out.flush()


def run_kernel(config: Mapping[str, Any]) -> str:
    """The kernel of the fp32 weight products the run trained with (its stored --matmul), made
    runnable: evaluation computes as training did."""
    kernel = str(config.get("matmul", "blas"))
    try:
        precision.require_matmul(kernel)
    except PrecisionError as e:
        raise PrecisionError(f"the model was trained with --matmul {kernel}; {e}") from None
    return kernel


def run_records(args: argparse.Namespace, out: TextIO, model: Any, tokenizer: Any,
                files: Sequence[Any], config: Mapping[str, Any]) -> None:
    """The masked loss of records: .jsonl DATA, or an instruction run's --split."""
    windows, instructions = records_of_run(resolve_checkpoint(args.checkpoint) if args.split
                                           else args.checkpoint, model, tokenizer, args.split,
                                           files)
    cut = refused = 0
    if instructions is not None and (instructions.cut or instructions.refused):
        cut, refused = instructions.cut, instructions.refused
        print(f"{PROG}: warning: of {len(windows) + refused:,} records, {refused:,} left out "
              f"(answer longer than the model's context of {model.config.seq_len} tokens), "
              f"{cut:,} cut from the left of the prompt", file=sys.stderr, flush=True)
    products = args.precision or config.get("precision", "fp32")
    precision.require(products)
    loss_sum, counted, n_windows = evaluate_windows(
        model, windows, args.threads or default_threads(), int(config.get("batch_size", 32)),
        int(config.get("micro_batch", 4)), tokenizer.pad_id, products, labelled=True,
        matmul=run_kernel(config))
    what = (f"{args.split} split" if args.split
            else f"{len(files)} {plural(len(files), 'file')}")
    tokens = int((windows[:, windows.shape[1] // 2:] >= 0).sum())
    result = TextLoss.of(what, None if args.split else len(files), tokens, loss_sum, counted,
                         n_windows, None)
    if args.json:
        write_json(out, {**dataclasses.asdict(result), "records": n_windows, "cut": cut,
                         "refused": refused})
    else:
        out.write(f"{'evaluated':<14} {'records':>8} {'answer tokens':>14} {'loss':>8} "
                  f"{'ppl':>10}\n")
        out.write(f"{what:<14} {n_windows:>8,} {counted:>14,} {fmt_loss(result.loss):>8} "
                  f"{result.ppl:>10.2f}\n")
    out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    # intermixed: DATA may follow options (cllm_eval MODEL --task lambada FILE)
    args = build_parser().parse_intermixed_args(argv)
    return run_main(PROG, lambda: run(args, sys.stdout), stop_without_output=True,
                    announce_signals=True, command_line=argv is None)


if __name__ == "__main__":
    sys.exit(main())
