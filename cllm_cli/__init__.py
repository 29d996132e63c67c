"""CLLM: train a small causal language model on plain text, on every CPU core."""
import os

# The spheres call BLAS from their own threads: OpenBLAS must not start threads of its own.
# This has to happen before scipy's OpenBLAS is loaded.
os.environ["OPENBLAS_NUM_THREADS"] = "1"

from .config import CLLMConfig  # noqa: E402
from .tokenizers import Tokenizer  # noqa: E402
from .model import CLLMModel, single_threaded_blas  # noqa: E402

single_threaded_blas()    # also when scipy's BLAS was loaded before us

__all__ = ["CLLMConfig", "CLLMModel", "Tokenizer", "train"]


def __getattr__(name):
    # train() is imported on first use, so that `python -m cllm_cli.trainer` runs the module
    # without the package having imported it already
    if name == "train":
        from .trainer import train
        return train
    raise AttributeError(f"module 'cllm_cli' has no attribute {name!r}")
