"""Generation: token ids sampled one at a time from a model's flat parameters, through the
engine's Decoder (a key/value cache filled by one batched pass over the prompt), and text
streamed to a terminal as the tokens arrive.

    generate_ids   prompt ids -> sampled ids, one at a time (CLLMModel.generate)
    stream         prompt text -> its continuation written to a stream (cllm_inference)
"""
import numpy as np

from cllm_cli._engine import Decoder
from cllm_cli.model.sampling import sample_from_logits
from cllm_cli.tokenizers import replace_undecodable


def generate_ids(config, flat, prompt_ids, max_tokens=50, temperature=1.0, top_k=0, top_p=1.0,
                 seed=0, stop_ids=(), start_id=None, threads=1, num_tokens=None,
                 precision="fp32"):
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


def stream(model, tokenizer, prompt, out, max_tokens, temperature, top_k, top_p, seed,
           threads=1, precision="fp32"):
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


def _show_new(out, text, printed, ends_line):
    """Writes text[printed:]; returns the new (printed, ends_line)."""
    piece = text[printed:]
    if not piece:
        return printed, ends_line
    out.write(piece)
    out.flush()
    return len(text), piece.endswith("\n")
