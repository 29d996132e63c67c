"""The model: CLLMModel (the parameters in one flat buffer, loss and gradients, logits,
generation), sampling from logits, and the bf16 precision's loading and checks."""
from cllm_cli.model.cllm import CLLMModel, single_threaded_blas
from cllm_cli.model.sampling import check_options, sample_from_logits

__all__ = ["CLLMModel", "check_options", "sample_from_logits", "single_threaded_blas"]
