"""Hugging Face interop, checked with the real readers: cllm_export's
directory loaded by transformers (AutoModelForCausalLM, AutoTokenizer) gives our ids, our
logits and our greedy text; load_model_files reads a transformers GPT-2 directory into our
layout and refuses, by name, what it cannot represent; --format gguf is read back with gguf's
reader. Every model is built here, small and random; nothing is downloaded."""
import copy
import json
import os
import shlex
import shutil

import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
from helpers import assert_one_error_line, call, sentences
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from cllm_cli import CLLMConfig, CLLMModel, Tokenizer
from cllm_cli._engine import parameter_layout
from cllm_cli.cli.export import main as export_main
from cllm_cli.errors import ConversionError
from cllm_cli.formats.hf_export import to_hf_state
from cllm_cli.formats.model_files import load_model_files
from cllm_cli.tokenizers import BPETokenizer

SAMPLE = ('Maren said, "Don\'t go near the river today." The old woman, tired, walked '
          'home; 12 apples cost 3.50! Zyxwv qat?')
MAX_REL = 1e-4
worst = {}          # worst relative logit difference seen, reported at the end of the module


@pytest.fixture(scope="module")
def text():
    """Holds every character of SAMPLE but not its last two words."""
    return sentences(600, seed=5, punct=".,!?;") + SAMPLE.replace("Zyxwv qat", "zyxwvq ZQ")


def relative_difference(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def record(name, rel):
    worst[name] = rel
    assert rel <= MAX_REL, f"{name}: logits differ by {rel:.3g} relative"


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if worst:
        name = max(worst, key=worst.get)
        print(f"\nworst relative logit difference against transformers: {worst[name]:.3g} "
              f"({name})")


def make_tokenizer(kind, text):
    if kind == "bpe":
        return BPETokenizer.train([text], 400)
    return Tokenizer.build([text], kind=kind, vocab_size=300)


def random_params(model, seed):
    """Every parameter moved off its initial value, so that biases and LayerNorms matter."""
    rng = np.random.default_rng(seed)
    model.flat += rng.standard_normal(model.flat.size).astype(np.float32) * np.float32(0.2)


def make_checkpoint(directory, kind, text, seq_len=48):
    """A checkpoint directory as train_model leaves it: final_model.cllm and its tokenizer."""
    tok = make_tokenizer(kind, text)
    cfg = CLLMConfig(vocab_size=len(tok), embed_dim=32, num_layers=2, num_heads=4, ff_dim=80,
                     seq_len=seq_len)
    model = CLLMModel(cfg, seed=1)
    random_params(model, seed=2)
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, "final_model.cllm"),
               {"tokenizer": kind, "vocab_hash": tok.vocab_hash})
    tok.save(os.path.join(directory, "tokenizer.json" if kind == "bpe" else "vocab.txt"))
    return model, tok


# --- export to transformers --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_export_loads_in_transformers(kind, text, tmp_path, capsys):
    model, tok = make_checkpoint(tmp_path / "ckpt", kind, text)
    out = tmp_path / "exported"
    code, _, err = call(capsys, export_main, tmp_path / "ckpt", out)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "exported"]     # no temporary directory
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(out))

    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = tok.encode(SAMPLE).tolist()
    assert hf_tok(SAMPLE)["input_ids"] == ours
    if kind == "word":
        assert 1 in ours                        # premise: the sample has unknown words
    assert hf_tok.decode(ours) == tok.decode(ours)          # the text our decode gives
    if kind != "word":
        assert hf_tok.decode(ours) == SAMPLE

    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf_model.config.n_positions == model.config.seq_len
    assert hf_model.config.activation_function == "gelu_new"
    assert hf_model.lm_head.weight.data_ptr() == hf_model.transformer.wte.weight.data_ptr()
    ids = np.array(ours[:model.config.seq_len])
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids[None])).logits[0].numpy()
    logits = model.logits(ids[None])[0]
    assert np.std(theirs[:, 0]) > 0.1           # premise: logits vary with the position
    record(f"export {kind}", relative_difference(logits, theirs))

    prompt = ids[:8]
    ours_greedy = list(model.generate(prompt, max_tokens=24, temperature=0))
    with torch.no_grad():
        hf_greedy = hf_model.generate(torch.tensor(prompt[None]), do_sample=False,
                                      max_new_tokens=24, eos_token_id=None)[0, 8:].tolist()
    assert len(set(ours_greedy)) > 1
    assert hf_greedy == ours_greedy


