"""Where a training step's time goes, op by op (python -m benchmarks.profile_ops): Linux perf
samples this process while the engine runs `--steps` steps (after one untimed step), and each
sampled function is put in the group of the op it belongs to: the matrix products (oneDNN's
JIT kernels for bf16, OpenBLAS's sgemm for fp32), the rounding to bf16, attention, layer
norms, GELU, the softmax and loss, residual adds and dropout, clearing, the accumulation and
its checks, the optimiser. Functions the compiler inlined count in their caller's group.
Needs `perf` (linux-perf) and perf_event_paranoid <= 2.

    python -m benchmarks.profile_ops --config G --precision bf16 --threads 2
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.measure import CONFIGS, GRAD_CLIP, LR, SEED, WEIGHT_DECAY, make_batches, model_config

# (group, pattern of the symbol), first match wins; symbols are the engine's function names
# (Cython's __pyx_f_..._<name>), oneDNN's JIT kernel names and the libraries' own
GROUPS = (
    ("products (oneDNN bf16)", r"jit_|brgemm|gemm_bf16|dnnl|onednn"),
    ("products (OpenBLAS fp32)", r"sgemm|openblas|blas_thread"),
    ("rounding to bf16", r"bf16_round"),
    ("attention (softmax, scaling, masks)", r"attention"),
    ("layer norms", r"layernorm|ln_backward"),
    ("GELU", r"gelu"),
    ("classifier softmax and loss", r"crossentropy"),
    ("residual adds and dropout", r"residual|dropout"),
    ("embedding", r"encoder_"),
    ("accumulation and NaN checks", r"accumulate|validate_gradients|nonfinite|sphere_worker"),
    ("optimiser", r"optimizer|divide_sumsq|mean_gradient"),
    ("clearing buffers", r"memset|clear_page"),
    ("the rest of the pass (copies, bias rows)", r"_engine|linear_|block_|model_|memcpy|memmove"),
)


def run_steps(precision_name, name, threads, steps):
    """The engine on `name`'s random batches; returns a function running the next step."""
    from cllm_cli._engine import Engine
    from cllm_cli.api import CLLMModel
    from cllm_cli.model.precision import require
    require(precision_name)
    cfg = model_config(name)
    flat = CLLMModel(cfg, SEED).flat
    adam_m, adam_v = np.zeros_like(flat), np.zeros_like(flat)
    batches = make_batches(name, steps + 1)
    engine = Engine(cfg, flat, threads, 4, CONFIGS[name]["batch"], precision=precision_name)

    def step(i):
        engine.train_step(batches[i], i, adam_m, adam_v, adamw=True, lr=LR,
                          weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, t=i + 1)
    return step


def grouped(report):
    """{group: share} of perf report's "overhead symbol" lines."""
    shares = {group: 0.0 for group, _ in GROUPS}
    shares["other"] = 0.0
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.*)", line)
        if not m:
            continue
        share, symbol = float(m.group(1)), m.group(2)
        group = next((g for g, pattern in GROUPS if re.search(pattern, symbol, re.I)), "other")
        shares[group] += share
    return shares


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_ops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="G", choices=sorted(CONFIGS))
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ["ONEDNN_JIT_PROFILE"] = "2"     # oneDNN names its JIT kernels in a perf map
    step = run_steps(args.precision, args.config, args.threads, args.steps)
    step(0)                                    # primitives created, pages touched
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "499", "-p", str(os.getpid()),
                                 "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for i in range(1, args.steps + 1):
                step(i)
        finally:
            perf.send_signal(2)
            _, err = perf.communicate()
        if perf.returncode not in (0, -2):
            print(f"perf record failed: {err.decode(errors='replace').strip()}", file=sys.stderr)
            return 1
        report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                                 "--sort", "symbol", "-F", "overhead,sym"],
                                capture_output=True, text=True).stdout
    shares = grouped(report)
    print(f"config {args.config}, {args.precision}, {args.threads} threads, {args.steps} steps: "
          f"share of the samples")
    for group, share in sorted(shares.items(), key=lambda item: -item[1]):
        if share >= 0.05:
            print(f"  {share:5.1f}%  {group}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
