"""Generation: token ids sampled one at a time from a model's flat parameters, through the
engine's Decoder (a key/value cache filled by one batched pass over the prompt), and text
streamed to a terminal as the tokens arrive.

    generate_ids   prompt ids -> sampled ids, one at a time (CLLMModel.generate)
    stream         prompt text -> its continuation written to a stream (cllm_inference)
"""
from __future__ import annotations

from typing import Container, Iterable, Iterator, Protocol, TextIO

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
    ids = [int(i) for i in prompt_ids]
    if not ids:
        if start_id is None:
            raise ValueError("an empty prompt needs start_id (the tokenizer's "
                             "end-of-text id)")
        ids = [int(start_id)]
    if min(ids) < 0 or max(ids) >= config.vocab_size:
        raise ValueError(f"prompt ids must be in [0, {config.vocab_size})")
    rng = np.random.default_rng(seed)
    T = config.seq_len
    decoder = Decoder(config, flat, threads, precision)
    for _ in range(max_tokens):
        if len(ids) > T:
            decoder.reset()
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
