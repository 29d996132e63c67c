"""The training step and the evaluation of one rank of a many-process run.

`mpiexec -n K train_model ...` starts K ranks; each runs the same loop as one process, with
these pieces in place of the single-process ones:

- DataParallelEngine: the Engine's train_step / evaluate for one rank. A step's micro-batches
  are split in contiguous blocks (world.block_of); the rank runs its block through its
  spheres with each gradient kept in a row of its own (the engine's kept_gradients), under
  the micro-batches' global indices; the per-micro-batch results are gathered on every rank
  and added up by the engine's sum_results (the same loss, tokens and left-out micro-batches
  everywhere). The gradients are folded across the ranks in micro-batch order, each rank
  receiving its share of the sum (World.fold_and_scatter; shares.py: ZeRO stage 1, each rank
  holds AdamW's m and v of its share only). The optimiser step then runs in two halves, as
  one process runs it over the same chunks: each rank divides its share and sums the squares
  per chunk (Engine.mean_gradient_sumsq), the ranks gather every chunk's sum, and each adds
  them up in chunk order (Engine.optimizer_update): the same norm bits, clipping factor and
  applied/skipped decision on every rank; each updates the weights of its share, and the
  ranks exchange the updated shares (World.allgather_shares).
- AgreedStop: a stop signal counts from the step at which the ranks learn of it (sent with
  the step's results), so every rank stops after the same step; rank 0 saves.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import numpy as np
from numpy.typing import NDArray

from cllm_cli._engine import StepResult
from cllm_cli.distributed.shares import MomentShares
from cllm_cli.distributed.world import World, block_of

WAIT_SLICE = 0.1       # seconds between waits on the spheres (Python signal handlers run)
ALIGN_FLOATS = 16      # kept gradient rows start on 64-byte boundaries, as the spheres' own


# -- stopping --------------------------------------------------------------------------------

class AgreedStop:
    """StopSignals for a rank: the signal this process received is only pending until the
    ranks exchange it with a step's or an evaluation's results; from then on every rank
    answers True, with the first rank's signal."""

    def __init__(self, local: Any) -> None:
        """local: this process's StopSignals."""
        self.local = local
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def defer(self) -> None:
        self.local.hold()       # a signal of the set-up goes out with the first step's results

    def name(self) -> str:
        self.local.signum = self.signum
        return self.local.name()

    def pending(self) -> int | None:
        return self.local.signum

    def agree(self, signums: Iterable[int | None]) -> None:
        if self.signum is None:
            self.signum = next((s for s in signums if s is not None), None)


def exchange_stop(should_stop: Callable[[], bool] | None,
                  gathered: Iterable[tuple[Any, int | None]]) -> None:
    """Feeds the pending signals the ranks sent with their results to an AgreedStop."""
    if isinstance(should_stop, AgreedStop):
        should_stop.agree([signum for _, signum in gathered])


# -- the step --------------------------------------------------------------------------------