WORD_PIECES = ["the", "The", "OLD", "don't", "'", "''", "x'y", "é", "E\u0301", "\u0301", "ß", "İ",
               "汉字", "🙂", "12", "3.5", "_", "a_b", "-", ".", ",", '"', "(", " ", "  ", "\t", "\n",
               "\r\n", "\u00a0", "\u3000", "\x1c", "\x1f", "\x85"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(WORD_PIECES), max_size=40).map("".join))
@example("the\x1cold\x1fthe")
def test_word_and_char_pipelines_give_our_ids(text):
    """The exported WordLevel pipelines split and map text exactly as our tokenizers do; the
    separators \\x1c..\\x1f too, which Python's \\s holds and the library's does not."""
    corpus = " ".join(WORD_PIECES[::2])       # half of the pieces known, the rest <unk>
    for kind in ("word", "char"):
        ours = Tokenizer.build([corpus], kind=kind, vocab_size=100)
        pipeline = tokenizers.Tokenizer.from_str(ours.tokenizer_json().decode("utf-8"))
        assert pipeline.encode(text).ids == ours.encode(text).tolist()


DECODED_PIECES = ['"', "(", ")", "[", "]", "{", "}", "-", "/", ".", ",", ";", ":", "!", "?", "%",
                  "'", "\u2026", "the", "don't", "x", "12", "é", "汉字"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(DECODED_PIECES) + 3), max_size=40))
def test_the_word_pipeline_decodes_as_we_do(ids):
    """Any ids, the special ones too (<eos> a line end, <pad> and <bos> skipped), and any
    quotes, odd or even in number: the exported decoder gives our decode's text."""
    ours = Tokenizer.build([" ".join(DECODED_PIECES)], kind="word", vocab_size=100)
    assert len(ours) == len(DECODED_PIECES) + 4
    assert tokenizers.Tokenizer.from_str(ours.tokenizer_json().decode("utf-8")).decode(ids, skip_special_tokens=False) == ours.decode(ids)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 11), max_size=40))
@example([5, 3, 0, 6, 2, 1, 3])
@example([6, 8, 9, 10, 7, 3])
def test_the_char_pipeline_decodes_as_we_do(ids):
    """Any ids, the special ones too (<eos> a line end, <pad> and <bos> skipped, <unk> as
    written), and characters that spell a special token's name: the exported decoder gives
    our decode's text."""
    ours = Tokenizer.build(["<eos> x\n"], kind="char", vocab_size=100)
    assert len(ours) == 12
    exported = tokenizers.Tokenizer.from_str(ours.tokenizer_json().decode("utf-8"))
    assert exported.decode(ids, skip_special_tokens=False) == ours.decode(ids)


def test_exported_config_and_layout(text, tmp_path, capsys):
    model, _ = make_checkpoint(tmp_path / "ckpt", "word", text)
    out = tmp_path / "out"
    assert call(capsys, export_main, tmp_path / "ckpt" / "final_model.cllm", out)[0] == 0
    config = json.loads((out / "config.json").read_text())
    cfg = model.config
    assert (config["n_positions"], config["n_ctx"], config["n_embd"], config["n_layer"],
            config["n_head"], config["n_inner"], config["vocab_size"]) == \
        (cfg.seq_len, cfg.seq_len, cfg.embed_dim, cfg.num_layers, cfg.num_heads, cfg.ff_dim,
         cfg.vocab_size)
    assert config["layer_norm_epsilon"] == 1e-5 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    c_attn = model.params["h.1.attn.c_attn.weight"]                # ours: [out, in]
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (cfg.embed_dim, 3 * cfg.embed_dim)
    assert np.array_equal(tensors["transformer.h.1.attn.c_attn.weight"], c_attn.T)
    assert np.array_equal(tensors["transformer.wte.weight"], model.params["wte"])
    assert len(tensors) == len(parameter_layout(cfg))


