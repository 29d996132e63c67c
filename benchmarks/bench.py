"""Training speed of the CLLM engine, side by side with PyTorch: `python -m benchmarks.bench`.

In the spirit of nanoGPT's bench.py: burn-in steps, then timed steps, then one summary line
(per config). This module is the command and its report; what is measured and how (configs,
worker processes, timing, the sgemm ceiling, RSS) is in measure.py.

- Threads: 1, 2, every core count up to os.cpu_count(), and twice the core count; lock mode
  `shared` at each, `exclusive` at the largest listed count that does not exceed the cores
  (what serialising the passes costs where it matters).
- Figures (derive): tokens/s and ms/step (median of the timed steps), achieved GFLOPS with
  the FLOP count below, the share of the fp32 sgemm ceiling measured in the same run, the
  speed-up against 1 thread, peak RSS against the formula below, and the time per step in
  ordered accumulation and in the optimiser, from the profiled pass.
- FLOPs per token = 6 x L x (3d^2 + d^2 + 2dF)   (the matmul weights: forward 2, backward 4)
                  + 6 x d x V                    (the tied output projection)
                  + 12 x L x T x d               (attention scores and weighted values)
- Peak RSS (VmHWM) against baseline + 4 bytes x (4P + spheres x (P + A)): P parameters, each
  for the weights, AdamW m and v and accumulated_gradients; per sphere local_gradients and A
  activation floats (activations_alloc of pyx/model/activations.pxi for micro_batch windows: what each
  block keeps for backward, one classifier block of logits, one block's scratches; never
  the B x T x V logits or the T x T attention probabilities).
- Rounds: the comparison point is measured --rounds times, interleaved; its ratios are the
  median of the per-round ratios. The summary marks each against the project's speed targets (TARGETS).
- PyTorch (torch_model.py) is skipped when torch is not installed or with --no-torch.
- Many processes (mpi.py): 2 ranks x 1 thread against 1 rank x 2 threads, the exchange
  on 2, 3 and 4 ranks and the cost model's predictions, on D (else the first config), and
  each rank's peak RSS on 2 ranks at G; skipped without mpiexec or with --no-mpi.
"""
import argparse
import json
import os
import statistics
import sys
import time

from benchmarks import mpi as bench_mpi
from benchmarks.measure import (
    BUSY_RETRY,
    CONFIGS,
    machine_info,
    measure,
    model_config,
    sgemm_ceiling,
    tokenize_speed,
    torch_version,
)
from cllm_cli._engine import activation_allocation, num_parameters

FLOP_FORMULA = "FLOPs/token = 6*L*(3d^2 + d^2 + 2dF) + 6dV + 12LTd"
RSS_FORMULA = ("peak RSS = baseline + 4 bytes x (4P + spheres x (P + A)): parameters, AdamW m "
               "and v, accumulated gradient; per sphere its local gradient and activations "
               "(kept per block, one classifier block of logits, scratches)")


def flops_per_token(cfg):
    """The stated per-token training FLOPs (see the module docstring)."""
    L, d, F, V, T = cfg.num_layers, cfg.embed_dim, cfg.ff_dim, cfg.vocab_size, cfg.seq_len
    return 6 * L * (3 * d * d + d * d + 2 * d * F) + 6 * d * V + 12 * L * T * d


def activation_floats(cfg, micro_batch):
    """Floats one sphere's Activations hold (the engine's activation table, as allocated)."""
    return activation_allocation(cfg, micro_batch)


def rss_formula_bytes(cfg, spheres, micro_batch):
    P = num_parameters(cfg)
    return 4 * (4 * P + spheres * (P + activation_floats(cfg, micro_batch)))


def default_micro_batch():
    try:
        from cllm_cli.training import TrainConfig
        return TrainConfig.micro_batch
    except (ImportError, AttributeError):
        return 4


def default_threads():
    cores = os.cpu_count() or 1
    return sorted({1, 2, *range(1, cores + 1), 2 * cores})


def measured(spec, cfg, ceiling, cores):
    """One measurement (measure.measure) with the figures of the table derived."""
    row = measure(spec)
    if "error" not in row:
        derive(row, spec, cfg, ceiling, cores)
    return row


