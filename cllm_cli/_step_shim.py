"""TEMPORARY: the new Engine.train_step / evaluate API on top of the old start/wait/results
calls, until the engine branch lands. Deleted at that merge."""
import math

from . import _engine
from .model import engine_config, optimizer_chunks, tensor_at


class StepAborted(Exception):
    pass


class BadMicroBatch:
    def __init__(self, step, index, sphere, loss_finite, tensor):
        self.step, self.index, self.sphere = step, index, sphere
        self.loss_finite, self.tensor = loss_finite, tensor


class StepResult:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class Engine:
    def __init__(self, cfg, params, threads, micro_batch, max_windows, lock_mode, debug_locks):
        self.cfg = cfg
        self.max_windows = max_windows
        self.e = _engine.Engine(engine_config(cfg), params, threads, micro_batch, max_windows,
                                lock_mode, debug_locks, optimizer_chunks(cfg))

    def __getattr__(self, name):
        return getattr(self.e, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.e.close()

    def _run(self, windows, train, step, should_stop):
        self.e.start(windows, train, step)
        while not self.e.wait(0.1):
            if should_stop is not None and should_stop():
                self.e.abort()
        if should_stop is not None and should_stop():
            raise StepAborted()
        return self.e.results()

    def train_step(self, windows, step, m, v, *, adamw, lr, weight_decay, grad_clip, t,
                   should_stop=None):
        results = self._run(windows, True, step, should_stop)
        loss_sum, counted, bad = 0.0, 0, []
        for index, (loss, n, sphere, valid, bad_index) in enumerate(results):
            if valid:
                loss_sum += loss
                counted += n
            else:
                bad.append(BadMicroBatch(step, index, sphere, math.isfinite(loss),
                                         tensor_at(self.cfg, bad_index) if bad_index >= 0 else None))
        norm, applied = float("nan"), False
        if counted:
            norm, applied = self.e.optimizer_step(counted, m, v, adamw=adamw, lr=lr,
                                                  weight_decay=weight_decay,
                                                  grad_clip=grad_clip, t=t)
        return StepResult(loss=loss_sum / counted if counted else float("nan"),
                          loss_sum=loss_sum, tokens=counted, micro_batches=len(results),
                          grad_norm=norm, applied=applied, bad=bad)

    def evaluate(self, windows, should_stop=None):
        loss_sum, counted = 0.0, 0
        for start in range(0, len(windows), self.max_windows):
            for loss, n, _, _, _ in self._run(windows[start:start + self.max_windows], False,
                                              -1, should_stop):
                loss_sum += loss
                counted += n
        return loss_sum, counted