def test_export_refusals(text, tmp_path, capsys):
    make_checkpoint(tmp_path / "ckpt", "word", text)
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = call(capsys, export_main, ckpt, out)
    assert_one_error_line(code, err, "cllm_export", "not empty", "--force")
    assert os.listdir(out) == ["keep.txt"]
    code, _, err = call(capsys, export_main, ckpt, out, "--force")
    assert code == 0, err
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)

    code, _, err = call(capsys, export_main, ckpt, ckpt, "--force")      # would delete it
    assert_one_error_line(code, err, "cllm_export", "holds")
    assert "final_model.cllm" in os.listdir(ckpt)

    garbage = tmp_path / "garbage.cllm"
    garbage.write_bytes(b"not a checkpoint at all")
    code, _, err = call(capsys, export_main, garbage, tmp_path / "o1")
    assert_one_error_line(code, err, "cllm_export", "garbage.cllm")

    other = tmp_path / "other_vocab.txt"
    Tokenizer.build(["a different corpus entirely"], "word", 50).save(other)
    code, _, err = call(capsys, export_main, ckpt, tmp_path / "o2", "--vocab", other)
    assert_one_error_line(code, err, "cllm_export", "not the vocabulary")

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(ckpt / "final_model.cllm", lonely)
    code, _, err = call(capsys, export_main, lonely / "final_model.cllm", tmp_path / "o3")
    assert_one_error_line(code, err, "cllm_export", "no vocab.txt")

    code, _, err = call(capsys, export_main, ckpt, tmp_path / "o4", "--format", "onnx")
    assert_one_error_line(code, err, "cllm_export", "--format")
    assert not {"o1", "o2", "o3", "o4"} & set(os.listdir(tmp_path))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


# --- import from transformers ------------------------------------------------------------

def gpt2_directory(path, text, seed=0, save=True, **overrides):
    """A small random GPT2LMHeadModel saved by transformers, with a BPE tokenizer.json."""
    tok = BPETokenizer.train([text], 300)
    settings = dict(vocab_size=len(tok), n_positions=40, n_embd=32, n_layer=2, n_head=4,
                    n_inner=72, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**settings)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    if save:
        model.save_pretrained(path)
        tok.save(os.path.join(path, "tokenizer.json"))
    return model, tok


def test_load_pretrained_matches_transformers(text, tmp_path):
    hf_model, tok = gpt2_directory(tmp_path / "gpt2", text)
    cfg, flat, loaded_tok = load_model_files(tmp_path / "gpt2")[:3]
    assert cfg == CLLMConfig(vocab_size=len(tok), embed_dim=32, num_layers=2, num_heads=4,
                             ff_dim=72, seq_len=40)
    assert flat.dtype == np.float32 and flat.size == sum(np.prod(s) for _, s, _ in parameter_layout(cfg))
    assert loaded_tok.vocab_hash == tok.vocab_hash and loaded_tok.kind == "bpe"
    ids = tok.encode(SAMPLE)[:40]
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids[None])).logits[0].numpy()
    ours = CLLMModel.from_flat(cfg, flat).logits(ids[None])[0]
    record("load_model_files", relative_difference(ours, theirs))


def test_round_trip_through_transformers_is_exact(text, tmp_path, capsys):
    model, tok = make_checkpoint(tmp_path / "ckpt", "bpe", text)
    assert call(capsys, export_main, tmp_path / "ckpt", tmp_path / "out")[0] == 0
    cfg, flat, loaded_tok = load_model_files(tmp_path / "out")[:3]
    assert cfg == model.config
    assert flat.tobytes() == model.flat.tobytes()
    assert loaded_tok.vocab_hash == tok.vocab_hash


def test_load_pretrained_of_a_cllm_file(text, tmp_path):
    model, tok = make_checkpoint(tmp_path / "ckpt", "char", text)
    cfg, flat, loaded_tok = load_model_files(tmp_path / "ckpt" / "final_model.cllm")[:3]
    assert cfg == model.config and flat.tobytes() == model.flat.tobytes()
    assert loaded_tok.kind == "char" and loaded_tok.vocab_hash == tok.vocab_hash


