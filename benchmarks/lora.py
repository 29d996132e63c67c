"""LoRA against full fine-tuning (`make bench`, or python -m benchmarks.lora): the time of one
training step of the engine at the GPT-2-small shape G (124 M parameters, T 512) with every
weight training, and with the weights frozen and rank-R adapters training instead (on
c_attn, PEFT's default for GPT-2, and on every linear layer). Each measurement runs in its own
process (measure.measure), as in benchmarks.bench; the figure is the median step.

A full step computes three products per weight (forward, the input's gradient, the weight's
gradient); a LoRA step skips the frozen weights' gradient products, about a third of the
work, and the optimiser touches only the adapters.
"""
import argparse
import json
import statistics
import sys

from benchmarks.bench import default_micro_batch
from benchmarks.measure import CONFIGS, machine_info, measure

VARIANTS = (("full", None),
            ("lora attn", ("attn.c_attn",)),
            ("lora all", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="G", choices=sorted(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    info = machine_info()
    c = CONFIGS[args.config]
    tokens = c["batch"] * c["seq_len"]
    print(f"{info.get('cpu', 'cpu')}; config {args.config} ({tokens} tokens a step), "
          f"{args.threads} threads, rank {args.rank}")
    print(f"{'variant':<10} {'step s':>8} {'tok/s':>8} {'vs full':>8} {'RSS MB':>8}")
    rows = []
    for name, sites in VARIANTS:
        spec = {"impl": "cllm", "config": args.config, "threads": args.threads,
                "lock_mode": "shared", "micro_batch": default_micro_batch(), "warmup": 1, "steps": args.steps,
                "lora": [args.rank, list(sites)] if sites else None}
        row = measure(spec)
        if "error" in row:
            print(f"{name:<10} failed: {row['error']}")
            return 1
        seconds = statistics.median(row["times"])
        rows.append({"variant": name, "step_seconds": seconds, "tokens_per_s": tokens / seconds,
                     "peak_rss_mb": row["peak_rss_bytes"] / 2**20,
                     "others_cpu_share": row["others_cpu_share"]})
        full = rows[0]["step_seconds"]
        print(f"{name:<10} {seconds:>8.2f} {tokens / seconds:>8,.0f} {seconds / full:>7.2f}x "
              f"{row['peak_rss_bytes'] / 2**20:>8,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
