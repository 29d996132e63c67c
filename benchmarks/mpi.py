"""Training speed on many processes: `python -m benchmarks.mpi`, and the last
section of `python -m benchmarks.bench` (`make bench`).

- Layouts: K ranks x N threads on the same global batches as bench_measure (config D by
  default): 2 ranks x 1 thread against 1 rank x 2 threads, measured --rounds times,
  interleaved; the ratio is the median of the per-round ratios (target >= 0.9). Each
  measurement is one `mpiexec -n K python -m benchmarks.mpi --worker ...` (the mpich
  wheel's mpiexec next to the interpreter); 1 rank runs the plain Engine.train_step.
- A step is timed as train_model runs it: the rank's block through its spheres, the results
  gathered, the ordered fold with each rank's share of the sum sent to it, the optimiser on
  the rank's share, the updated weights gathered; the exchange is the time of all the
  communication of a step, waiting for slower ranks included, on rank 0.
- Exchange alone: the ordered fold and scatter of config D's P floats on 2, 3 and 4 ranks
  with each rank's block of kept gradients, then the allgather of the weights' shares,
  median of --exchange-repeats; 3 and 4 ranks oversubscribe two cores. These are the inputs
  of the cost model (docs/distributed.md):
      step(K) = compute / K + (K - 1 + S) x (l + s / b) + 4P / b + K x l
  with S = ceil(P / SEGMENT_FLOATS) segments of s = 4 x SEGMENT_FLOATS bytes, link latency l
  and bandwidth b; its predictions for 4, 16 and 64 nodes on 10 and 100 Gb/s are printed.
- Memory (--memory CONFIG alone; config G in the report): each rank's peak RSS (VmHWM) over
  two training steps on 2 ranks x 1 thread, as train_model's ranks hold their state, with
  the bytes of each part (weights, the rank's share of AdamW's state, gradient rows,
  activations), and after a checkpoint save written by rank 0 from every rank's share; the
  baseline is the rank's RSS before the model is built.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.measure import (
    CONFIGS,
    GRAD_CLIP,
    LR,
    SEED,
    WEIGHT_DECAY,
    make_batches,
    model_config,
    peak_rss_bytes,
    rss_now_bytes,
)
from cllm_cli.api import CLLMModel

MARK = "BENCH-MPI "
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TARGET_RATIO = 0.9
LINKS = {"10 Gb/s": (10e9 / 8, 20e-6), "100 Gb/s": (100e9 / 8, 5e-6)}   # bytes/s, latency s
NODES = (4, 16, 64)


def rank_engine(world, solo, cfg, flat, batch):
    """(engine, adam_m, adam_v, moments) as a rank of train_model holds them: one process,
    the Engine with the whole of AdamW's state (moments None); on many, the
    DataParallelEngine with this rank's share of it, sent by rank 0 (MomentShares)."""
    from cllm_cli import _engine
    from cllm_cli.distributed import MomentShares
    from cllm_cli.distributed import step as parallel
    if world.size == 1:
        return solo, np.zeros_like(flat), np.zeros_like(flat), None
    whole = np.zeros_like(flat) if world.is_root else None
    moments = MomentShares.scatter(world, _engine.optimizer_chunks(cfg), whole, whole)
    engine = parallel.DataParallelEngine(solo, world, flat, moments, batch)
    return engine, moments.m, moments.v, moments


def worker(config, threads, warmup, steps, micro_batch):
    """One layout's measurement, on every rank of the job; rank 0 prints the figures."""
    from cllm_cli import _engine
    from cllm_cli.distributed import world as distributed
    world = distributed.world()
    cfg = model_config(config)
    batch = CONFIGS[config]["batch"]
    batches = make_batches(config, warmup + steps)
    flat = CLLMModel(cfg, SEED).flat
    with _engine.Engine(cfg, flat, threads, micro_batch, batch) as solo:
        engine, adam_m, adam_v, _ = rank_engine(world, solo, cfg, flat, batch)
        times, exchange, losses = [], [], []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            result = engine.train_step(batches[i], i, adam_m, adam_v, adamw=True, lr=LR,
                                       weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, t=i + 1)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                exchange.append(getattr(engine, "exchange", {}).get("exchange_seconds", 0.0))
            losses.append(result.loss)
    if world.is_root:
        step = statistics.median(times)
        print(MARK + json.dumps({
            "ranks": world.size, "threads": threads, "step_seconds": step,
            "tokens_per_s": batch * cfg.seq_len / step,
            "exchange_seconds": statistics.median(exchange),
            "exchange_bytes": getattr(engine, "exchange", {}).get("exchange_bytes", 0),
            "losses": losses}), flush=True)


