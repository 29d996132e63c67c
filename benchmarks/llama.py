"""The Llama form at SmolLM2-135M's shape: `python -m benchmarks.llama`.

- Model: V 49152, d 576, 30 layers, 9 query heads over 3 key/value heads, SwiGLU 1536, tied
  output layer, rope theta 10000 (--shape small: a quick stand-in of the same form), random
  weights of transformers' initialisation (speed does not depend on the values).
- Training: steps of 4 windows of T 512 (2,048 tokens), AdamW (lr 1e-3, weight decay 0.01,
  gradient clipping 1.0), --threads threads; burn-in steps, then timed steps, each side in a
  process of its own (peak RSS is its VmHWM):
    cllm       the engine, one micro-batch per thread (and cllm-bf16: --precision bf16, on
               a CPU with bf16)
    lora       the engine training rank-8 adapters on q_proj and v_proj (PEFT's default)
    torch      transformers' LlamaForCausalLM (its default attention) + torch.optim.AdamW,
               eager, torch.set_num_threads(threads) (and torch-bf16: the forward and the
               loss under torch.autocast bf16, on a CPU with bf16)
    finetune   llama.cpp's llama-finetune on our GGUF export of the same model (f32, -c 512,
               -b 512, -ub 512), tokens per second from its own progress line; with
               --llama-cpp DIR (the bin directory of a llama.cpp build:
               `tools/llama_cpp_check.py` builds one, with llama-finetune and llama-bench)
- Generation as llama-bench reports it: pp512 (Decoder.prefill of 512 tokens) and tg128 (128
  positions one at a time), tokens per second, against llama-bench -p 512 -n 128 on the same
  GGUF, at 1 thread and at --threads.
- Shares of the host's ceilings: training and prefill against the fp32 sgemm ceiling (one
  2048^3 product per core, measure.sgemm_ceiling) with FLOPs per token
  6 L (d W + d^2 + 3 d F) + 6 d V + 12 L T d (W = d + 2 x kv heads x head size: q, k, v);
  decoding against the bytes a token reads (every weight once).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.llama_cpp import export_gguf, llama_bench
from benchmarks.measure import (
    burn_in_and_time,
    machine_info,
    peak_rss_bytes,
    rss_now_bytes,
    sgemm_ceiling,
)
from cllm_cli.model import LlamaConfig, LoraSpec, init_adapters, named_views, parse_targets

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, embed_dim=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, ff_dim=1536, seq_len=512),
    "small": dict(vocab_size=8192, embed_dim=256, num_layers=4, num_heads=8, num_kv_heads=2,
                  ff_dim=704, seq_len=512),
}
BATCH = 4
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 0.01, 1.0
MARK = "LLAMA-BENCH "
FINETUNE_CHARS = 12_000      # llama-finetune's text: about 3,000 tokens, a dozen windows
ROOT = Path(__file__).resolve().parent.parent


def config(shape):
    return LlamaConfig(**SHAPES[shape], tie_embeddings=True)


def micro_batch(threads):
    """Windows per micro-batch: one micro-batch per sphere."""
    return max(1, BATCH // threads)


def flops_per_token(cfg):
    hs = cfg.embed_dim // cfg.num_heads
    d, width = cfg.embed_dim, cfg.embed_dim + 2 * cfg.num_kv_heads * hs
    per_layer = d * width + d * d + 3 * d * cfg.ff_dim
    return (6 * cfg.num_layers * per_layer + 6 * d * cfg.vocab_size
            + 12 * cfg.num_layers * cfg.seq_len * d)


def parameters(cfg):
    from cllm_cli._engine import num_parameters
    from cllm_cli.model.llama import init_parameters
    flat = np.zeros(num_parameters(cfg), dtype=np.float32)
    init_parameters(cfg, named_views(cfg, flat), np.random.default_rng(1234))
    return flat


def batches(cfg, count):
    rng = np.random.default_rng(7)
    return [rng.integers(4, cfg.vocab_size, size=(BATCH, cfg.seq_len + 1), dtype=np.int32)
            for _ in range(count)]


# --- workers: one measurement each, in a process of its own ----------------------------------

def train_cllm(spec):
    from cllm_cli._engine import Engine
    cfg = config(spec["shape"])
    baseline = rss_now_bytes()
    flat = parameters(cfg)
    adapters = lora = None
    if spec["impl"] == "lora":
        lora = LoraSpec(8, 16.0, 0.0, parse_targets("attn", family_of_llama()))
        adapters = init_adapters(cfg, lora, 1234)
    trained = flat if adapters is None else adapters
    m, v = np.zeros_like(trained), np.zeros_like(trained)
    data = batches(cfg, spec["warmup"] + spec["steps"])
    precision = spec.get("precision", "fp32")
    if precision == "bf16":
        from cllm_cli.model.precision import require
        require("bf16")
    engine = Engine(cfg, flat, spec["threads"], micro_batch(spec["threads"]), BATCH,
                    adapters=adapters, lora=lora and lora.engine_args, precision=precision)
    try:
        timed = burn_in_and_time(
            lambda i: engine.train_step(data[i], i, m, v, adamw=True, lr=LR,
                                        weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, t=i + 1),
            spec["warmup"], spec["steps"])
    finally:
        engine.close()
    return {**timed, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes()}


def family_of_llama():
    from cllm_cli.model import FAMILIES
    return FAMILIES["llama"]


def train_torch(spec):
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM
    torch.set_num_threads(spec["threads"])
    cfg = config(spec["shape"])
    baseline = rss_now_bytes()
    hf = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
                  intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  max_position_embeddings=cfg.seq_len, tie_word_embeddings=True,
                  rms_norm_eps=cfg.rms_norm_eps)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    data = [torch.from_numpy(b.astype(np.int64)) for b in batches(cfg, spec["warmup"] + spec["steps"])]

    autocast = spec.get("precision") == "bf16"     # torch.autocast: bf16 products on CPU

    def step(i):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=data[i][:, :-1], labels=None)
            loss = torch.nn.functional.cross_entropy(
                out.logits.float().reshape(-1, cfg.vocab_size), data[i][:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()

    timed = burn_in_and_time(step, spec["warmup"], spec["steps"])
    return {**timed, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes(),
            "torch": torch.__version__}


def generate_cllm(spec):
    from cllm_cli._engine import Decoder
    cfg = config(spec["shape"])
    flat = parameters(cfg)
    ids = np.random.default_rng(3).integers(4, cfg.vocab_size, 512).astype(np.int32)
    out = {}
    decoder = Decoder(cfg, flat, threads=spec["threads"])
    decoder.prefill(ids[:64])                   # warm-up
    pp = []
    for _ in range(spec["repeats"]):
        decoder.reset()
        t0 = time.perf_counter()
        decoder.prefill(ids)
        pp.append(512 / (time.perf_counter() - t0))
    tg = []
    for _ in range(spec["repeats"]):
        decoder.reset()
        t0 = time.perf_counter()
        for t in range(128):
            decoder.feed(int(ids[t]))
        tg.append(128 / (time.perf_counter() - t0))
    out.update(pp512=statistics.median(pp), tg128=statistics.median(tg))
    return out


WORKERS = {"cllm": train_cllm, "lora": train_cllm, "cllm-bf16": train_cllm, "torch": train_torch,
           "torch-bf16": train_torch,
           "generate": generate_cllm}


def run_worker(spec):
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.llama", "--worker",
                           json.dumps(spec)], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


# --- llama.cpp -----------------------------------------------------------------------------

def export_finetune_files(shape, work):
    """A GGUF file of the model and a text file for llama-finetune."""
    cfg = config(shape)
    path = export_gguf(cfg, parameters(cfg), work / "model.gguf")
    sample = work / "finetune.txt"
    text = (ROOT / "data" / "corpus.txt").read_text(encoding="utf-8")
    sample.write_text(text[:FINETUNE_CHARS], encoding="utf-8")
    return path, sample


def finetune(bins, gguf, sample, threads):
    """llama-finetune's training tokens per second: the windows of its last progress line
    (data=N/M, each n_ctx tokens) over its t=HH:MM:SS."""
    done = subprocess.run([str(bins / "llama-finetune"), "-m", str(gguf), "-f", str(sample),
                           "-c", "512", "-b", "512", "-ub", "512", "-t", str(threads),
                           "-epochs", "1", "-o", str(gguf.parent / "finetuned.gguf")],
                          capture_output=True, text=True, errors="replace")
    said = done.stdout + done.stderr
    lines = [ln for ln in re.split(r"[\r\n]", said) if "train:" in ln and "data=" in ln]
    if done.returncode != 0 or not lines:
        return {"error": (said.strip().splitlines() or ["no output"])[-1][:200]}
    last = lines[-1]
    windows = int(re.search(r"data=\s*(\d+)/", last).group(1))
    h, m, s = map(int, re.search(r"t=(\d+):(\d+):(\d+)", last).group(1, 2, 3))
    seconds = 3600 * h + 60 * m + s
    return {"tokens_per_s": windows * 512 / seconds, "windows": windows, "seconds": seconds,
            "peak_rss_bytes": None}


# --- the report ----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="generation runs, median")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--llama-cpp", type=Path, help="bin directory of a llama.cpp build")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(MARK + json.dumps(WORKERS[spec["impl"]](spec)), flush=True)
        return 0
    cfg = config(args.shape)
    flops = flops_per_token(cfg)
    ceiling = sgemm_ceiling(args.threads)
    ceil = ceiling["ceiling_gflops"]
    info = machine_info()
    print(f"host: {info['cpu']}, {os.cpu_count()} cores; kernel of the fp32 products: "
          f"--matmul blas ({info['blas']}); fp32 sgemm ceiling "
          f"{ceiling['single_core_gflops']:.1f} GFLOPS per core")
    print(f"model: {args.shape} (V {cfg.vocab_size}, d {cfg.embed_dim}, L {cfg.num_layers}, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads, ff {cfg.ff_dim}, T {cfg.seq_len}), "
          f"batch {BATCH} x {cfg.seq_len}, {flops / 1e6:.0f} MFLOP per token, "
          f"{args.threads} threads")
    base = dict(shape=args.shape, threads=args.threads, warmup=args.warmup, steps=args.steps)
    from cllm_cli.model.precision import cpu_has_bf16, library_path
    bf16 = cpu_has_bf16() and library_path() is not None
    impls = ["cllm", "lora"] + ([] if args.no_torch else ["torch"])
    if bf16:
        impls[1:1] = ["cllm-bf16"]
        impls += [] if args.no_torch else ["torch-bf16"]
    results = {}
    for impl in impls:
        row = run_worker(dict(base, impl=impl, precision="bf16" if impl.endswith("bf16")
                              else "fp32"))
        if "error" not in row:
            row["tokens_per_s"] = BATCH * cfg.seq_len / statistics.median(row["times"])
        results[impl] = row
    gen = {t: run_worker(dict(base, impl="generate", threads=t, repeats=args.repeats))
           for t in sorted({1, args.threads})}
    llama = {}
    if args.llama_cpp:
        with tempfile.TemporaryDirectory() as tmp:
            gguf, sample = export_finetune_files(args.shape, Path(tmp))
            llama["finetune"] = finetune(args.llama_cpp, gguf, sample, args.threads)
            llama["bench"] = {t: llama_bench(args.llama_cpp, gguf, t)
                              for t in sorted({1, args.threads})}
    report(cfg, flops, ceil, args.threads, results, gen, llama)
    if args.json:
        args.json.write_text(json.dumps({"config": SHAPES[args.shape], "ceiling": ceiling,
                                         "train": results, "generate": gen,
                                         "llama_cpp": llama}, indent=2, default=str))
    return 0


def report(cfg, flops, ceil, threads, results, gen, llama):
    def share(tokens_per_s, cores):
        return f"{100 * tokens_per_s * flops / 1e9 / ceil[cores]:.1f}% of ceiling"

    print(f"\ntraining, {threads} threads     tokens/s   peak RSS    share")
    ours = results["cllm"].get("tokens_per_s")
    names = {"cllm": "CLLM", "cllm-bf16": "CLLM bf16", "lora": "CLLM LoRA r8 (q,v)",
             "torch": "PyTorch eager", "torch-bf16": "PyTorch eager, bf16 autocast"}
    for impl, row in results.items():
        if "error" in row:
            print(f"  {names[impl]:<28} failed: {row['error']}")
            continue
        rss = row["peak_rss_bytes"] / 2**30
        shown = share(row['tokens_per_s'], threads) if impl in ("cllm", "torch") else ""
        print(f"  {names[impl]:<28} {row['tokens_per_s']:9.1f}  {rss:6.2f} GiB  {shown}")
    fine = llama.get("finetune")
    if fine and "error" not in fine:
        print(f"  {'llama-finetune':<28} {fine['tokens_per_s']:9.1f}        -   "
              f"{share(fine['tokens_per_s'], threads)} ({fine['windows']} windows in "
              f"{fine['seconds']} s)")
    elif fine:
        print(f"  {'llama-finetune':<28} failed: {fine['error']}")
    for mine, theirs in (("cllm", "torch"), ("cllm-bf16", "torch-bf16"), ("cllm-bf16", "torch")):
        a, t = results.get(mine, {}), results.get(theirs, {})
        if "tokens_per_s" in a and "tokens_per_s" in t:
            print(f"  {names[mine]} / {names[theirs]}: {a['tokens_per_s'] / t['tokens_per_s']:.2f}x "
                  f"tokens/s, {a['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}x peak RSS")
    if ours and fine and "error" not in fine:
        print(f"  CLLM / llama-finetune: {ours / fine['tokens_per_s']:.2f}x tokens/s")
    print("\ngeneration     pp512 tok/s   tg128 tok/s   (llama-bench pp512, tg128)")
    for t, row in gen.items():
        theirs = llama.get("bench", {}).get(t, {})
        if "error" in row:
            print(f"  {t} thread(s): failed: {row['error']}")
            continue
        extra = (f"({theirs['pp512']:.1f}, {theirs['tg128']:.1f}: "
                 f"{row['pp512'] / theirs['pp512']:.2f}x, {row['tg128'] / theirs['tg128']:.2f}x)"
                 if "pp512" in theirs and "tg128" in theirs else "")
        print(f"  {t} thread(s) {row['pp512']:11.1f}   {row['tg128']:11.1f}   {extra}")


if __name__ == "__main__":
    sys.exit(main())
