"""CLLM: train a small causal language model on plain text, on every CPU core.

The package's face: CLLMConfig, CLLMModel, Tokenizer and train, each imported on first use,
so that importing one module of the package (or `python -m cllm_cli.cli.train`) runs only
what that module needs."""
import os

# The spheres call BLAS from their own threads: OpenBLAS must not start threads of its own.
# This has to happen before scipy's OpenBLAS is loaded.
os.environ["OPENBLAS_NUM_THREADS"] = "1"


def _engine_not_loadable(error):
    """ImportError saying how to build the compiled engine (cllm_cli/_engine*.so)."""
    import glob
    import importlib.machinery
    here = os.path.dirname(os.path.abspath(__file__))
    built = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
             for p in glob.glob(os.path.join(here, "_engine*" + suffix))]
    how = "run `make build` or `pip install -e .` in the source checkout"
    if not built:
        return ImportError(f"the compiled engine of cllm_cli (cllm_cli._engine) is not built for "
                           f"this Python in {here}: {how}")
    return ImportError(f"the compiled engine {built[0]} cannot be loaded ({error}): rebuild it: "
                       f"{how}")


try:
    import cllm_cli._engine  # noqa: F401  (every module of the package needs it)
except ImportError as _error:
    raise _engine_not_loadable(_error) from None

from cllm_cli.blas import single_threaded_blas  # noqa: E402

single_threaded_blas()    # also when scipy's BLAS was loaded before us

__all__ = ["CLLMConfig", "CLLMModel", "Tokenizer", "train"]


def __getattr__(name):
    if name == "CLLMConfig":
        from cllm_cli.model import CLLMConfig
        return CLLMConfig
    if name == "CLLMModel":
        from cllm_cli.api import CLLMModel
        return CLLMModel
    if name == "Tokenizer":
        from cllm_cli.tokenizers import Tokenizer
        return Tokenizer
    if name == "train":
        from cllm_cli.training import train
        return train
    raise AttributeError(f"module 'cllm_cli' has no attribute {name!r}")
