"""--tensorboard: the run's metrics as TensorBoard event files, written by rank 0.

What goes in is what the metrics file holds (Log.record): every number of a record becomes a
scalar at the record's global step, tagged val/<name> for val_loss, val_ppl and val_bpb
(val/loss, val/ppl, val/bpb) and train/<name> for the others (train/loss, train/lr,
train/grad_norm, train/tokens_per_s, train/epoch; on many processes train/exchange_bytes and
train/exchange_seconds). A value that is not finite (the loss of a skipped step, null in the
metrics file) is left out: a gap in the curve. Samples go in as text, tagged sample.

tensorboardX (the `tensorboard` extra) builds the events and frames them as TFRecords; it is
imported only when --tensorboard is given. Its SummaryWriter hands events to a thread whose
flush() leaves the ones still queued unwritten, so the events are written here, in the
loop's thread, through tensorboardX's RecordWriter: flushed (and fsync'ed) after every
evaluation and closed at the end of the run, a stop signal included.

Each run, and each resumption, writes a file of its own, events.out.tfevents.<time>.<host>.<pid>.
It starts with the file version and a session start at the step after the one the run starts
from: TensorBoard then drops what earlier files of the directory hold from that step on (the
steps a stopped run logged after its last checkpoint, or an earlier run in the same DIR).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import time
from types import ModuleType
from typing import Any, Mapping

from cllm_cli.errors import DataError, MissingExtra, UsageError
from cllm_cli.fileio import reason, writable_directory
from cllm_cli.training.rundir import first_missing, run_file

INSTALL = "pip install '.[tensorboard]' in CLLM's source (or pip install tensorboardX)"


def require_tensorboardx() -> ModuleType:
    """The tensorboardX package; MissingExtra (one line naming the extra) without it."""
    try:
        import tensorboardX
    except ImportError:
        raise MissingExtra(f"--tensorboard needs tensorboardX, which is not installed: "
                           f"{INSTALL}") from None
    return tensorboardX


def check_tensorboard(directory: str | os.PathLike, run_dir: str | os.PathLike,
                      metrics_file: str | os.PathLike | None = None) -> None:
    """Before the corpus is read: tensorboardX can be imported, `directory` is not named as
    another output of the run (a file the run in `run_dir` writes there, such as its tokenizer
    or a checkpoint, or its `metrics_file`), and a file can be created in `directory`.
    MissingExtra, UsageError or DataError with one line when not. The directories made for
    the check are removed again, so that a run refused later leaves none; the run's event
    writer makes them."""
    require_tensorboardx()
    if metrics_file and os.path.realpath(directory) == os.path.realpath(metrics_file):
        raise UsageError(f"--tensorboard {directory} is the --metrics-file: the events need a "
                         f"directory of their own")
    name = run_file(directory, run_dir)
    if name:
        raise UsageError(f"--tensorboard {directory} is {name}, a file the run writes in its "
                         f"--checkpoint-dir; choose another directory")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise DataError(f"cannot write --tensorboard {directory}: it is a file, not a "
                        f"directory")
    created = first_missing(str(directory))
    try:
        writable_directory(directory)
    except OSError as e:
        raise DataError(f"cannot write --tensorboard {directory}: {reason(e)}") from None
    finally:
        path = str(directory)
        while created is not None:
            try:
                os.rmdir(path)
            except OSError:
                break
            if path == created:
                break
            path = os.path.dirname(path)


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics-file key: val_loss -> val/loss, lr -> train/lr."""
    return "val/" + key[len("val_"):] if key.startswith("val_") else "train/" + key


def event_file_name(directory: str | os.PathLike) -> str:
    """A new file's path: TensorBoard reads the files whose name holds "tfevents", in name
    order, so the new file's time stamp is later than every earlier file's in the directory
    (a resume within the same second as the run it continues, another process's pid sorting
    first, still comes after it); a name already taken gets a counter."""
    stamp = int(time.time())
    for name in os.listdir(directory):
        match = re.match(r"events\.out\.tfevents\.(\d+)\.", name)
        if match:
            stamp = max(stamp, int(match.group(1)) + 1)
    base = os.path.join(directory, f"events.out.tfevents.{stamp}."
                                   f"{socket.gethostname()}.{os.getpid()}")
    path, n = base, 0
    while os.path.exists(path):
        n += 1
        path = f"{base}.{n}"
    return path


class EventWriter:
    """One event file of a run that starts (or resumes) after step `first_step`. record(),
    text() and flush() raise OSError when the file cannot be written; the Log reports it."""

    def __init__(self, directory: str | os.PathLike, first_step: int) -> None:
        tensorboardX = require_tensorboardx()
        from tensorboardX import summary
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        self._summary, self._event = summary, Event
        try:
            os.makedirs(directory, exist_ok=True)
            self.path = event_file_name(directory)
            self._records = tensorboardX.RecordWriter(self.path)
        except OSError as e:
            raise DataError(f"cannot write --tensorboard {directory}: {reason(e)}") from None
        try:
            self._write(Event(file_version="brain.Event:2"))
            self._write(Event(step=first_step + 1,
                              session_log=SessionLog(status=SessionLog.START)))
            self.flush()
        except OSError as e:
            with contextlib.suppress(OSError):
                self.close()
            raise DataError(f"cannot write --tensorboard {directory}: {reason(e)}") from None

    def _write(self, event: Any) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())

    def record(self, fields: Mapping[str, Any]) -> None:
        """One record of the metrics file: its numbers as scalars at its step. An evaluation's
        record is flushed to disk at once."""
        step = fields["step"]
        for key, value in fields.items():
            if key != "step" and value is not None and math.isfinite(value):
                self._write(self._event(step=step, summary=self._summary.scalar(tag(key), value)))
        if any(key.startswith("val_") for key in fields):
            self.flush()

    def text(self, step: int, name: str, text: str) -> None:
        self._write(self._event(step=step, summary=self._summary.text(name, text)))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()
