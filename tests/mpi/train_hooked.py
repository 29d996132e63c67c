"""train_model with a test hook, run under mpiexec (or alone) by tests/test_mpi_training.py:
the run's engine is the testing extension's (cllm_cli._engine_testing, which has the hooks).
argv: HOOK TRAIN_MODEL_ARGS...; HOOK is
  nan:STEP:MICRO   a NaN in the gradient of global micro-batch MICRO of step STEP (0-based)
  fail:RANK:STEP   rank RANK raises RuntimeError at step STEP (a failure of that rank alone)
"""
import functools
import sys

from cllm_cli import _engine_testing
from cllm_cli.cli import train as train_cli
from cllm_cli.training import loop

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
    return wrapped


loop.rank_engine = hooked
train_cli.train = functools.partial(loop.train, engine_class=_engine_testing.Engine)
sys.exit(train_cli.main(sys.argv[2:]))
