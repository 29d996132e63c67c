"""bf16 against fp32 (`make bench`, or python -m benchmarks.bf16): training tokens/s of
train_model's engine in both precisions, and of PyTorch eager in fp32 and with CPU autocast
to bf16, on config D and the GPT-2-small shape G, at 1 and 2 threads; beside each rate its
share of the ceiling of its own precision: the bf16 ceiling (a 2048^3 product on one core
through the engine's oneDNN path) for bf16 rows, the fp32 one (a 2048^3 sgemm on one core,
scipy's OpenBLAS) for fp32 rows, times the threads. Every measurement
runs in its own process (measure.measure), as in benchmarks.bench.

Validation loss in both precisions after the same steps is measured by training on the
bundled corpus (--val-loss; make train's settings), since that is what the 1% target is about.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.bench import flops_per_token
from benchmarks.measure import CONFIGS, machine_info, measure, model_config, sgemm_ceiling, torch_version

CEILING_N = 2048
IMPLS = (("cllm", "fp32"), ("cllm", "bf16"), ("torch-eager", "fp32"), ("torch-eager", "bf16"))


def bf16_ceiling(n=CEILING_N, repeats=5):
    """GFLOPS of one n^3 bf16 product (fp32 output) on one core through op_bf16_gemm, best of
    `repeats` (each call also builds its primitive, so this slightly under-states the peak)."""
    from cllm_cli import _engine_testing
    from cllm_cli.model.precision import library_path, require
    require("bf16")
    _engine_testing.load_bf16(library_path())     # the testing extension loads its own
    rng = np.random.default_rng(0)
    a = _engine_testing.op_bf16_round(rng.standard_normal(n * n).astype(np.float32)).reshape(n, n)
    b = _engine_testing.op_bf16_round(rng.standard_normal(n * n).astype(np.float32)).reshape(n, n)
    c = np.zeros((n, n), np.float32)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        _engine_testing.op_bf16_gemm(a, b, c)
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def speed_rows(configs, threads, with_torch):
    rows = []
    for name in configs:
        cfg = model_config(name)
        tokens = CONFIGS[name]["batch"] * cfg.seq_len
        for t in threads:
            for impl, precision in IMPLS:
                if impl != "cllm" and not with_torch:
                    continue
                spec = {"impl": impl, "precision": precision, "config": name, "threads": t,
                        "lock_mode": "shared", "micro_batch": 4,
                        "warmup": CONFIGS[name]["warmup"], "steps": CONFIGS[name]["steps"]}
                row = measure(spec)
                if "error" in row:
                    print(f"{name} {impl} {precision} {t}: {row['error']}", flush=True)
                    continue
                tok_s = tokens / statistics.median(row["times"])
                rows.append({"config": name, "impl": impl, "precision": precision,
                             "threads": t, "tokens_per_s": tok_s,
                             "gflops": flops_per_token(cfg) * tok_s / 1e9,
                             "peak_rss_mb": row.get("peak_rss_bytes", 0) / 1e6,
                             "others_cpu_share": row.get("others_cpu_share", 0.0)})
                print(f"{name} {impl:<12} {precision} {t} thr: {tok_s:8,.0f} tok/s", flush=True)
    return rows


def val_losses(steps_args):
    """Final validation loss of make train's run on data/corpus.txt in each precision."""
    out = {}
    for precision in ("fp32", "bf16"):
        argv = [sys.executable, "-m", "cllm_cli.cli.train", "data/corpus.txt", "--overwrite",
                "--checkpoint-dir", f"/tmp/cllm-bench-{precision}", "--precision", precision,
                *steps_args]
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"bench_bf16: train_model failed: {p.stderr.strip()}")
        match = re.search(r"val loss ([0-9.]+)", p.stdout.splitlines()[-1])
        out[precision] = {"val_loss": float(match.group(1)),
                          "seconds": time.perf_counter() - t0}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bf16", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="D,G")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--val-loss", action="store_true",
                    help="also train make train's run in both precisions (about 4 minutes)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    from cllm_cli.errors import PrecisionError
    from cllm_cli.model.precision import require
    try:
        require("bf16")
    except PrecisionError as e:
        print(f"bf16 benchmark skipped: {e}")
        return 0
    info = machine_info()
    tv = None if args.no_torch else torch_version()
    ceiling = bf16_ceiling()
    fp32_ceiling = sgemm_ceiling(1)["single_core_gflops"]
    print(f"{info.get('cpu', 'cpu')}; per core: bf16 ceiling {ceiling:.1f} GFLOPS, fp32 "
          f"{fp32_ceiling:.1f} ({CEILING_N}^3, one thread); torch {tv or 'not used'}")
    rows = speed_rows(args.configs.split(","), [int(t) for t in args.threads.split(",")],
                      tv is not None)
    print(f"\n{'cfg':<3} {'impl':<12} {'prec':<5} {'thr':>3} {'tok/s':>8} {'GFLOPS':>7} "
          f"{'%ceiling':>9} {'vs own fp32':>11} {'RSS MB':>7}")
    for r in rows:
        base = next(x for x in rows if x["config"] == r["config"] and x["impl"] == r["impl"]
                    and x["threads"] == r["threads"] and x["precision"] == "fp32")
        r["vs_fp32"] = r["tokens_per_s"] / base["tokens_per_s"]
        own = ceiling if r["precision"] == "bf16" else fp32_ceiling
        r["ceiling_share"] = r["gflops"] / (own * r["threads"])
        print(f"{r['config']:<3} {r['impl']:<12} {r['precision']:<5} {r['threads']:>3} "
              f"{r['tokens_per_s']:>8,.0f} {r['gflops']:>7.1f} {100 * r['ceiling_share']:>8.1f}% "
              f"{r['vs_fp32']:>10.2f}x {r['peak_rss_mb']:>7,.0f}")
    doc = {"machine": info, "torch": tv, "bf16_ceiling_gflops_per_core": ceiling,
           "fp32_ceiling_gflops_per_core": fp32_ceiling, "rows": rows}
    if args.val_loss:
        make_train = ["--tokenizer", "word", "--dropout", "0", "--epochs", "10",
                      "--eval-interval", "50", "--threads", "2", "--quiet"]
        doc["val_loss"] = losses = val_losses(make_train)
        f32, b16 = losses["fp32"]["val_loss"], losses["bf16"]["val_loss"]
        print(f"\nval loss after make train's 190 steps: fp32 {f32:.4f} "
              f"({losses['fp32']['seconds']:.0f} s), bf16 {b16:.4f} "
              f"({losses['bf16']['seconds']:.0f} s): {100 * (b16 - f32) / f32:+.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
