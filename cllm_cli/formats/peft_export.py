"""A LoRA run's adapters as a Hugging Face PEFT adapter directory, which
``peft.PeftModel.from_pretrained(base, DIR)`` loads onto the transformers base (the names and
fan_in_fan_out are the model family's, model/family.py; for GPT-2):

    adapter_config.json        peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
                               lora_dropout, target_modules (the adapted layers' names, such
                               as attn.c_attn, which PEFT matches as name suffixes),
                               fan_in_fan_out true (GPT-2's Conv1D layers store their weight
                               as [in, out]), bias none, and base_model_name_or_path: the base
                               model the run started from
    adapter_model.safetensors  base_model.model.transformer.h.{l}.<layer>.lora_A.weight
                               (r, in) and .lora_B.weight (out, r): PEFT's names; its shapes
                               are ours, so the tensors are written as they are

PEFT adds (lora_alpha / r) * B A to each adapted weight, as the engine does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from numpy.typing import NDArray

from cllm_cli.formats.hf_export import FileContent, write_directory, write_safetensors
from cllm_cli.model import CLLMConfig, adapter_views, family_of


def adapter_config(cfg: CLLMConfig, lora: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter_config.json fields of a LoRA checkpoint's lora metadata."""
    spec = lora["spec"]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": list(spec.sites),
            "fan_in_fan_out": family_of(cfg).peft_fan_in_fan_out, "bias": "none",
            "base_model_name_or_path": lora["base_path"], "inference_mode": True}


def peft_tensors(cfg: CLLMConfig, lora: Mapping[str, Any],
                 adapters: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
    """{PEFT name: array} of the adapters (views, no copies)."""
    prefix = family_of(cfg).peft_prefix
    return {f"{prefix}{name}.weight": view
            for name, view in adapter_views(cfg, lora["spec"], adapters).items()}


def export_peft(cfg: CLLMConfig, lora: Mapping[str, Any], adapters: NDArray[np.float32],
                outdir: str | os.PathLike, force: bool = False) -> list[tuple[Path, int, str]]:
    """Writes the PEFT adapter directory of a LoRA checkpoint (config, lora metadata and
    adapter buffer), all or nothing (write_directory); returns what write_directory
    cleaned up."""
    tensors = peft_tensors(cfg, lora, adapters)
    files: dict[str, FileContent] = {
        "adapter_config.json": (json.dumps(adapter_config(cfg, lora), indent=2) + "\n").encode(),
             "adapter_model.safetensors": lambda f: write_safetensors(f, tensors,
                                                                      {"format": "pt"})}
    return write_directory(outdir, files, force)
