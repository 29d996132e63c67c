"""Dropout: the counter-based masks, exact gradients with dropout on
(against the float64 reference given the engine's masks, and by finite differences), masks
keyed by the global micro-batch index, evaluation without dropout, and the determinism
contract with dropout on: every thread count, both lock modes, resumed == straight."""
import shutil

import numpy as np
import pytest
import reference as ref
from engine_cases import CONFIGS, REL_TOL, make_batch, make_params
from helpers import assert_bit_identical, sentences

from cllm_cli import _engine, train
from cllm_cli._engine import DROPOUT_SITES, dropout_mask, parameter_layout
from cllm_cli.errors import UsageError
from cllm_cli.formats.checkpoint_load import load_checkpoint

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def kept(p, seed, step, microbatch, layer, site, index):
    """kernels/dropout.h written again in Python integers."""
    k = mix64((seed + GOLDEN) & MASK64)
    for part in (step, microbatch, layer, site):
        k = mix64(k ^ (part & MASK64))
    threshold = min(round(p * 2**32), 2**32 - 1)
    return (mix64((k + (index + 1) * GOLDEN) & MASK64) >> 32) >= threshold


def test_mask_shim_is_the_documented_generator():
    p = 0.3
    factors = dropout_mask(p, 1234, 7, 3, 1, 2, 200)
    scale = np.float32(1 / (1 - p))
    assert set(np.unique(factors)) == {np.float32(0), scale}
    assert [f != 0 for f in factors] == [kept(p, 1234, 7, 3, 1, 2, i) for i in range(200)]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_drop_the_share_p_independently_per_key(p):
    count = 200_000
    base = dropout_mask(p, 5, 0, 0, 0, 1, count)
    assert abs((base == 0).mean() - p) < 0.01
    for other in (dropout_mask(p, 6, 0, 0, 0, 1, count), dropout_mask(p, 5, 1, 0, 0, 1, count),
                  dropout_mask(p, 5, 0, 1, 0, 1, count), dropout_mask(p, 5, 0, 0, 1, 1, count),
                  dropout_mask(p, 5, 0, 0, 0, 2, count)):
        both = ((base == 0) & (other == 0)).mean()
        assert abs(both - p * p) < 0.01, "masks of different keys should be independent"
    assert np.array_equal(base, dropout_mask(p, 5, 0, 0, 0, 1, count))
    assert np.all(dropout_mask(0.0, 5, 0, 0, 0, 1, 100) == 1)


def test_mask_shim_refuses_bad_arguments():
    for p in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError):
            dropout_mask(p, 0, 0, 0, 0, 0, 4)
    with pytest.raises(ValueError):
        dropout_mask(0.1, 0, 0, 0, 0, len(DROPOUT_SITES), 4)


def engine_grads(cfg, flat, inputs, targets, **drop):
    grads = np.zeros_like(flat)
    loss, counted = _engine.loss_and_grads(cfg, flat, inputs, targets, grads, **drop)
    return loss, counted, grads


def test_dropout_zero_is_no_dropout():
    cfg = CONFIGS["A"]
    flat, _ = make_params(cfg, seed=1)
    inputs, targets = make_batch(cfg, 3, 5, seed=2)
    plain = engine_grads(cfg, flat, inputs, targets)
    zero = engine_grads(cfg, flat, inputs, targets, dropout=0.0, seed=9, step=4, microbatch=2)
    assert plain[:2] == zero[:2]
    assert np.array_equal(plain[2], zero[2])


# (config, B, n, p, step, micro-batch): several blocks of 32 attention rows in D
CASES = [("A", 3, 5, 0.2, 0, 0), ("A", 1, 3, 0.5, 4, 7), ("B", 2, 7, 0.1, 2, 1),
         ("C", 3, 4, 0.3, 1, 3), ("D", 2, 80, 0.2, 5, 2), ("D", 1, 45, 0.1, 0, 9)]


