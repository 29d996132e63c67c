"""cllm_tokenize: text -> ids, ids -> text, and token statistics with a training run's
vocabulary (vocab.txt, or tokenizer.json for bpe and for files such as GPT-2's).

Modes (one per run):

    encode (default)  the ids of each DATA file: one line of space-separated ids per file,
                      or with --json one object {"file", "ids"} per line
    --decode          DATA holds ids separated by white space (or the JSON lines --json
                      writes, or JSON arrays of ids); prints the text of each file, or with
                      --json one object {"file", "text"} per line
    --stats           over all DATA files together: files, tokens, unknown tokens and their
                      rate, the --top most frequent tokens with their counts (with --json one
                      object)

DATA "-" is standard input. Text is read as train_model reads it (strict UTF-8, BOM dropped,
line ends normalised; binary input is refused as soon as it arrives); encoding adds no <eos>,
so decoding the ids gives the text back as the tokenizer sees it (lower-cased words, spacing by
the decode rules; bpe gives the text back exactly). --vocab must be a regular file. Exit status: 0 done, 2 bad usage or input
(one line on stderr), 1 standard output lost, 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import codecs
import json
import sys
from typing import Any, BinaryIO, Iterable, Mapping, Sequence, TextIO

from cllm_cli.cli.common import HelpFormatter, Parser, int_option, name_defaults, run_main
from cllm_cli.corpus import collect_files
from cllm_cli.corpus.files import decode_text as _decode
from cllm_cli.corpus.files import read_text
from cllm_cli.errors import UsageError
from cllm_cli.jsonfile import JSONError, loads
from cllm_cli.tokenizers import TOKENIZER_KINDS, Tokenizer, load_tokenizer, token_stats

PROG = "cllm_tokenize"
STDIN = "-"
STDIN_CHUNK = 1 << 16     # bytes read from standard input at a time


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Encode text into token ids with the vocabulary of a training run "
                    "(tokenizer file: vocab.txt or tokenizer.json, or GPT-2's vocab.json + "
                    "merges.txt), "
                    "decode ids back into text, or count tokens and unknown words.",
        epilog="Example: cllm_tokenize notes.txt --vocab checkpoints/vocab.txt --stats",
        formatter_class=HelpFormatter)
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="text files to encode, or files of ids with --decode; a directory "
                        "means every file matching --glob below it, as for train_model ('-' "
                        "reads standard input)")
    p.add_argument("--glob", default="*.txt",
                   help="file pattern inside directories (default: %(default)s)")
    g = p.add_argument_group("vocabulary")
    g.add_argument("--vocab", metavar="PATH", required=True,
                   help="tokenizer file (vocab.txt or tokenizer.json) of a training run (in "
                        "its checkpoint directory), any BPE tokenizer.json, or GPT-2's vocab.json "
                        "with merges.txt next to it (or their directory)")
    g.add_argument("--tokenizer", choices=("auto",) + TOKENIZER_KINDS, default="auto",
                   help="tokenizer the vocabulary was built with; auto: bpe for a JSON file "
                        "(tokenizer.json, vocab.json) or a directory, char when the vocabulary holds a white-space token "
                        "(a word vocabulary never does) or only single characters in code-point "
                        "order, else word (default: %(default)s)")
    g = p.add_argument_group("mode")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--decode", action="store_true",
                      help="read ids and print the text they stand for")
    mode.add_argument("--stats", action="store_true",
                      help="print token and unknown-token counts and the most frequent tokens")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true",
                   help="one JSON object per file (per run with --stats)")
    g.add_argument("--top", metavar="N", type=int_option(0, None), default=10,
                   help="most frequent tokens listed by --stats (default: %(default)s)")
    return name_defaults(p)


# ---------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------

def expand(names: Iterable[str], pattern: str) -> list[str]:
    """DATA arguments as files: a directory becomes its matching files, in sorted order."""
    files: list[str] = []
    for name in names:
        files.extend([name] if name == STDIN else map(str, collect_files([name], pattern)))
    return files


def read_input(name: str) -> str:
    """Text of a DATA argument, read as train_model reads a corpus file."""
    if name == STDIN:
        if sys.stdin is None:
            raise UsageError("standard input is closed")
        return read_stdin(sys.stdin.buffer)
    return read_text(name)


def read_stdin(stream: BinaryIO) -> str:
    """Standard input as text, checked chunk by chunk: binary input (a NUL byte, invalid
    UTF-8) is refused as soon as it arrives, so that `- < /dev/zero` ends at once."""
    data = bytearray()
    checker = codecs.getincrementaldecoder("utf-8")("strict")
    while chunk := stream.read(STDIN_CHUNK):
        try:
            checker.decode(chunk)
            binary = b"\x00" in chunk
        except UnicodeDecodeError:
            binary = True
        data += chunk
        if binary:
            break       # _decode names the first bad byte and its offset
    return _decode("<stdin>", bytes(data), "strict")


def parse_ids(name: str, text: str, vocab_len: int) -> list[int]:
    """The ids in `text`: integers separated by white space, or JSON lines holding arrays of
    ids or objects with an "ids" array."""
    label = "<stdin>" if name == STDIN else name
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        raw = []
        for k, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = loads(line)
            except JSONError as e:
                raise UsageError(f"{label}:{k}: {e}") from None
            if isinstance(item, dict):
                item = item.get("ids")
            if not isinstance(item, list):
                raise UsageError(f"{label}:{k}: expected a JSON array of ids or an object "
                                 f"with an \"ids\" array")
            raw.extend(item)
    else:
        raw = text.split()
    ids = []
    for word in raw:
        if isinstance(word, bool) or not isinstance(word, (int, str)):
            raise UsageError(f"{label}: not a token id: {word!r}")
        try:
            value = int(word)
        except ValueError:
            raise UsageError(f"{label}: not a token id: {word!r}") from None
        if not 0 <= value < vocab_len:
            raise UsageError(f"{label}: token id {value} is outside the vocabulary "
                             f"(0..{vocab_len - 1})")
        ids.append(value)
    return ids


# ---------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------

def encode_files(tokenizer: Tokenizer, names: Iterable[str], as_json: bool, out: TextIO) -> None:
    for name in names:
        ids = tokenizer.encode(read_input(name)).tolist()
        if as_json:
            out.write(json.dumps({"file": name, "ids": ids}) + "\n")
        else:
            out.write(" ".join(map(str, ids)) + "\n")


def decode_files(tokenizer: Tokenizer, names: Iterable[str], as_json: bool, out: TextIO) -> None:
    for name in names:
        text = tokenizer.decode(parse_ids(name, read_input(name), len(tokenizer)))
        if as_json:
            out.write(json.dumps({"file": name, "text": text}, ensure_ascii=False) + "\n")
        else:
            out.write(text if text.endswith("\n") else text + "\n")


def format_stats(stats: Mapping[str, Any]) -> str:
    lines = [f"files:          {len(stats['files'])}",
             f"tokens:         {stats['tokens']:,}",
             f"unknown tokens: {stats['unknown']:,} ({100 * stats['unknown_rate']:.3g}%)",
             f"distinct ids:   {stats['distinct']:,} of {stats['vocab_size']:,} in the vocabulary"]
    total = stats["tokens"] or 1
    if stats["top"]:
        lines.append("most frequent tokens:")
        width = max(len(_show(t)) for t, _ in stats["top"])
        for rank, (tok, count) in enumerate(stats["top"], start=1):
            lines.append(f"  {rank:>4}  {_show(tok):<{width}}  {count:>10,}  {count / total:7.2%}")
    if stats["unknown_top"]:
        lines.append("most frequent words not in the vocabulary:")
        width = max(len(_show(t)) for t, _ in stats["unknown_top"])
        for rank, (tok, count) in enumerate(stats["unknown_top"], start=1):
            lines.append(f"  {rank:>4}  {_show(tok):<{width}}  {count:>10,}")
    return "\n".join(lines) + "\n"


def _show(token: str) -> str:
    """A token as one visible cell: white space and control characters escaped."""
    if token.isprintable() and not token.isspace():
        return token if token == token.strip() else repr(token)    # " the" -> ' the'
    return repr(token)[1:-1] if token != " " else "' '"


def run(args: argparse.Namespace, out: TextIO) -> None:
    if args.data.count(STDIN) > 1:
        raise UsageError("standard input ('-') can be read only once")
    tokenizer = load_tokenizer(args.vocab, args.tokenizer, "--vocab")
    args.data = expand(args.data, args.glob)
    if args.decode:
        decode_files(tokenizer, args.data, args.json, out)
    elif args.stats:
        stats = token_stats(tokenizer, ((name, read_input(name)) for name in args.data),
                            args.top)
        if args.json:
            out.write(json.dumps(stats, ensure_ascii=False) + "\n")
        else:
            out.write(format_stats(stats))
    else:
        encode_files(tokenizer, args.data, args.json, out)
    out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: run(args, sys.stdout), stop_without_output=True,
                    command_line=argv is None)


if __name__ == "__main__":
    sys.exit(main())
