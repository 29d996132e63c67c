"""Generation: token ids sampled one at a time from a model's flat parameters, through the
engine's Decoder (a key/value cache filled by one batched pass over the prompt), and text
streamed to a terminal as the tokens arrive.

    generate_ids   prompt ids -> sampled ids, one at a time (CLLMModel.generate)
    CachedDecoder  the same, from a Decoder kept between calls: a prompt that starts with
                   the ids its cache holds runs only its new positions (cllm_chat's turns)
    stream         prompt text -> its continuation written to a stream (cllm_inference)
"""
from __future__ import annotations

import operator
from typing import Container, Generator, Iterable, Iterator, Protocol, Sequence, TextIO

import numpy as np
from numpy.typing import NDArray

from cllm_cli._engine import Decoder
from cllm_cli.model.config import CLLMConfig
from cllm_cli.model.sampling import sample_from_logits
from cllm_cli.tokenizers import Tokenizer, replace_undecodable


class IdGenerator(Protocol):
    """What stream needs of a model: CLLMModel.generate."""

    def generate(self, prompt_ids: Iterable[int], max_tokens: int = ..., temperature: float = ...,
                 top_k: int = ..., top_p: float = ..., seed: int = ...,
                 stop_ids: Container[int] = ..., start_id: int | None = ..., threads: int = ...,
                 num_tokens: int | None = ..., precision: str = ...) -> Iterator[int]: ...


def generate_ids(config: CLLMConfig, flat: NDArray[np.float32], prompt_ids: Iterable[int],
                 max_tokens: int = 50, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: Container[int] = (),
                 start_id: int | None = None, threads: int = 1, num_tokens: int | None = None,
                 precision: str = "fp32") -> Iterator[int]:
    """Yields sampled token ids one at a time: CLLMModel.generate, whose docstring says what
    each argument does."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
    if operator.index(max_tokens) < 0:
        raise ValueError(f"max_tokens must be at least 0, got {max_tokens}")
    ids = _ids(prompt_ids)
    if not ids:
        if start_id is None:
            raise ValueError("an empty prompt needs start_id (the tokenizer's "
                             "end-of-text id)")
        ids = [int(start_id)]
    decoder = CachedDecoder(config, flat, threads, precision)
    yield from decoder.generate(ids, max_tokens, temperature, top_k, top_p,
                                np.random.default_rng(seed), stop_ids, num_tokens)


def _ids(prompt_ids: Iterable[int]) -> list[int]:
    """The prompt as ints; TypeError for an id that is not an integer (1.7 would be cut to
    1 silently, a str read as digits)."""
    try:
        return [operator.index(i) for i in prompt_ids]
    except TypeError:
        raise TypeError("prompt ids must be integer token ids") from None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of a and b."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class CachedDecoder:
    """A Decoder that knows which ids its cache holds, so that generate() from a prompt that
    starts with them runs only the positions after them: the next turn of a conversation runs
    the new message, not the whole history again.

    The cache's positions 0..length-1 hold self._ids[self._start:], computed as that
    sequence's first positions; a window that slid past seq_len starts at self._start > 0.
    Sampling draws from the generator the caller gives, so that a conversation's turns
    continue one stream of random numbers."""

    def __init__(self, config: CLLMConfig, flat: NDArray[np.float32], threads: int = 1,
                 precision: str = "fp32") -> None:
        self.config = config
        self.decoder = Decoder(config, flat, threads, precision)
        self._ids: list[int] = []
        self._start = 0

    def cached_ids(self) -> list[int]:
        """The ids whose positions the cache holds, in order from position 0."""
        return self._ids[self._start:self._start + self.decoder.length]

    def reset(self) -> None:
        """Empties the cache: the next prompt runs whole."""
        self.decoder.reset()
        self._ids, self._start = [], 0

    def generate(self, prompt_ids: Sequence[int], max_tokens: int, temperature: float,
                 top_k: int, top_p: float, rng: np.random.Generator,
                 stop_ids: Container[int] = (), num_tokens: int | None = None
                 ) -> Generator[int, None, None]:
        """Yields sampled ids after prompt_ids (at least one id), as generate_ids does; the
        cached positions that agree with the prompt's are kept, at most all but its last
        (whose logits the sampler needs). Stopping early (close(), an exception) leaves the
        cache holding the positions run so far, which the next call can reuse."""
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("generation needs at least one prompt id")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"prompt ids must be in [0, {self.config.vocab_size})")
        T = self.config.seq_len
        keep = min(common_prefix(self.cached_ids(), ids), len(ids) - 1)
        self.decoder.truncate(keep)
        self._ids, self._start = ids, 0
        decoder = self.decoder
        for _ in range(max_tokens):
            if len(ids) > T:
                decoder.reset()
                self._start = len(ids) - T
                row = decoder.prefill(ids[-T:])
            elif decoder.length == len(ids) - 1 and decoder.length:
                row = decoder.feed(ids[-1])
            else:
                row = decoder.prefill(ids[decoder.length:])
            next_id = sample_from_logits(row.astype(np.float64), temperature, top_k, top_p, rng,
                                         num_tokens)
            ids.append(next_id)
            yield next_id
            if next_id in stop_ids:
                return


def stream(model: IdGenerator, tokenizer: Tokenizer, prompt: str, out: TextIO, max_tokens: int,
           temperature: float, top_k: int, top_p: float, seed: int, threads: int = 1,
           precision: str = "fp32") -> list[int]:
    """Writes the prompt and its continuation to `out` as the tokens arrive; returns the
    generated ids (without the final end of text). A byte-level token may end inside a
    multi-byte character: what decodes to U+FFFD at the end is held back until the
    character is complete (or the text ends)."""
    prompt_ids = [int(i) for i in tokenizer.encode(prompt)]
    prompt = replace_undecodable(prompt)[0]     # bytes that are not UTF-8 shown as U+FFFD
    shown = tokenizer.shown_prompt(prompt)
    out.write(shown)
    out.flush()
    ids = list(prompt_ids)
    printed = len(tokenizer.decode(ids))      # characters of the decoded text already shown
    ends_line = shown.endswith("\n") or not shown
    generated = []
    eos = tokenizer.eos_id
    for next_id in model.generate(prompt_ids, max_tokens=max_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, stop_ids=(eos,),
                                  start_id=eos, threads=threads,
                                  num_tokens=len(tokenizer), precision=precision):
        if next_id == eos:
            break
        ids.append(next_id)
        generated.append(next_id)
        printed, ends_line = _show_new(out, tokenizer.decode(ids).rstrip("\ufffd"), printed,
                                       ends_line)
    printed, ends_line = _show_new(out, tokenizer.decode(ids), printed, ends_line)
    if not ends_line:
        out.write("\n")
    out.flush()
    return generated


def _show_new(out: TextIO, text: str, printed: int, ends_line: bool) -> tuple[int, bool]:
    """Writes text[printed:]; returns the new (printed, ends_line)."""
    piece = text[printed:]
    if not piece:
        return printed, ends_line
    out.write(piece)
    out.flush()
    return len(text), piece.endswith("\n")
