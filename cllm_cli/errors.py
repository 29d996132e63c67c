"""Every failure a CLLM command reports as one line, and the exit status it ends with.

Input and usage faults end with status 2, faults of the run or of the set-up with 1; a stop
signal with 128 + its number. The command-line tools map exceptions to statuses with
exit_status(), so that each class has one status wherever it is raised.
"""
from __future__ import annotations

import signal
from typing import Dict, Tuple, Type, Union

from cllm_cli._engine import ProductError


class UsageError(Exception):
    """A bad option value, combination or input (exit status 2)."""


class DataError(Exception):
    """A problem with the user's data; the message is one line naming the file and the fault."""


class CheckpointError(Exception):
    """A checkpoint cannot be written or read; the message is one line naming file and problem."""


class ConversionError(Exception):
    """A model that cannot be converted; the message is one line naming the file and setting."""


class PrecisionError(Exception):
    """bf16 was asked for and cannot run here."""


class DistributedError(Exception):
    """MPI was asked for but cannot be used (exit status 2)."""


class SamplingError(ValueError):
    """The logits hold no finite value or +inf: no token can be chosen."""


class TrainingError(Exception):
    """Training cannot go on (exit status 1); the last good state has been saved."""


class PlotError(Exception):
    """The metrics cannot be read or the plot cannot be drawn; one line naming the problem."""


class MissingDependency(Exception):
    """An optional package the asked-for feature needs is not installed (exit status 1: the
    input is fine, the setup is not)."""


class WriteFailed(Exception):
    """A file could not be written because the storage failed (no space left, quota, file too
    large, an I/O error): the work could not go on (exit status 1); nothing partial is left."""


class MissingExtra(Exception):
    """An option needs an optional extra that is not installed (exit status 2, as --precision
    bf16 and an MPI launch without theirs): the run is refused before anything is read."""


class Interrupted(Exception):
    """A stop signal: the last completed step has been saved (if training had started).
    The exit status is 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.status = 128 + signum


class RankLost(Exception):
    """Another rank of the job died (exit status 1); this one stops the job."""


class AllRanksStop(Exception):
    """Every rank stops here with `status`; rank 0 has said why."""

    def __init__(self, status: int) -> None:
        super().__init__(f"stopped with rank 0 (status {status})")
        self.status = status


# Tried in order: the first class an error is an instance of gives its status.
# exception classes (a class or a tuple of them) -> the exit status they end a command with
Statuses = Dict[Union[Type[BaseException], Tuple[Type[BaseException], ...]], int]

STATUSES: Statuses = {
    (UsageError, DataError, CheckpointError, ConversionError, DistributedError, PrecisionError,
     PlotError, MissingExtra): 2,
    (TrainingError, MissingDependency, SamplingError, RankLost, ProductError,
     WriteFailed): 1,
}


def exit_status(error: BaseException, statuses: Statuses = STATUSES) -> int:
    """The status a command ends with after `error` (1 for anything not listed)."""
    if isinstance(error, (Interrupted, AllRanksStop)):
        return error.status
    if isinstance(error, KeyboardInterrupt):
        return 130
    return next((status for classes, status in statuses.items() if isinstance(error, classes)), 1)
