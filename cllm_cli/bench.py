"""Training speed of the CLLM engine, side by side with PyTorch: `python -m cllm_cli.bench`.

In the spirit of nanoGPT's bench.py: burn-in steps, then timed steps, then one summary line
(per config). Every measurement is one training step as train_model runs it (random token
windows, forward + loss + backward in the spheres, ordered accumulation, AdamW with gradient
clipping), timed from handing the windows to the spheres to the end of the optimiser step.

- Configs: S (V 2000, d 128, L 4, H 4, F 512, T 64, batch 16) and D (V 10000, d 256, L 6,
  H 8, F 1024, T 128, batch 32: the original's defaults and train_model's).
- Threads: 1, 2, every core count up to os.cpu_count(), and twice the core count; lock mode
  `shared` at each, `exclusive` at the largest listed count that does not exceed the cores
  (what serialising the passes costs where it matters).
- Figures: tokens/s and ms/step (median of the timed steps), achieved GFLOPS with the FLOP
  count below, the share of the fp32 sgemm ceiling measured in the same run, the speed-up
  against 1 thread, peak RSS, and the time per step in ordered accumulation and in the
  optimiser, from one extra profiled pass (the per-op timers cost a clock read per op, so
  the timed steps run without them).
- FLOPs per token = 6 x L x (3d^2 + d^2 + 2dF)   (the matmul weights: forward 2, backward 4)
                  + 6 x d x V                    (the tied output projection)
                  + 12 x L x T x d               (attention scores and weighted values)
- The sgemm ceiling: a 2048^3 float32 sgemm through scipy's BLAS (the engine's) on one
  thread; the N-core ceiling is N times that (the same sgemm in N processes at once is
  printed too).
- Peak RSS (VmHWM) against baseline + 4 bytes x (4P + spheres x (P + A)): P parameters, each
  for the weights, AdamW m and v and accumulated_gradients; per sphere local_gradients and A
  activation floats (activations_alloc of pyx/model.pxi for micro_batch windows).
- Every measurement runs in a fresh worker process (`--worker`), so the peak RSS is that of
  one configuration, and threads left over by one run (PyTorch's OpenMP pool) cannot slow
  the next one. The column `others` is the CPU share other processes took during the timed
  steps; above 10% the measurement is repeated once and the quieter run kept.
- PyTorch: cllm_cli/bench_torch.py, eager and torch.compile, at torch.set_num_threads(N) for
  the same N; skipped when torch is not installed or with --no-torch.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from . import CLLMConfig, CLLMModel   # sets OPENBLAS_NUM_THREADS=1 before scipy loads it
from .config import num_params

CONFIGS = {
    "S": dict(vocab_size=2000, embed_dim=128, num_layers=4, num_heads=4, ff_dim=512, seq_len=64,
              batch=16, warmup=3, steps=10, profile_steps=4),
    "D": dict(vocab_size=10000, embed_dim=256, num_layers=6, num_heads=8, ff_dim=1024,
              seq_len=128, batch=32, warmup=2, steps=5, profile_steps=2),
}
LR = 1e-3
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
SEED = 1234
RESULT_MARK = "BENCH-RESULT "
BUSY_RETRY = 0.10     # re-measure once when other processes took more than this CPU share
FLOP_FORMULA = "FLOPs/token = 6*L*(3d^2 + d^2 + 2dF) + 6dV + 12LTd"
RSS_FORMULA = ("peak RSS = baseline + 4 bytes x (4P + spheres x (P + A)): parameters, AdamW m "
               "and v, accumulated gradient; per sphere its local gradient and activations")


def model_config(name):
    c = CONFIGS[name]
    return CLLMConfig(vocab_size=c["vocab_size"], embed_dim=c["embed_dim"],
                      num_layers=c["num_layers"], num_heads=c["num_heads"], ff_dim=c["ff_dim"],
                      seq_len=c["seq_len"])


def flops_per_token(cfg):
    """The stated per-token training FLOPs (see the module docstring)."""
    L, d, F, V, T = cfg.num_layers, cfg.embed_dim, cfg.ff_dim, cfg.vocab_size, cfg.seq_len
    return 6 * L * (3 * d * d + d * d + 2 * d * F) + 6 * d * V + 12 * L * T * d


def activation_floats(cfg, micro_batch):
    """Floats one sphere's Activations hold: the sizes of activations_alloc in pyx/model.pxi
    for micro_batch windows of T tokens, each piece rounded up to 16 floats, + 16 for the
    alignment. Keep in step with that function."""
    N, C, L, F, V, T, NH = (micro_batch * cfg.seq_len, cfg.embed_dim, cfg.num_layers,
                            cfg.ff_dim, cfg.vocab_size, cfg.seq_len, cfg.num_heads)
    wide = max(3 * C, F)
    sizes = [N * C,                                   # encoded
             L * N * C, L * N, L * N,                 # ln1, mean, rstd
             L * N * 3 * C,                           # qkv
             L * N * C,                               # atty
             L * micro_batch * NH * T * T,            # att
             L * N * C,                               # residual2
             L * N * C, L * N, L * N,                 # ln2, mean, rstd
             L * N * F, L * N * F,                    # fch, fch_gelu
             L * N * C,                               # residual3
             N * C, N, N,                             # lnf, mean, rstd
             N * V,                                   # logits
             N * C, N * wide, N * C,                  # backward scratch
             T * T]                                   # datt
    return sum((s + 15) & ~15 for s in sizes) + 16


def rss_formula_bytes(cfg, spheres, micro_batch):
    P = num_params(cfg)
    return 4 * (4 * P + spheres * (P + activation_floats(cfg, micro_batch)))


def default_micro_batch():
    try:
        from .trainer import TrainConfig
        return TrainConfig.micro_batch
    except (ImportError, AttributeError):
        return 4


def default_threads():
    cores = os.cpu_count() or 1
    return sorted({1, 2, *range(1, cores + 1), 2 * cores})


def rss_now_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: after a vfork + exec (how
    subprocess starts the workers) ru_maxrss carries the parent's peak over."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux


def engine_sha1():
    """Which build of the engine ran (the .so may be rebuilt while a benchmark runs)."""
    import hashlib
    from . import _engine
    with open(_engine.__file__, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def cpu_seconds():
    """(seconds the whole machine spent busy, seconds this process spent on a CPU)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]      # all but idle and iowait
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def burn_in_and_time(step, warmup, steps):
    """Runs step(0..warmup-1) untimed, then step(warmup..warmup+steps-1). Returns the seconds
    of each timed step, and the share of the machine's CPU time that other processes took
    during them (a busy machine makes the figures noisy)."""
    for i in range(warmup):
        step(i)
    times = []
    busy0, own0 = cpu_seconds()
    t_start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    busy1, own1 = cpu_seconds()
    wall = time.perf_counter() - t_start
    others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
    return {"times": times, "others_cpu_share": others}


