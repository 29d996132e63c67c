"""cllm_chat: a conversation with a trained model, in a terminal or through a pipe.

    RUN -> model, tokenizer, chat template -> for each message read: the conversation
    rendered by the template -> the reply, streamed to stdout -> the history

Choices written down here:

- RUN is what cllm_inference reads (a .cllm file, a run directory, a transformers
  directory). The chat template is --template, else the one stored with the model: in the
  checkpoint's metadata (a run trained on messages), else in its directory
  (tokenizer_config.json or chat_template.jinja; for a .cllm file the directory it is in);
  without one, ChatML (the default of the chat template module). The rendered conversation
  is encoded as training on messages encodes it: special tokens the template writes are
  their ids where the tokenizer reads them so.
- Input is read a line at a time: each line is one user message; a line ending in a
  backslash goes on on the next line (one message of several lines). Empty lines are skipped.
  The lines "/reset" and "/exit" are commands. On a terminal a prompt "> " (and "... " for a
  continued line) is shown; from a pipe, nothing but the replies is written.
- A reply is generated from the whole conversation rendered with add_generation_prompt,
  and streamed: after each token the reply's ids are decoded again and the new text
  written, so that a character cut between byte-level tokens is shown whole. It ends at the
  tokenizer's end-of-text id, at the template's end-of-turn marker (what the template writes
  after an assistant message, found by rendering one; it is never shown), or after
  --max-new-tokens. The reply is added to the history as the assistant's message.
- The history is kept within the model's context (seq_len): when the rendered conversation
  leaves less room than a reply may take (--max-new-tokens, at most half the context), the
  oldest exchanges (a user message and its reply) are dropped, never the system message nor
  the new message. stderr says so once.
- Decoding keeps its key/value cache from one reply to the next (CachedDecoder): a turn runs
  only the positions after the part of the conversation the cache already holds. Replies are
  sampled from one random stream seeded with --seed: the same seed and messages give the same
  conversation.
- /reset forgets the history (not --system), empties the cache and seeds the sampler again:
  the next reply is the one a new session would give. /exit, or the end of input (Ctrl-D),
  leaves with status 0.
- Ctrl-C during a reply stops it: what was shown so far is kept as the assistant's message
  and the prompt returns. Ctrl-C at the prompt drops what was typed and shows a new prompt
  (with a hint on stderr the first time); a second Ctrl-C in a row, with no message between,
  leaves with status 0.
- Exit status: 0 done, 2 bad usage or input (one line on stderr), 1 a runtime failure
  (standard output lost, a model whose logits are NaN everywhere), 130 Ctrl-C outside a reply
  or the prompt (while the model loads).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Dict, Iterator, Mapping, Sequence, TextIO

import numpy as np

from cllm_cli.api import CLLMModel, load_model
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
from cllm_cli.model.generation import CachedDecoder
from cllm_cli.threads import default_threads
from cllm_cli.tokenizers import Tokenizer
from cllm_cli.tokenizers.chat_template import ChatTemplate, ChatTemplateError

PROG = "cllm_chat"
PROMPT = "> "
CONTINUED = "... "            # the prompt of a line that goes on a message ending in "\"
RESET, EXIT = "/reset", "/exit"
# an assistant message whose rendering shows what the template writes after the message
SENTINEL = "cllmchatsentinelreply"

Message = Dict[str, str]      # {"role": ..., "content": ...}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Talk with a model trained by train_model: each line read is a user "
                    "message, rendered with the model's chat template together with the "
                    "conversation so far; the reply is printed as it is generated. On a "
                    "terminal: /reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C "
                    "stops a reply. From a pipe: one message per line, only the replies are "
                    "written.",
        epilog="Example: cllm_chat checkpoints --system 'You answer briefly.' --temperature 0",
        formatter_class=HelpFormatter)
    p.add_argument("run", metavar="RUN",
                   help="a run directory (its final_model.cllm, else its newest "
                        "checkpoint_step_<N>.cllm), a .cllm file or a transformers directory")
    g = p.add_argument_group("conversation")
    g.add_argument("--system", metavar="TEXT", default=None,
                   help="a system message that starts the conversation; it is kept when old "
                        "turns are dropped and after /reset (default: none)")
    g.add_argument("--max-new-tokens", metavar="N", type=int_option(1), default=256,
                   help="tokens of one reply at most; a reply also stops at <eos> and at the "
                        "template's end of turn (default: %(default)s)")
    add_seed_option(g)
    add_sampling_options(p.add_argument_group("sampling"))
    g = p.add_argument_group("files")
    add_vocab_option(g)
    g.add_argument("--template", metavar="PATH", default=None,
                   help="the chat template: a Jinja file, a tokenizer_config.json with a "
                        "chat_template, or a directory holding one (default: the model's own, "
                        "else ChatML)")
    return name_defaults(p)


def model_template(run: str | os.PathLike, template: str | os.PathLike | None,
                   tokenizer: Tokenizer, meta: Mapping[str, Any]) -> ChatTemplate:
    """The chat template of --template, else the one the checkpoint's metadata holds (a run
    trained on messages keeps it there), else its directory's (that of a .cllm file: the one
    it is in), else ChatML; rendered with the tokenizer's begin and end-of-text strings."""
    bos = tokenizer.id_to_token(tokenizer.bos_id) or ""
    eos = tokenizer.id_to_token(tokenizer.eos_id) or ""
    if template is not None:
        return ChatTemplate.of(template, bos, eos)
    stored = meta.get("chat_template")
    if isinstance(stored, str) and stored:
        return ChatTemplate(stored, bos, eos, f"{run}: its chat template")
    where = Path(run)
    return ChatTemplate.of(where if where.is_dir() else where.parent, bos, eos)


