"""The precision switch on any CPU: bf16 rounding (plain code, no bf16 instructions needed),
the refusals of --precision bf16 where the CPU or oneDNN is missing, and CLLM_NO_BF16, which
makes a CPU with bf16 count as one without, so that either kind of host shows both paths."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
from engine_cases import CONFIGS, make_params
from helpers import ROOT, assert_one_error_line, call

from cllm_cli import _engine, _engine_testing
from cllm_cli.cli.train import main as train_main
from cllm_cli.model import precision


def nearest_bf16(x):
    """The bf16 nearest to float32 x, ties to the even significand, found by comparing the
    two neighbours in float64 (an independent route to op_bf16_round's answer)."""
    u = int(np.float32(x).view(np.uint32))
    if math.isnan(x):
        return None
    down = u >> 16
    up = down + 1
    if math.isinf(x):
        return down
    lo, hi = ref.bf16_values([down, up])
    if math.isinf(hi):      # rounding sees the step past the largest finite bf16 as 2^128
        hi = math.copysign(2.0 ** 128, hi)
    # distances in float64 are exact for float32 inputs
    d_lo, d_hi = abs(float(np.float32(x)) - lo), abs(float(np.float32(x)) - hi)
    if d_lo != d_hi:
        return down if d_lo < d_hi else up
    return down if down % 2 == 0 else up


def test_rounding_is_nearest_even_on_every_kind_of_float():
    rng = np.random.default_rng(0)
    bits = np.concatenate([
        rng.integers(0, 2**32, 20000, dtype=np.uint64),
        # ties: the low half exactly 0x8000, with both parities of the kept part
        (rng.integers(0, 2**16, 2000, dtype=np.uint64) << 16) | 0x8000,
        np.array([0, 0x80000000, 0x00000001, 0x00008000, 0x007FFFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                  0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000], np.uint64),
    ]).astype(np.uint32)
    x = bits.view(np.float32)
    got = _engine_testing.op_bf16_round(x)
    for xi, gi in zip(x, got):
        want = nearest_bf16(float(xi))
        if want is None:
            assert gi & 0x7F80 == 0x7F80 and gi & 0x7F, f"NaN {xi!r} became {gi:#06x}"
        else:
            assert gi == want, f"{float(xi)!r}: got {gi:#06x}, want {want:#06x}"


def test_missing_onednn_is_one_line(window_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "library_path", lambda: None)
    monkeypatch.setattr(precision, "load_bf16", lambda path: pytest.fail("loaded"))
    argv = [window_corpus, "--checkpoint-dir", tmp_path / "ck", "--precision", "bf16", "--quiet"]
    code, _, err = call(capsys, train_main, *argv)
    assert_one_error_line(code, err, "train_model", "oneDNN", "bf16")
    assert not (tmp_path / "ck").exists()


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.delenv(precision.HIDE_SWITCH, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not precision.cpu_has_bf16(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert precision.cpu_has_bf16(str(cpuinfo))
    monkeypatch.setenv(precision.HIDE_SWITCH, "1")
    assert not precision.cpu_has_bf16(str(cpuinfo))
    monkeypatch.setenv(precision.HIDE_SWITCH, "0")
    assert precision.cpu_has_bf16(str(cpuinfo))


def test_a_cpu_without_bf16_refuses_it_in_one_line_and_writes_nothing(window_corpus, tmp_path):
    """A real train_model process with the switch set: on a host with bf16 it behaves as one
    without; on a host without, as it is."""
    ck = tmp_path / "ck"
    env = {**os.environ, precision.HIDE_SWITCH: "1"}
    p = subprocess.run([sys.executable, "-m", "cllm_cli.cli.train", str(window_corpus),
                        "--checkpoint-dir", str(ck), "--precision", "bf16", "--quiet"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert_one_error_line(p.returncode, p.stderr, "train_model", "avx512_bf16",
                          precision.HIDE_SWITCH, "use fp32")
    assert not ck.exists()


def test_engine_refuses_an_unknown_precision():
    cfg = CONFIGS["A"]
    flat, _ = make_params(cfg)
    with pytest.raises(ValueError, match="precision"):
        _engine.Engine(cfg, flat, 1, 1, 1, precision="fp16")
