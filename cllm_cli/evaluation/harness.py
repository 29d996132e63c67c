"""The model `cllm` of lm-evaluation-harness (the lm-eval extra; cllm_cli.lm_eval imports this
module, which registers it): a .cllm run or any model directory load_model reads, scored
through the engine's Decoder as the harness's own `hf` model scores a transformers model.

    HarnessModel   loglikelihood, loglikelihood_rolling and generate_until of lm-eval's LM

Choices written down here:

- Tokens as the harness's causal models take them: a (context, continuation) pair is split
  with white space at the end of the context moved to the continuation, the continuation's
  ids being those of encode(context + continuation) after the first len(encode(context)); an
  empty context is the begin-of-text id, or the end-of-text id for a tokenizer without one
  (or, when the continuation starts with that id, its first id), as the `hf` model takes it.
  A context of white space only is taken as empty, its white space leading the continuation
  (the `hf` model would be left with no context id at all). Contexts are cut on the left so
  that every continuation token is scored with at most max_length positions (the model's
  seq_len unless smaller).
- Requests are scored one at a time in the order of their context ids, so that requests of
  one context follow each other and reuse the context's cached positions (Scorer); the
  answers come back in the requests' order. They do not depend on `threads`.
- Rolling log-likelihoods: the harness's own windows (get_rolling_token_windows with
  context_len 1, made disjoint), the same begin-of-text id the first context: every token is
  scored once, with the longest context that fits.
- Generation: the context is cut on the left to max_length - max_gen_toks ids (as the `hf`
  model does; to max_length when that is not positive), then max_gen_toks tokens at most,
  stopping at the end-of-text id or once the text holds a stop string, and the text is cut at
  the first stop string. Greedy unless do_sample is true (or unset) and temperature > 0;
  sampling is seeded by `seed`, the same for every request.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from cllm_cli.api import load_model
from cllm_cli.errors import UsageError
from cllm_cli.evaluation.scoring import Scorer

DEFAULT_MAX_GEN_TOKS = 256       # the harness's default for its own models


@register_model("cllm")
class HarnessModel(LM):
    """lm-eval's `--model cllm`; `--model_args pretrained=PATH,threads=N` (lm-eval passes
    their values as strings or numbers). batch_size, max_batch_size and device, which
    lm-eval's command line passes to every model, are accepted and have no effect: requests
    run one at a time on the CPU."""

    def __init__(self, pretrained: str, threads: int | str = 1,
                 max_length: int | str | None = None,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, seed: int | str = 0,
                 vocab: str | None = None, batch_size: Any = None, max_batch_size: Any = None,
                 device: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise UsageError(f"--model_args {', '.join(sorted(unknown))}: not an argument of "
                             f"the cllm model (pretrained, threads, max_length, max_gen_toks, "
                             f"seed, vocab)")
        self.threads = _whole(threads, "threads")
        self.model, self.tokenizer, _ = load_model(str(pretrained), vocab)
        seq_len = self.model.config.seq_len
        self.max_length = seq_len if max_length is None else _whole(max_length, "max_length")
        if self.max_length > seq_len:
            raise UsageError(f"max_length {self.max_length} is more than the model's context "
                             f"of {seq_len}")
        self.max_gen_toks = _whole(max_gen_toks, "max_gen_toks")
        self.seed = _whole(seed, "seed", minimum=0)
        self.eot_token_id = int(self.tokenizer.eos_id)
        # what an empty context and the first rolling window start from: the begin-of-text
        # id (our tokenizers give the end-of-text id when they have none), as `hf` takes it
        self.prefix_token_id = int(self.tokenizer.bos_id)
        self.scorer = Scorer(self.model, self.tokenizer, self.threads, self.max_length)

    def tok_encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as the harness's causal models split a pair."""
        stripped = context.rstrip()
        if stripped == "":
            # no text before the continuation (white space goes with it): the start of a text
            ids = self.tok_encode(context + continuation)
            if ids and ids[0] == self.prefix_token_id:
                return ids[:1], ids[1:]
            return [self.prefix_token_id], ids
        context, continuation = stripped, context[len(stripped):] + continuation
        context_ids = self.tok_encode(context)
        return context_ids, self.tok_encode(context + continuation)[len(context_ids):]

    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Scorer.score_ids of each pair, in the order of the context ids."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for i in sorted(range(len(pairs)), key=lambda i: pairs[i][0]):
            results[i] = self.scorer.score_ids(*pairs[i], where="request")
        return results

    def loglikelihood(self, requests: Iterable[Any],
                      disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score_pairs([self.encode_pair(*request.args) for request in requests])

    def loglikelihood_rolling(self, requests: Iterable[Any],
                              disable_tqdm: bool = False) -> list[float]:
        totals = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            totals.append(float(sum(logp for logp, _ in self.score_pairs(windows))))
        return totals

    def generate_until(self, requests: Iterable[Any], disable_tqdm: bool = False) -> list[str]:
        return [self.generate(*request.args) for request in requests]

    def generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        """The text generated after `context`, cut at the first stop string."""
        until = gen_kwargs.get("until") or []
        stops = [s for s in ([until] if isinstance(until, str) else until) if s]
        max_gen_toks = _whole(gen_kwargs.get("max_gen_toks", gen_kwargs.get(
            "max_new_tokens", self.max_gen_toks)), "max_gen_toks", minimum=0, what="a task's")
        temperature = float(gen_kwargs.get("temperature", 0.0))
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        keep = self.max_length - max_gen_toks
        prompt = self.tok_encode(context)[-(keep if keep > 0 else self.max_length):]
        eos = self.eot_token_id
        generated: list[int] = []
        text = ""
        for token in self.model.generate(
                prompt, max_tokens=max_gen_toks, temperature=temperature,
                top_k=int(gen_kwargs.get("top_k", 0)), top_p=float(gen_kwargs.get("top_p", 1.0)),
                seed=self.seed, stop_ids=(eos,), start_id=eos, threads=self.threads,
                num_tokens=len(self.tokenizer)):
            if token == eos:
                break
            generated.append(token)
            text = self.tokenizer.decode(generated)
            if any(stop in text for stop in stops):
                break
        for stop in stops:
            text = text.split(stop)[0]
        return text


def _whole(value: int | str, name: str, minimum: int = 1, what: str = "--model_args") -> int:
    """A --model_args value (or, with `what`, a task's generation setting) that must be a
    whole number of at least `minimum` (UsageError otherwise)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum:
        raise UsageError(f"{what} {name} must be a whole number of at least {minimum}, "
                         f"not {value}")
    return number
