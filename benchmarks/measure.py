"""The measuring half of `python -m benchmarks.bench`: what is timed and how; bench.py turns
the raw figures into the report (derived figures, table, summary, targets).

- Configs: S (V 2000, d 128, L 4, H 4, F 512, T 64, batch 16) and D (V 10000, d 256, L 6,
  H 8, F 1024, T 128, batch 32: the C trainer's defaults and train_model's).
- A measurement is one training step as train_model runs it (random token windows,
  forward + loss + backward in the spheres, ordered accumulation, AdamW with gradient
  clipping), timed from handing the windows to the spheres to the end of the optimiser step:
  burn-in steps, then timed steps (burn_in_and_time), then, for the engine, one extra
  profiled pass (the per-op timers cost a clock read per op, so the timed steps run without
  them).
- Worker protocol: every measurement runs in a fresh process, `python -m
  benchmarks.measure JSON` (run_worker), which prints one line RESULT_MARK + JSON of its
  raw figures; so the peak RSS is that of one configuration, and threads left over by one
  run (PyTorch's OpenMP pool) cannot slow the next one. others_cpu_share is the CPU share
  other processes took during the timed steps; above BUSY_RETRY the measurement is repeated
  once and the quieter run kept (measure).
- The sgemm ceiling: a 2048^3 float32 sgemm through scipy's BLAS (the engine's) on one
  thread; the N-core ceiling is N times that (the same sgemm in N processes at once is
  measured too).
- Peak RSS: VmHWM of the worker, and its RSS before the model is built (the baseline).
- PyTorch: cllm_cli/torch_model.py, eager and torch.compile, at torch.set_num_threads(N) for
  the same N, timed by the same burn_in_and_time.
"""
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from cllm_cli.api import CLLMModel
from cllm_cli.model import CLLMConfig, LoraSpec, init_adapters

CONFIGS = {
    "S": dict(vocab_size=2000, embed_dim=128, num_layers=4, num_heads=4, ff_dim=512, seq_len=64,
              batch=16, warmup=3, steps=10, profile_steps=4),
    "D": dict(vocab_size=10000, embed_dim=256, num_layers=6, num_heads=8, ff_dim=1024,
              seq_len=128, batch=32, warmup=2, steps=5, profile_steps=2),
    # GPT-2 small's shape (124 M parameters): the scale issue's memory and speed point
    "G": dict(vocab_size=50257, embed_dim=768, num_layers=12, num_heads=12, ff_dim=3072,
              seq_len=512, batch=8, warmup=1, steps=2, profile_steps=1),
}
LR = 1e-3
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
SEED = 1234
RESULT_MARK = "BENCH-RESULT "
BUSY_RETRY = 0.10     # re-measure once when other processes took more than this CPU share


def model_config(name):
    c = CONFIGS[name]
    return CLLMConfig(vocab_size=c["vocab_size"], embed_dim=c["embed_dim"],
                      num_layers=c["num_layers"], num_heads=c["num_heads"], ff_dim=c["ff_dim"],
                      seq_len=c["seq_len"])


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

    from cllm_cli import _engine
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
        from benchmarks import torch_model as bench_torch
        flat = CLLMModel(cfg, SEED).flat
        out = bench_torch.run(dict(spec, lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP),
                              cfg, flat, batches, burn_in_and_time)
        out["peak_rss_bytes"] = peak_rss_bytes()
        return out

    from cllm_cli._engine import Engine
    from cllm_cli.model.precision import require
    require(spec.get("precision", "fp32"))
    baseline = rss_now_bytes()
    flat = CLLMModel(cfg, SEED).flat     # this process's own copy: updated in place
    adapters = lora = None
    if spec.get("lora"):                 # [rank, sites]: adapters train, the model is frozen
        lora = LoraSpec(spec["lora"][0], 2.0 * spec["lora"][0], 0.0, tuple(spec["lora"][1]))
        adapters = init_adapters(cfg, lora, SEED)
    trained = flat if adapters is None else adapters
    adam_m, adam_v = np.zeros_like(trained), np.zeros_like(trained)
    engine = Engine(cfg, flat, spec["threads"], spec["micro_batch"],
                    CONFIGS[name]["batch"], lock_mode=spec["lock_mode"],
                    precision=spec.get("precision", "fp32"), adapters=adapters,
                    lora=lora and lora.engine_args)
    losses, skipped = [], 0

    def step(i):
        nonlocal skipped
        result = engine.train_step(batches[i], i, adam_m, adam_v, adamw=True, lr=LR,
                                   weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, t=i + 1)
        losses.append(result.loss)
        skipped += not result.applied

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
    """Runs worker(spec) in a fresh `python -m benchmarks.measure` process; its raw
    figures, or {"error": last line of its stderr}."""
    env = dict(os.environ)
    if spec["impl"] != "cllm":
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.measure", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"error": tail[:200]}


