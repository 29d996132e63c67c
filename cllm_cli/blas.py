"""The spheres call scipy's OpenBLAS from their own threads: it must not start threads of its
own (cllm_cli sets OPENBLAS_NUM_THREADS=1 before scipy loads; single_threaded_blas covers a
process that loaded it earlier)."""
from __future__ import annotations

import ctypes
import os


def blas_libraries() -> list[str]:
    """Paths of the loaded OpenBLAS copies of scipy (the one cython_blas calls). numpy's own
    copy (libscipy_openblas64_) is left alone."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libscipy_openblas" in line}
    except OSError:
        return []
    return sorted(p for p in paths if "openblas64_" not in os.path.basename(p))


def single_threaded_blas() -> list[int]:
    """The spheres are the parallelism: scipy's OpenBLAS must run each call on the calling
    thread. OPENBLAS_NUM_THREADS=1 (set by cllm_cli) covers a fresh process; this covers a
    process that loaded scipy's BLAS before importing cllm_cli. Returns the thread counts."""
    counts = []
    for path in blas_libraries():
        lib = ctypes.CDLL(path)
        set_threads = getattr(lib, "scipy_openblas_set_num_threads", None)
        get_threads = getattr(lib, "scipy_openblas_get_num_threads", None)
        if set_threads is not None and get_threads is not None:
            set_threads(1)
            counts.append(get_threads())
    return counts
