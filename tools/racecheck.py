"""A short multi-sphere training for `make racecheck`: 4 spheres (more than cores and than
some steps' micro-batches), both lock modes, the lock-order check on, evaluation and a NaN
micro-batch, so every path that shares memory between threads runs under ThreadSanitizer. The engine
is the testing extension (cllm_cli._engine_testing), for its NaN injection; the word tokenizer
keeps the tokenizers library's own (uninstrumented) threads out of the check."""
import os
import sys
import tempfile

from cllm_cli import _engine, _engine_testing, train


def abort_mid_step():
    """Ctrl-C's path: a step stopped while spheres compute and wait for their turns, in both
    APIs (abort() between start() and wait(); should_stop() of train_step and evaluate)."""
    import itertools
    import time

    import numpy as np

    from cllm_cli import CLLMConfig, CLLMModel
    cfg = CLLMConfig(vocab_size=50, embed_dim=32, num_layers=4, num_heads=2, seq_len=32)
    model = CLLMModel(cfg, seed=1)
    windows = np.random.default_rng(2).integers(4, 50, (64, 33)).astype(np.int32)
    m, v = np.zeros_like(model.flat), np.zeros_like(model.flat)
    with _engine.Engine(cfg, model.flat, 4, 1, 64, debug_locks=True) as engine:
        for delay in (0.0, 0.05, 0.2):
            engine.start(windows, True, 0)
            time.sleep(delay)
            engine.abort()
            while not engine.wait(0.1):
                pass
        steps = (lambda stop: engine.train_step(windows, 0, m, v, adamw=True, lr=1e-3,
                                                weight_decay=0.0, grad_clip=1.0, t=1,
                                                should_stop=stop),
                 lambda stop: engine.evaluate(windows, should_stop=stop))
        for slices in (0, 1, 3):      # should_stop answers True after this many slices
            for run in steps:
                calls = itertools.count()
                try:
                    run(lambda: next(calls) >= slices)
                except _engine.StepAborted:
                    pass


def main():
    if "--expect-engine" in sys.argv:
        # the TSan build must be the one imported, not an installed engine
        expected = os.path.abspath(sys.argv[sys.argv.index("--expect-engine") + 1])
        for module in (_engine, _engine_testing):
            if not os.path.abspath(module.__file__).startswith(expected):
                print(f"racecheck: imported {module.__file__}, not the build in {expected}")
                return 1
    print(f"racecheck: engine {_engine_testing.__file__}")
    words = ("the valley river stone bread loom weaver miller boat hill market lamp "
             "quiet early green old small warm said asked gave took walked").split()
    text = " ".join(words[(i * 7 + i // 5) % len(words)] for i in range(6000))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = f"{tmp}/corpus.txt"
        with open(corpus, "w") as f:
            f.write(text)
        for lock_mode in ("shared", "exclusive"):
            train([corpus], engine_class=_engine_testing.Engine,
                  engine_hook=lambda e: _engine_testing.inject_nan(e, 2, 1),
                  checkpoint_dir=f"{tmp}/ck-{lock_mode}", tokenizer="word", embed_dim=16, num_layers=2,
                  num_heads=2, seq_len=16, batch_size=12, micro_batch=2, max_steps=6,
                  eval_interval=3, threads=4, lock_mode=lock_mode, debug_locks=True,
                  quiet=True)
    abort_mid_step()
    print("racecheck run finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
