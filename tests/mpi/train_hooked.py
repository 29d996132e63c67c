"""train_model with a test hook, run under mpiexec (or alone) by tests/test_mpi_training.py:
the run's engine is the testing extension's (cllm_cli._engine_testing, which has the hooks).
argv: HOOK TRAIN_MODEL_ARGS...; HOOK is
  nan:STEP:MICRO   a NaN in the gradient of global micro-batch MICRO of step STEP (0-based)
  fail:RANK:STEP   rank RANK raises RuntimeError at step STEP (a failure of that rank alone)
  fold:RANK:STEP   rank RANK raises RuntimeError in the middle of step STEP's exchange: the
                   gradients folded and scattered, the chunks' sums about to be gathered
  save:RANK:N      rank RANK (not 0) raises RuntimeError while rank 0 reads its share of
                   AdamW's state into the N-th checkpoint (its first piece)
  setup:0:0        rank 0, in set-up (the checkpoint directory locked, before tokenizing),
                   writes CHECKPOINT_DIR.setting-up next to the directory and waits (at most
                   60 s) until it is removed, or for a signal
  shares:0:0       each rank writes, at its first step, shares.RANK.json into the checkpoint
                   directory: the sizes of the AdamW state it is handed and holds, its
                   share, and the shape of every numpy array its DataParallelEngine holds
"""
import functools
import json
import os
import sys
import time

import numpy as np

from cllm_cli import _engine_testing
from cllm_cli.cli import train as train_cli
from cllm_cli.training import loop, trainer

kind, a, b = sys.argv[1].split(":")
a, b = int(a), int(b)
make_engine = loop.rank_engine


def hooked(world, engine, run):
    if kind == "nan":
        _engine_testing.inject_nan(engine, a, b)
    wrapped = make_engine(world, engine, run)
    if kind == "fail" and world.rank == a:
        step = wrapped.train_step

        def failing_step(windows, index, *args, **kw):
            if index == b:
                raise RuntimeError(f"injected failure at step {index}")
            return step(windows, index, *args, **kw)
        wrapped.train_step = failing_step
    if kind == "fold" and world.rank == a:
        gather, steps = world.allgather_array, iter(range(10 ** 6))

        def failing_gather(*args, **kw):
            index = next(steps)              # one gather of chunk sums per step
            if index == b:
                raise RuntimeError(f"injected failure in the exchange of step {index}")
            return gather(*args, **kw)
        world.allgather_array = failing_gather
    if kind == "save" and world.rank == a:
        serve, saves = run.moments.serve, iter(range(1, 10 ** 6))

        def failing_serve():
            if next(saves) == b:
                world.send = failing_send
            return serve()

        def failing_send(*args, **kw):
            raise RuntimeError(f"injected failure in checkpoint {b}")
        run.moments.serve = failing_serve
    if kind == "shares":
        step = wrapped.train_step

        def reporting_step(windows, index, adam_m, adam_v, *args, **kw):
            if index == 0:
                share = run.moments.share
                held = {name: list(value.shape) for name, value in vars(wrapped).items()
                        if isinstance(value, np.ndarray)}
                with open(os.path.join(run.ckpt_dir, f"shares.{world.rank}.json"), "w") as f:
                    json.dump({"rank": world.rank, "m": adam_m.size, "v": adam_v.size,
                               "trainer_m": run.adam_m.size, "trainer_v": run.adam_v.size,
                               "start": share.start, "stop": share.stop,
                               "gradient_size": engine.gradient_size, "held": held}, f)
            return step(windows, index, adam_m, adam_v, *args, **kw)
        wrapped.train_step = reporting_step
    return wrapped


if kind == "setup":
    prepare = trainer.prepare_dataset

    def waiting_prepare(files, ckpt_dir, *args, **kw):
        marker = f"{ckpt_dir}.setting-up"
        open(marker, "w").close()
        for _ in range(1200):
            if not os.path.exists(marker):
                break
            time.sleep(0.05)
        return prepare(files, ckpt_dir, *args, **kw)
    trainer.prepare_dataset = waiting_prepare

loop.rank_engine = hooked
train_cli.train = functools.partial(loop.train, engine_class=_engine_testing.Engine)
sys.exit(train_cli.main(sys.argv[2:]))