def derive(row, spec, cfg, ceiling, cores):
    """Adds the figures of the table to a worker's raw result."""
    tokens = CONFIGS[spec["config"]]["batch"] * cfg.seq_len
    med = statistics.median(row["times"])
    row["ms_per_step"] = 1000 * med
    row["tokens_per_s"] = tokens / med
    row["gflops"] = flops_per_token(cfg) * row["tokens_per_s"] / 1e9
    row["ceiling_gflops"] = ceiling[min(spec["threads"], cores)]
    row["ceiling_share"] = row["gflops"] / row["ceiling_gflops"]
    if "profile" in row:
        # per step, mean over spheres: comparable to the wall-clock ms/step
        per = 1000 / (row["profile_steps"] * spec["threads"])
        row["profile_ms_per_step"] = {k: v * per for k, v in row["profile"].items()}
        row["accumulate_ms"] = row["profile_ms_per_step"]["accumulate"]
        row["optimizer_ms"] = row["profile_ms_per_step"]["optimizer"]
    if "baseline_rss_bytes" in row:
        row["rss_formula_bytes"] = (row["baseline_rss_bytes"]
                                    + rss_formula_bytes(cfg, spec["threads"], spec["micro_batch"]))
    return row


HEADER = (f"{'cfg':<3} {'impl':<13} {'thr':>3} {'lock':<9} {'tok/s':>7} {'ms/step':>8} "
          f"{'GFLOPS':>7} {'%ceil':>6} {'speedup':>7} {'accum':>6} {'optim':>6} "
          f"{'RSS MB':>7} {'formula':>7} {'others':>6}")


def format_row(spec, row):
    lead = f"{spec['config']:<3} {spec['impl']:<13} {spec['threads']:>3} {spec.get('lock_mode') or '-':<9}"
    if "error" in row:
        return f"{lead} failed: {row['error']}"
    speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
    accum = f"{row['accumulate_ms']:.1f}" if "accumulate_ms" in row else "-"
    optim = f"{row['optimizer_ms']:.1f}" if "optimizer_ms" in row else "-"
    formula = f"{row['rss_formula_bytes'] / 2**20:.0f}" if "rss_formula_bytes" in row else "-"
    line = (f"{lead} {row['tokens_per_s']:>7.0f} {row['ms_per_step']:>8.1f} {row['gflops']:>7.1f} "
            f"{100 * row['ceiling_share']:>5.1f}% {speed:>7} {accum:>6} {optim:>6} "
            f"{row['peak_rss_bytes'] / 2**20:>7.0f} {formula:>7} {100 * row['others_cpu_share']:>5.0f}%")
    if "retried_busy" in row:
        line += f"  (re-measured: others took {100 * row['retried_busy']:.0f}% the first time)"
    if "first_step_seconds" in row and spec["impl"] == "torch-compile":
        line += f"  (first step incl. compile {row['first_step_seconds']:.0f} s)"
    return line


def format_profile(spec, row):
    """The per-op line of --profile: ms per step, mean per sphere, and the share of the wall
    time; 'idle' is the rest (a sphere waiting for work, Python between steps)."""
    per = dict(row["profile_ms_per_step"])
    wall = 1000 * row["profile_wall"] / row["profile_steps"]
    per["idle"] = max(wall - sum(per.values()), 0.0)
    parts = [f"{k} {v:.1f} ({100 * v / wall:.0f}%)" for k, v in per.items()]
    return f"      per-op ms/step, mean per sphere (profiled pass, {wall:.0f} ms/step): " + ", ".join(parts)


# the speed targets for config D (at 2 threads; 1->2 speed-up; more spheres than cores)
TARGETS = {"D": {"ceiling_share": 0.78, "vs_torch-eager": 1.3, "vs_torch-compile": 1.1,
                 "speedup": 1.85, "oversubscribed": 0.95}}


def comparison_threads(threads, cores):
    """The thread count of the comparison: 2 (the issue's), else the most within the cores."""
    return 2 if 2 in threads else max([t for t in threads if t <= cores] or [min(threads)])