class DataParallelEngine:
    """An Engine's training step and evaluation spread over the ranks of `world`, with the
    results of one process (see the module docstring). Delegates everything else.
    trained: the buffer the optimiser updates (the engine's parameters, or its adapters);
    moments: this rank's share of AdamW's state."""

    def __init__(self, engine: Any, world: World, trained: NDArray[np.float32],
                 moments: MomentShares, batch_size: int) -> None:
        self.engine, self.world, self.trained, self.moments = engine, world, trained, moments
        n_micro = -(-batch_size // engine.micro_batch)
        first, end = block_of(world.rank, world.size, n_micro)   # a full batch's block
        # one row per micro-batch of the block; the sum is folded into the first one
        self.kept = aligned_rows(max(1, end - first), engine.gradient_size)
        self.chunk_counts = [s.end_chunk - s.first_chunk for s in moments.shares]
        self.epoch_loss, self.epoch_tokens, self.total_batches = 0.0, 0, 0
        self.exchange: dict[str, float] = {}
        # spheres are numbered across the ranks in rank order, each rank with its own count
        counts = world.allgather(engine.num_spheres)
        self.first_sphere = [sum(counts[:rank]) for rank in range(world.size)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def _run(self, windows: NDArray[np.int32], train: bool, step: int = 0,
             first: int = 0) -> list[Any]:
        """This rank's windows through its spheres; their per-micro-batch results."""
        if len(windows) == 0:
            return []
        self.engine.start(windows, train, step, first, self.kept if train else None)
        while not self.engine.wait(WAIT_SLICE):
            pass
        return self.engine.results()

    def train_step(self, windows: NDArray[np.int32], step: int, adam_m: NDArray[np.float32],
                   adam_v: NDArray[np.float32], *, adamw: bool, lr: float, weight_decay: float,
                   grad_clip: float, t: int, should_stop: Callable[[], bool] | None = None) -> Any:
        """Engine.train_step over every rank: the same StepResult and weights on each;
        adam_m, adam_v: this rank's share of AdamW's state. A stop signal does not abandon
        the step; it is agreed with the step's results."""
        mb, rank = self.engine.micro_batch, self.world.rank
        n_micro = -(-len(windows) // mb)
        first, end = block_of(rank, self.world.size, n_micro)
        mine = self._run(windows[first * mb:end * mb], True, step, first)
        self.world.begin_exchange()
        t0 = time.perf_counter()
        pending = should_stop.pending() if isinstance(should_stop, AgreedStop) else None
        gathered = self.world.allgather((mine, pending))
        gather_seconds = time.perf_counter() - t0
        exchange_stop(should_stop, gathered)
        results = [(loss, counted, self.first_sphere[owner] + sphere, ok, bad_index)
                   for owner, (block, _) in enumerate(gathered)
                   for loss, counted, sphere, ok, bad_index in block]
        for loss, counted, _, ok, _ in results:
            if ok:
                self.epoch_loss += loss
                self.epoch_tokens += counted
        self.total_batches += n_micro
        loss_sum, tokens, bad = self.engine.sum_results(step, results)
        norm, applied = math.nan, False
        if tokens:                  # else no optimiser step: nothing to fold
            valid = [r[3] for r in results]
            gradient = self.world.fold_and_scatter(self.kept, valid[first:end],
                                                   any(valid[:first]), self.moments.bounds)
            norm, applied = self._optimizer_step(gradient, tokens, adam_m, adam_v, adamw=adamw,
                                                 lr=lr, weight_decay=weight_decay,
                                                 grad_clip=grad_clip, t=t)
        self.exchange = {"exchange_bytes": self.world.bytes_sent + self.world.bytes_received,
                         "exchange_seconds": gather_seconds + self.world.seconds}
        return StepResult(loss_sum, tokens, len(results), norm, applied, bad)

    def _optimizer_step(self, gradient: NDArray[np.float32], tokens: int,
                        adam_m: NDArray[np.float32], adam_v: NDArray[np.float32],
                        **settings: Any) -> tuple[float, bool]:
        """The optimiser step of this rank's share, `gradient` its part of the summed
        gradient; then every rank's updated weights on every rank. (norm, applied)."""
        share = self.moments.share
        sums = self.engine.mean_gradient_sumsq(gradient, tokens, share.first_chunk,
                                               share.end_chunk)
        every = self.world.allgather_array(sums, self.chunk_counts)
        norm, applied = self.engine.optimizer_update(gradient, adam_m, adam_v,
                                                     share.first_chunk, share.end_chunk,
                                                     every, **settings)
        if applied:
            self.world.allgather_shares(self.trained, self.moments.bounds)
        return norm, applied

    def evaluate(self, windows: NDArray[np.int32],
                 should_stop: Callable[[], bool] | None = None) -> tuple[float, int]:
        """Engine.evaluate over every rank: the micro-batches one process would run (slices
        of max_windows, each cut into micro-batches), in contiguous blocks; their losses
        added up in micro-batch order on every rank."""
        mb, step = self.engine.micro_batch, self.engine.max_windows
        pieces = [(start, min(start + step, len(windows)))
                  for start in range(0, len(windows), step)]
        micro = [(a, min(a + mb, end)) for start, end in pieces for a in range(start, end, mb)]
        first, end = block_of(self.world.rank, self.world.size, len(micro))
        mine: list[Any] = []
        for start, stop in pieces:
            inside = [m for m in micro[first:end] if start <= m[0] < stop]
            if inside:
                mine += self._run(windows[inside[0][0]:inside[-1][1]], False)
        gathered = self.world.allgather((mine, should_stop.pending()
                                         if isinstance(should_stop, AgreedStop) else None))
        exchange_stop(should_stop, gathered)
        loss_sum, tokens = 0.0, 0
        for block, _ in gathered:
            for loss, counted, *_ in block:
                loss_sum += loss
                tokens += counted
        return loss_sum, tokens

    def begin_epoch(self) -> None:
        self.engine.begin_epoch()
        self.epoch_loss, self.epoch_tokens = 0.0, 0

    def epoch_stats(self) -> tuple[float, int, int]:
        return self.epoch_loss, self.epoch_tokens, self.total_batches

    def sphere_stats(self) -> list[dict[str, Any]]:
        """Every rank's spheres, numbered across the ranks in rank order."""
        stats: list[dict[str, Any]] = []
        for rank, mine in enumerate(self.world.allgather(self.engine.sphere_stats())):
            stats += [dict(s, sphere=self.first_sphere[rank] + s["sphere"], rank=rank)
                      for s in mine]
        return stats


def aligned_rows(rows: int, size: int) -> NDArray[np.float32]:
    """float32 (rows, size) whose rows each start on a 64-byte boundary."""
    stride = -(-size // ALIGN_FLOATS) * ALIGN_FLOATS
    raw = np.empty(rows * stride + ALIGN_FLOATS, dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip:skip + rows * stride].reshape(rows, stride)[:, :size]