@pytest.mark.parametrize("key, B, n, p, step, mb", CASES)
def test_gradients_with_dropout_match_reference(key, B, n, p, step, mb):
    cfg = CONFIGS[key]
    seed = 17
    flat, p64 = make_params(cfg, seed=B + n)
    inputs, targets = make_batch(cfg, B, n, seed=B * 7 + n)
    loss, counted, grads = engine_grads(cfg, flat, inputs, targets, dropout=p, seed=seed,
                                        step=step, microbatch=mb)
    masks = ref.dropout_masks(p, seed, step, mb)
    rloss, rcount, rgrads = ref.loss_and_grads(p64, cfg, inputs, targets, masks=masks)
    plain_loss, _, _ = ref.loss_and_grads(p64, cfg, inputs, targets)
    assert counted == rcount
    assert loss == pytest.approx(rloss, rel=1e-5, abs=1e-5)
    assert abs(rloss - plain_loss) > 1e-3, "the masks should change the loss"
    views = ref.unflatten(grads, cfg)
    for name, _, _ in parameter_layout(cfg):
        g, r = views[name], rgrads[name]
        scale = np.abs(r).max()
        assert scale > 0, f"{name}: the reference gradient is zero, the case tests nothing"
        err = np.abs(g - r).max()
        assert err <= REL_TOL * scale, f"{name}: max error {err:.3g} vs max |grad| {scale:.3g}"


def test_gradients_with_dropout_match_finite_differences():
    """The masks do not depend on the parameters, so the dropped loss is differentiable."""
    cfg = CONFIGS["A"]
    drop = dict(dropout=0.3, seed=3, step=2, microbatch=1)
    flat, _ = make_params(cfg, seed=11)
    inputs, targets = make_batch(cfg, 2, 5, seed=12)
    _, _, grads = engine_grads(cfg, flat, inputs, targets, **drop)
    rng = np.random.default_rng(13)
    eps = np.float32(1e-2)
    for name, shape, off in parameter_layout(cfg):
        size = int(np.prod(shape))
        for k in rng.choice(size, size=min(3, size), replace=False):
            i = off + int(k)
            if grads[i] == 0:
                continue      # an unused wte row or wpe position, or a dropped path
            buf = flat.copy()
            buf[i] = flat[i] + eps
            hi, lp = float(buf[i]), engine_grads(cfg, buf, inputs, targets, **drop)[0]
            buf[i] = flat[i] - eps
            lo, lm = float(buf[i]), engine_grads(cfg, buf, inputs, targets, **drop)[0]
            numeric = (lp - lm) / (hi - lo)
            assert abs(numeric - grads[i]) <= 2e-2 * abs(numeric) + 2e-3, \
                f"{name}[{k}]: engine gradient {grads[i]:.6g}, finite difference {numeric:.6g}"


# ----------------------------------------------------------------------------------------
# the engine: masks keyed by (seed, step, global micro-batch index); evaluation never drops

ENGINE_CFG = CONFIGS["A"]
STEP = dict(adamw=True, lr=1e-3, weight_decay=0.0, grad_clip=0.0)


def windows_of(cfg, count, seed):
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(rng.integers(1, cfg.vocab_size, size=(count, cfg.seq_len + 1)),
                                dtype=np.int32)


def micro_batch_sum(cfg, flat, windows, micro, step, first, p, seed):
    """The accumulated gradient of a step, micro-batch by micro-batch through loss_and_grads."""
    total = None
    for i, start in enumerate(range(0, len(windows), micro)):
        w = windows[start:start + micro]
        _, _, g = engine_grads(cfg, flat, np.ascontiguousarray(w[:, :-1]),
                               np.ascontiguousarray(w[:, 1:]), dropout=p, seed=seed,
                               step=step, microbatch=first + i)
        total = g if total is None else total + g
    return total


@pytest.mark.parametrize("spheres, first", [(1, 0), (3, 0), (2, 4)])
def test_step_masks_use_the_global_micro_batch_index(spheres, first):
    cfg = ENGINE_CFG
    flat, _ = make_params(cfg, seed=21)
    windows = windows_of(cfg, 5, seed=22)
    m, v = np.zeros_like(flat), np.zeros_like(flat)
    with _engine.Engine(cfg, flat.copy(), spheres, 2, 8, dropout=0.25, seed=31) as engine:
        result = engine.train_step(windows, 6, m, v, t=1, first_microbatch=first, **STEP)
        got = engine.accumulated_gradients()      # the optimiser made it the mean
    expected = micro_batch_sum(cfg, flat, windows, 2, 6, first, 0.25, 31)
    expected /= np.float32(result.tokens)
    assert np.array_equal(got, expected)
    other = micro_batch_sum(cfg, flat, windows, 2, 7, first, 0.25, 31)
    assert not np.array_equal(got, other), "the step should change the masks"


