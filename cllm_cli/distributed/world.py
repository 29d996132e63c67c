"""Many processes over MPI: `mpiexec -n K train_model ...` or `srun`.

Each process ("rank") runs a ThreadedTrainingSystem of its own. The micro-batches of a global
batch are split over the ranks in contiguous blocks (block_of); each rank keeps the gradient
of each of its micro-batches, and the step's gradient is folded across the ranks in
micro-batch order, exactly as one process folds it:

    rank 0:  S = g0;  S = S + g1; ...           (its own micro-batches)     -> rank 1
    rank r:  S = S_received + g_a; S = S + g_a+1; ...                       -> rank r+1
    the last rank holds (((g0 + g1) + g2) + ...) and broadcasts it.

The buffer is cut into segments, and each segment travels down the chain on its own, so that
sending segment k overlaps adding segment k+1 (a pipeline: the chain costs about
(K - 1 + segments) segment times, then one broadcast). A plain MPI_Allreduce(SUM) would not do:
its order of additions depends on its algorithm and on K. The additions are numpy float32
adds, element by element, the same IEEE operation the engine's ordered accumulation performs,
so the result is the same bit for bit.

Rank and size come from the communicator. Launcher variables are only used to notice that a
launcher started us while mpi4py is missing (one line says how to install it).

How a rank ends (run_rank): a failure every rank meets at the same point (a refused set-up,
the agreed stop, too many skipped steps, divergence) ends each rank normally, rank 0 printing
the one line. A failure of one rank alone prints "train_model: error: rank R: ..." and ends
that process at once: the launcher then ends the others within a second, with that status,
and no rank is left waiting in a collective.

Waiting for rank 0 (from_root): while rank 0 sets the run up alone (tokenizing can take
minutes), the other ranks do not wait in a blocking MPI call, which busy-polls a core and does
not notice a dead peer: they poll for rank 0's message every POLL_SECONDS and sleep in
between, and check that rank 0 still lives (its pid, exchanged at start-up, when it runs on the
same host and is visible there; else that the launcher's process that started this rank is
still its parent). A rank that finds rank 0 gone says so in one line and ends the job
(MPI_Abort), status 1.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Callable, Iterable, NoReturn, Sequence, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from cllm_cli.errors import AllRanksStop, CheckpointError, DataError, DistributedError, Interrupted, RankLost

_T = TypeVar("_T")
_Error = TypeVar("_Error", bound=BaseException)

LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
SEGMENT_FLOATS = 1 << 20            # 4 MiB per message down the chain
ABORT_GRACE = 0.5      # seconds a failing rank waits after its error line, before MPI_Abort
POLL_SECONDS = 0.05    # between two polls of a rank waiting for rank 0 (from_root)
FROM_ROOT_TAG = 0x5E7


def on_all_ranks(error: _Error) -> _Error:
    """Marks an exception that every rank raises at the same point of the run (so that each
    ends normally); returns it."""
    error.all_ranks = True      # type: ignore[attr-defined]  # read by run_rank
    return error


def launched_by_mpi() -> bool:
    if any(v in os.environ for v in LAUNCHER_VARS):
        return True
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1


def world() -> Solo | World:
    """The MPI world when launched by an MPI launcher with more than one process, else Solo."""
    if not launched_by_mpi():
        return Solo()
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError("started by an MPI launcher, but mpi4py is not installed: "
                               "pip install '.[mpi]' in CLLM's source (or mpi4py built "
                               "against your MPI)") from None
    if MPI.COMM_WORLD.Get_size() == 1:
        return Solo()
    return World(MPI.COMM_WORLD)


def block_of(rank: int, size: int, n_micro: int) -> tuple[int, int]:
    """[first, end) micro-batch indices of `rank`: contiguous blocks, the first n % size ranks
    one longer."""
    base, extra = divmod(n_micro, size)
    first = rank * base + min(rank, extra)
    return first, first + base + (1 if rank < extra else 0)


def fold_into(acc: NDArray[np.float32], grads: Iterable[np.ndarray], valid: Iterable[bool],
              started: bool) -> None:
    """acc = (((acc + g_a) + g_a+1) + ...) over the valid grads, in order; when not `started`
    the first valid one is copied (nothing valid leaves acc as it is, zeros if it was)."""
    for g, ok in zip(grads, valid):
        if not ok:
            continue
        if started:
            np.add(acc, g, out=acc)
        else:
            acc[...] = g
            started = True
    if not started:
        acc[...] = 0.0


class Solo:
    """One process: every collective is the identity."""
    rank, size, local_size = 0, 1, 1
    is_root = True

    def share(self, array: np.ndarray) -> None:
        pass

    def bcast(self, obj: _T) -> _T:
        return obj

    def from_root(self, obj: _T) -> _T:
        return obj

    def allgather(self, obj: _T) -> list[_T]:
        return [obj]

    def ordered_fold(self, grads: Sequence[np.ndarray], valid: Sequence[bool], first_valid_before: bool,
                     out: NDArray[np.float32]) -> None:
        fold_into(out, grads, valid, started=False)


class World:
    """The ranks of one MPI job. Small control messages are pickled (lower-case mpi4py calls);
    gradients go through buffers (capitalised calls)."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.local_size = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()   # on this host
        self.bytes_sent = 0             # gradient bytes this rank sent in the last fold
        self.bytes_received = 0
        self.seconds = 0.0              # time spent in the last fold (waiting included)
        self.parent = os.getppid()      # the launcher's process that started this rank
        self.root_host, self.root_pid = comm.bcast((socket.gethostname(), os.getpid()), root=0)
        self.root_visible = (self.root_host == socket.gethostname()
                             and _process_alive(self.root_pid))

    def bcast(self, obj: _T) -> _T:
        return self.comm.bcast(obj, root=0)

    def from_root(self, obj: _T) -> _T:
        """Rank 0's `obj` on every rank, for a wait that may be long (see the module
        docstring): the other ranks sleep between polls, and raise RankLost when rank 0
        has died."""
        if self.is_root:
            for rank in range(1, self.size):
                self.comm.send(obj, dest=rank, tag=FROM_ROOT_TAG)
            return obj
        while not self.comm.Iprobe(source=0, tag=FROM_ROOT_TAG):
            self.check_root()
            time.sleep(POLL_SECONDS)
        return self.comm.recv(source=0, tag=FROM_ROOT_TAG)

    def check_root(self) -> None:
        """RankLost when rank 0's process (or, when it cannot be seen from here, the
        launcher's process that started this one) has ended."""
        if self.root_visible:
            if not _process_alive(self.root_pid):
                raise RankLost(f"rank 0 (pid {self.root_pid} on {self.root_host}) died; "
                               f"stopping the job")
        elif os.getppid() != self.parent:
            raise RankLost("the MPI launcher that started this rank died; stopping the job")

    def allgather(self, obj: _T) -> list[_T]:
        return self.comm.allgather(obj)

    def share(self, array: np.ndarray) -> None:
        """Rank 0's contents of a numpy array, into the same array on every rank."""
        self.comm.Bcast(array, root=0)

    def abort(self, status: int) -> NoReturn:
        """Ends this process and, through the launcher, every rank of the job at once (no rank
        is left waiting in a collective); MPI prints one line naming the rank."""
        self.comm.Abort(status)
        os._exit(status)

    def ordered_fold(self, grads: Sequence[np.ndarray], valid: Sequence[bool], first_valid_before: bool,
                     out: NDArray[np.float32]) -> None:
        """The step's gradient (((g0 + g1) + g2) + ...) over every rank's micro-batches, into
        `out` on every rank. grads: this rank's micro-batch gradients (float32, in order);
        valid: which of them enter the sum; first_valid_before: whether any micro-batch of a
        lower rank entered it (then this rank adds to what it receives, else it starts from
        its first valid gradient). Returns nothing; counts bytes and seconds."""
        t0 = time.perf_counter()
        size, left, right = out.size, self.rank - 1, self.rank + 1
        self.bytes_sent = self.bytes_received = 0
        pending = []
        for seg, start in enumerate(range(0, size, SEGMENT_FLOATS)):
            piece = out[start:start + SEGMENT_FLOATS]
            if left >= 0:
                self.comm.Recv(piece, source=left, tag=seg)
                self.bytes_received += piece.nbytes
            fold_into(piece, [g[start:start + SEGMENT_FLOATS] for g in grads], valid,
                      first_valid_before)
            if right < self.size:
                pending.append(self.comm.Isend(piece, dest=right, tag=seg))
                self.bytes_sent += piece.nbytes
        for request in pending:
            request.Wait()
        self.comm.Bcast(out, root=self.size - 1)
        if self.rank != self.size - 1:
            self.bytes_received += out.nbytes
        self.seconds = time.perf_counter() - t0


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):           # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True


# -- how a rank ends -------------------------------------------------------------------------

def run_rank(world: Solo | World, body: Callable[[], _T], exit_status: Callable[[BaseException], int],
             prog: str = "train_model") -> _T:
    """body() on this rank, and its result. When every rank stops together, rank 0 raises
    the exception (reported as usual) and the others AllRanksStop with its status. A failure
    of this rank alone: one line naming the rank, then the process ends at once with its
    status (no MPI_Finalize: the launcher ends the other ranks)."""
    try:
        return body()
    except BaseException as e:
        if world.size == 1:
            raise
        if getattr(e, "all_ranks", False):
            if world.is_root:
                raise
            raise AllRanksStop(exit_status(e)) from None
        if not isinstance(e, Interrupted):
            message = str(e) if isinstance(e, (DataError, CheckpointError, OSError, RankLost)) \
                else f"{type(e).__name__}: {e}"
            line = f"{prog}: error: rank {world.rank} of {world.size}: {message}"
            try:
                sys.stdout.flush()
                print(line, file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass
            time.sleep(ABORT_GRACE)      # the launcher forwards the line before it ends the job
        cast(World, world).abort(exit_status(e))        # size > 1: a World
