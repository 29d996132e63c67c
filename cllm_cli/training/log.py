"""What train_model shows: the live progress line or log lines, warnings, the JSON lines
of --metrics-file and the TensorBoard events of --tensorboard."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import time
from typing import Any, TextIO, Union

from cllm_cli.errors import DataError, UsageError
from cllm_cli.fileio import file_start, reason
from cllm_cli.training.config import TrainConfig
from cllm_cli.training.rundir import run_file
from cllm_cli.training.tensorboard import EventWriter

# How every line train_model writes into a metrics file starts
METRICS_START = b'{"step": '


def check_metrics_output(path: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """Raises UsageError when --metrics-file names an existing file that a run would damage:
    a new run replaces the file and a resumed one appends to it, which is right only for an
    earlier run's metrics (an empty file, or one that starts as train_model writes them), not
    for a corpus or a model given by mistake; or a file of the run in `run_dir` (its
    tokenizer, dataset.bin, a checkpoint), which the run writes there later, destroying the
    metrics or being destroyed by them; or a path that cannot be created (a directory, below
    a missing directory other than `run_dir` or its parents, which the run creates, or below
    a file). Other paths that are not regular files are left to the open."""
    if os.path.isdir(path):
        raise UsageError(f"cannot write --metrics-file {path}: it is a directory")
    if os.path.realpath(path) == os.path.realpath(run_dir):     # one the run is to create
        raise UsageError(f"cannot write --metrics-file {path}: it is a directory (the "
                         f"--checkpoint-dir)")
    parent = os.path.dirname(os.path.abspath(path))
    run_dir_or_above = os.path.commonpath([parent, os.path.abspath(run_dir)]) == parent
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise UsageError(f"cannot write --metrics-file {path}: {parent} is not a directory")
    if not os.path.lexists(parent) and not run_dir_or_above:
        raise UsageError(f"cannot write --metrics-file {path}: its directory {parent} does not "
                         f"exist")
    if os.path.exists(path) and not os.path.isfile(path):     # a FIFO, a device: open it now
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:
            raise UsageError(f"cannot write --metrics-file {path}: {open_failure(e)}") from None
    if os.path.isfile(path):
        try:
            start = file_start(path, len(METRICS_START))
        except OSError as e:
            raise UsageError(f"cannot write --metrics-file {path}: {reason(e)}") from None
        if start and start != METRICS_START:
            raise UsageError(f"--metrics-file {path} exists and is not a metrics file (its "
                             f"lines do not start with {METRICS_START.decode()}...): a run "
                             f"writes only over an earlier run's metrics; remove it or choose "
                             f"another")
    name = run_file(path, run_dir)
    if name:
        raise UsageError(f"--metrics-file {path} is {name}, a file the run writes in its "
                         f"--checkpoint-dir; choose another name")


def open_failure(e: OSError) -> str:
    """Why the metrics file did not open: opening a FIFO for writing without waiting fails
    with ENXIO when no process reads it."""
    if e.errno == errno.ENXIO:
        return "it is a FIFO that no process reads (start the reader first)"
    return reason(e)


def open_metrics(path: str | os.PathLike, append: bool) -> TextIO:
    """The metrics file open for writing (appending, on --resume). A FIFO is opened without
    waiting for a reader, which stop signals could not interrupt: OSError ENXIO when it has
    none."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a" if append else "w")


def drop_cut_line(path: str | os.PathLike) -> None:
    """Truncates the metrics file a resumed run appends to (when it is a regular file) to its
    last whole line: a run stopped mid-write (a full disk, kill -9) may have left a record
    without its newline, which the next record would otherwise continue."""
    if not os.path.isfile(path):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
        cut = tail.rfind(b"\n")
        if cut >= 0 or len(tail) == size:      # a record is far shorter than 64 KiB
            os.ftruncate(fd, size - len(tail) + cut + 1)
    finally:
        os.close(fd)