def test_evaluation_does_not_drop():
    cfg = ENGINE_CFG
    flat, _ = make_params(cfg, seed=23)
    windows = windows_of(cfg, 6, seed=24)
    with _engine.Engine(cfg, flat, 2, 2, 8) as plain, \
            _engine.Engine(cfg, flat, 2, 2, 8, dropout=0.5, seed=1) as dropping:
        assert plain.evaluate(windows) == dropping.evaluate(windows)


def test_engine_refuses_bad_dropout():
    flat, _ = make_params(ENGINE_CFG, seed=25)
    for p in (-0.5, 1.0, 2.0):
        with pytest.raises(ValueError, match="dropout"):
            _engine.Engine(ENGINE_CFG, flat, 1, 1, 4, dropout=p)


# ----------------------------------------------------------------------------------------
# train_model with --dropout: determinism contract, checkpoint, resume

BATCH, MICRO, STEPS, SAVE = 9, 2, 6, 3
BASE = dict(tokenizer="word", vocab_size=120, embed_dim=16, num_layers=2, num_heads=2, seq_len=16,
            batch_size=BATCH, micro_batch=MICRO, max_steps=STEPS, warmup_steps=2,
            learning_rate=3e-3, save_interval=SAVE, keep_checkpoints=0, eval_interval=3,
            log_interval=1, seed=99, quiet=True, dropout=0.2)


def run(data, ckpt_dir, **over):
    """train() with BASE and `over`; an option set to None is not given at all."""
    opts = dict(BASE, checkpoint_dir=str(ckpt_dir))
    opts.update(over)
    return train([str(data)], **{k: v for k, v in opts.items() if v is not None})


@pytest.fixture(scope="module")
def dropout_corpus(tmp_path_factory):
    """The dropout runs' own seeded sentences (ends drawn evenly from . ! ? and ,)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(sentences(95, 7, punct=(".", "!", "?", ",")), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def straight(dropout_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("straight") / "ckpt"
    return d, run(dropout_corpus, d, threads=1)


def test_dropout_run_records_p_and_differs_from_no_dropout(straight, dropout_corpus, tmp_path):
    d, result = straight
    meta = load_checkpoint(d / "final_model.cllm").meta
    assert meta["train_config"]["dropout"] == 0.2
    plain = run(dropout_corpus, tmp_path / "plain", threads=1, dropout=0.0)
    assert plain["train_loss"] != result["train_loss"]


@pytest.mark.parametrize("threads, lock_mode", [(2, "shared"), (3, "shared"), (8, "shared"),
                                                (1, "exclusive"), (3, "exclusive")])
def test_dropout_run_is_bit_identical_across_threads_and_lock_modes(straight, dropout_corpus, tmp_path,
                                                                     threads, lock_mode):
    d, result = straight
    other = run(dropout_corpus, tmp_path / "ckpt", threads=threads, lock_mode=lock_mode)
    for name in ("final_model.cllm", f"checkpoint_step_{SAVE}.cllm"):
        assert_bit_identical(d / name, tmp_path / "ckpt" / name)
    assert other["train_loss"] == result["train_loss"]
    assert other["val_loss"] == result["val_loss"]


def resume_from_step(straight, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    for name in (f"checkpoint_step_{SAVE}.cllm", "vocab.txt", "dataset.bin"):
        shutil.copy2(straight[0] / name, d / name)
    return d


def test_resumed_dropout_run_is_bit_identical(straight, dropout_corpus, tmp_path):
    """The resumed run keeps the checkpoint's p (given nothing) and its masks continue."""
    d = resume_from_step(straight, tmp_path)
    run(dropout_corpus, d, threads=2, resume=True, dropout=None)
    assert_bit_identical(straight[0] / "final_model.cllm", d / "final_model.cllm")


def test_dropout_may_change_on_resume(straight, dropout_corpus, tmp_path, capsys):
    d = resume_from_step(straight, tmp_path)
    run(dropout_corpus, d, threads=2, resume=True, dropout=0.0, quiet=False)
    assert "changed: --dropout 0.2 -> 0.0" in capsys.readouterr().out
    meta = load_checkpoint(d / "final_model.cllm").meta
    assert meta["train_config"]["dropout"] == 0.0
    with open(straight[0] / "final_model.cllm", "rb") as a, open(d / "final_model.cllm", "rb") as b:
        assert a.read() != b.read()


def test_bad_dropout_option_is_a_usage_error(dropout_corpus, tmp_path):
    for p in (-0.1, 1.0):
        with pytest.raises(UsageError, match="--dropout"):
            run(dropout_corpus, tmp_path / "ckpt", dropout=p)
