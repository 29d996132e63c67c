"""--precision bf16: the CPU check and oneDNN, loaded only when a run asks for bf16.

oneDNN comes from the `onednn-cpu-gomp` wheel (the `bf16` extra: pip install '.[bf16]'); its
libdnnl.so.3 lands in <prefix>/lib. fp32 never imports or loads it.

CLLM_NO_BF16=1 in the environment makes a CPU with bf16 instructions count as one without, so
that one host can show both behaviours (the tests run that way once in CI).
"""
from __future__ import annotations

import importlib.metadata
import os
import sys

from cllm_cli._engine import load_bf16
from cllm_cli.errors import PrecisionError

DISTRIBUTION = "onednn-cpu-gomp"
LIBRARY = "libdnnl.so.3"
CPU_FLAGS = ("avx512_bf16", "amx_bf16")     # what oneDNN's native bf16 kernels need
PRECISIONS = ("fp32", "bf16")
HIDE_SWITCH = "CLLM_NO_BF16"


def bf16_hidden() -> bool:
    """The environment asks to treat this CPU as one without bf16."""
    return os.environ.get(HIDE_SWITCH, "") not in ("", "0")


def cpu_has_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    if bf16_hidden():
        return False
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in CPU_FLAGS)


def library_path() -> str | None:
    """Where the installed wheel put libdnnl.so.3, or None."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == LIBRARY:
            return str(f.locate())
    candidate = os.path.join(sys.prefix, "lib", LIBRARY)
    return candidate if os.path.exists(candidate) else None


MATMUL_KERNELS = ("blas", "onednn")


def require_matmul(kernel: str) -> None:
    """Makes the fp32 weight products' kernel runnable: loads oneDNN for "onednn" (any x86-64
    CPU); PrecisionError with one line when it cannot."""
    if kernel == "onednn":
        load_onednn("--matmul onednn")


def load_onednn(option: str) -> None:
    """Loads the installed oneDNN into the engine; PrecisionError naming `option` (what
    needs it) when it is not installed or cannot be loaded."""
    path = library_path()
    if path is None:
        raise PrecisionError(f"{option} needs oneDNN: pip install '.[bf16]' "
                             f"({DISTRIBUTION}==2023.2.0)")
    try:
        load_bf16(path)
    except OSError as e:
        raise PrecisionError(f"{option}: cannot load oneDNN from {path}: {e}") from None


def require(precision: str) -> None:
    """Makes `precision` runnable: loads oneDNN for bf16; PrecisionError with one line when
    it cannot."""
    if precision != "bf16":
        return
    if not cpu_has_bf16():
        hidden = f" ({HIDE_SWITCH} is set)" if bf16_hidden() else ""
        raise PrecisionError("--precision bf16 needs a CPU with bf16 instructions "
                             f"({' or '.join(CPU_FLAGS)}); this one has neither{hidden}: use fp32")
    load_onednn("--precision bf16")
