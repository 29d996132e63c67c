"""Model families: GPT-2's and the Llama form's declarations checked against the real readers
(transformers' own GPT2LMHeadModel, LlamaForCausalLM and Qwen2ForCausalLM, gguf's tables of
llama.cpp's gpt2, llama and qwen2 tensors), and the seam itself: no module but the family's own
names its tensors."""
import ast
import pathlib

import gguf
import pytest
import torch
import transformers

from cllm_cli.model import FAMILIES, CLLMConfig, LlamaConfig, family_of, tensor_shapes
from cllm_cli.model.gpt2 import GPT2
from cllm_cli.model.llama import LLAMA

ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = CLLMConfig(vocab_size=50, embed_dim=16, num_layers=2, num_heads=2, ff_dim=24, seq_len=12)


def test_every_config_has_a_registered_family():
    assert family_of(CFG) is GPT2 and FAMILIES == {"gpt2": GPT2, "llama": LLAMA}
    assert all(family_of(cfg) is LLAMA for cfg in LLAMAS)


# untied with a grouped key/value head, tied with q/k/v biases (Qwen2)
LLAMAS = [LlamaConfig(vocab_size=50, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
                      ff_dim=24, seq_len=12, tie_embeddings=False),
          LlamaConfig(vocab_size=50, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=1,
                      ff_dim=24, seq_len=12, attention_bias=True, hf_model_type="qwen2")]


@pytest.mark.parametrize("cfg", LLAMAS, ids=["llama", "qwen2"])
def test_llama_names_and_layout_are_those_of_transformers(cfg):
    """Every tensor's transformers name and shape is a parameter of the transformers class
    built from our config.json, and every parameter of it is ours (the tied output layer
    aside)."""
    fields = LLAMA.hf_config(cfg)
    model_class = getattr(transformers, fields["architectures"][0])
    config = transformers.AutoConfig.for_model(**fields)
    torch.manual_seed(0)
    state = model_class(config).state_dict()
    theirs = {name: tuple(t.shape) for name, t in state.items()
              if not name.endswith(LLAMA.hf_ignored)}
    ours = {LLAMA.hf_name(name): shape for name, shape in tensor_shapes(cfg).items()}
    if cfg.tie_embeddings:
        assert theirs.pop(LLAMA.hf_head) == tensor_shapes(cfg)[LLAMA.embedding]
    assert ours == theirs


@pytest.mark.parametrize("cfg", LLAMAS, ids=["llama", "qwen2"])
def test_llama_config_json_reads_back_as_the_same_config(cfg):
    refused = []
    assert LLAMA.config_from_hf(LLAMA.hf_config(cfg), refused.append) == cfg
    assert refused == []


def llama_cpp_tensor_names(family, cfg):
    """(llama.cpp's tensor names of the family's GGUF architecture for cfg, with "{bid}" for
    the block number; our GGUF names of cfg's tensors), each of ours checked to be one of
    them and to be unique."""
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items()
                if name == family.gguf_architecture(cfg))
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    names = [family.gguf_name(name) for name in tensor_shapes(cfg)]
    for name in names:
        base = name.rsplit(".", 1)[0]
        if base.startswith("blk."):
            base = "blk.{bid}." + base.split(".", 2)[2]
        assert base in known, name
    assert len(set(names)) == len(names)
    return known, names


@pytest.mark.parametrize("cfg", LLAMAS, ids=["llama", "qwen2"])
def test_gguf_names_are_llama_cpps_llama_and_qwen2_tensors(cfg):
    assert LLAMA.gguf_architecture(cfg) == ("qwen2" if cfg.hf_model_type == "qwen2" else "llama")
    llama_cpp_tensor_names(LLAMA, cfg)


def test_gpt2_names_and_layout_are_those_of_transformers():
    """Every tensor's transformers name and shape (transposed where GPT-2's Conv1D stores
    [in, out]) is a parameter of transformers' GPT2LMHeadModel built from our config.json,
    and every parameter of it is ours or the tied output layer."""
    config = transformers.GPT2Config(**GPT2.hf_config(CFG))
    torch.manual_seed(0)
    state = transformers.GPT2LMHeadModel(config).state_dict()
    theirs = {name: tuple(t.shape) for name, t in state.items()
              if not name.endswith(GPT2.hf_ignored)}
    ours = {GPT2.hf_name(name): shape[::-1] if GPT2.hf_transposed(name) else shape
            for name, shape in tensor_shapes(CFG).items()}
    assert theirs.pop(GPT2.hf_head) == tensor_shapes(CFG)[GPT2.embedding]
    assert ours == theirs


def test_gpt2_config_json_reads_back_as_the_same_config():
    refused = []
    assert GPT2.config_from_hf(GPT2.hf_config(CFG), refused.append) == CFG
    assert refused == []


def test_gguf_names_are_llama_cpps_gpt2_tensors():
    known, _ = llama_cpp_tensor_names(GPT2, CFG)
    assert GPT2.gguf_output.rsplit(".", 1)[0] in known


def string_constants(path):
    """The string literals of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


@pytest.mark.parametrize("family", FAMILIES.values(), ids=lambda f: f.name)
def test_only_the_family_module_names_its_tensors(family):
    own = ROOT / "cllm_cli" / "model" / f"{family.name}.py"
    layers = {layer.split(".")[-1] for group in family.lora_targets.values() for layer in group}
    names = {family.embedding, family.position_table, family.hf_head,
             family.hf_name(family.embedding), *family.hf_architectures, family.gguf_output,
             *layers}
    names.discard(None)
    # what several families call alike (transformers' lm_head, llama.cpp's output) is no
    # one family's
    shared = set.intersection(*({f.hf_head, f.gguf_output} for f in FAMILIES.values()))
    names -= shared
    assert own.exists() and names
    found = []
    for path in sorted((ROOT / "cllm_cli").rglob("*.py")):
        if path == own:
            continue
        for text in string_constants(path):
            found += [f"{path.relative_to(ROOT)}: {text!r}" for name in names if name in text]
    assert found == []
