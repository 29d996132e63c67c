"""Milliseconds per generated token on the default model (vocab 10000, d 256, 6 layers,
8 heads, T 128), without the key/value cache (the whole context run for every token, as
CLLMModel.generate does once the window slides) and with it (_engine.Decoder), at 16
positions of context and at a full window. Sampling is left out: both paths share it.

    python tools/generation_speed.py [--repeats N]
"""
import argparse
import time

import numpy as np

from cllm_cli import _engine
from cllm_cli.config import CLLMConfig
from cllm_cli.model import CLLMModel

DEFAULT = CLLMConfig(vocab_size=10000, embed_dim=256, num_layers=6, num_heads=8, ff_dim=1024,
                     seq_len=128)


def ms_without_cache(model, ids, repeats):
    """The full pass over ids, the cost of one token without the cache."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.logits(ids)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def ms_with_cache(model, ids, repeats):
    """One feed at position len(ids) - 1 after the positions before it are cached."""
    decoder = _engine.Decoder(model.config, model.flat)
    best = float("inf")
    for _ in range(repeats):
        decoder.reset()
        for token in ids[:-1]:
            decoder.feed(int(token))
        t = time.perf_counter()
        decoder.feed(int(ids[-1]))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20, help="best of N (default: %(default)s)")
    args = p.parse_args()
    model = CLLMModel(DEFAULT, seed=1)
    ids = np.random.default_rng(0).integers(4, DEFAULT.vocab_size, DEFAULT.seq_len)
    print("context  without cache  with cache  (ms per token, best of "
          f"{args.repeats})")
    for n in (16, DEFAULT.seq_len):
        before = ms_without_cache(model, ids[:n], args.repeats)
        after = ms_with_cache(model, ids[:n], args.repeats)
        print(f"{n:7d}  {before:13.2f}  {after:10.2f}  ({before / after:.1f}x)")


if __name__ == "__main__":
    main()
