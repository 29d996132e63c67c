"""What the command-line tools share: one-line argparse errors, help that shows defaults, and
the mapping of failures to one line on stderr and an exit status (run_main), including a
standard output that fails."""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import math
import os
import select
import signal
import stat
import sys
import threading
from types import FrameType
from typing import Any, Callable, Iterable, Mapping, NoReturn, TextIO, TypeVar

from cllm_cli.distributed.world import launcher_rank
from cllm_cli.errors import STATUSES, Interrupted, Statuses, UsageError
from cllm_cli.model import precision
from cllm_cli.threads import MAX_THREADS, threads_warning

INT_MAX = 2**31 - 1         # the largest value of a C int, which the engine's counts are


_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


class OutputLost(Exception):
    """Standard output failed (a full disk, a reader that went away) in a tool whose output is
    its work. Not an OSError, so that no handler of file errors mistakes it for one."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.errno = error.errno


class _GuardedStdout:
    """Standard output for the duration of run_main. Its first failure points file descriptor
    1 at /dev/null (so that nothing, not even the exit-time flush, fails again); then every
    write raises OutputLost (stop=True), or one warning goes to stderr and later output is
    discarded (stop=False)."""

    def __init__(self, prog: str, stream: TextIO | None, stop: bool) -> None:
        self.prog, self.stream, self.stop = prog, stream, stop
        self.lost: OSError | None = None        # the OSError that lost the output

    def write(self, text: str) -> int:
        if len(text) > _LONG_TEXT and hasattr(self.stream, "buffer"):
            self._call("flush")
            self._call("write_all", text)
        else:
            self._call("write", text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._call("flush")

    def isatty(self) -> bool:
        return self.stream is not None and self.stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def _call(self, method: str, *args: Any) -> None:
        if self.lost is None:
            try:
                if self.stream is None:         # started with file descriptor 1 closed
                    raise OSError(errno.EBADF, os.strerror(errno.EBADF))
                if method == "write_all":
                    _write_all(self.stream, *args)
                else:
                    getattr(self.stream, method)(*args)
                return
            except OSError as e:
                self._lose(e)
        if self.stop:
            raise OutputLost(self.lost)         # type: ignore[arg-type]  # lost by now

    def _lose(self, error: OSError) -> None:
        self.lost = error
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())     # type: ignore[union-attr]  # None: AttributeError
            os.close(devnull)
        if not self.stop:
            _say(f"{self.prog}: warning: cannot write to standard output "
                 f"({error.strerror or error}); going on without it")


# A text stream hands a text longer than its chunk straight to its byte buffer, and the buffer
# may write only part of it (a disk that fills up midway) and return the short count, which the
# text stream ignores: the rest would be lost without an error. Such texts go to the buffer here.
_LONG_TEXT = 4096


def _write_all(stream: TextIO, text: str) -> None:
    """Writes `text` through stream's byte buffer until every byte is written; a write that
    cannot go on raises OSError (the short write's cause, such as ENOSPC)."""
    data = memoryview(text.encode(stream.encoding, stream.errors or "strict"))
    while data:
        written = stream.buffer.write(data)
        if not written:
            raise OSError(errno.EIO, "the output took no more bytes")
        data = data[written:]
    stream.buffer.flush()


def _reader_gone(stream: TextIO) -> bool:
    """True when `stream` is a pipe whose reading end is closed: output still in the pipe
    (written, never read) is then lost, although every write succeeded."""
    try:
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _say(line: str) -> None:
    """One line on stderr, unless stderr fails too."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print(line, file=sys.stderr, flush=True)


def end_line() -> None:
    """On Ctrl-C of a tool that streams text to stdout: ends the line written so far."""
    sys.stdout.write("\n")
    sys.stdout.flush()


def run_main(prog: str, command: Callable[[], object],
             statuses: Statuses | None = None,
             interrupts: tuple[type[BaseException], ...] = (),
             on_interrupt: Callable[[], object] | None = None, stop_without_output: bool = False,
             announce_signals: bool = False, command_line: bool = False) -> int:
    """Runs command() as the body of a tool's main() and returns the exit status: 0 when it
    returns.

    statuses maps exception classes (or tuples of them) to exit statuses, tried in order before
    errors.STATUSES: such an exception prints the one line "prog: error: <message>" on stderr. For every tool alike,
    out of memory prints "prog: error: out of memory" and gives 1; Ctrl-C
    (KeyboardInterrupt, or one of `interrupts`) gives 130 after on_interrupt(), when given.

    A standard output that fails (a full disk, `| head`) never gives a traceback. With
    stop_without_output (tools whose output is their work) the run ends with status 1 and
    "prog: error: cannot write output: <reason>", quietly for a reader that went away.
    Otherwise (train_model: losing the log must not lose the training) one warning is printed
    and the command goes on with its output discarded. Anything else propagates.

    With announce_signals, SIGINT, SIGTERM and SIGHUP end the command with the line
    "prog: interrupted by SIGxxx" and status 128 + the signal's number.

    Once a stop signal is being handled, SIGINT, SIGTERM and SIGHUP are ignored, so a second
    one (Ctrl-C pressed twice) cannot interrupt the handling with a traceback. command_line
    (main() running the process's own command line) keeps them ignored until the process
    exits; otherwise (a caller in the same process, the tests) they are restored.
    """
    real_stdout = sys.stdout
    sys.stdout = out = _GuardedStdout(prog, real_stdout, stop_without_output)
    previous = _raise_on_signals() if announce_signals else {}
    stopping = False
    try:
        command()
        out.flush()
        if stop_without_output and _reader_gone(real_stdout):
            raise OutputLost(OSError(errno.EPIPE, os.strerror(errno.EPIPE)))
    except OutputLost as e:
        if e.errno != errno.EPIPE:
            _say(f"{prog}: error: cannot write output: {e}")
        return 1
    except (KeyboardInterrupt, Interrupted, *interrupts) as e:      # type: ignore[misc]
        stopping = True
        previous = {**_ignore_stop_signals(), **previous}
        if announce_signals:
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            _say(f"{prog}: interrupted by {signal.Signals(signum).name}")
            return 128 + signum
        if on_interrupt is not None:
            with contextlib.suppress(OutputLost):
                on_interrupt()
        return 130
    except MemoryError as e:
        _say(f"{prog}: error: out of memory" + (f" ({e})" if str(e) else ""))
        return 1
    except Exception as e:
        for classes, status in [*(statuses or {}).items(), *STATUSES.items()]:
            if isinstance(e, classes):
                _say(f"{prog}: error: {e}")
                return status
        raise
    finally:
        sys.stdout = real_stdout
        if not (stopping and command_line):
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return 0


def _raise_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP raise Interrupted (SIGINT raises KeyboardInterrupt already);
    returns the handlers they had."""
    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, interrupted) for signum in (signal.SIGTERM, signal.SIGHUP)}


