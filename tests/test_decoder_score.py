"""Decoder.score and Decoder.truncate: the log-probabilities of given targets after a prefill
against log softmax of the full pass, the argmax flags, a cache cut back and reused with the
same bits, the same bits for every thread count, and refused arguments."""
import numpy as np
import pytest

from cllm_cli import _engine
from cllm_cli.api import CLLMModel
from cllm_cli.model import CLLMConfig

# more vocabulary columns than one classifier chunk, more scored rows than one block
CFG = CLLMConfig(vocab_size=2500, embed_dim=48, num_layers=2, num_heads=3, ff_dim=40,
                 seq_len=96)


def noisy_model(cfg, seed=1):
    model = CLLMModel(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    model.flat += rng.standard_normal(model.flat.size).astype(np.float32) * np.float32(0.15)
    return model


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_score_is_the_log_softmax_of_the_full_pass():
    model = noisy_model(CFG)
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, 91)
    logits = model.logits(ids[None, :90])[0]
    targets = ids[1:91].copy()
    targets[[3, 40, 77]] = logits[[3, 40, 77]].argmax(-1)       # greedy there
    expected = log_softmax(logits)[np.arange(90), targets]
    decoder = _engine.Decoder(CFG, model.flat, 2)
    logp, greedy = decoder.score(ids[:10], ())                   # fills the cache only
    assert logp.shape == (0,) and greedy.shape == (0,) and decoder.length == 10
    logp, greedy = decoder.score(ids[10:90], targets[15:90])     # 75 of 80 positions scored
    assert decoder.length == 90 and logp.dtype == np.float64 and greedy.dtype == bool
    np.testing.assert_allclose(logp, expected[15:], rtol=0, atol=2e-5)
    assert list(np.flatnonzero(greedy)) == list(np.flatnonzero(
        logits[15:].argmax(-1) == targets[15:]))
    assert greedy[40 - 15] and greedy[77 - 15]


def test_truncate_reuses_the_cached_context_with_the_same_bits():
    model = noisy_model(CFG)
    rng = np.random.default_rng(4)
    context = rng.integers(0, CFG.vocab_size, 30)
    endings = [rng.integers(0, CFG.vocab_size, n) for n in (5, 17, 1)]
    shared = _engine.Decoder(CFG, model.flat, 1)
    shared.score(context[:-1], ())
    for ending in endings:
        shared.truncate(29)
        tokens = np.concatenate([context[-1:], ending[:-1]])
        reused = shared.score(tokens, ending)
        fresh = _engine.Decoder(CFG, model.flat, 1)
        fresh.score(context[:-1], ())
        again = fresh.score(tokens, ending)
        assert reused[0].tobytes() == again[0].tobytes()
        assert reused[1].tolist() == again[1].tolist()
    # the cache keeps working for generation after scoring and truncating
    shared.truncate(12)
    row = shared.feed(int(context[12]))
    np.testing.assert_allclose(row, model.logits(context[None, :13])[0, -1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("n, k", [(70, 70), (23, 9), (1, 1)])
def test_scores_are_the_same_bits_for_every_thread_count(n, k):
    model = noisy_model(CFG)
    ids = np.random.default_rng(n).integers(0, CFG.vocab_size, n + 9)
    results = []
    for threads in (1, 2, 3):
        decoder = _engine.Decoder(CFG, model.flat, threads)
        decoder.score(ids[:8], ())
        logp, greedy = decoder.score(ids[8:8 + n], ids[9 + n - k:9 + n])
        results.append((logp.tobytes(), greedy.tobytes()))
    assert results[0] == results[1] == results[2]


def test_score_and_truncate_refuse_bad_arguments():
    model = noisy_model(CFG)
    decoder = _engine.Decoder(CFG, model.flat, 1)
    with pytest.raises(ValueError, match="at most one target per token"):
        decoder.score([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one token"):
        decoder.score([], [])
    with pytest.raises(ValueError, match="outside"):
        decoder.score([1, 2], [CFG.vocab_size])
    with pytest.raises(ValueError, match="cache is full"):
        decoder.score(np.zeros(CFG.seq_len + 1, dtype=np.int32), [])
    decoder.score([1, 2, 3], [4])
    with pytest.raises(ValueError, match="cannot truncate 3 cached positions to 4"):
        decoder.truncate(4)
    with pytest.raises(ValueError):
        decoder.truncate(-1)
    decoder.truncate(0)
    assert decoder.length == 0