def summarise(name, rows, rounds, cores):
    """The one summary line of a config, and its figures for the JSON. rows: the table's
    (spec, row) pairs; rounds: further (spec, row) lists of the comparison point. Ratios are
    the median of the per-round ratios (round 1 is the table)."""
    def get(impl, threads, lock="shared", in_rows=rows):
        for spec, row in in_rows:
            if (spec["impl"], spec["threads"], spec.get("lock_mode") or "shared") == \
                    (impl, threads, lock) and "error" not in row:
                return row
        return None

    def over_rounds(key, num, den=None):
        """[num / den tokens/s] (or [num tokens/s]) for every round holding both."""
        values = []
        for r in [rows] + rounds:
            a = get(*num, in_rows=r)
            b = get(*den, in_rows=r) if den else None
            if a and (b or not den):
                values.append(a["tokens_per_s"] / b["tokens_per_s"] if den else a["tokens_per_s"])
        if values:
            figures[key] = statistics.median(values)
            figures[key + "_rounds"] = values
        return values

    def spread(values, fmt):
        return f" (rounds {', '.join(fmt % v for v in values)})" if len(values) > 1 else ""

    targets = TARGETS.get(name, {})

    def mark(key):
        if key not in targets or key not in figures:
            return ""
        goal = f"{100 * targets[key]:.0f}%" if key == "ceiling_share" else f"{targets[key]:.2f}x"
        return f" [target {goal}: {'met' if figures[key] >= targets[key] else 'MISSED'}]"

    listed = sorted({spec["threads"] for spec, _ in rows})
    at = comparison_threads(listed, cores)
    figures = {"threads": at, "rounds": 1 + len(rounds)}
    parts = []
    one, ours = get("cllm", 1), get("cllm", at)
    tok = over_rounds("tokens_per_s", ("cllm", at))
    if tok:
        figures["ceiling_share"] = figures["tokens_per_s"] / ours["tokens_per_s"] * ours["ceiling_share"]
        parts.append(f"cllm {figures['tokens_per_s']:.0f} tok/s at {at} threads{spread(tok, '%.0f')}, "
                     f"{100 * figures['ceiling_share']:.0f}% of the sgemm ceiling" + mark("ceiling_share"))
    if at != 1:
        values = over_rounds("speedup", ("cllm", at), ("cllm", 1))
        if values:
            parts.append(f"1->{at} threads {figures['speedup']:.2f}x{spread(values, '%.2f')}"
                         + mark("speedup"))
    for impl, label in (("torch-eager", "torch eager"), ("torch-compile", "torch.compile")):
        values = over_rounds(f"vs_{impl}", ("cllm", at), (impl, at))
        if values:
            parts.append(f"{figures[f'vs_{impl}']:.2f}x {label}{spread(values, '%.2f')}"
                         + mark(f"vs_{impl}"))
    over = max(listed)
    more = get("cllm", over)
    if ours and more and over > at:
        figures["oversubscribed"] = more["tokens_per_s"] / ours["tokens_per_s"]
        figures["oversubscribed_threads"] = over
        parts.append(f"{over} spheres {figures['oversubscribed']:.2f}x {at}" + mark("oversubscribed"))
    for spec, row in rows:
        if spec.get("lock_mode") == "exclusive" and "error" not in row:
            shared = get("cllm", spec["threads"])
            text = f"exclusive lock at {spec['threads']} threads"
            if shared:
                figures["exclusive_vs_shared"] = row["tokens_per_s"] / shared["tokens_per_s"]
                text += f" {figures['exclusive_vs_shared']:.2f}x shared"
            if one:
                figures["exclusive_vs_1_thread"] = row["tokens_per_s"] / one["tokens_per_s"]
                text += f" ({figures['exclusive_vs_1_thread']:.2f}x one sphere)"
            parts.append(text)
    # the determinism contract, as a by-product: every engine run saw the same batches
    runs = [row for r in [rows] + rounds for spec, row in r
            if spec["impl"] == "cllm" and "error" not in row]
    if len(runs) > 1:
        n = min(len(r["losses"]) for r in runs)
        figures["bit_identical_losses"] = all(r["losses"][:n] == runs[0]["losses"][:n] for r in runs)
        if len({r.get("engine_sha1") for r in runs}) > 1:
            figures["engine_rebuilt_during_run"] = True
        parts.append("losses bit-identical across threads and lock modes"
                     if figures["bit_identical_losses"] else
                     "LOSSES DIFFER across threads/lock modes"
                     + (" (the engine was rebuilt during the run)"
                        if figures.get("engine_rebuilt_during_run") else ""))
    torch_first = [row["losses"][0] for spec, row in rows
                   if spec["impl"] != "cllm" and "error" not in row and row.get("losses")]
    if runs and torch_first:
        figures["first_loss_max_diff_vs_torch"] = max(abs(x - runs[0]["losses"][0]) for x in torch_first)
        parts.append(f"first loss {runs[0]['losses'][0]:.5f}, torch's within "
                     f"{figures['first_loss_max_diff_vs_torch']:.1e}")
    return f"{name}: " + ", ".join(parts), figures


