"""Generation with the key/value cache (_engine.Decoder, CLLMModel.generate): its logits
against the full forward pass, and the sampled tokens against generation without a cache (the
whole context run again for every token, as before the cache) for several temperatures,
top-k, top-p, seeds, and contexts that make the window slide.

The cached logits are not always bit-identical to the full pass: OpenBLAS's sgemm sums a row
that it handles in a group of 4 to 16 rows (the full pass's rows) differently from a row alone
(the cache's one new position), in the last bits. The full pass itself gives a
position different bits depending on how many positions follow it. So the tests below check
the logits to float32 rounding and the tokens exactly."""
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, checkout_env

from cllm_cli import _engine
from cllm_cli.api import CLLMModel
from cllm_cli.model import CLLMConfig
from cllm_cli.model.sampling import sample_from_logits

CFG = CLLMConfig(vocab_size=120, embed_dim=32, num_layers=2, num_heads=4, ff_dim=64, seq_len=16)
# D: more than one block of 32 attention rows
CFG_D = CLLMConfig(vocab_size=37, embed_dim=48, num_layers=2, num_heads=3, ff_dim=40, seq_len=80)


def peaked_model(cfg, seed=1):
    """A model whose next-token distributions are far from uniform, as a trained one's."""
    model = CLLMModel(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    model.flat += rng.standard_normal(model.flat.size).astype(np.float32) * np.float32(0.15)
    return model


def generate_without_cache(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed,
                           stop_ids=(), start_id=3):
    """Generation as before the cache: the logits of the whole last-seq_len context."""
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in prompt_ids] or [start_id]
    out = []
    for _ in range(max_tokens):
        row = model.logits(np.array(ids[-model.config.seq_len:]))[0, -1].astype(np.float64)
        next_id = sample_from_logits(row, temperature, top_k, top_p, rng)
        ids.append(next_id)
        out.append(next_id)
        if next_id in stop_ids:
            break
    return out


@pytest.mark.parametrize("cfg", [CFG, CFG_D], ids=["small", "two-blocks"])
def test_decoder_logits_match_the_full_pass(cfg):
    model = peaked_model(cfg)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, cfg.seq_len)
    decoder = _engine.Decoder(cfg, model.flat)
    for t in range(cfg.seq_len):
        row = decoder.feed(int(ids[t]))
        full = model.logits(ids[None, :t + 1])[0, -1]
        np.testing.assert_allclose(row, full, rtol=0, atol=2e-6 * np.abs(full).max())
    assert decoder.length == cfg.seq_len


def test_decoder_reset_full_and_bad_token():
    model = peaked_model(CFG)
    decoder = _engine.Decoder(CFG, model.flat)
    first = [decoder.feed(t) for t in (5, 6, 7)]
    decoder.reset()
    assert decoder.length == 0
    again = [decoder.feed(t) for t in (5, 6, 7)]
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    for t in range(3, CFG.seq_len):
        decoder.feed(t)
    with pytest.raises(ValueError, match="full"):
        decoder.feed(1)
    decoder.reset()
    for bad in (-1, CFG.vocab_size):
        with pytest.raises(ValueError, match="outside"):
            decoder.feed(bad)
    with pytest.raises(ValueError, match="does not match"):
        _engine.Decoder(CFG, model.flat[:-1])


SAMPLING = [(0.0, 0, 1.0), (0.5, 0, 1.0), (0.8, 40, 0.95), (1.0, 0, 1.0), (1.0, 5, 1.0),
            (1.0, 0, 0.5), (1.5, 10, 0.9), (2.0, 0, 1.0)]
# (prompt length, tokens): inside the window, filling it and sliding on, longer than it
CONTEXTS = [(1, 10), (4, 30), (15, 8), (16, 5), (40, 6)]


@pytest.mark.parametrize("temperature, top_k, top_p", SAMPLING)
@pytest.mark.parametrize("prompt_len, max_tokens", CONTEXTS)
def test_tokens_are_those_of_generation_without_cache(temperature, top_k, top_p, prompt_len,
                                                      max_tokens):
    model = peaked_model(CFG)
    prompt = np.random.default_rng(prompt_len).integers(4, CFG.vocab_size, prompt_len).tolist()
    for seed in (0, 7):
        got = list(model.generate(prompt, max_tokens=max_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed))
        want = generate_without_cache(model, prompt, max_tokens, temperature, top_k, top_p, seed)
        assert got == want


def test_tokens_match_over_two_attention_blocks_and_stop_ids():
    model = peaked_model(CFG_D, seed=3)
    prompt = [5, 9, 11]
    for seed in (1, 2):
        got = list(model.generate(prompt, max_tokens=90, temperature=0.9, top_k=20, seed=seed))
        want = generate_without_cache(model, prompt, 90, 0.9, 20, 1.0, seed)
        assert got == want and len(got) == 90
    stop = want[10]
    got = list(model.generate(prompt, max_tokens=90, temperature=0.9, top_k=20, seed=2,
                              stop_ids=(stop,)))
    assert got == want[:want.index(stop) + 1]


