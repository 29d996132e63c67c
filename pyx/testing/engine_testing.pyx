"""CLLM engine with its test hooks: cllm_cli._engine_testing, built for the tests only.

The production engine (pyx/engine.pyx) compiled again with CLLM_TESTING defined, which
compiles in the sphere's NaN injection (training/sphere.pxi), plus a Python wrapper of each
kernel (kernel_wrappers.pxi) and the fault hooks (fault_hooks.pxi). setup.py builds it when
CLLM_TEST_BUILD=1 (the Makefile's test targets); `pip install .` and wheels leave it out.
"""

cdef extern from *:
    """
    #define CLLM_TESTING 1
    """

include "../engine.pyx"
include "kernel_wrappers.pxi"      # op_<kernel>: one Python wrapper per forward and backward
include "fault_hooks.pxi"          # inject_nan, violate_lock_order

# The production engine's exception classes in place of this module's own, so that code that
# catches cllm_cli._engine.StepAborted or ProductError catches them from either engine.
from cllm_cli._engine import ProductError, StepAborted   # noqa: E402
