"""Generation on bf16 weights (Decoder precision "bf16", cllm_inference --precision bf16): the
logits against the float64 reference with bf16-rounded weights and product inputs (and not
against the unrounded one), the same bits for any thread count, prefill against feeding one
position at a time, and the command line."""
import numpy as np
import pytest
import reference as ref
from helpers import call

from cllm_cli import CLLMConfig, CLLMModel, _engine
from cllm_cli.cli.inference import main as inference_main

pytestmark = pytest.mark.bf16     # a CPU with bf16 instructions, and oneDNN: tests/conftest.py

CFG = CLLMConfig(vocab_size=60, embed_dim=32, num_layers=2, num_heads=4, ff_dim=64, seq_len=16)


@pytest.fixture(scope="module")
def model():
    return CLLMModel(CFG, seed=5)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(2).integers(0, CFG.vocab_size, CFG.seq_len)


def fed(model, ids, threads, prefilled=1):
    """Logits of every position from `prefilled` on: a prefill of the first ones, then feeds."""
    decoder = _engine.Decoder(model.config, model.flat, threads, precision="bf16")
    rows = [decoder.prefill(ids[:prefilled])]
    rows += [decoder.feed(int(t)) for t in ids[prefilled:]]
    return np.stack(rows)


def reference_logits(model, ids, rounded):
    """float64 logits of every position; with `rounded`, every product with a weight sees
    bf16(weight) and bf16(input) (the attention is left unrounded, as the decoder leaves it)."""
    params = {k: v.astype(np.float64) for k, v in model.params.items()}
    original = ref.linear_forward
    if rounded:
        ref.linear_forward = lambda inp, w, b: ref.round_bf16(inp) @ ref.round_bf16(w).T + b
    try:
        lnf, _ = ref._forward_hidden(params, model.config, ids[None, :])
    finally:
        ref.linear_forward = original
    wte = params["wte"]
    if rounded:
        lnf, wte = ref.round_bf16(lnf), ref.round_bf16(wte)
    return (lnf @ wte.T)[0]


def test_logits_are_those_of_the_bf16_weights(model, ids):
    got = fed(model, ids, threads=2)
    want = reference_logits(model, ids, rounded=True)
    plain = reference_logits(model, ids, rounded=False)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale
    assert np.abs(got - plain).max() >= 1e-4 * scale       # the weights were rounded


def test_bf16_decoding_does_not_depend_on_the_thread_count(model, ids):
    runs = [fed(model, ids, threads, prefilled=9) for threads in (1, 2, 3)]
    assert runs[0].tobytes() == runs[1].tobytes() == runs[2].tobytes()


def test_prefill_agrees_with_feeding_one_position_at_a_time(model, ids):
    one_by_one = fed(model, ids, threads=2)[-1]
    decoder = _engine.Decoder(model.config, model.flat, 2, precision="bf16")
    prefilled = decoder.prefill(ids)
    assert np.abs(prefilled - one_by_one).max() <= 1e-5 * np.abs(one_by_one).max()


def test_scoring_is_refused_in_bf16(model, ids):
    decoder = _engine.Decoder(model.config, model.flat, 1, precision="bf16")
    with pytest.raises(ValueError, match="fp32"):
        decoder.score(ids[:4], ids[1:5])


def test_cllm_inference_precision_bf16(capsys, trained):
    texts = []
    for threads in ("1", "2"):
        code, out, err = call(capsys, inference_main, trained, "--prompt", "the", "--max-tokens",
                              "12", "--temperature", "0", "--precision", "bf16", "--threads",
                              threads)
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1] and len(texts[0].split()) > 1