def make_batches(name, count):
    """count global batches of random windows [B, T+1] (ids 4..V-1: every target counts)."""
    c = CONFIGS[name]
    rng = np.random.default_rng([SEED, ord(name)])
    return [rng.integers(4, c["vocab_size"], size=(c["batch"], c["seq_len"] + 1), dtype=np.int32)
            for _ in range(count)]


# --- sgemm ceiling -------------------------------------------------------------------------

def sgemm_ceiling(max_cores, n=2048, repeats=5):
    """The fp32 ceiling, with scipy's BLAS (the engine's) single-threaded
    (OPENBLAS_NUM_THREADS=1): GFLOPS of an n^3 sgemm on one core, best of `repeats`; and the
    same sgemm in k processes at once for k = 2..max_cores (scipy.linalg.blas holds the GIL,
    so threads would take turns), the total GFLOPS the cores reach together. The ceiling used
    for the shares is k x the one-core figure: background load on the machine then lowers
    the measured k-core figure, not the ceiling."""
    import multiprocessing
    from scipy.linalg.blas import sgemm
    rng = np.random.default_rng(0)
    a = np.asfortranarray(rng.standard_normal((n, n), dtype=np.float32))
    b = np.asfortranarray(rng.standard_normal((n, n), dtype=np.float32))
    flops = 2.0 * n ** 3
    sgemm(1.0, a, b)   # warm-up: buffers, page faults
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        sgemm(1.0, a, b)
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    measured = {1: best}
    ctx = multiprocessing.get_context("fork")   # the children share a and b copy-on-write

    def child(barrier, seconds, j):
        barrier.wait()
        t0 = time.perf_counter()
        for _ in range(repeats):
            sgemm(1.0, a, b)
        seconds[j] = time.perf_counter() - t0

    for k in range(2, max_cores + 1):
        barrier, seconds = ctx.Barrier(k), ctx.Array("d", k)
        procs = [ctx.Process(target=child, args=(barrier, seconds, j)) for j in range(k)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if all(p.exitcode == 0 for p in procs):
            measured[k] = k * repeats * flops / max(seconds) / 1e9
    return {"n": n, "single_core_gflops": best, "measured_gflops": measured,
            "ceiling_gflops": {k: k * best for k in range(1, max_cores + 1)}}


# --- worker: one measurement in its own process ----------------------------------------------

def worker(spec):
    """Runs one measurement (spec: impl, config, threads, lock_mode, warmup, steps,
    profile_steps, micro_batch) and returns its raw figures."""
    name = spec["config"]
    cfg = model_config(name)
    profile_steps = spec.get("profile_steps", 0) if spec["impl"] == "cllm" else 0
    batches = make_batches(name, spec["warmup"] + spec["steps"] + profile_steps)
    if spec["impl"] != "cllm":
        from . import bench_torch
        flat = CLLMModel(cfg, SEED).flat
        out = bench_torch.run(dict(spec, lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP),
                              cfg, flat, batches, burn_in_and_time)
        out["peak_rss_bytes"] = peak_rss_bytes()
        return out

    from ._engine import Engine
    from .model import engine_config
    baseline = rss_now_bytes()
    flat = CLLMModel(cfg, SEED).flat     # this process's own copy: updated in place
    adam_m, adam_v = np.zeros_like(flat), np.zeros_like(flat)
    engine = Engine(engine_config(cfg), flat, spec["threads"], spec["micro_batch"],
                    CONFIGS[name]["batch"], lock_mode=spec["lock_mode"])
    losses, skipped = [], 0

    def step(i):
        nonlocal skipped
        engine.start(batches[i], True, i)
        while not engine.wait(0.1):
            pass
        results = engine.results()
        count = sum(r[1] for r in results)
        losses.append(sum(r[0] for r in results) / count)
        _, applied = engine.optimizer_step(count, adam_m, adam_v, adamw=True, lr=LR,
                                           weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
                                           t=i + 1)
        skipped += not applied

    try:
        timed = burn_in_and_time(step, spec["warmup"], spec["steps"])
        profile = None
        if profile_steps:
            first = spec["warmup"] + spec["steps"]
            engine.set_profile(True)
            t0 = time.perf_counter()
            for i in range(first, first + profile_steps):
                step(i)
            profile_wall = time.perf_counter() - t0
            profile = engine.profile()
            engine.set_profile(False)
    finally:
        engine.close()
    out = {**timed, "losses": losses, "skipped_steps": skipped,
           "engine_sha1": engine_sha1(),
           "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes()}
    if profile is not None:
        out.update(profile=profile, profile_steps=profile_steps, profile_wall=profile_wall)
    return out


def run_worker(spec):
    """Runs worker(spec) in a fresh `python -m cllm_cli.bench --worker` process."""
    env = dict(os.environ)
    if spec["impl"] != "cllm":
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run([sys.executable, "-m", "cllm_cli.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"error": tail[:200]}


# --- the report ----------------------------------------------------------------------------

def measure(spec, cfg, ceiling, cores):
    """run_worker, once more when other processes took more than BUSY_RETRY of the CPU
    (keeping the quieter run), then derive."""
    row = run_worker(spec)
    if row.get("others_cpu_share", 0) > BUSY_RETRY:
        again = run_worker(spec)
        if "error" not in again and again["others_cpu_share"] < row["others_cpu_share"]:
            again["retried_busy"] = row["others_cpu_share"]
            row = again
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


# issue 4's targets for config D (at 2 threads; 1->2 speed-up; more spheres than cores)
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


def machine_info():
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform()}


def torch_version():
    """torch's version without importing it here (the workers import it), or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("torch")
    except PackageNotFoundError:
        return None


def parse_list(ap, text, kind, what):
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        items = []
    if not items:
        ap.error(f"--{what} needs a comma-separated list, got {text!r}")
    return items


def tokenize_speed(size=12_000_000):
    """Seconds to tokenise a generated corpus of `size` bytes (word tokenizer: read, count,
    build the vocabulary, encode, write vocab.txt and dataset.bin) with train_model's code."""
    import subprocess
    import tempfile

    from .data import prepare_dataset
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        subprocess.run([sys.executable, os.path.join(root, "data", "make_corpus.py"),
                        "--size", str(size), "--seed", "7", "--out", corpus],
                       check=True, capture_output=True)
        t = time.perf_counter()
        _, tokens, info = prepare_dataset([corpus], os.path.join(tmp, "ck"), "word", 10000)
        seconds = time.perf_counter() - t
        return {"bytes": info["bytes"], "tokens": int(len(tokens)), "seconds": seconds}


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m cllm_cli.bench",
        description="Training speed of the CLLM engine (and PyTorch, when installed) on configs "
                    "S and D: tokens/s, GFLOPS, share of the sgemm ceiling, speed-up, peak RSS.")
    ap.add_argument("--configs", default="S,D", help="comma-separated, from S and D (default: S,D)")
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
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = worker(json.loads(args.worker))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0

    configs = [c.upper() for c in parse_list(ap, args.configs, str, "configs")]
    threads = sorted(set(parse_list(ap, args.threads, int, "threads"))) if args.threads else default_threads()
    modes = parse_list(ap, args.lock_modes, str, "lock-modes")
    bad = [c for c in configs if c not in CONFIGS] + [m for m in modes if m not in ("shared", "exclusive")]
    if bad or min(threads) < 1 or args.micro_batch < 1 or args.rounds < 1 or (args.steps is not None and args.steps < 1) \
            or (args.warmup is not None and args.warmup < 0):
        ap.error(f"bad arguments {', '.join(bad)} (configs S, D; lock modes shared, exclusive; "
                 "threads, steps, rounds and micro-batch >= 1, warmup >= 0)")
    cores = os.cpu_count() or 1
    tv = None if args.no_torch else torch_version()
    impls = ["cllm"] + (["torch-eager", "torch-compile"] if tv else [])

    info = machine_info()
    load = os.getloadavg()[0]   # before the sgemm ceiling adds its own
    print(f"CLLM benchmark: {info['cpu']}, {cores} cores, Python {info['python']}, "
          f"numpy {info['numpy']}, torch {tv or ('skipped' if args.no_torch else 'not installed')}")
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
              f"{args.micro_batch}, P {num_params(cfg):,}, A {activation_floats(cfg, args.micro_batch):,} "
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
            row = measure(spec, cfg, ceiling, cores)
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
            found = [(spec, measure(spec, cfg, ceiling, cores)) for spec in again]
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

    tok = tokenize_speed()
    print(f"tokenize: {tok['bytes'] / 1e6:.1f} MB generated corpus, {tok['tokens']:,} tokens in "
          f"{tok['seconds']:.2f} s (word tokenizer, vocab 10000, dataset.bin written) "
          f"[target < 5 s: {'met' if tok['seconds'] < 5 else 'MISSED'}]")
    load_end = os.getloadavg()[0]
    print(f"(total {time.perf_counter() - t0:.0f} s, load average at the start {load:.2f}, "
          f"at the end {load_end:.2f})")
    for c in configs:
        print(summaries[c]["line"])
    if args.json:
        doc = {"machine": info, "torch": tv, "tokenize": tok, "load_average": {"start": load, "end": load_end}, "flop_formula": FLOP_FORMULA,
               "rss_formula": RSS_FORMULA, "sgemm": sg,
               "configs": {c: dict(CONFIGS[c], flops_per_token=flops_per_token(model_config(c)),
                                   params=num_params(model_config(c)),
                                   activation_floats=activation_floats(model_config(c), args.micro_batch))
                           for c in configs},
               "micro_batch": args.micro_batch,
               "runs": [dict(spec=spec, **row) for spec, row in all_rows],
               "summary": summaries}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
