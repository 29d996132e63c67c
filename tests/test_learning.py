"""The whole pipeline learns: on a Markov source with a known entropy rate, validation loss
must come close to that rate (the best any model can do) from above."""
import math

import pytest
from markov import LOWER_MARGIN, UPPER_MARGIN, make_markov_corpus

from cllm_cli import train


@pytest.mark.slow
def test_validation_loss_reaches_entropy_rate(tmp_path):
    text, H = make_markov_corpus(n_words=40, n_tokens=80000, seed=7, branching=4)
    corpus = tmp_path / "markov.txt"
    corpus.write_text(text)
    result = train([str(corpus)], checkpoint_dir=str(tmp_path / "ckpt"), tokenizer="word", embed_dim=32,
                   num_layers=1, num_heads=2, seq_len=32, batch_size=16, micro_batch=4,
                   max_steps=1000, learning_rate=3e-3, warmup_steps=20, eval_interval=0,
                   val_fraction=0.1, threads=2, quiet=True)
    val = result["val_loss"]
    assert H - LOWER_MARGIN < val < H + UPPER_MARGIN, (val, H)
    assert val < math.log(44) - 2.0
