"""Many processes over MPI: `mpiexec -n K train_model ...` or `srun`.

Each process ("rank") runs a ThreadedTrainingSystem of its own. The micro-batches of a global
batch are split over the ranks in contiguous blocks (block_of); each rank keeps the gradient
of each of its micro-batches in a row of its own, and the step's gradient is folded across
the ranks in micro-batch order, exactly as one process folds it, in place in the rank's first
row (fold_and_scatter):

    rank 0:  S = g0;  S = S + g1; ...           (its own micro-batches)     -> rank 1
    rank r:  S = S_received + g_a; S = S + g_a+1; ...                       -> rank r+1
    the last rank holds (((g0 + g1) + g2) + ...) and sends each rank its share of it.

The buffer is cut into segments, and each segment travels down the chain on its own, so that
sending segment k overlaps adding segment k+1 (a pipeline: the chain costs about
(K - 1 + segments) segment times); the last rank sends each finished segment's parts on to
the ranks that own them (a reduce-scatter in a fixed order). A plain MPI_Allreduce(SUM) would
not do: its order of additions depends on its algorithm and on K. The additions are numpy
float32 adds, element by element, the same IEEE operation the engine's ordered accumulation
performs, so the result is the same bit for bit. Each rank then updates the weights of its
share, and allgather_shares gives every rank all of them.

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
from typing import Any, Callable, NoReturn, Sequence, TypeVar, cast

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


RANK_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


def launcher_rank() -> int:
    """This process's rank as its MPI launcher (or srun) numbered it, before MPI is set up;
    0 when not launched by one."""
    if not launched_by_mpi():
        return 0
    for name in (*RANK_VARS, "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


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


def fold_segment(acc: NDArray[np.float32], received: NDArray[np.float32] | None,
                 grads: Sequence[np.ndarray], valid: Sequence[bool]) -> None:
    """acc = (((received + g_a) + g_a+1) + ...) over the valid grads, in order, where grads[0]
    (when there is one) is acc itself, overwritten. received is None when no earlier
    micro-batch entered the sum: then the first valid gradient starts it, and without any
    the sum is zeros."""
    started = received is not None
    if started:
        if grads and valid[0]:
            np.add(received, acc, out=acc)     # received + g_a, the order of one process
        else:
            acc[...] = received
    for j in range(1 if started else 0, len(grads)):
        if not valid[j]:
            continue
        if started:
            np.add(acc, grads[j], out=acc)
        else:
            if j:
                acc[...] = grads[j]
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


class World:
    """The ranks of one MPI job. Small control messages are pickled (lower-case mpi4py calls);
    gradients go through buffers (capitalised calls)."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.local_size = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()   # on this host
        # the step's exchange so far (since begin_exchange): bytes of gradients and weights
        # this rank sent and received, seconds spent in it (waiting included)
        self.bytes_sent = self.bytes_received = 0
        self.seconds = 0.0
        self.incoming = np.empty(0, dtype=np.float32)   # a segment received down the chain
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

    def send(self, array: np.ndarray, dest: int, tag: int) -> None:
        self.comm.Send(array, dest=dest, tag=tag)

    def recv(self, array: np.ndarray, source: int, tag: int) -> None:
        self.comm.Recv(array, source=source, tag=tag)

    def gather(self, obj: _T) -> list[_T] | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        return self.comm.gather(obj, root=0)

    def begin_exchange(self) -> None:
        """Starts counting a step's exchange (bytes_sent, bytes_received, seconds)."""
        self.bytes_sent = self.bytes_received = 0
        self.seconds = 0.0

    def fold_and_scatter(self, rows: NDArray[np.float32], valid: Sequence[bool],
                         first_valid_before: bool,
                         shares: Sequence[tuple[int, int]]) -> NDArray[np.float32]:
        """This rank's share of the step's gradient (((g0 + g1) + g2) + ...) over every rank's
        micro-batches: rows[0][start:stop] for its share (start, stop) in `shares` (every
        rank's, in rank order), where the sum is folded in place. rows: float32 (n, size)
        with n >= 1, the first len(valid) of them this rank's micro-batch gradients in order;
        valid: which of them enter the sum; first_valid_before: whether any micro-batch of a
        lower rank entered it (then this rank adds to what it receives, else it starts from
        its first valid gradient). Counts bytes and seconds."""
        from mpi4py import MPI
        t0 = time.perf_counter()
        acc, own = rows[0], list(rows[:len(valid)])
        last, left, right = self.size - 1, self.rank - 1, self.rank + 1
        if left >= 0 and self.incoming.size < min(SEGMENT_FLOATS, acc.size):
            self.incoming = np.empty(min(SEGMENT_FLOATS, acc.size), dtype=np.float32)
        pending = []
        for seg, start in enumerate(range(0, acc.size, SEGMENT_FLOATS)):
            stop = min(start + SEGMENT_FLOATS, acc.size)
            received = None
            if left >= 0:
                self.comm.Recv(self.incoming[:stop - start], source=left, tag=seg)
                self.bytes_received += 4 * (stop - start)
                if first_valid_before:
                    received = self.incoming[:stop - start]
            fold_segment(acc[start:stop], received, [g[start:stop] for g in own], valid)
            if right <= last:
                pending.append(self.comm.Isend(acc[start:stop], dest=right, tag=seg))
                self.bytes_sent += 4 * (stop - start)
                continue
            for owner, (a, b) in enumerate(shares[:last]):    # the sum's segment is final
                lo, hi = max(a, start), min(b, stop)
                if lo < hi:
                    pending.append(self.comm.Isend(acc[lo:hi], dest=owner, tag=seg))
                    self.bytes_sent += 4 * (hi - lo)
        MPI.Request.Waitall(pending)
        a, b = shares[self.rank]
        if self.rank != last:               # this rank's share, as the last rank sent it
            for seg, start in enumerate(range(0, acc.size, SEGMENT_FLOATS)):
                lo, hi = max(a, start), min(b, start + SEGMENT_FLOATS)
                if lo < hi:
                    self.comm.Recv(acc[lo:hi], source=last, tag=seg)
                    self.bytes_received += 4 * (hi - lo)
        self.seconds += time.perf_counter() - t0
        return acc[a:b]

    def allgather_array(self, mine: np.ndarray, counts: Sequence[int]) -> np.ndarray:
        """Every rank's `mine` (counts[r] values on rank r, float64), one after another in
        rank order, on every rank."""
        from mpi4py import MPI
        t0 = time.perf_counter()
        out: np.ndarray = np.empty(sum(counts), dtype=np.float64)
        self.comm.Allgatherv(mine, [out, list(counts), MPI.DOUBLE])
        self.seconds += time.perf_counter() - t0
        return out

    def allgather_shares(self, buffer: NDArray[np.float32],
                         shares: Sequence[tuple[int, int]]) -> None:
        """buffer[start:stop] of each rank's share, from that rank into every rank's
        buffer (in place). Counts bytes and seconds."""
        from mpi4py import MPI
        t0 = time.perf_counter()
        counts = [b - a for a, b in shares]
        displacements = [a for a, _ in shares]
        self.comm.Allgatherv(MPI.IN_PLACE, [buffer, counts, displacements, MPI.FLOAT])
        mine = counts[self.rank]
        self.bytes_sent += 4 * mine * (self.size - 1)
        self.bytes_received += 4 * (buffer.size - mine)
        self.seconds += time.perf_counter() - t0


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
