"""Builds the Cython engine of pyx/ into the cllm_cli package.

CLLM_DEBUG=1 turns Cython's checks back on (bounds, wraparound, initialisation) and writes
annotated HTML next to the sources. CLLM_SANITIZE=thread builds for ThreadSanitizer
(`make racecheck`). The build fails if Cython reports that an exception
check forces a nogil function to take the GIL back after a call.
"""
import os
import sys

from setuptools import Extension, setup

DEBUG = os.environ.get("CLLM_DEBUG", "") not in ("", "0")
MODULES = ["engine"]   # pyx/<name>.pyx -> cllm_cli._<name>

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}
# -O3 and the build machine's vector instructions (CLLM_MARCH=x86-64 for a portable build);
# never -ffast-math, and -ffp-contract=off so that no multiply-add is fused: every build
# rounds the same operations the same way.
MARCH = os.environ.get("CLLM_MARCH", "native")
COMPILE_ARGS = ["-O0", "-g"] if DEBUG else ["-O3", f"-march={MARCH}"]
COMPILE_ARGS += ["-fno-fast-math", "-ffp-contract=off", "-pthread"]
LINK_ARGS = ["-pthread"]
SANITIZE = os.environ.get("CLLM_SANITIZE", "")
if SANITIZE:
    COMPILE_ARGS += [f"-fsanitize={SANITIZE}", "-g", "-fno-omit-frame-pointer"]
    LINK_ARGS += [f"-fsanitize={SANITIZE}"]


def gil_reacquiring_calls():
    """Collects Cython's 'Exception check ... will always require the GIL' hints."""
    from Cython.Compiler import PyrexTypes
    found = []
    original = PyrexTypes.write_noexcept_performance_hint

    def record(pos, env, *args, **kwargs):
        found.append(f"{pos[0].filename}:{pos[1]}")
        return original(pos, env, *args, **kwargs)

    PyrexTypes.write_noexcept_performance_hint = record
    return found


def extensions():
    import numpy
    from Cython.Build import cythonize
    found = gil_reacquiring_calls()
    exts = [Extension(f"cllm_cli._{name}", [f"pyx/{name}.pyx"],
                      include_dirs=[numpy.get_include(), "pyx"],
                      extra_compile_args=COMPILE_ARGS, extra_link_args=LINK_ARGS)
            for name in MODULES]
    built = cythonize(exts, compiler_directives=DIRECTIVES, annotate=DEBUG,
                      force=True if DEBUG or SANITIZE else None)
    if found:
        sys.exit("error: exception checks re-acquire the GIL in engine code "
                 "(declare the functions noexcept): " + ", ".join(sorted(set(found))))
    return built


setup(ext_modules=extensions())
