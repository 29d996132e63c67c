"""The model's core, below everything that reads or writes files: the configuration
(CLLMConfig, the one check of model sizes), the model families (family.py: what makes a model
GPT-2, declared once in gpt2.py; FAMILIES is filled here), the layout of the one flat
parameter buffer and its named tensors, LoRA adapters (their settings, layout, initialisation
and merging), sampling from logits, generation, and the bf16 precision's loading and checks.

The modules below import one another directly, never this face."""
from cllm_cli.model.config import (
    MODEL_FIELDS,
    CLLMConfig,
    LlamaConfig,
    default_ff_dim,
    llama_config_problem,
    model_config_problem,
)
from cllm_cli.model.family import FAMILIES, Family, family_of
from cllm_cli.model.gpt2 import GPT2
from cllm_cli.model.layout import named_views, shorten_positions, tensor_shapes
from cllm_cli.model.llama import LLAMA
from cllm_cli.model.lora import (
    MAX_LORA_SCALE,
    LoraSpec,
    adapter_shapes,
    adapter_views,
    content_hash,
    init_adapters,
    merge_adapters,
    num_adapter_parameters,
    parse_targets,
    target_groups,
)
from cllm_cli.model.sampling import check_options, sample_from_logits

FAMILIES.update({family.name: family for family in (GPT2, LLAMA)})

__all__ = ["FAMILIES", "MAX_LORA_SCALE", "MODEL_FIELDS", "CLLMConfig", "Family", "LlamaConfig", "LoraSpec",
           "adapter_shapes", "adapter_views", "check_options", "content_hash", "default_ff_dim", "init_adapters",
           "llama_config_problem", "merge_adapters", "model_config_problem", "named_views", "num_adapter_parameters",
           "family_of", "parse_targets", "sample_from_logits", "shorten_positions", "target_groups",
           "tensor_shapes"]
