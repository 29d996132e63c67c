"""Small model configurations, random batches and parameters, and the engine's gradients:
the cases the engine tests (forward, backward, bf16, dropout) share."""
import numpy as np
import reference as ref

from cllm_cli import _engine
from cllm_cli.model import CLLMConfig

CFG_A = CLLMConfig(vocab_size=11, embed_dim=8, num_layers=2, num_heads=2, ff_dim=12, seq_len=5)
CFG_B = CLLMConfig(vocab_size=17, embed_dim=12, num_layers=1, num_heads=3, ff_dim=20, seq_len=7)
CFG_C = CLLMConfig(vocab_size=9, embed_dim=6, num_layers=3, num_heads=3, ff_dim=10, seq_len=4)
# D: long enough for several attention blocks of 32 query rows and wide enough (C >= 16) for
# the 16-lane vector paths of layer norm and softmax, with a remainder in both
CFG_D = CLLMConfig(vocab_size=37, embed_dim=48, num_layers=2, num_heads=3, ff_dim=40, seq_len=80)
# E: a vocabulary so wide that the classifier's default row blocks (32 MB of logits: 419
# rows here) do not cover a micro-batch, with a short last block (B * n = 450 or 900 rows)
CFG_E = CLLMConfig(vocab_size=20000, embed_dim=8, num_layers=1, num_heads=2, ff_dim=12,
                   seq_len=450)
CONFIGS = {"A": CFG_A, "B": CFG_B, "C": CFG_C, "D": CFG_D, "E": CFG_E}

REL_TOL = 1e-4     # float32 engine vs float64 reference, relative to a tensor's max |grad|


def make_batch(cfg, B, n, seed, pad_frac=0.25, pad_rows=()):
    """int32 inputs/targets [B, n]; about pad_frac of the targets are <pad> (0), rows in
    pad_rows are all <pad>; at least one target stays counted."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, cfg.vocab_size, size=(B, n)).astype(np.int32)
    targets = rng.integers(1, cfg.vocab_size, size=(B, n)).astype(np.int32)
    targets[rng.random((B, n)) < pad_frac] = 0
    for r in pad_rows:
        targets[r] = 0
    if not (targets != 0).any():
        targets[B - 1, n - 1] = 1
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


def make_params(cfg, seed=0, std=0.3):
    """(float32 flat buffer, float64 dict of exactly the same values)."""
    flat = ref.flatten(ref.init_params(cfg, seed, std), cfg, dtype=np.float32)
    return flat, {k: v.astype(np.float64) for k, v in ref.unflatten(flat, cfg).items()}


def engine_grads(cfg, flat, inputs, targets, block_rows=0):
    grads = np.zeros_like(flat)
    loss, counted = _engine.loss_and_grads(cfg, flat, inputs, targets, grads,
                                           block_rows=block_rows)
    return loss, counted, grads


# (config, B, n, pad_rows): B=1 and B=3, n=T and n<T, some pad targets, all-pad rows
CASES = [
    ("A", 1, 5, ()), ("A", 3, 5, (1,)), ("A", 3, 3, ()), ("A", 1, 2, ()),
    ("B", 1, 7, ()), ("B", 3, 7, (0,)), ("B", 3, 4, (2,)), ("B", 1, 1, ()),
    ("C", 3, 4, (1,)), ("C", 1, 3, ()),
    ("D", 2, 80, ()), ("D", 1, 70, ()), ("D", 2, 33, (1,)),
    ("E", 1, 450, ()), ("E", 2, 450, (0,)),
]
