"""The training step and the evaluation of one rank of a many-process run.

`mpiexec -n K train_model ...` starts K ranks; each runs the same loop as one process, with
these pieces in place of the single-process ones:

- DataParallelEngine: the Engine's train_step / evaluate for one rank. A step's micro-batches
  are split in contiguous blocks (world.block_of); the rank runs its block through its
  spheres with each gradient kept in a row of its own (the engine's kept_gradients), under
  the micro-batches' global indices; the per-micro-batch results are gathered on every rank;
  the gradients are folded across the ranks in micro-batch order (World.ordered_fold); every
  rank then ends the step with the engine's own apply_step on the same results and sum, so
  every rank takes the same NaN/Inf decisions and holds the same weights.
- AgreedStop: a stop signal counts from the step at which the ranks learn of it (sent with
  the step's results), so every rank stops after the same step; rank 0 saves.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import numpy as np
from numpy.typing import NDArray

from cllm_cli.distributed.world import World, block_of
from cllm_cli.model import CLLMConfig

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
        self.local.defer()

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
    results of one process (see the module docstring). Delegates everything else."""

    def __init__(self, engine: Any, world: World, model_config: CLLMConfig,
                 batch_size: int) -> None:
        self.engine, self.world, self.model_config = engine, world, model_config
        n_micro = -(-batch_size // engine.micro_batch)
        first, end = block_of(0, world.size, n_micro)          # rank 0's block is the longest
        size = engine.gradient_size
        self.kept = aligned_rows(end - first, size)
        self.total = np.empty(size, dtype=np.float32)
        self.epoch_loss, self.epoch_tokens, self.total_batches = 0.0, 0, 0
        self.exchange: dict[str, float] = {}

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
        """Engine.train_step over every rank: the same StepResult and weights on each. A stop
        signal does not abandon the step; it is agreed with the step's results."""
        mb, rank = self.engine.micro_batch, self.world.rank
        n_micro = -(-len(windows) // mb)
        first, end = block_of(rank, self.world.size, n_micro)
        mine = self._run(windows[first * mb:end * mb], True, step, first)
        t0 = time.perf_counter()
        pending = should_stop.pending() if isinstance(should_stop, AgreedStop) else None
        gathered = self.world.allgather((mine, pending))
        gather_seconds = time.perf_counter() - t0
        exchange_stop(should_stop, gathered)
        threads = self.engine.num_spheres
        results = [(loss, counted, owner * threads + sphere, ok, bad_index)
                   for owner, (block, _) in enumerate(gathered)
                   for loss, counted, sphere, ok, bad_index in block]
        valid = [r[3] for r in results]
        self.world.ordered_fold(self.kept[:end - first], valid[first:end], any(valid[:first]),
                                self.total)
        for loss, counted, _, ok, _ in results:
            if ok:
                self.epoch_loss += loss
                self.epoch_tokens += counted
        self.total_batches += n_micro
        result = self.engine.apply_step(step, results, adam_m, adam_v, adamw=adamw, lr=lr,
                                        weight_decay=weight_decay, grad_clip=grad_clip, t=t,
                                        gradients=self.total)
        self.exchange = {"exchange_bytes": self.world.bytes_sent + self.world.bytes_received,
                         "exchange_seconds": gather_seconds + self.world.seconds}
        return result

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
        """Every rank's spheres, numbered rank x threads + sphere."""
        threads = self.engine.num_spheres
        stats: list[dict[str, Any]] = []
        for rank, mine in enumerate(self.world.allgather(self.engine.sphere_stats())):
            stats += [dict(s, sphere=rank * threads + s["sphere"], rank=rank) for s in mine]
        return stats


def aligned_rows(rows: int, size: int) -> NDArray[np.float32]:
    """float32 (rows, size) whose rows each start on a 64-byte boundary."""
    stride = -(-size // ALIGN_FLOATS) * ALIGN_FLOATS
    raw = np.empty(rows * stride + ALIGN_FLOATS, dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip:skip + rows * stride].reshape(rows, stride)[:, :size]


