"""train_model on many processes (SPEC section 8): the trainer's side of distributed.py.

`mpiexec -n K train_model ...` starts K ranks; each runs the same loop as one process, with
these pieces in place of the single-process ones (train() picks them when K > 1):

- open_trainer: rank 0 sets the run up alone (directory lock, tokenizing, resuming) and
  broadcasts what it decided; every other rank becomes a FollowerTrainer that reads the
  vocabulary and memory-maps dataset.bin from the same checkpoint directory, checks that it
  sees rank 0's dataset key, vocabulary and model config, and receives the weights and AdamW
  state from rank 0. A rank that sees something else stops every rank (one line naming it).
- DataParallelEngine: the Engine's train_step / evaluate for one rank. A step's micro-batches
  are split in contiguous blocks (distributed.block_of); the rank runs its block through its
  spheres with each gradient kept in a row of its own (the engine's kept_gradients), under
  the micro-batches' global indices; the per-micro-batch results are gathered on every rank
  and added up in micro-batch order; the gradients are folded across the ranks in micro-batch
  order (World.ordered_fold); every rank then applies the same sum with the same settings,
  so every rank takes the same NaN/Inf decisions and holds the same weights.
- AgreedStop: a stop signal counts from the step at which the ranks learn of it (sent with
  the step's results), so every rank stops after the same step; rank 0 saves.
- SilentLog: only rank 0 prints and writes the metrics file.
- run_rank: how a rank ends. A failure every rank meets at the same point (a refused set-up,
  the agreed stop, too many skipped steps, divergence) ends each rank normally, rank 0 printing
  the one line. A failure of one rank alone prints "train_model: error: rank R: ..." and ends
  that process at once (os._exit): the launcher then ends the others within a second, with
  that status, and no rank is left waiting in a collective.
"""
import math
import os
import socket
import sys
import time

import numpy as np

from . import _engine
from .checkpoint import CheckpointError, checkpoint_path
from .dataset import dataset_header, load_dataset
from .distributed import AllRanksStop, block_of, on_all_ranks
from .files import DataError
from .model import CLLMModel
from .tokenizers import Tokenizer, tokenizer_class
from .trainer import Interrupted, Trainer

WAIT_SLICE = 0.1       # seconds between waits on the spheres (Python signal handlers run)
ALIGN_FLOATS = 16      # kept gradient rows start on 64-byte boundaries, as the spheres' own
ABORT_GRACE = 0.5      # seconds a failing rank waits after its error line, before MPI_Abort


class RankRefused(DataError):
    """A rank other than 0 does not see the run rank 0 set up (exit status 2)."""


# -- set-up ----------------------------------------------------------------------------------

def open_trainer(world, make_trainer, checkpoint_dir, exit_status):
    """The run's Trainer on this rank (see the module docstring); checkpoint_dir: this rank's
    --checkpoint-dir. exit_status(exception) gives the status every rank ends with when rank
    0's set-up fails."""
    if world.size == 1:
        return make_trainer()
    if world.is_root:
        try:
            trainer = make_trainer()
        except BaseException as e:
            world.bcast(exit_status(e))
            raise on_all_ranks(e)
        world.bcast(follower_plan(trainer))
        refusals = world.allgather(None)
    else:
        plan = world.bcast(None)
        if not isinstance(plan, dict):
            raise on_all_ranks(AllRanksStop(plan))
        trainer, refusal = None, None
        try:
            trainer = FollowerTrainer(plan, checkpoint_dir)
        except (DataError, CheckpointError, OSError, ValueError) as e:
            refusal = str(e)
        refusals = world.allgather(refusal)
    refused = [(rank, why) for rank, why in enumerate(refusals) if why]
    if refused:
        if world.is_root:
            trainer.close()
            rank, why = refused[0]
            raise on_all_ranks(RankRefused(f"rank {rank} of {world.size}: {why}"))
        raise on_all_ranks(AllRanksStop(2))
    for buffer in (trainer.model.flat, trainer.adam_m, trainer.adam_v):
        world.share(buffer)
    trainer.layout = describe_layout(world, trainer.cfg.threads)
    return trainer