def parse_list(ap, text, kind, what):
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        items = []
    if not items:
        ap.error(f"--{what} needs a comma-separated list, got {text!r}")
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Training speed of the CLLM engine (and PyTorch, when installed) on configs "
                    "S, D and G: tokens/s, GFLOPS, share of the sgemm ceiling, speed-up, peak RSS.")
    ap.add_argument("--configs", default="S,D", help="comma-separated, from S, D and G (GPT-2 small's shape) (default: S,D)")
    ap.add_argument("--threads", default=None,
                    help="comma-separated sphere/thread counts (default: 1, 2, every core count, "
                         "twice the cores: %s)" % ",".join(map(str, default_threads())))
    ap.add_argument("--lock-modes", default="shared,exclusive",
                    help="shared at every thread count; exclusive at the largest count that does "
                         "not exceed the cores (default: shared,exclusive)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per measurement; the median is reported (default: S %d, D %d)"
                         % (CONFIGS["S"]["steps"], CONFIGS["D"]["steps"]))
    ap.add_argument("--warmup", type=int, default=None,
                    help="burn-in steps before timing (default: S %d, D %d)"
                         % (CONFIGS["S"]["warmup"], CONFIGS["D"]["warmup"]))
    ap.add_argument("--micro-batch", type=int, default=default_micro_batch(),
                    help="windows per micro-batch (default: train_model's, %(default)s)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measurements of the comparison point (the engine at 1 and 2 threads, "
                         "torch at 2), interleaved: ratios are the median of the per-round "
                         "ratios (default: %(default)s)")
    ap.add_argument("--profile", action="store_true",
                    help="print every per-op bucket of the profiled pass")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--no-mpi", action="store_true", help="skip the many-process comparison")
    args = ap.parse_args(argv)

    configs = [c.upper() for c in parse_list(ap, args.configs, str, "configs")]
    threads = sorted(set(parse_list(ap, args.threads, int, "threads"))) if args.threads else default_threads()
    modes = parse_list(ap, args.lock_modes, str, "lock-modes")
    bad = [c for c in configs if c not in CONFIGS] + [m for m in modes if m not in ("shared", "exclusive")]
    if bad or min(threads) < 1 or args.micro_batch < 1 or args.rounds < 1 or (args.steps is not None and args.steps < 1) \
            or (args.warmup is not None and args.warmup < 0):
        ap.error(f"bad arguments {', '.join(bad)} (configs S, D, G; lock modes shared, exclusive; "
                 "threads, steps, rounds and micro-batch >= 1, warmup >= 0)")
    cores = os.cpu_count() or 1
    tv = None if args.no_torch else torch_version()
    impls = ["cllm"] + (["torch-eager", "torch-compile"] if tv else [])

    info = machine_info()
    load = os.getloadavg()[0]   # before the sgemm ceiling adds its own
    print(f"CLLM benchmark: {info['cpu']}, {cores} cores, Python {info['python']}, "
          f"numpy {info['numpy']}, torch {tv or ('skipped' if args.no_torch else 'not installed')}")
    print(f"kernel of the fp32 products: --matmul blas ({info['blas']}); "
          f"python -m benchmarks.kernels compares it with onednn")
    print(f"{FLOP_FORMULA}  ("
          + ", ".join(f"{c}: {flops_per_token(model_config(c)) / 1e6:.2f} MFLOP" for c in configs) + ")")
    t0 = time.perf_counter()
    sg = sgemm_ceiling(cores)
    ceiling = sg["ceiling_gflops"]
    print(f"fp32 sgemm ceiling ({sg['n']}^3 sgemm, scipy's BLAS, 1 thread): "
          f"{sg['single_core_gflops']:.1f} GFLOPS per core, N-core ceiling = N x that "
          f"({cores} cores: {ceiling[cores]:.1f}); measured with N processes at once: "
          + ", ".join(f"{k}: {g:.1f}" for k, g in sg["measured_gflops"].items() if k > 1)
          )
    for c in configs:
        cfg = model_config(c)
        print(f"{c}: V {cfg.vocab_size}, d {cfg.embed_dim}, L {cfg.num_layers}, H {cfg.num_heads}, "
              f"F {cfg.ff_dim}, T {cfg.seq_len}, batch {CONFIGS[c]['batch']}, micro-batch "
              f"{args.micro_batch}, P {num_parameters(cfg):,}, A {activation_floats(cfg, args.micro_batch):,} "
              f"activation floats per sphere")
    print(RSS_FORMULA)
    print("timed: median of the timed steps after burn-in; accum/optim: ms per step in ordered "
          "accumulation / the optimiser (mean per sphere, profiled pass); RSS: peak of the run's "
          "process; others: CPU share other processes took during the timed steps (above "
          f"{100 * BUSY_RETRY:.0f}% a measurement is repeated once, the quieter one kept)")
    if not tv and not args.no_torch:
        print("torch is not installed (pip install torch==2.13.0): PyTorch comparison skipped")
    if load > 0.5:
        print(f"note: the machine is busy before the benchmark starts (load average {load:.2f}): "
              "expect noisy figures")
    print(HEADER, flush=True)

    exclusive_at = max([t for t in threads if t <= cores] or [min(threads)])
    all_rows, summaries = [], {}
    for c in configs:
        cfg = model_config(c)
        warmup = CONFIGS[c]["warmup"] if args.warmup is None else args.warmup
        steps = CONFIGS[c]["steps"] if args.steps is None else args.steps
        plan = []
        for impl in impls:
            for n in threads:
                for mode in (modes if impl == "cllm" else [None]):
                    if mode == "exclusive" and n != exclusive_at:
                        continue
                    plan.append({"impl": impl, "config": c, "threads": n, "lock_mode": mode,
                                 "warmup": max(warmup, 1 if impl != "cllm" else 0), "steps": steps,
                                 "profile_steps": CONFIGS[c]["profile_steps"],
                                 "micro_batch": args.micro_batch})
        rows = []
        for spec in plan:
            row = measured(spec, cfg, ceiling, cores)
            if "error" not in row:
                base = next((r for s, r in rows if s["impl"] == spec["impl"] and s["threads"] == 1
                             and s["lock_mode"] in (None, "shared") and "error" not in r), None)
                if spec["threads"] == 1 and spec["lock_mode"] in (None, "shared"):
                    base = row
                row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
            rows.append((spec, row))
            print(format_row(spec, row), flush=True)
            if args.profile and "profile_ms_per_step" in row:
                print(format_profile(spec, row), flush=True)
        # the comparison point again, interleaved, without the profiled pass
        at = comparison_threads(threads, cores)
        again = [dict(spec, profile_steps=0) for spec in plan
                 if spec["lock_mode"] in (None, "shared")
                 and (spec["threads"] == at or (spec["impl"] == "cllm" and spec["threads"] == 1))]
        rounds = []
        for r in range(2, args.rounds + 1):
            found = [(spec, measured(spec, cfg, ceiling, cores)) for spec in again]
            rounds.append(found)
            print(f"    {c} round {r}: " + ", ".join(
                f"{spec['impl']} {spec['threads']}: "
                + (f"{row['tokens_per_s']:.0f} tok/s" if "error" not in row else "failed")
                + (f" (others {100 * row['others_cpu_share']:.0f}%)"
                   if row.get("others_cpu_share", 0) > BUSY_RETRY / 2 else "")
                for spec, row in found), flush=True)
        line, figures = summarise(c, rows, rounds, cores)
        summaries[c] = {"line": line, **figures}
        all_rows += rows + [(dict(spec, round=r), row)
                            for r, found in enumerate(rounds, 2) for spec, row in found]

    mpi = None if args.no_mpi else bench_mpi.report("D" if "D" in configs else configs[0],
                                                     args.micro_batch, args.rounds)

    tok = tokenize_speed()
    for kind, row in tok.items():
        parts = (f" (BPE training {row['train_seconds']:.2f} s, encoding "
                 f"{row['encode_seconds']:.2f} s)" if "train_seconds" in row else "")
        print(f"tokenize {kind}: {row['bytes'] / 1e6:.1f} MB generated corpus, "
              f"{row['tokens']:,} tokens in {row['seconds']:.2f} s{parts} (vocab 10000, "
              f"dataset.bin written) [target < 5 s: {'met' if row['seconds'] < 5 else 'MISSED'}]")
    load_end = os.getloadavg()[0]
    print(f"(total {time.perf_counter() - t0:.0f} s, load average at the start {load:.2f}, "
          f"at the end {load_end:.2f})")
    for c in configs:
        print(summaries[c]["line"])
    if args.json:
        doc = {"machine": info, "torch": tv, "tokenize": tok, "load_average": {"start": load, "end": load_end}, "flop_formula": FLOP_FORMULA,
               "rss_formula": RSS_FORMULA, "sgemm": sg,
               "configs": {c: dict(CONFIGS[c], flops_per_token=flops_per_token(model_config(c)),
                                   params=num_parameters(model_config(c)),
                                   activation_floats=activation_floats(model_config(c), args.micro_batch))
                           for c in configs},
               "micro_batch": args.micro_batch,
               "runs": [dict(spec=spec, **row) for spec, row in all_rows],
               "summary": summaries, "mpi": mpi}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
