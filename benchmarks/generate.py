"""Generation speed, as llama.cpp's llama-bench reports it: `python -m benchmarks.generate`.

- pp512: a 512-token prompt run as one batched pass (Decoder.prefill), tokens per second.
- tg128: 128 tokens decoded one at a time from an empty cache (Decoder.feed), tokens per
  second; as in llama-bench, the two are measured apart.
- Configs D (d256 L6 T512, V 10000) and G (GPT-2 small's shape: d768 L12 T1024, V 50257),
  random weights of the training initialisation (speed does not depend on the values), at 1
  and 2 threads (--threads); each figure the median of --repeats runs.
- Prompt cost: the seconds CLLMModel.generate takes for 100 tokens after a 393-token prompt
  against a 4-token one (D, T 512, greedy, at the largest thread count).
- --precision bf16: the weights' bf16 copy (Decoder precision "bf16"), 2 bytes per parameter
  read per decoded token.
- With --llama-cpp DIR (the bin directory of a llama.cpp build; tools/llama_cpp_check.py
  builds one): llama-bench -p 512 -n 128 on our GGUF export of the same weights, at the same
  thread counts, and our figures' ratio to its.
- Ceilings of this host, so that figures from two hosts compare: the memory bandwidth of a
  streaming read (numpy's max of a 512 MB array, one process per thread, at once: the
  fastest of numpy's reductions, where its sum is bound by its pairwise adds) against the
  bytes a decoded token reads (every weight once: 4 bytes per parameter, 2 in bf16), and the fp32 sgemm
  rate (one 2048^3 product per thread) against the FLOPs of a prompt token (2 per weight of
  the blocks, attention aside).
"""
import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.llama_cpp import export_gguf, llama_bench
from benchmarks.measure import machine_info
from cllm_cli import _engine
from cllm_cli.api import CLLMModel
from cllm_cli.model import CLLMConfig

CONFIGS = {
    "D": CLLMConfig(vocab_size=10000, embed_dim=256, num_layers=6, num_heads=8, seq_len=512),
    "G": CLLMConfig(vocab_size=50257, embed_dim=768, num_layers=12, num_heads=12, seq_len=1024),
}
PROMPT, GENERATED = 512, 128


def _read_bandwidth(_):
    data = np.ones(128 << 20, dtype=np.float32)          # 512 MB
    data.max()
    t0 = time.perf_counter()
    for _ in range(3):
        data.max()
    return 3 * data.nbytes / (time.perf_counter() - t0)


def _sgemm_rate(_):
    from scipy.linalg.blas import sgemm
    a = np.ones((2048, 2048), dtype=np.float32, order="F")
    sgemm(1.0, a, a)
    t0 = time.perf_counter()
    for _ in range(3):
        sgemm(1.0, a, a)
    return 3 * 2 * 2048 ** 3 / (time.perf_counter() - t0)


def ceiling(measure, processes):
    """The host's rate with `processes` processes measuring at once (summed)."""
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        return sum(pool.map(measure, range(processes)))


def block_weights(cfg):
    """Parameters of the blocks' matrix products (what a prompt token multiplies)."""
    C, F = cfg.embed_dim, cfg.ff_dim
    return cfg.num_layers * (3 * C * C + C * C + 2 * C * F)


def measure(cfg, threads, repeats, precision="fp32"):
    model = CLLMModel(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, PROMPT + GENERATED)
    pp, tg = [], []
    for _ in range(repeats):
        decoder = _engine.Decoder(cfg, model.flat, threads, precision)
        t0 = time.perf_counter()
        decoder.prefill(ids[:PROMPT])
        t1 = time.perf_counter()
        decoder.reset()
        for token in ids[PROMPT:]:
            decoder.feed(int(token))
        t2 = time.perf_counter()
        pp.append(PROMPT / (t1 - t0))
        tg.append(GENERATED / (t2 - t1))
    return statistics.median(pp), statistics.median(tg), model.num_params()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="D,G", help="comma-separated, from D and G")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--no-prompt-cost", action="store_true")
    ap.add_argument("--llama-cpp", type=Path, metavar="DIR",
                    help="bin directory of a llama.cpp build: compare with llama-bench")
    args = ap.parse_args(argv)
    if args.precision == "bf16":
        from cllm_cli.model.precision import require
        require("bf16")
    threads = [int(t) for t in args.threads.split(",")]
    info = machine_info()
    print(f"CLLM generation benchmark ({args.precision}): {info['cpu']}, {os.cpu_count()} cores, "
          f"prompt products on {info['blas']}, load average {os.getloadavg()[0]:.2f}")
    bandwidth = {n: ceiling(_read_bandwidth, n) for n in threads}
    sgemm = {n: ceiling(_sgemm_rate, n) for n in threads}
    for n in threads:
        print(f"ceilings at {n} thread(s): streaming read {bandwidth[n] / 1e9:.1f} GB/s, "
              f"fp32 sgemm {sgemm[n] / 1e9:.1f} GFLOPS")
    print(f"{'cfg':<4}{'thr':>4}{'pp512 tok/s':>13}{'% sgemm':>9}{'tg128 tok/s':>13}"
          f"{'GB/s read':>11}{'% bandwidth':>13}"
          + ("   llama-bench pp512, tg128 (ours / theirs)" if args.llama_cpp else ""))
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        theirs = against_llama_cpp(args.llama_cpp, cfg, threads) if args.llama_cpp else {}
        for n in threads:
            pp, tg, params = measure(cfg, n, args.repeats, args.precision)
            flops = 2 * block_weights(cfg) * pp
            read = (2 if args.precision == "bf16" else 4) * params * tg
            print(f"{name:<4}{n:>4}{pp:>13,.1f}{flops / sgemm[n]:>9.0%}{tg:>13,.1f}"
                  f"{read / 1e9:>11.1f}{read / bandwidth[n]:>13.0%}"
                  + compared(theirs.get(n), pp, tg), flush=True)
    if args.no_prompt_cost:
        return
    short, long = prompt_cost(max(threads), args.repeats)
    print(f"D, {max(threads)} thread(s): 100 tokens after a 4-token prompt {short:.2f} s, after "
          f"a 393-token prompt {long:.2f} s ({long / short:.2f}x)")


def against_llama_cpp(bins, cfg, threads):
    """{threads: llama-bench's figures} on a GGUF export of measure()'s weights."""
    with tempfile.TemporaryDirectory() as tmp:
        gguf = export_gguf(cfg, CLLMModel(cfg, seed=0).flat, Path(tmp) / "model.gguf")
        return {n: llama_bench(bins, gguf, n) for n in threads}


def compared(theirs, pp, tg):
    if not theirs:
        return ""
    if "error" in theirs:
        return f"   llama-bench failed: {theirs['error']}"
    return (f"   {theirs['pp512']:,.1f}, {theirs['tg128']:,.1f} "
            f"({pp / theirs['pp512']:.2f}x, {tg / theirs['tg128']:.2f}x)")


def prompt_cost(threads, repeats):
    """(seconds for 100 tokens after a 4-token prompt, after a 393-token prompt) on D."""
    model = CLLMModel(CONFIGS["D"], seed=0)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 393).tolist()
    out = []
    for prompt in (ids[:4], ids):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            got = list(model.generate(prompt, max_tokens=100, temperature=0, threads=threads))
            times.append(time.perf_counter() - t0)
            assert len(got) == 100
        out.append(statistics.median(times))
    return out


if __name__ == "__main__":
    main()