def follower_plan(trainer):
    """What rank 0 decided in set-up that the other ranks take as it is."""
    bin_path = os.path.join(trainer.ckpt_dir, "dataset.bin")
    return {"cfg": trainer.cfg, "state": trainer.state, "changed": trainer.changed,
            "resumed_from": trainer.resumed_from, "data_info": trainer.data_info,
            "model_config": trainer.mcfg,
            "vocab_hash": trainer.tokenizer.vocab_hash,
            "stream_key": dataset_header(bin_path)["key"],
            "final_model_ok": trainer.final_model_ok()}


def describe_layout(world, threads):
    """'K ranks x N sphere(s)' and where each rank runs (the launcher names a rank that dies
    by its pid)."""
    where = world.allgather(f"rank {world.rank} pid {os.getpid()} on {socket.gethostname()}")
    return f"{world.size} ranks x {threads} sphere(s) ({', '.join(where)})"


class FollowerTrainer(Trainer):
    """A Trainer's data and state on a rank other than 0: read, never written."""

    def __init__(self, plan, own_checkpoint_dir):
        self.cfg, self.state = plan["cfg"], plan["state"]
        self.ckpt_dir = os.path.abspath(own_checkpoint_dir)     # the same one, when shared
        self.cfg.checkpoint_dir = own_checkpoint_dir
        self.changed, self.resumed_from = plan["changed"], plan["resumed_from"]
        self.data_info, self.leftovers = plan["data_info"], (0, 0)
        self._final_model_ok = plan["final_model_ok"]
        hint = f" (is {self.ckpt_dir} on a filesystem every rank shares?)"
        vocab_path = os.path.join(self.ckpt_dir, tokenizer_class(self.cfg.tokenizer).file_name)
        bin_path = os.path.join(self.ckpt_dir, "dataset.bin")
        if not os.path.isfile(bin_path) or not os.path.isfile(vocab_path):
            raise DataError(f"{bin_path} or {vocab_path} is missing here{hint}")
        if dataset_header(bin_path)["key"] != plan["stream_key"]:
            raise DataError(f"{bin_path} has another dataset key than rank 0's{hint}")
        self.tokenizer = Tokenizer.load(vocab_path, self.cfg.tokenizer)
        if self.tokenizer.vocab_hash != plan["vocab_hash"]:
            raise DataError(f"{vocab_path} is not rank 0's vocabulary{hint}")
        tokens = load_dataset(bin_path)
        config = self.cfg.model_config(len(self.tokenizer))
        if config != plan["model_config"]:
            raise DataError(f"model config {config} differs from rank 0's {plan['model_config']}")
        self.model = CLLMModel.from_flat(config, np.zeros(_engine.num_parameters(config),
                                                          dtype=np.float32))
        self.adam_m = np.zeros_like(self.model.flat)
        self.adam_v = np.zeros_like(self.model.flat)
        self.plan(tokens)

    def close(self):
        pass

    def save(self, path=None, prune=True):
        """Rank 0 writes; the path it writes to."""
        return path or checkpoint_path(self.ckpt_dir, self.state.step)

    def final_model_ok(self):
        return self._final_model_ok


class SilentLog:
    """The Log of a rank other than 0: rank 0 prints and writes the metrics for all."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def say(self, text, always=False):
        pass

    def progress(self, step, total, text):
        pass

    def warn(self, text):
        pass

    def record(self, **fields):
        pass


# -- stopping --------------------------------------------------------------------------------

class AgreedStop:
    """StopSignals for a rank: the signal this process received is only pending until the
    ranks exchange it with a step's or an evaluation's results; from then on every rank
    answers True, with the first rank's signal."""

    def __init__(self, local):
        self.local = local
        self.signum = None

    def __call__(self):
        return self.signum is not None

    def defer(self):
        self.local.defer()

    def name(self):
        self.local.signum = self.signum
        return self.local.name()

    def pending(self):
        return self.local.signum

    def agree(self, signums):
        if self.signum is None:
            self.signum = next((s for s in signums if s is not None), None)


def exchange_stop(should_stop, gathered):
    """Feeds the pending signals the ranks sent with their results to an AgreedStop."""
    if isinstance(should_stop, AgreedStop):
        should_stop.agree([signum for _, signum in gathered])


# -- the step --------------------------------------------------------------------------------

