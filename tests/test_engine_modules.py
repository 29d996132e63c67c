"""The two builds of the engine: cllm_cli._engine, the one users install, has no test hook;
cllm_cli._engine_testing (the same sources with pyx/testing/, built for the tests only) has
them all."""
import os
import re

import numpy as np
import pytest
from helpers import ROOT

from cllm_cli import _engine, _engine_testing
from cllm_cli.api import CLLMModel
from cllm_cli.model import CLLMConfig

HOOKS = ("inject_nan", "violate_lock_order")


def kernel_wrappers():
    """The op_<kernel> names that pyx/testing/kernel_wrappers.pxi defines."""
    with open(os.path.join(ROOT, "pyx", "testing", "kernel_wrappers.pxi")) as f:
        names = re.findall(r"^def (op_\w+)\(", f.read(), re.M)
    assert len(names) > 10, names
    return names


def test_production_engine_has_no_test_hook():
    test_only = [name for name in dir(_engine) if name.startswith("op_") or name in HOOKS]
    assert test_only == []
    assert [name for name in dir(_engine.Engine) if name in HOOKS] == []


def test_testing_engine_has_every_hook_and_wrapper():
    for name in kernel_wrappers() + list(HOOKS):
        assert callable(getattr(_engine_testing, name)), name


def test_hooks_take_only_a_testing_engine():
    cfg = CLLMConfig(vocab_size=10, embed_dim=8, num_layers=1, num_heads=2, seq_len=4)
    flat = CLLMModel(cfg, 0).flat
    with _engine.Engine(cfg, flat, 1, 1, 4) as engine, pytest.raises(TypeError):
        _engine_testing.inject_nan(engine, 0, 0)


def test_testing_engine_raises_the_production_exceptions():
    assert _engine_testing.StepAborted is _engine.StepAborted
    assert _engine_testing.ProductError is _engine.ProductError


def test_both_engines_compute_the_same_step():
    cfg = CLLMConfig(vocab_size=20, embed_dim=8, num_layers=1, num_heads=2, seq_len=8)
    windows = np.random.default_rng(0).integers(0, 20, (4, 9)).astype(np.int32)
    flats = []
    for module in (_engine, _engine_testing):
        flat = CLLMModel(cfg, 1).flat
        m, v = np.zeros_like(flat), np.zeros_like(flat)
        with module.Engine(cfg, flat, 2, 1, 4) as engine:
            engine.train_step(windows, 0, m, v, adamw=True, lr=1e-2, weight_decay=0.0,
                              grad_clip=1.0, t=1)
        flats.append(flat)
    assert not np.array_equal(flats[0], CLLMModel(cfg, 1).flat)
    assert flats[0].tobytes() == flats[1].tobytes()
