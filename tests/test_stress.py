"""Stress: 8 spheres, a few hundred steps on a multi-megabyte generated corpus. No step may
turn non-finite (a race between spheres shows up as NaN gradients with 2+ threads), every
sphere takes part, and the loss must fall."""
import json
import math
import subprocess
import sys

import pytest
from helpers import ROOT

from cllm_cli import train


@pytest.mark.slow
def test_eight_spheres_hundreds_of_steps(tmp_path):
    corpus = tmp_path / "big.txt"
    subprocess.run([sys.executable, f"{ROOT}/data/make_corpus.py", "--size", "3000000",
                    "--seed", "99", "--out", str(corpus)], check=True, capture_output=True)
    assert corpus.stat().st_size > 2_500_000
    metrics = tmp_path / "metrics.jsonl"
    steps = 300
    result = train([str(corpus)], checkpoint_dir=str(tmp_path / "ck"), embed_dim=32,
                   num_layers=2, num_heads=2, seq_len=32, batch_size=16, micro_batch=1,
                   max_steps=steps, learning_rate=3e-3, eval_interval=100, threads=8,
                   metrics_file=str(metrics), quiet=True)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train_rows)
    first = sum(r["loss"] for r in train_rows[:20]) / 20
    last = sum(r["loss"] for r in train_rows[-20:]) / 20
    assert last < first - 2.0, (first, last)
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < first - 2.0
    assert len(result["spheres"]) == 8
    # every sphere took part: 300 steps x 16 micro-batches shared by 8 spheres
    assert sum(s["micro_batches"] for s in result["spheres"]) == steps * 16
    assert all(s["micro_batches"] > 0 for s in result["spheres"])
