"""Log-likelihoods of continuations given a context, as lm-evaluation-harness computes them
for its loglikelihood requests, through the engine's Decoder.

    encode_pair   (context ids, continuation ids) of a (context, continuation) pair
    Scorer        the summed log-probability of each continuation and whether every one of
                  its tokens is the greedy choice; a context's cached positions serve all of
                  its continuations

Choices written down here:

- The pair is split as the harness splits it: white space at the end of the context moves to
  the start of the continuation; the continuation's ids are those of encode(context +
  continuation) after the len(encode(context)) first. When encode(context + continuation)
  does not start with encode(context) (a tokenizer that merges across the join) the
  continuation is encoded on its own instead; the harness keeps the tail of the joined
  encoding then. GPT-2's byte-level BPE never merges across a space-led continuation (its
  pre-tokenizer cuts before the space), so for it the two rules agree. An empty context is
  the end-of-text id, as the harness's prefix token.
- Left truncation, as the harness: of context + continuation only the last seq_len + 1 ids
  are kept, the last one being only a target, so the model sees at most seq_len positions and
  every continuation token is scored. A continuation of more than seq_len ids is refused.
- The log-probabilities are log softmax over the model's whole vocabulary (padding ids
  included, as the loss and the harness count them), in float64 from float32 logits; their sum
  over a continuation is a float64 sum. They do not depend on the thread count, nor on which
  other items were scored before (a cached prefix is the same bits as one computed again).
"""
from __future__ import annotations

from typing import Iterable, Sequence

from cllm_cli._engine import Decoder
from cllm_cli.api import CLLMModel
from cllm_cli.errors import DataError
from cllm_cli.tokenizers import Tokenizer


def encode_pair(tokenizer: Tokenizer, context: str,
                continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lists of ints."""
    stripped = context.rstrip()
    if stripped == "":
        # no text before the continuation (white space goes with it): the start of a text
        return [int(tokenizer.eos_id)], [int(i) for i in tokenizer.encode(context + continuation)]
    if len(stripped) < len(context):
        context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = [int(i) for i in tokenizer.encode(context)]
    whole = [int(i) for i in tokenizer.encode(context + continuation)]
    if whole[:len(context_ids)] == context_ids:
        return context_ids, whole[len(context_ids):]
    return context_ids, [int(i) for i in tokenizer.encode(continuation)]


class Scorer:
    """Scores continuations with one Decoder of `model` (a CLLMModel) on `threads` threads,
    with at most `max_length` positions (the model's seq_len when None).

    For each pair the model sees context[-kept:] + continuation[:-1] and the targets are the
    continuation's ids. The cache holds the context's positions but its last (the first
    scored one): the next continuation of the same context is cut back to them and runs only
    its own positions."""

    def __init__(self, model: CLLMModel, tokenizer: Tokenizer, threads: int = 1,
                 max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.seq_len = model.config.seq_len if max_length is None else max_length
        self.decoder = Decoder(model.config, model.flat, threads)
        self.cached: tuple[int, ...] = ()        # the ids whose positions the cache holds

    def loglikelihoods(self, context: str, continuations: Iterable[str],
                       where: str = "item") -> list[tuple[float, bool]]:
        """[(summed log-probability, every token greedy)] of each continuation string after
        the context string; DataError naming `where` for a continuation that encodes to no id
        or to more than seq_len."""
        return [self.score_ids(*encode_pair(self.tokenizer, context, continuation),
                               where=where, what=continuation)
                for continuation in continuations]

    def score_ids(self, context_ids: Sequence[int], continuation_ids: Sequence[int],
                  where: str = "item", what: str | None = None) -> tuple[float, bool]:
        """(summed log-probability, every token greedy) of the ids continuation_ids after
        context_ids (at least one id)."""
        n, T = len(continuation_ids), self.seq_len
        label = "the continuation" if what is None else \
            f"continuation {what[:40] + '...' if len(what) > 40 else what!r}"
        if n == 0:
            raise DataError(f"{where}: {label} encodes to no token")
        if n > T:
            raise DataError(f"{where}: {label} is {n} tokens long, more than the model's "
                            f"context of {T}")
        kept = list(context_ids)[-(T + 1 - n):]
        prefix = tuple(kept[:-1])
        if prefix != self.cached:
            self.decoder.reset()
            self.cached = ()
            if prefix:
                self.decoder.score(prefix, ())
            self.cached = prefix
        else:
            self.decoder.truncate(len(prefix))
        logp, greedy = self.decoder.score([kept[-1], *continuation_ids[:-1]], continuation_ids)
        return float(logp.sum()), bool(greedy.all())