class Log:
    """Human output on stdout (unless quiet) and JSON lines in the metrics file. On a terminal
    progress is one line rewritten in place (a few times a second); elsewhere it is a plain
    line every log_interval steps."""

    REFRESH = 0.2   # seconds between rewrites of the progress line
    shown = True    # what it is told reaches the user (warnings at least)

    def __init__(self, cfg: TrainConfig, append: bool, first_step: int = 0) -> None:
        self.quiet = cfg.quiet
        self.tty = sys.stdout.isatty()
        self.log_interval = max(cfg.log_interval, 1)
        self.showing = False     # a progress line is on screen
        self.stdout_lost = False
        self.last_draw = 0.0
        try:
            if cfg.metrics_file and append:
                drop_cut_line(cfg.metrics_file)
            self.metrics = open_metrics(cfg.metrics_file, append) if cfg.metrics_file else None
        except OSError as e:
            raise DataError(f"cannot write --metrics-file {cfg.metrics_file}: "
                            f"{open_failure(e)}") from None
        self.events: EventWriter | None = None
        if cfg.tensorboard:
            try:
                self.events = EventWriter(cfg.tensorboard, first_step)
            except BaseException:
                self.close()
                raise

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def say(self, text: str, always: bool = False) -> None:
        if always or not self.quiet:
            self._clear()
            self._out(text + "\n")

    def progress(self, step: int, total: int, text: str) -> None:
        if self.quiet:
            return
        if not self.tty:
            if step % self.log_interval == 0 or step == total:
                self._out(text + "\n")
            return
        now = time.monotonic()
        if step == total:              # the last state stays on screen
            self._out("\r" + text + "\x1b[K\n")
            self.showing = False
        elif now - self.last_draw >= self.REFRESH:
            self._out("\r" + text + "\x1b[K")
            self.showing = True
            self.last_draw = now

    def _clear(self) -> None:
        # other output goes above the progress line, which is redrawn at the next step
        if self.showing:
            self._out("\r\x1b[K")
            self.showing = False
            self.last_draw = 0.0

    def _out(self, text: str) -> None:
        """Writes to stdout. Losing stdout (a full disk, a reader that went away) must not
        lose the training: one warning, then stdout is silenced for the rest of the run."""
        if self.stdout_lost:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError as e:
            self.stdout_lost = True
            with contextlib.suppress(OSError):      # nor fail again at exit
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            self.warn(f"cannot write to standard output ({e.strerror or e}); training goes "
                      f"on without progress output")

    def warn(self, text: str) -> None:
        self._clear()
        with contextlib.suppress(OSError):
            print(f"train_model: warning: {text}", file=sys.stderr, flush=True)

    def record(self, **fields: Any) -> None:
        """One JSON line; NaN (a skipped step) is written as null. With --tensorboard the same
        numbers as scalars. A failing metrics or event file is reported once and dropped: it
        must not stop the training."""
        self._to_events("record", fields)
        if not self.metrics:
            return
        fields = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in fields.items()}
        try:
            self.metrics.write(json.dumps(fields) + "\n")
            self.metrics.flush()
        except OSError as e:
            self.warn(f"cannot write the metrics file ({e.strerror or e}); metrics stop here")
            self._drop_metrics()

    def sample(self, step: int, text: str) -> None:
        """A sample of the model at `step`: shown, and with --tensorboard written as text."""
        self.say(f"sample: {text}")
        self._to_events("text", step, "sample", text)

    def _to_events(self, method: str, *args: Any) -> None:
        if not self.events:
            return
        try:
            getattr(self.events, method)(*args)
        except OSError as e:
            self.warn(f"cannot write the TensorBoard events {self.events.path} ({e.strerror or e}); "
                      f"events stop here")
            with contextlib.suppress(OSError):
                self.events.close()
            self.events = None

    def _drop_metrics(self) -> None:
        with contextlib.suppress(OSError):
            self.metrics.close()      # type: ignore[union-attr]  # called while there is one
        self.metrics = None

    def close(self) -> None:
        self._clear()
        if self.metrics:
            self._drop_metrics()
        self._to_events("close")
        self.events = None


class SilentLog:
    """The Log of a rank other than 0: rank 0 prints and writes the metrics for all."""

    shown = False

    def __enter__(self) -> SilentLog:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def say(self, text: str, always: bool = False) -> None:
        pass

    def progress(self, step: int, total: int, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        pass

    def record(self, **fields: Any) -> None:
        pass

    def sample(self, step: int, text: str) -> None:
        pass


# the log of a rank: rank 0's Log, the others' SilentLog
RunLog = Union[Log, SilentLog]
