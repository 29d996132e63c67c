"""CLLM: train a small causal language model on plain text, on every CPU core."""
import os

# The spheres call BLAS from their own threads: OpenBLAS must not start threads of its own.
# This has to happen before scipy's OpenBLAS is loaded.
os.environ["OPENBLAS_NUM_THREADS"] = "1"

from .config import CLLMConfig  # noqa: E402
from .data import Tokenizer  # noqa: E402
from .model import CLLMModel  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["CLLMConfig", "CLLMModel", "Tokenizer", "train"]