def test_empty_prompt_and_bad_prompt_ids():
    model = peaked_model(CFG)
    got = list(model.generate([], max_tokens=5, temperature=0.7, seed=4, start_id=9))
    assert got == generate_without_cache(model, [], 5, 0.7, 0, 1.0, 4, start_id=9)
    with pytest.raises(ValueError, match="start_id"):
        list(model.generate([], max_tokens=1))
    with pytest.raises(ValueError):
        list(model.generate([CFG.vocab_size], max_tokens=1))


@pytest.mark.parametrize("cfg", [CFG, CFG_D], ids=["small", "two-blocks"])
@pytest.mark.parametrize("split", [1, 5])
def test_prefill_matches_feeding_the_positions_one_by_one(cfg, split):
    """A prompt run as one batched pass (in two parts: a prompt, then more of it) fills the
    cache as feeding it token by token does: the logits agree to float rounding (measured
    below 1e-6 of the largest logit) at every later position."""
    model = peaked_model(cfg)
    ids = np.random.default_rng(split).integers(0, cfg.vocab_size, cfg.seq_len)
    one_by_one = _engine.Decoder(cfg, model.flat)
    rows = [one_by_one.feed(int(t)) for t in ids]
    batched = _engine.Decoder(cfg, model.flat)
    first = batched.prefill(ids[:split])
    second = batched.prefill(ids[split:split + 9])
    assert batched.length == split + 9
    for got, want in ((first, rows[split - 1]), (second, rows[split + 8])):
        assert not np.array_equal(got, np.zeros_like(got))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    for t in range(split + 9, cfg.seq_len):
        np.testing.assert_allclose(batched.feed(int(ids[t])), rows[t], rtol=0,
                                   atol=2e-6 * np.abs(rows[t]).max())


