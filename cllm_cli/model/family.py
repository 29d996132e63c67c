"""Model families: what makes a model GPT-2 (or another family), declared once per family, so
that everything else (spheres, optimiser, checkpoints, LoRA, exports) works on any family
without naming its tensors.

A Family holds, for one family:
- its initialisation (init_parameters) and the tensor whose rows are positions, if any
  (position_table: a shorter --seq-len keeps its first rows);
- its LoRA target groups (--lora-targets name -> the adapted layers, in buffer order);
- transformers: the architectures read and written, model_type, each tensor's checkpoint
  name and whether transformers stores it transposed, config.json's model fields both ways,
  the output layer's name (tied to the embedding) and the prefix files may leave out;
- GGUF: llama.cpp's architecture, its settings, tensor names and layout, and the output
  layer (a copy of the tied embedding);
- PEFT: the adapters' name prefix and fan_in_fan_out.
The parameter table itself (names, shapes, order of the flat buffer) and the block's ops are
the engine's for the family (pyx/, model/layout.py reads the table from it).

FAMILIES (name -> Family) is filled by the package face (model/__init__.py) once the family
modules are imported; family_of(config) is the family of a model config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, NoReturn, Optional

import numpy as np

if TYPE_CHECKING:
    from cllm_cli.model.config import CLLMConfig

FAMILIES: dict[str, Family] = {}


@dataclass(frozen=True)
class Family:
    name: str
    # fills the named views of a new model's buffer, from a numpy Generator
    init_parameters: Callable[[CLLMConfig, Mapping[str, np.ndarray], np.random.Generator], None]
    embedding: str                  # the token embedding (the tied output layer's weight)
    position_table: Optional[str]   # the tensor of one row per position, or None
    lora_targets: dict[str, tuple[str, ...]]   # --lora-targets group -> layer names
    hf_architectures: tuple[str, ...]          # transformers classes read; the first is written
    hf_model_types: tuple[str, ...]            # config.json model_type values read
    hf_name: Callable[[str], str]              # our tensor name -> transformers' checkpoint name
    hf_transposed: Callable[[str], bool]       # our tensor name -> stored [in, out]
    hf_config: Callable[[CLLMConfig], dict[str, Any]]    # config.json's model fields
    # (config.json, refuse(message)) -> our config
    config_from_hf: Callable[[Mapping[str, Any], Callable[[str], NoReturn]], CLLMConfig]
    hf_head: str                    # the output layer's checkpoint name (tied: not written)
    hf_prefix: str                  # the prefix of the base model's names, optional in files
    hf_ignored: tuple[str, ...]     # name endings of buffers that are not parameters
    gguf_architecture: Callable[[CLLMConfig], str]     # llama.cpp's architecture of a model
    gguf_name: Callable[[str], str]            # our tensor name -> llama.cpp's
    gguf_hparams: Callable[[Any, CLLMConfig], None]   # (GGUFWriter, config): its settings
    # (config, our tensor name, its array) -> the array as llama.cpp reads it
    gguf_tensor: Callable[[CLLMConfig, str, np.ndarray], np.ndarray]
    gguf_output: str                # llama.cpp's name of the output layer (the embedding's copy)
    peft_prefix: str                # PEFT's prefix of an adapted layer's name
    peft_fan_in_fan_out: bool       # the adapted layers store W as [in, out]


def gguf_block_name(name: str, modules: Mapping[str, str]) -> str:
    """llama.cpp's name of a block tensor "<block>.<l>.<module>.<kind>": blk.<l>.<its
    module's llama.cpp name>.<kind>, `modules` mapping our module names to llama.cpp's."""
    _, layer, rest = name.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{modules[module]}.{kind}"


def family_of(config: CLLMConfig | type[CLLMConfig]) -> Family:
    """The Family of a model config (its `family` name)."""
    return FAMILIES[config.family]
