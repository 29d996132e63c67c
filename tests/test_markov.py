"""Checks of the known-answer Markov corpus (tests/markov.py)."""
import math
import os
import re
import sys
from collections import Counter

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from markov import build_chain, entropy_rate, make_markov_corpus, stationary_distribution  # noqa: E402


def empirical_conditional_entropy(words):
    """Plug-in estimate of H(next word | word) from bigram counts, in nats."""
    pairs = Counter(zip(words, words[1:]))
    firsts = Counter(words[:-1])
    n = len(words) - 1
    return -sum(c / n * math.log(c / firsts[a]) for (a, _), c in pairs.items())


@pytest.mark.parametrize("n_words,branching,seed", [(5, 2, 0), (40, 4, 1), (300, 8, 2),
                                                    (12, 12, 3)])
def test_chain_structure_and_stationarity(n_words, branching, seed):
    words, P = build_chain(n_words, seed, branching)
    assert len(words) == n_words == len(set(words))
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert np.allclose(P.sum(axis=1), 1.0, atol=1e-12)
    assert np.all((P > 0).sum(axis=1) == branching)
    idx = np.arange(n_words)
    assert np.all(P[idx, (idx + 1) % n_words] > 0) and np.all(P[idx, idx] > 0)
    pi = stationary_distribution(P)
    assert pi.shape == (n_words,) and np.all(pi > 0)
    assert abs(pi.sum() - 1.0) < 1e-12
    assert np.max(np.abs(pi @ P - pi)) < 1e-12
    H = entropy_rate(P, pi)
    assert 0.0 < H <= math.log(branching) + 1e-12
    assert H < math.log(branching)        # the weights are not uniform
    assert H == pytest.approx(entropy_rate(P))


def test_entropy_rate_known_answer():
    """A hand-made two-state chain: pi = (q, p)/(p+q), H = pi0 h(p) + pi1 h(q)."""
    p, q = 0.3, 0.1
    P = np.array([[1 - p, p], [q, 1 - q]])
    pi = stationary_distribution(P)
    assert pi == pytest.approx([q / (p + q), p / (p + q)], abs=1e-14)

    def h(x):
        return -x * math.log(x) - (1 - x) * math.log(1 - x)

    assert entropy_rate(P, pi) == pytest.approx(pi[0] * h(p) + pi[1] * h(q), abs=1e-14)
    assert entropy_rate(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0.5, 0.5])) == 0.0


def test_text_format_and_determinism():
    text, H = make_markov_corpus(30, 1001, seed=5, branching=3)
    words, _ = build_chain(30, 5, 3)
    assert text.endswith("\n") and "  " not in text and "\t" not in text
    lines = text.split("\n")[:-1]
    assert [len(line.split(" ")) for line in lines] == [20] * 50 + [1]
    tokens = text.split()
    assert len(tokens) == 1001 and set(tokens) <= set(words)
    assert re.findall(r"\w+(?:'\w+)*|[^\w\s]", text) == tokens      # the word tokenizer's pattern
    assert make_markov_corpus(30, 1001, seed=5, branching=3) == (text, H)
    assert make_markov_corpus(30, 1001, seed=6, branching=3)[0] != text
    # transitions that occur are edges of the chain
    _, P = build_chain(30, 5, 3)
    index = {w: i for i, w in enumerate(words)}
    ids = [index[t] for t in tokens]
    assert all(P[a, b] > 0 for a, b in zip(ids, ids[1:]))


@pytest.mark.parametrize("n_words,branching,seed", [(50, 4, 11), (200, 6, 12)])
def test_empirical_entropy_matches_rate(n_words, branching, seed):
    text, H = make_markov_corpus(n_words, 300_000, seed=seed, branching=branching)
    est = empirical_conditional_entropy(text.split())
    assert abs(est - H) < 0.01 * H, (est, H)
    # and it is far from what a unigram model would see
    counts = np.array(list(Counter(text.split()).values()), float)
    unigram = -(counts / counts.sum() * np.log(counts / counts.sum())).sum()
    assert unigram > H + 0.5


def test_bad_arguments():
    with pytest.raises(ValueError):
        build_chain(1, 0, 2)
    with pytest.raises(ValueError):
        build_chain(5, 0, 6)
    with pytest.raises(ValueError):
        build_chain(5, 0, 1)
