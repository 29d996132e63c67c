"""What CLLM writes and reads: .cllm checkpoints, safetensors streams, transformers
directories, GGUF files, PEFT adapters, the one loader of a model named by a user
(model_files), and models fetched by Hugging Face Hub name (hub)."""
from cllm_cli.formats.checkpoint import (
    FORMAT_VERSION,
    checkpoint_path,
    count_non_finite,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from cllm_cli.formats.checkpoint_load import Checkpoint, check_vocabulary, load_checkpoint
from cllm_cli.formats.hf_export import export_pretrained
from cllm_cli.formats.hub import model_source
from cllm_cli.formats.model_files import (
    ModelFiles,
    checkpoint_params,
    load_lora_base,
    load_model_files,
    resolve_checkpoint,
)
from cllm_cli.formats.peft_export import export_peft

__all__ = ["FORMAT_VERSION", "Checkpoint", "ModelFiles", "check_vocabulary", "checkpoint_params", "checkpoint_path",
           "count_non_finite", "export_peft", "export_pretrained", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_lora_base", "load_model_files", "model_source", "prune_checkpoints",
           "resolve_checkpoint", "save_checkpoint"]
