"""The model's core, below everything that reads or writes files: the configuration
(CLLMConfig, the one check of model sizes), the layout of the one flat parameter buffer and
its named tensors, LoRA adapters (their settings, layout, initialisation and merging),
sampling from logits, and the bf16 precision's loading and checks."""
from cllm_cli.model.config import MODEL_FIELDS, CLLMConfig, model_config_problem
from cllm_cli.model.layout import named_views, shorten_positions, tensor_shapes
from cllm_cli.model.lora import (
    MAX_LORA_SCALE,
    TARGET_GROUPS,
    LoraSpec,
    adapter_shapes,
    adapter_views,
    content_hash,
    init_adapters,
    merge_adapters,
    num_adapter_parameters,
    parse_targets,
)
from cllm_cli.model.sampling import check_options, sample_from_logits

__all__ = ["MAX_LORA_SCALE", "MODEL_FIELDS", "TARGET_GROUPS", "CLLMConfig", "LoraSpec",
           "adapter_shapes", "adapter_views", "check_options", "content_hash", "init_adapters",
           "merge_adapters", "model_config_problem", "named_views", "num_adapter_parameters",
           "parse_targets", "sample_from_logits", "shorten_positions",
           "tensor_shapes"]