@pytest.mark.parametrize("cfg", [CFG, CFG_D], ids=["small", "two-blocks"])
def test_logits_are_the_same_bits_for_every_thread_count(cfg):
    model = peaked_model(cfg, seed=5)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, cfg.seq_len)
    runs = []
    for threads in (1, 2, 3, 4):
        decoder = _engine.Decoder(cfg, model.flat, threads)
        rows = [decoder.prefill(ids[:cfg.seq_len // 2])]
        rows += [decoder.feed(int(t)) for t in ids[cfg.seq_len // 2:]]
        runs.append(np.stack(rows))
    assert not np.array_equal(runs[0][0], runs[0][1])          # premise: the rows differ
    for other in runs[1:]:
        assert np.array_equal(runs[0], other)


def test_generated_ids_do_not_depend_on_threads():
    model = peaked_model(CFG_D, seed=7)
    prompt = list(range(4, 30))
    for temperature in (0.0, 0.9):
        runs = [list(model.generate(prompt, max_tokens=70, temperature=temperature, seed=3,
                                    threads=threads)) for threads in (1, 2, 3)]
        assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 70


def test_greedy_text_after_a_batched_prompt_is_that_of_the_full_pass():
    model = peaked_model(CFG_D, seed=8)
    prompt = np.random.default_rng(9).integers(0, CFG_D.vocab_size, 40).tolist()
    got = list(model.generate(prompt, max_tokens=30, temperature=0))
    assert got == generate_without_cache(model, prompt, 30, 0, 0, 1.0, 0)


def test_a_decoder_refuses_bad_threads_and_an_overfull_prefill():
    model = peaked_model(CFG)
    with pytest.raises(ValueError, match="threads"):
        _engine.Decoder(CFG, model.flat, 0)
    decoder = _engine.Decoder(CFG, model.flat, 2)
    with pytest.raises(ValueError, match="full"):
        decoder.prefill(np.arange(CFG.seq_len + 1) % CFG.vocab_size)
    with pytest.raises(ValueError, match="outside"):
        decoder.prefill([1, CFG.vocab_size])
    with pytest.raises(ValueError, match="at least one"):
        decoder.prefill([])


def test_a_cached_decoder_runs_only_the_positions_after_those_it_holds():
    """Turns of a conversation through one CachedDecoder: each turn's tokens are those of
    generation without a cache on the whole context, and the positions already cached are
    not run again (shown by changing the weights in place between turns: a fresh decoder on
    the new weights gives other tokens than the one whose cache holds the old weights' keys
    and values)."""
    from cllm_cli.model.generation import CachedDecoder
    model = peaked_model(CFG_D, seed=8)
    rng = np.random.default_rng(11)
    context = rng.integers(0, CFG_D.vocab_size, 12).tolist()
    weights = model.flat.copy()
    cached = CachedDecoder(CFG_D, weights)
    for turn in range(3):
        got = list(cached.generate(context, 8, 0.0, 0, 1.0, np.random.default_rng(0)))
        assert got == generate_without_cache(model, context, 8, 0, 0, 1.0, 0), turn
        assert cached.cached_ids() == context + got[:-1]
        context += got + rng.integers(0, CFG_D.vocab_size, 4).tolist()
    other = peaked_model(CFG_D, seed=9)
    weights[:] = other.flat
    reused = list(cached.generate(context, 20, 0.0, 0, 1.0, np.random.default_rng(0)))
    assert reused != generate_without_cache(other, context, 20, 0, 0, 1.0, 0)
    cached.reset()
    assert cached.cached_ids() == []
    fresh = list(cached.generate(context, 20, 0.0, 0, 1.0, np.random.default_rng(0)))
    assert fresh == generate_without_cache(other, context, 20, 0, 0, 1.0, 0)
    sliding = context + rng.integers(0, CFG_D.vocab_size, CFG_D.seq_len).tolist()
    got = list(cached.generate(sliding, 5, 0.0, 0, 1.0, np.random.default_rng(0)))
    assert got == generate_without_cache(other, sliding, 5, 0, 0, 1.0, 0)
    assert cached.cached_ids() == (sliding + got[:-1])[-CFG_D.seq_len:]


def test_api_misuse_is_refused_with_a_clear_exception(tiny_model):
    # ids that are not integers were cut to integers (1.7 read as 1) and a negative
    # max_tokens gave no tokens without a word
    V = tiny_model.config.vocab_size
    for bad in (np.array([1.7, 2.0]), ["a", "b"], [True, False], [None]):
        with pytest.raises(TypeError, match="integer token ids"):
            tiny_model.logits(bad)
        with pytest.raises(TypeError, match="integer token ids"):
            tiny_model.loss_and_grads(bad, [1, 2])
    for bad in ([], np.zeros((0, 3), dtype=np.int64)):
        with pytest.raises(ValueError, match="B >= 1 and n >= 1"):
            tiny_model.logits(bad)
    with pytest.raises(TypeError, match="integer token ids"):
        list(tiny_model.generate([1.7], max_tokens=2))
    with pytest.raises(ValueError, match="max_tokens must be at least 0"):
        list(tiny_model.generate([1], max_tokens=-1))
    assert list(tiny_model.generate([1], max_tokens=0)) == []
    assert tiny_model.logits(np.array([[1, V - 1]], dtype=np.uint8)).shape == (1, 2, V)
    assert len(list(tiny_model.generate(np.array([1, 2], dtype=np.int16), max_tokens=2))) == 2


def test_a_pad_id_that_is_no_id_is_refused(tiny_model):
    # 2.5 was cut to 2 (a real id, whose targets were then left out); 2**40 overflowed
    V = tiny_model.config.vocab_size
    for bad in (2.5, 2 ** 40, V, -2, True, "1"):
        with pytest.raises(ValueError, match="pad_id must be an id"):
            tiny_model.loss_and_grads([[1, 2]], [[2, 1]], pad_id=bad)
    counted_all, _ = tiny_model.loss_and_grads([[1, 2]], [[2, 1]], pad_id=np.int64(-1))
    assert counted_all == tiny_model.loss_and_grads([[1, 2]], [[2, 1]])[0]
    padded, _ = tiny_model.loss_and_grads([[1, 2]], [[2, 1]], pad_id=np.int32(2))
    assert padded == tiny_model.loss_and_grads([[1, 2]], [[-1, 1]])[0]     # target 2 left out


GENERATE_BF16 = """
from cllm_cli import CLLMConfig, CLLMModel
from cllm_cli.errors import PrecisionError
model = CLLMModel(CLLMConfig(vocab_size=40, embed_dim=16, num_layers=1, num_heads=2, seq_len=8), 1)
try:
    print(len(list(model.generate([1, 2], max_tokens=3, temperature=0, precision="bf16"))))
except PrecisionError as e:
    print(e)
"""


@pytest.mark.parametrize("hidden", [True, pytest.param(False, marks=pytest.mark.bf16)])
def test_generate_in_bf16_loads_what_it_needs(hidden):
    """A fresh process: generate(precision="bf16") loads oneDNN itself (no internal call
    first), or says in one PrecisionError why this host cannot (CLLM_NO_BF16 hides bf16)."""
    env = checkout_env(CLLM_NO_BF16="1")
    if not hidden:
        del env["CLLM_NO_BF16"]
    p = subprocess.run([sys.executable, "-c", GENERATE_BF16], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    if hidden:
        assert p.stdout.startswith("--precision bf16 needs a CPU with bf16 instructions"), p.stdout
    else:
        assert p.stdout == "3\n"