def measure(spec):
    """run_worker, once more when other processes took more than BUSY_RETRY of the CPU
    (keeping the quieter run, marked with the share of the first in retried_busy)."""
    row = run_worker(spec)
    if row.get("others_cpu_share", 0) > BUSY_RETRY:
        again = run_worker(spec)
        if "error" not in again and again["others_cpu_share"] < row["others_cpu_share"]:
            again["retried_busy"] = row["others_cpu_share"]
            row = again
    return row


# --- what ran where, and the tokenizer's speed ----------------------------------------------

# the instruction sets that decide the kernels' speed, as /proc/cpuinfo flags name them
ISA_FLAGS = (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 bf16"), ("amx_bf16", "AMX"),
             ("avx2", "AVX2"))


def machine_info():
    """The host: "cpu" is the model name and its vector instructions (a virtual machine's model
    name is often only "Intel(R) Xeon(R) Processor")."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    isa = [name for flag, name in ISA_FLAGS if flag in flags]
    if "AVX-512" in isa and "AVX2" in isa:
        isa.remove("AVX2")
    if isa:
        model = f"{model} ({', '.join(isa)})"
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform(), "blas": blas_name()}


def blas_name():
    """scipy's BLAS, the engine's default kernel of the fp32 products (--matmul blas), as its
    build names it: "scipy-openblas 0.3.30", or "unknown"."""
    try:
        import scipy
        blas = scipy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas['version']}"
    except (AttributeError, KeyError, TypeError):
        return "unknown"


def torch_version():
    """torch's version without importing it here (the workers import it), or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("torch")
    except PackageNotFoundError:
        return None


def tokenize_speed(kinds=("word", "bpe"), size=12_000_000):
    """{kind: figures} of tokenising a generated corpus of `size` bytes with train_model's code
    (read, build the vocabulary, encode, write the vocabulary file and dataset.bin; vocab
    10000). For bpe the BPE training and the encoding are also timed apart."""
    import tempfile

    from cllm_cli.corpus import prepare_dataset
    from cllm_cli.tokenizers import BPETokenizer
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        subprocess.run([sys.executable, os.path.join(root, "data", "make_corpus.py"),
                        "--size", str(size), "--seed", "7", "--out", corpus],
                       check=True, capture_output=True)
        for kind in kinds:
            t = time.perf_counter()
            _, tokens, info = prepare_dataset([corpus], os.path.join(tmp, kind), kind, 10000)
            row = {"bytes": info["bytes"], "tokens": int(len(tokens)),
                   "seconds": time.perf_counter() - t}
            if kind == "bpe":
                with open(corpus, encoding="utf-8") as f:
                    text = f.read()
                t = time.perf_counter()
                tokenizer = BPETokenizer.train([text], 10000)
                row["train_seconds"] = time.perf_counter() - t
                t = time.perf_counter()
                tokenizer.encode_document(text)
                row["encode_seconds"] = time.perf_counter() - t
            results[kind] = row
    return results


if __name__ == "__main__":
    # the worker side of run_worker: one measurement, its raw figures as one marked line
    print(RESULT_MARK + json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