def exchange_worker(config, micro_batch, repeats):
    """The exchange alone: config's P floats, each rank with its block of gradients folded
    in order and scattered in shares, then the shares of the weights gathered."""
    from cllm_cli import _engine
    from cllm_cli.distributed import world as distributed
    from cllm_cli.distributed.shares import shares_of
    world = distributed.world()
    cfg = model_config(config)
    size = _engine.num_parameters(cfg)
    bounds = [(s.start, s.stop) for s in shares_of(_engine.optimizer_chunks(cfg), world.size)]
    n_micro = -(-CONFIGS[config]["batch"] // micro_batch)
    first, end = distributed.block_of(world.rank, world.size, n_micro)
    rng = np.random.default_rng(world.rank)
    rows = rng.standard_normal((max(1, end - first), size), dtype=np.float32)
    weights = np.zeros(size, dtype=np.float32)
    seconds = []
    for _ in range(repeats + 1):                       # the first one warms the buffers up
        world.allgather(None)                          # start together
        world.begin_exchange()
        world.fold_and_scatter(rows, [True] * (end - first), first > 0, bounds)
        world.allgather_shares(weights, bounds)
        seconds.append(world.seconds)
    gathered = world.allgather(statistics.median(seconds[1:]))
    if world.is_root:
        print(MARK + json.dumps({"ranks": world.size, "params": size,
                                 "segments": math.ceil(size / distributed.SEGMENT_FLOATS),
                                 "seconds": max(gathered)}), flush=True)


def memory_worker(config, threads, micro_batch, steps):
    """A rank's memory in training: every rank holds what a rank of train_model holds (the
    weights, its share of AdamW's m and v, the DataParallelEngine's gradient rows, its
    spheres' activations), runs `steps` steps and then saves a checkpoint as train_model
    does (rank 0 writes, reading the moments from every rank in pieces); rank 0 prints each
    rank's peak RSS (VmHWM) before and after the save, and the bytes of each part."""
    from cllm_cli import _engine
    from cllm_cli.distributed import world as distributed
    from cllm_cli.formats import save_checkpoint
    world = distributed.world()
    baseline = rss_now_bytes()
    cfg = model_config(config)
    batch = CONFIGS[config]["batch"]
    batches = make_batches(config, steps)
    flat = CLLMModel(cfg, SEED).flat
    with _engine.Engine(cfg, flat, threads, micro_batch, batch) as solo:
        engine, adam_m, adam_v, moments = rank_engine(world, solo, cfg, flat, batch)
        for i in range(steps):
            engine.train_step(batches[i], i, adam_m, adam_v, adamw=True, lr=LR,
                              weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, t=i + 1)
        parts = {"weights": flat.nbytes, "adam_m_v": adam_m.nbytes + adam_v.nbytes,
                 "kept_rows": engine.kept.shape[0] * engine.kept.shape[1] * 4,
                 "activations": threads * 4 * _engine.activation_allocation(cfg, micro_batch)}
        step_peak = peak_rss_bytes()
        if world.is_root:
            with tempfile.TemporaryDirectory() as directory:
                try:
                    save_checkpoint(os.path.join(directory, "memory.cllm"), cfg, flat,
                                    *moments.whole(), {"step": steps})
                finally:
                    moments.done()
        else:
            moments.serve()
    figures = world.allgather({"peak_bytes": step_peak, "saved_peak_bytes": peak_rss_bytes(),
                               "baseline_bytes": baseline, "parts": parts})
    if world.is_root:
        print(MARK + json.dumps({"config": config, "ranks": world.size, "threads": threads,
                                 "micro_batch": micro_batch, "per_rank": figures}), flush=True)


def memory_report(config="G", ranks=2, threads=1, micro_batch=4, steps=2):
    """Prints each rank's peak RSS in a training step at `config` and its parts; returns the
    figures. Two steps: the second runs with the AdamW state the first one wrote."""
    fig = launch(ranks, "--memory-worker", config, threads, micro_batch, steps)
    if "error" in fig:
        print(f"    memory, config {config}, {ranks} ranks: failed ({fig['error']})")
        return fig
    mib = 1 << 20
    for rank, r in enumerate(fig["per_rank"]):
        other = r["peak_bytes"] - r["baseline_bytes"] - sum(r["parts"].values())
        print(f"    memory, config {config}, {ranks} ranks x {threads} thread(s), micro-batch "
              f"{micro_batch}: rank {rank} peak RSS {r['peak_bytes'] / mib:,.0f} MiB = baseline "
              f"{r['baseline_bytes'] / mib:,.0f} + " + " + ".join(
                  f"{name.replace('_', ' ')} {n / mib:,.0f}" for name, n in r["parts"].items())
              + f" + other {other / mib:,.0f}; after a checkpoint save "
              f"{r['saved_peak_bytes'] / mib:,.0f} MiB", flush=True)
    return fig


def launch(ranks, *argv, timeout=1800):
    """Runs this module under mpiexec; the figures rank 0 printed, or {"error": ...}."""
    line = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "benchmarks.mpi", *map(str, argv)]
    try:
        p = subprocess.run(line, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    for text in p.stdout.splitlines():
        if text.startswith(MARK):
            return json.loads(text[len(MARK):])
    return {"error": (p.stderr.strip().splitlines() or [f"status {p.returncode}"])[-1]}


def predict(compute, params, nodes, bandwidth, latency):
    """The cost model's step time (seconds) on `nodes` nodes: see the module docstring. After
    the chain, each rank receives its share of the sum (P / K floats) and the allgather of
    the weights (MPI's ring for a large buffer: K - 1 rounds of a share each); the
    optimiser's work, part of `compute`, is divided by K like the micro-batches."""
    from cllm_cli.distributed.world import SEGMENT_FLOATS
    if nodes == 1:
        return compute
    segments = math.ceil(params / SEGMENT_FLOATS)
    seg_bytes = 4 * min(params, SEGMENT_FLOATS)
    chain = (nodes - 1 + segments) * (latency + seg_bytes / bandwidth)
    share = latency + 4 * params / nodes / bandwidth
    return compute / nodes + chain + nodes * share


def scaling_limit(compute, params, bandwidth, latency):
    """The node count from which one more node makes the step slower."""
    k = 1
    while predict(compute, params, k + 1, bandwidth, latency) < predict(compute, params, k,
                                                                        bandwidth, latency):
        k += 1
    return k


def report(config="D", micro_batch=4, rounds=3, warmup=None, steps=None, repeats=5,
           memory_config="G"):
    """Prints the section and returns its figures."""
    if not os.path.exists(MPIEXEC):
        print("MPI: no mpiexec next to the interpreter (pip install .[mpi]): skipped")
        return {"skipped": True}
    warmup = CONFIGS[config]["warmup"] if warmup is None else warmup
    steps = CONFIGS[config]["steps"] if steps is None else steps
    print(f"MPI, config {config} (mpich wheel's mpiexec, one host): tokens/s of K ranks x N "
          f"threads, exchange = a step's communication on rank 0", flush=True)
    layouts = ((1, 2), (2, 1))
    found = {layout: [] for layout in layouts}
    ratios = []
    for r in range(1, rounds + 1):
        row = {}
        for ranks, threads in layouts:
            row[ranks, threads] = launch(ranks, "--worker", config, threads, warmup, steps,
                                         micro_batch)
            found[ranks, threads].append(row[ranks, threads])
        parts = []
        for (ranks, threads), fig in row.items():
            parts.append(f"{ranks}x{threads}: " + (f"{fig['tokens_per_s']:.0f} tok/s, "
                         f"{1000 * fig['step_seconds']:.0f} ms/step, exchange "
                         f"{1000 * fig['exchange_seconds']:.1f} ms, "
                         f"{fig['exchange_bytes'] / 1e6:.1f} MB" if "error" not in fig
                         else f"failed ({fig['error']})"))
        if all("error" not in fig for fig in row.values()):
            ratios.append(row[2, 1]["tokens_per_s"] / row[1, 2]["tokens_per_s"])
        print(f"    round {r}: " + "; ".join(parts), flush=True)
    runs = [fig for figs in found.values() for fig in figs if "error" not in fig]
    identical = len({json.dumps(fig["losses"]) for fig in runs}) == 1 if runs else None
    figures = {"rounds": {f"{k}x{n}": figs for (k, n), figs in found.items()},
               "identical_losses": identical}
    exchange = {k: launch(k, "--exchange", config, micro_batch, repeats) for k in (2, 3, 4)}
    figures["exchange_only"] = exchange
    print("    exchange alone (fold and scatter of P floats, allgather of the weights): "
          + ", ".join(f"{k} ranks {1000 * e['seconds']:.1f} ms" if "error" not in e
                      else f"{k} ranks failed" for k, e in exchange.items())
          + " (3 and 4 ranks oversubscribe the cores)")
    figures["memory"] = memory_report(memory_config, micro_batch=micro_batch)
    if ratios:
        figures["ratio_2x1_vs_1x2"] = statistics.median(ratios)
        met = "met" if figures["ratio_2x1_vs_1x2"] >= TARGET_RATIO else "MISSED"
        print(f"MPI {config}: 2 ranks x 1 thread {figures['ratio_2x1_vs_1x2']:.2f}x 1 rank x 2 "
              f"threads (rounds {', '.join(f'{x:.2f}' for x in ratios)}) [target "
              f"{TARGET_RATIO:.2f}x: {met}], losses "
              + ("bit-identical across layouts" if identical else "DIFFER across layouts"))
        compute = statistics.median(fig["step_seconds"] for fig in found[1, 2]
                                    if "error" not in fig)        # a node like this one
        params = next(e["params"] for e in exchange.values() if "error" not in e) \
            if any("error" not in e for e in exchange.values()) else None
        if params:
            figures["cost_model"] = {}
            for link, (b, l) in LINKS.items():
                cells = {k: predict(compute, params, k, b, l) for k in NODES}
                limit = scaling_limit(compute, params, b, l)
                figures["cost_model"][link] = {"step_seconds": cells, "limit": limit}
                print(f"    cost model, nodes like this one, {link}: " + ", ".join(
                    f"{k} nodes {1000 * s:.0f} ms/step ({compute / s:.1f}x)"
                    for k, s in cells.items()) + f"; stops scaling beyond {limit} nodes")
    return figures


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mpi",
                                 description="speed of train_model on many MPI processes")
    ap.add_argument("--config", default="D", choices=sorted(CONFIGS))
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", metavar="CONFIG", choices=sorted(CONFIGS),
                    help="only each rank's peak RSS in a step of CONFIG, on 2 ranks x 1 thread")
    ap.add_argument("--worker", nargs=5, metavar=("CONFIG", "THREADS", "WARMUP", "STEPS", "MB"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--exchange", nargs=3, metavar=("CONFIG", "MB", "REPEATS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", nargs=4, metavar=("CONFIG", "THREADS", "MB", "STEPS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        c, *numbers = args.worker
        worker(c, *map(int, numbers))
    elif args.exchange:
        c, *numbers = args.exchange
        exchange_worker(c, *map(int, numbers))
    elif args.memory_worker:
        c, *numbers = args.memory_worker
        memory_worker(c, *map(int, numbers))
    elif args.memory:
        memory_report(args.memory, micro_batch=args.micro_batch)
    else:
        report(args.config, args.micro_batch, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