def test_load_pretrained_widens_half_precision_exactly(text, tmp_path):
    hf_model, _ = gpt2_directory(tmp_path / "gpt2", text)
    cfg, flat32, _ = load_model_files(tmp_path / "gpt2")[:3]
    for dtype in (torch.float16, torch.bfloat16):
        half = copy.deepcopy(hf_model).to(dtype)
        half.save_pretrained(tmp_path / str(dtype))
        shutil.copy(tmp_path / "gpt2" / "tokenizer.json", tmp_path / str(dtype))
        _, flat, _ = load_model_files(tmp_path / str(dtype))[:3]
        want = np.concatenate([
            torch.from_numpy(flat32[o:o + int(np.prod(s))]).to(dtype).float().numpy()
            for _, s, o in parameter_layout(cfg)])
        assert not np.array_equal(want, flat32)            # premise: rounding happened
        assert flat.tobytes() == want.tobytes()


def edit_config(path, **changes):
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def edit_tensors(path, change):
    file = str(path / "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    change(tensors)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


REFUSALS = {
    "model_type": (lambda p: edit_config(p, model_type="falcon"), "model_type"),
    "model_type not a name": (lambda p: edit_config(p, model_type=["gpt2"]), "model_type"),
    "architectures": (lambda p: edit_config(p, architectures=["GPT2ForSequenceClassification"]),
                      "architectures"),
    "activation": (lambda p: edit_config(p, activation_function="relu"), "activation_function"),
    "exact gelu": (lambda p: edit_config(p, activation_function="gelu"), "activation_function"),
    "null activation": (lambda p: edit_config(p, activation_function=None),
                        "activation_function null"),
    "epsilon": (lambda p: edit_config(p, layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    "null epsilon": (lambda p: edit_config(p, layer_norm_epsilon=None), "layer_norm_epsilon null"),
    "null scaling": (lambda p: edit_config(p, scale_attn_weights=None), "scale_attn_weights null"),
    "inverse layer idx": (lambda p: edit_config(p, scale_attn_by_inverse_layer_idx=True),
                          "scale_attn_by_inverse_layer_idx"),
    "reorder": (lambda p: edit_config(p, reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    "no scaling": (lambda p: edit_config(p, scale_attn_weights=False), "scale_attn_weights"),
    "cross attention": (lambda p: edit_config(p, add_cross_attention=True), "add_cross_attention"),
    "n_ctx": (lambda p: edit_config(p, n_ctx=20), "n_ctx"),
    "missing bias": (lambda p: edit_tensors(p, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias")),
                     "transformer.h.1.mlp.c_fc.bias"),
    "unexpected tensor": (lambda p: edit_tensors(p, lambda t: t.update(
        {"score.weight": np.zeros((2, 32), np.float32)})), "score.weight"),
    "float64": (lambda p: edit_tensors(p, lambda t: t.update(
        {"transformer.wpe.weight": t["transformer.wpe.weight"].astype(np.float64)})), "F64"),
    "wrong shape": (lambda p: edit_tensors(p, lambda t: t.update(
        {"transformer.wpe.weight": t["transformer.wpe.weight"][:10]})), "transformer.wpe.weight"),
    "pytorch_model.bin": (lambda p: os.rename(p / "model.safetensors", p / "pytorch_model.bin"),
                          "pytorch_model.bin"),
    "no tokenizer.json": (lambda p: os.remove(p / "tokenizer.json"), "tokenizer.json"),
    "too small vocab": (lambda p: edit_config(p, vocab_size=3), "vocab_size"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_load_pretrained_refuses_by_name(case, text, tmp_path):
    gpt2_directory(tmp_path / "gpt2", text)
    load_model_files(tmp_path / "gpt2")                    # premise: loads before the change
    change, name = REFUSALS[case]
    change(tmp_path / "gpt2")
    with pytest.raises(ConversionError) as e:
        load_model_files(tmp_path / "gpt2")
    message = str(e.value)
    assert name in message and "\n" not in message


def test_untied_output_layer(text, tmp_path):
    """tie_word_embeddings false: refused when lm_head differs from wte, taken when equal."""
    hf_model, _ = gpt2_directory(tmp_path / "gpt2", text, tie_word_embeddings=False)
    assert not torch.equal(hf_model.lm_head.weight, hf_model.transformer.wte.weight)
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        load_model_files(tmp_path / "gpt2")
    edit_tensors(tmp_path / "gpt2", lambda t: t.update(
        {"lm_head.weight": t["transformer.wte.weight"].copy()}))
    cfg, flat, _ = load_model_files(tmp_path / "gpt2")[:3]
    assert np.array_equal(flat[:cfg.vocab_size * cfg.embed_dim],
                          hf_model.transformer.wte.weight.detach().numpy().reshape(-1))
    edit_tensors(tmp_path / "gpt2", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ConversionError, match="tie_word_embeddings"):
        load_model_files(tmp_path / "gpt2")


def test_gpt2_names_without_prefix(text, tmp_path):
    """Files saved from GPT2Model (as GPT-2's own) name tensors without "transformer." and
    may carry the causal masks as buffers, which are left out."""
    hf_model, _ = gpt2_directory(tmp_path / "gpt2", text)
    cfg, flat, _ = load_model_files(tmp_path / "gpt2")[:3]

    def strip_prefix(t):
        t.update({k[len("transformer."):]: t.pop(k) for k in list(t)})
        t.update({f"h.{l}.attn.bias": np.tril(np.ones((1, 1, 40, 40), np.float32))
                  for l in range(2)})
    edit_tensors(tmp_path / "gpt2", strip_prefix)
    assert all(not k.startswith("transformer.") for k in
               safetensors.numpy.load_file(str(tmp_path / "gpt2" / "model.safetensors")))
    assert load_model_files(tmp_path / "gpt2")[1].tobytes() == flat.tobytes()


def test_sharded_safetensors(text, tmp_path):
    hf_model, _ = gpt2_directory(tmp_path / "gpt2", text)
    _, flat, _ = load_model_files(tmp_path / "gpt2")[:3]
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shutil.copy(tmp_path / "gpt2" / "tokenizer.json", tmp_path / "sharded")
    names = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    assert load_model_files(tmp_path / "sharded")[1].tobytes() == flat.tobytes()


def test_to_hf_state_is_transformers_state_dict(text):
    hf_model, _ = gpt2_directory(None, text, save=False)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()
             if k != "lm_head.weight"}
    cfg = CLLMConfig(vocab_size=hf_model.config.vocab_size, embed_dim=32, num_layers=2,
                     num_heads=4, ff_dim=72, seq_len=40)
    flat = np.zeros(sum(int(np.prod(s)) for _, s, _ in parameter_layout(cfg)), np.float32)
    ours = to_hf_state(cfg, flat)
    assert sorted(ours) == sorted(state)
    assert all(ours[k].shape == state[k].shape for k in state)


# --- GGUF -----------------------------------------------------------------------------------

def test_gguf_export_reads_back(text, tmp_path, capsys):
    import gguf
    model, tok = make_checkpoint(tmp_path / "ckpt", "bpe", text)
    out = tmp_path / "model.gguf"
    code, _, err = call(capsys, export_main, tmp_path / "ckpt", out, "--format", "gguf")
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))

    def field(key):
        f = reader.fields[key]
        return f.contents()

    cfg = model.config
    assert field("general.architecture") == "gpt2"
    assert (field("gpt2.context_length"), field("gpt2.embedding_length"),
            field("gpt2.feed_forward_length"), field("gpt2.block_count"),
            field("gpt2.attention.head_count")) == \
        (cfg.seq_len, cfg.embed_dim, cfg.ff_dim, cfg.num_layers, cfg.num_heads)
    assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert tokens == [tok.id_to_token(i) for i in range(len(tok))]
    merges = json.loads(tok.json_bytes)["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert field("tokenizer.ggml.token_type")[:5] == [3, 3, 3, 3, 1]
    assert (field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.bos_token_id"),
            field("tokenizer.ggml.padding_token_id")) == (3, 2, 0)

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(parameter_layout(cfg)) + 1
    expect = {"token_embd.weight": "wte", "position_embd.weight": "wpe",
              "output.weight": "wte", "output_norm.bias": "ln_f.bias",
              "blk.1.attn_qkv.weight": "h.1.attn.c_attn.weight",
              "blk.0.attn_output.bias": "h.0.attn.c_proj.bias",
              "blk.1.ffn_up.weight": "h.1.mlp.c_fc.weight",
              "blk.0.ffn_down.weight": "h.0.mlp.c_proj.weight",
              "blk.1.ffn_norm.weight": "h.1.ln_2.weight",
              "blk.0.attn_norm.bias": "h.0.ln_1.bias"}
    for name, ours in expect.items():
        t = tensors[name]
        assert list(t.shape) == list(model.params[ours].shape[::-1])   # GGUF: innermost first
        assert np.array_equal(np.asarray(t.data).reshape(model.params[ours].shape),
                              model.params[ours])

    code, _, err = call(capsys, export_main, tmp_path / "ckpt", out, "--format", "gguf")
    assert_one_error_line(code, err, "cllm_export", "exists")
    make_checkpoint(tmp_path / "words", "word", text)
    code, _, err = call(capsys, export_main, tmp_path / "words", tmp_path / "w.gguf",
                        "--format", "gguf")
    assert_one_error_line(code, err, "cllm_export", "bpe tokenizer")
    assert not os.path.exists(tmp_path / "w.gguf")


def test_the_printed_commands_quote_paths_for_the_shell(text, tmp_path, capsys):
    # the llama-completion line runs as printed, whatever the path holds
    make_checkpoint(tmp_path / "ckpt", "bpe", text)
    out = tmp_path / "my model's.gguf"
    code, stdout, err = call(capsys, export_main, tmp_path / "ckpt", out)
    assert code == 0, err
    line = next(line for line in stdout.splitlines() if "llama-completion" in line)
    command = shlex.split(line.split("run it with: ", 1)[1])
    assert command[:3] == ["llama-completion", "-m", str(out)]


def test_gguf_lists_rows_beyond_the_tokenizer_as_unused(text, tmp_path, capsys):
    import gguf
    tok = make_tokenizer("bpe", text)
    cfg = CLLMConfig(vocab_size=len(tok) + 3, embed_dim=16, num_layers=1, num_heads=2,
                     seq_len=16)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    CLLMModel(cfg, seed=0).save(ckpt / "final_model.cllm",
                                {"tokenizer": "bpe", "vocab_hash": tok.vocab_hash})
    tok.save(ckpt / "tokenizer.json")
    assert call(capsys, export_main, ckpt, tmp_path / "m.gguf", "--format", "gguf")[0] == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == cfg.vocab_size
    assert tokens[-3:] == [f"[PAD{i}]" for i in range(len(tok), len(tok) + 3)]
    assert types[-4:] == [1, 5, 5, 5]


def test_gguf_added_tokens_that_are_not_special(text, tmp_path, capsys):
    # the library finds a plain added token in text before its BPE runs; llama.cpp (and
    # transformers' GGUF reader, which follows it) does that for USER_DEFINED tokens only
    import gguf
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tk.add_tokens(["zebra", "quiet"])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer.json").write_text(tk.to_str(), encoding="utf-8")
    tok = BPETokenizer.read(ckpt / "tokenizer.json")
    cfg = CLLMConfig(vocab_size=len(tok), embed_dim=16, num_layers=1, num_heads=2, seq_len=16)
    CLLMModel(cfg, seed=0).save(ckpt / "final_model.cllm",
                                {"tokenizer": "bpe", "vocab_hash": tok.vocab_hash})
    assert call(capsys, export_main, ckpt, tmp_path / "m.gguf")[0] == 0
    types = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.token_type"].contents()
    assert {types[tk.token_to_id(t)] for t in ("zebra", "quiet")} == {gguf.TokenType.USER_DEFINED}
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for sample in ("a zebra, the quiet river", "zebrazebra quietly", text[:200]):
        assert theirs(sample, add_special_tokens=False)["input_ids"] == tok.encode(sample).tolist()