def _ignore_stop_signals() -> dict[int, Any]:
    """SIGINT, SIGTERM and SIGHUP ignored from now on; returns the handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, signal.SIG_IGN)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def package_version() -> str:
    """CLLM's version, from the installed package's metadata (pyproject.toml's)."""
    try:
        return importlib.metadata.version("cllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and exit status 2, and
    --version ("<tool> <version>"). Shared by every tool."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"{self.prog} {package_version()}",
                          help="print the tool's name and CLLM's version, and exit")

    def error(self, message: str) -> NoReturn:
        # under an MPI launcher every rank reads the same command line: rank 0 says what is
        # wrong, the others only exit with the same status
        if launcher_rank() != 0:
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except where the help text already says it and for defaults that
    mean "not given" (None, empty, False). Help texts name their defaults themselves with
    %(default)s where it matters, because argparse-manpage expands only that."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default in (None, "", False):
            return text
        return super()._get_help_string(action)


def name_defaults(parser: _Parser) -> _Parser:
    """Writes each option's default into its help text as %(default)s, the only form
    argparse-manpage expands, so that --help and the man page both show it; a flag's
    default is "off". Options whose default means "not given" (None, empty) say in their
    help text what that means, as "(default: ...)"."""
    for action in parser._actions:
        if action.help is None or action.help == argparse.SUPPRESS or "(default" in action.help:
            continue
        if action.option_strings == [] or action.default is argparse.SUPPRESS:
            continue
        if action.default is False:             # a flag, or --resume
            action.help += " (default: off)"
        elif action.default not in (None, ""):
            action.help += " (default: %(default)s)"
    return parser


def int_option(minimum: int, maximum: int | None = INT_MAX) -> Callable[[str], int]:
    """The argparse type of an integer option from `minimum` to `maximum` (None: no upper
    bound). Every tool's integer options that reach the engine (threads, token counts) use
    it, so that a value out of range is one line and status 2 before anything runs."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value
    parse.__name__ = "integer"      # what argparse calls the type in its messages
    return parse


# --threads of every tool: the spheres or decoding threads, at most MAX_THREADS
threads_option = int_option(1, MAX_THREADS)


def add_seed_option(group: argparse._ActionsContainer) -> None:
    """--seed of the tools that sample (cllm_inference, cllm_chat)."""
    group.add_argument("--seed", metavar="N", type=int_option(0, None), default=0,
                       help="seed of the sampler; the same seed gives the same text "
                            "(default: %(default)s)")


def add_sampling_options(group: argparse._ActionsContainer) -> None:
    """The options of the tools that sample from a model (cllm_inference, cllm_chat):
    --temperature, --top-k, --top-p, --threads, --precision. check_sampling_options checks
    what argparse cannot."""
    group.add_argument("--temperature", metavar="T", type=float, default=0.8,
                       help="divides the logits; lower is more conservative, 0 is greedy "
                            "(default: %(default)s)")
    group.add_argument("--top-k", metavar="K", type=int_option(0), default=40,
                       help="sample among the k most likely tokens only (0: all) "
                            "(default: %(default)s)")
    group.add_argument("--top-p", metavar="P", type=float, default=0.95,
                       help="sample among the most likely tokens whose probabilities add up "
                            "to p (nucleus sampling; 1: all) (default: %(default)s)")
    group.add_argument("--threads", metavar="N", type=threads_option, default=None,
                       help="threads that share each token's work, 1 to %d (default: all "
                            "cores); the text does not depend on it" % MAX_THREADS)
    group.add_argument("--precision", choices=precision.PRECISIONS, default=None,
                       help="the weights as products read them: fp32, or their bf16 copy (half "
                            "the bytes to read per token; needs the bf16 extra) (default: the "
                            "precision the model was trained in)")


def add_vocab_option(group: argparse._ActionsContainer) -> None:
    """--vocab of the tools that read a model with its tokenizer."""
    group.add_argument("--vocab", metavar="PATH", default=None,
                       help="tokenizer file (vocab.txt or tokenizer.json; for bpe also GPT-2's "
                            "vocab.json with merges.txt next to it, or their directory) the "
                            "model was trained with (default: the one next to the checkpoint)")


def check_sampling_options(args: argparse.Namespace) -> None:
    """UsageError for a --temperature or --top-p out of range (add_sampling_options)."""
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a number >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")


def products_precision(args: argparse.Namespace, meta: Mapping[str, Any]) -> str:
    """The precision of the products (--precision, else the one the model, whose meta is
    given, was trained in), loaded: PrecisionError when this machine cannot run it."""
    products = args.precision or meta.get("train_config", {}).get("precision", "fp32")
    precision.require(products)
    return str(products)


def warn_threads(prog: str, threads: int | None, ranks: int = 1) -> None:
    """One warning line on stderr when `threads` (per process, `ranks` processes on this
    host) exceed the cores this process may run on."""
    warning = threads_warning(threads, ranks) if threads is not None else None
    if warning:
        _say(f"{prog}: warning: {warning}")