class DataParallelEngine:
    """An Engine's training step and evaluation spread over the ranks of `world`, with the
    results of one process (see the module docstring). Delegates everything else."""

    def __init__(self, engine, world, model_config, batch_size):
        self.engine, self.world, self.model_config = engine, world, model_config
        n_micro = -(-batch_size // engine.micro_batch)
        first, end = block_of(0, world.size, n_micro)          # rank 0's block is the longest
        size = _engine.num_parameters(model_config)
        self.kept = aligned_rows(end - first, size)
        self.total = np.empty(size, dtype=np.float32)
        self.epoch_loss, self.epoch_tokens, self.total_batches = 0.0, 0, 0
        self.exchange = {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _run(self, windows, train, step=0, first=0):
        """This rank's windows through its spheres; their per-micro-batch results."""
        if len(windows) == 0:
            return []
        self.engine.start(windows, train, step, first, self.kept if train else None)
        while not self.engine.wait(WAIT_SLICE):
            pass
        return self.engine.results()

    def train_step(self, windows, step, adam_m, adam_v, *, adamw, lr, weight_decay, grad_clip,
                   t, should_stop=None):
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
        results = [(owner, r) for owner, (block, _) in enumerate(gathered) for r in block]
        valid = [r[3] for _, r in results]
        self.world.ordered_fold(self.kept[:end - first], valid[first:end], any(valid[:first]),
                                self.total)
        loss_sum, tokens, bad = 0.0, 0, []
        threads = self.engine.num_spheres
        for index, (owner, (loss, counted, sphere, ok, bad_index)) in enumerate(results):
            if not ok:
                tensor = _engine.tensor_at(self.model_config, bad_index) if bad_index >= 0 \
                    else None
                bad.append(_engine.BadMicroBatch(step, index, owner * threads + sphere,
                                                 math.isfinite(loss), tensor))
                continue
            loss_sum += loss
            tokens += counted
            self.epoch_loss += loss
            self.epoch_tokens += counted
        self.total_batches += n_micro
        norm, applied = math.nan, False
        if tokens:
            norm, applied = self.engine.optimizer_step(
                tokens, adam_m, adam_v, adamw=adamw, lr=lr, weight_decay=weight_decay,
                grad_clip=grad_clip, t=t, gradients=self.total)
        self.exchange = {"exchange_bytes": self.world.bytes_sent + self.world.bytes_received,
                         "exchange_seconds": gather_seconds + self.world.seconds}
        return _engine.StepResult(loss_sum, tokens, n_micro, norm, applied, bad)

    def evaluate(self, windows, should_stop=None):
        """Engine.evaluate over every rank: the micro-batches one process would run (slices
        of max_windows, each cut into micro-batches), in contiguous blocks; their losses
        added up in micro-batch order on every rank."""
        mb, step = self.engine.micro_batch, self.engine.max_windows
        pieces = [(start, min(start + step, len(windows)))
                  for start in range(0, len(windows), step)]
        micro = [(a, min(a + mb, end)) for start, end in pieces for a in range(start, end, mb)]
        first, end = block_of(self.world.rank, self.world.size, len(micro))
        mine = []
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

    def begin_epoch(self):
        self.engine.begin_epoch()
        self.epoch_loss, self.epoch_tokens = 0.0, 0

    def epoch_stats(self):
        return self.epoch_loss, self.epoch_tokens, self.total_batches

    def sphere_stats(self):
        """Every rank's spheres, numbered rank x threads + sphere."""
        threads = self.engine.num_spheres
        stats = []
        for rank, mine in enumerate(self.world.allgather(self.engine.sphere_stats())):
            stats += [dict(s, sphere=rank * threads + s["sphere"], rank=rank) for s in mine]
        return stats


def aligned_rows(rows, size):
    """float32 (rows, size) whose rows each start on a 64-byte boundary."""
    stride = -(-size // ALIGN_FLOATS) * ALIGN_FLOATS
    raw = np.empty(rows * stride + ALIGN_FLOATS, dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip:skip + rows * stride].reshape(rows, stride)[:, :size]


# -- how a rank ends -------------------------------------------------------------------------

def run_rank(world, body, exit_status, prog="train_model"):
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
            message = str(e) if isinstance(e, (DataError, CheckpointError, OSError)) \
                else f"{type(e).__name__}: {e}"
            line = f"{prog}: error: rank {world.rank} of {world.size}: {message}"
            try:
                sys.stdout.flush()
                print(line, file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass
            time.sleep(ABORT_GRACE)      # the launcher forwards the line before it ends the job
        world.abort(exit_status(e))
