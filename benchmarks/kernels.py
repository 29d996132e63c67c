"""The kernels of the fp32 weight products on this host: `python -m benchmarks.kernels`.

- Products: GFLOPS of one-thread float32 products at the engine's own shapes (config D's and
  the Llama form's at SmolLM2-135M's, forward and weight-gradient products, the classifier),
  best of 5, through scipy's BLAS (the engine's `--matmul blas`) and, for reference, torch.mm
  (torch's own BLAS, MKL on x86-64) when torch is installed.
- Training: tokens/s of train_model's step (Engine.train_step, AdamW) with --matmul blas and
  --matmul onednn, on D (batch 32 x 128, micro-batches of 4) and on SmolLM2-135M's shape
  (batch 4 x 512, one micro-batch per thread), each in a process of its own, median of the
  timed steps.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.measure import machine_info

SHAPES = {  # name: (M, N, K) of out[M, N] = A[M, K] @ B[K, N]
    "2048^3": (2048, 2048, 2048),
    "D c_fc, 4096x256 @ 256x1024": (4096, 1024, 256),
    "D classifier, 4096x256 @ 256x10000": (4096, 10000, 256),
    "D weight gradient, 1024x4096 @ 4096x256": (1024, 256, 4096),
    "SmolLM2 q/k/v, 512x576 @ 576x960": (512, 960, 576),
    "SmolLM2 gate/up, 512x576 @ 576x3072": (512, 3072, 576),
    "SmolLM2 down, 512x1536 @ 1536x576": (512, 576, 1536),
    "SmolLM2 classifier, 512x576 @ 576x49152": (512, 49152, 576),
}
MARK = "KERNELS-BENCH "


def rate(product, flops, repeats=5):
    product()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        product()
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def products():
    from scipy.linalg.blas import sgemm
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    rows = {}
    rng = np.random.default_rng(0)
    for name, (M, N, K) in SHAPES.items():
        a = np.asfortranarray(rng.standard_normal((M, K), dtype=np.float32))
        b = np.asfortranarray(rng.standard_normal((K, N), dtype=np.float32))
        flops = 2.0 * M * N * K
        row = {"blas": rate(lambda: sgemm(1.0, a, b), flops)}
        if torch is not None:
            ta, tb = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))
            row["torch"] = rate(lambda: torch.mm(ta, tb), flops)
        rows[name] = row
    return rows


def training(spec):
    from cllm_cli._engine import Engine
    from cllm_cli.api import CLLMModel
    from cllm_cli.model import CLLMConfig, precision
    precision.require_matmul(spec["matmul"])
    if spec["config"] == "D":
        cfg = CLLMConfig(vocab_size=10000, embed_dim=256, num_layers=6, num_heads=8,
                         seq_len=128)
        flat, batch, micro = CLLMModel(cfg, 1).flat, 32, 4
    else:
        from benchmarks.llama import config, parameters
        cfg, batch = config("smollm2-135m"), 4
        flat, micro = parameters(cfg), max(1, 4 // spec["threads"])
    m, v = np.zeros_like(flat), np.zeros_like(flat)
    rng = np.random.default_rng(0)
    data = [rng.integers(4, cfg.vocab_size, (batch, cfg.seq_len + 1)).astype(np.int32)
            for _ in range(spec["steps"] + 1)]
    times = []
    with Engine(cfg, flat, spec["threads"], micro, batch, matmul=spec["matmul"]) as engine:
        for i, windows in enumerate(data):
            t0 = time.perf_counter()
            engine.train_step(windows, i, m, v, adamw=True, lr=1e-3, weight_decay=0.01,
                              grad_clip=1.0, t=i + 1)
            times.append(time.perf_counter() - t0)
    return {"tokens_per_s": batch * cfg.seq_len / statistics.median(times[1:])}


def run_worker(spec):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--worker",
                           json.dumps(spec)], capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(training(json.loads(args.worker))), flush=True)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = machine_info()
    print(f"host: {info['cpu']}, {os.cpu_count()} cores; blas: {info['blas']}")
    print("\none-thread float32 products, GFLOPS   blas   torch.mm   torch / blas")
    for name, row in products().items():
        extra = (f"{row['torch']:9.1f}   {row['torch'] / row['blas']:5.2f}x" if "torch" in row
                 else "")
        print(f"  {name:<42} {row['blas']:6.1f}  {extra}")
    print(f"\ntraining, {args.threads} threads, tokens/s   --matmul blas   --matmul onednn")
    for config in ("D", "smollm2-135m"):
        rows = {k: run_worker(dict(config=config, matmul=k, threads=args.threads,
                                   steps=args.steps)) for k in ("blas", "onednn")}
        cells = [f"{r['tokens_per_s']:10.1f}" if "error" not in r else f"failed: {r['error']}"
                 for r in rows.values()]
        ratio = (f"   onednn / blas {rows['onednn']['tokens_per_s'] / rows['blas']['tokens_per_s']:.2f}x"
                 if all("error" not in r for r in rows.values()) else "")
        print(f"  {config:<22} {cells[0]}   {cells[1]}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