def encode_rendered(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of a rendered conversation: the tokenizer's special tokens the template writes
    (a chat model's <|im_start|>, <eos>) read as their ids, as training on messages reads
    them (encode_marked)."""
    return [int(i) for i in tokenizer.encode_marked(text)]


def end_of_turn(template: ChatTemplate, system: Sequence[Message] = ()) -> str:
    """What the template writes after an assistant message ("<|im_end|>" for ChatML), white
    space around it left out (unless that is all it writes); empty when it writes nothing.
    `system`: the session's system message, if any, rendered first as in every turn (a
    template may require one)."""
    shown = template.render([*system, {"role": "user", "content": "hello"},
                             {"role": "assistant", "content": SENTINEL}])
    after = shown[shown.rfind(SENTINEL) + len(SENTINEL):] if SENTINEL in shown else ""
    return after.strip() or after


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`: they are
    shown only once the marker turns out not to follow."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1)
                 if text.endswith(marker[:n])), 0)


class Chat:
    """A conversation: the history, the cached decoder and the sampler's random stream."""

    def __init__(self, model: CLLMModel, tokenizer: Tokenizer, template: ChatTemplate,
                 args: argparse.Namespace, products: str) -> None:
        self.model, self.tokenizer, self.template, self.args = model, tokenizer, template, args
        self.decoder = CachedDecoder(model.config, model.flat, args.threads or default_threads(),
                                     products)
        self.rng = np.random.default_rng(args.seed)
        self.turns: list[Message] = []          # user and assistant messages, in order
        # a template that refuses the --system message says so before the first prompt
        self.marker = end_of_turn(template, self.messages())
        if not encode_rendered(tokenizer, template.render(
                self.messages() + [{"role": "user", "content": "hello"}],
                add_generation_prompt=True)):
            raise ChatTemplateError(f"{template.origin}: renders a conversation as no tokens, "
                                    f"so the model would read nothing of it")
        self.stop_ids = {tokenizer.eos_id}
        marker_ids = encode_rendered(tokenizer, self.marker) if self.marker else []
        if len(marker_ids) == 1:                # a token of its own, perhaps one that
            self.stop_ids.add(marker_ids[0])    # decodes to nothing
        self.said_dropped = False

    def reset(self) -> None:
        """Forgets the history (not the system message) as if the session had just begun."""
        self.turns = []
        self.decoder.reset()
        self.rng = np.random.default_rng(self.args.seed)

    def messages(self) -> list[Message]:
        system = [] if self.args.system is None else [{"role": "system",
                                                       "content": self.args.system}]
        return system + self.turns

    def prompt_ids(self) -> list[int]:
        """The ids of the conversation rendered for the next reply, after dropping the
        oldest exchanges while it leaves less room for the reply than a reply may take."""
        T = self.model.config.seq_len
        room = min(self.args.max_new_tokens, T // 2)
        while True:
            text = self.template.render(self.messages(), add_generation_prompt=True)
            # a message of no tokens under a template that writes only the messages: the
            # start of a new text, as cllm_inference reads an empty prompt
            ids = encode_rendered(self.tokenizer, text) or [self.tokenizer.eos_id]
            if len(ids) + room <= T or len(self.turns) <= 1:
                break
            dropped = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:dropped]
            if not self.said_dropped:
                self.said_dropped = True
                say(f"{PROG}: the conversation no longer fits in the model's context of {T} "
                    f"tokens: its oldest messages are dropped")
        if len(ids) > T:
            say(f"{PROG}: warning: the conversation takes {len(ids)} tokens, more than the "
                f"model's context of {T}: the model reads only its last {T}")
        return ids

    def reply(self, message: str, out: TextIO, stop: threading.Event) -> str:
        """Adds the user's message, streams the reply to `out` until it ends or `stop` is
        set, adds the reply to the history and returns it."""
        self.turns.append({"role": "user", "content": message})
        ids: list[int] = []
        shown = ""
        marker, decode = self.marker, self.tokenizer.decode
        text = ""
        generated = self.decoder.generate(
            self.prompt_ids(), self.args.max_new_tokens, self.args.temperature, self.args.top_k,
            self.args.top_p, self.rng, self.stop_ids, num_tokens=len(self.tokenizer))
        try:
            for next_id in generated:
                if next_id in self.stop_ids:
                    break
                ids.append(next_id)
                text = decode(ids)
                if marker and marker in text:
                    text = text[:text.index(marker)]
                    break
                ready = text.rstrip("\ufffd")
                shown = show(out, shown, ready[:len(ready) - held_back(ready, marker)])
                if stop.is_set():
                    break
        finally:
            generated.close()
            self.turns.append({"role": "assistant", "content": text})
        shown = show(out, shown, text)
        if not shown.endswith("\n") or stop.is_set():     # after Ctrl-C the terminal shows ^C
            out.write("\n")
        out.flush()
        return text


def show(out: TextIO, shown: str, text: str) -> str:
    """Writes what `text` adds to `shown` (the part of the reply already written); returns
    what is shown then."""
    if len(text) > len(shown):
        out.write(text[len(shown):])
        out.flush()
        return text
    return shown


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_message(stdin: TextIO, out: TextIO, terminal: bool) -> str | None:
    """The next message: a line, or lines joined by a backslash at their end; None at the
    end of input."""
    lines: list[str] = []
    while True:
        if terminal:
            out.write(CONTINUED if lines else PROMPT)
            out.flush()
        line = stdin.readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


@contextlib.contextmanager
def interrupt_sets(event: threading.Event) -> Iterator[threading.Event]:
    """Within the block, SIGINT (Ctrl-C) sets `event` (cleared first) instead of raising
    KeyboardInterrupt."""
    def handler(signum: int, frame: FrameType | None) -> None:
        event.set()
    event.clear()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def converse(chat: Chat, stdin: TextIO, out: TextIO, terminal: bool) -> None:
    """Reads messages and answers them until /exit, the end of input or two Ctrl-C in a
    row at the prompt."""
    interrupted_at_prompt = False
    hinted = False
    stop = threading.Event()
    while True:
        try:
            message = read_message(stdin, out, terminal)
        except KeyboardInterrupt:
            if terminal:                # the terminal shows ^C at the end of the line
                out.write("\n")
                out.flush()
            if interrupted_at_prompt:
                return
            interrupted_at_prompt = True
            if not hinted:
                hinted = True
                say(f"{PROG}: Ctrl-C again, Ctrl-D or {EXIT} leaves")
            continue
        if message is None:
            if terminal:
                out.write("\n")
                out.flush()
            return
        interrupted_at_prompt = False
        command = message.strip()
        if command == EXIT:
            return
        if command == RESET:
            chat.reset()
            continue
        if not command:
            continue
        with interrupt_sets(stop):
            chat.reply(message, out, stop)


def run(args: argparse.Namespace) -> None:
    check_sampling_options(args)
    warn_threads(PROG, args.threads)
    model, tokenizer, _ = load_model(args.run, args.vocab)
    products = products_precision(args, model.meta)
    template = model_template(args.run, args.template, tokenizer, model.meta)
    chat = Chat(model, tokenizer, template, args, products)
    stdin = sys.stdin
    if stdin is None:                   # started with file descriptor 0 closed: no input
        return
    if hasattr(stdin, "reconfigure"):   # bytes that are not UTF-8 are read as U+FFFD
        stdin.reconfigure(encoding="utf-8", errors="replace")
    converse(chat, stdin, sys.stdout, stdin.isatty())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: run(args), on_interrupt=end_line, stop_without_output=True,
                    command_line=argv is None)


if __name__ == "__main__":
    sys.exit(main())
