"""What the training loop prints: the header, validation results, skipped micro-batches,
samples, the per-sphere statistics and the divergence check."""
from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sized, cast

import numpy as np

from cllm_cli.api import CLLMModel
from cllm_cli.distributed import on_all_ranks
from cllm_cli.errors import TrainingError
from cllm_cli.model import CLLMConfig, LlamaConfig, LoraSpec
from cllm_cli.progress import fmt_loss, fmt_ppl, perplexity, plural
from cllm_cli.tokenizers import Tokenizer
from cllm_cli.training.config import TrainConfig
from cllm_cli.training.log import RunLog
from cllm_cli.training.trainer import Trainer

UNKNOWN_WARNING = 0.01     # the share of <unk> in the corpus above which the header warns


def unknown_count(tokens: np.ndarray, unk_id: int, chunk: int = 1 << 24) -> int:
    """How many of `tokens` are unk_id, counted a chunk at a time (a memory-mapped corpus is
    never copied whole)."""
    return sum(int(np.count_nonzero(tokens[i:i + chunk] == unk_id))
               for i in range(0, len(tokens), chunk))


def vocabulary_name(cfg: TrainConfig, tokenizer: Tokenizer) -> str:
    """What the header calls the vocabulary: its kind, or for a tokenizer.json whose model is
    not BPE (a word or char model exported by cllm_export) the library's name of that model."""
    model = getattr(tokenizer, "model_name", "BPE")
    return cfg.tokenizer if model == "BPE" else f"{model} (tokenizer.json)"


def family_shape(m: CLLMConfig) -> str:
    """A model's family and shape as the run header gives them: GPT-2's as it always was."""
    if not isinstance(m, LlamaConfig):
        return (f"d {m.embed_dim}, {m.num_layers} layers, {m.num_heads} heads, ff {m.ff_dim}, "
                f"seq {m.seq_len}")
    return (f"{m.hf_model_type}, d {m.embed_dim}, {m.num_layers} layers, {m.num_heads} heads "
            f"over {m.num_kv_heads} key/value heads, SwiGLU ff {m.ff_dim}, seq {m.seq_len}, "
            f"rope theta {m.rope_theta:g}, {'tied' if m.tie_embeddings else 'untied'} output layer"
            f"{', q/k/v biases' if m.attention_bias else ''}")


def lora_line(trainer: Trainer) -> str:
    """The header's line of a LoRA run: rank, alpha, dropout, targets, and the trained
    parameters against all of them."""
    spec = cast(LoraSpec, trainer.lora)                  # a LoRA run's
    base, trained = trainer.model.num_params(), cast(np.ndarray, trainer.adapters).size
    total = base + trained
    return (f"lora: rank {spec.rank}, alpha {spec.alpha:g}, dropout {spec.dropout:g}, targets "
            f"{', '.join(spec.sites)}; {trained:,} trained parameters of {total:,} "
            f"({trained / total:.2%}), the base model's {base:,} frozen")


def report_skips(log: RunLog, step: int, result: Any) -> None:
    """Warns about each micro-batch left out of the step and about a skipped step."""
    for bad in result.bad:
        where = [] if bad.loss_finite else ["the loss"]
        if bad.tensor is not None:
            where.append(f"the gradient of {bad.tensor} (first bad tensor)")
        log.warn(f"step {step}: micro-batch {bad.index} (sphere {bad.sphere}) has a "
                 f"non-finite value in {' and '.join(where)}; left out of the step")
    if result.tokens == 0:
        log.warn(f"step {step}: no valid micro-batch; step skipped")
    elif not result.applied:
        log.warn(f"step {step}: the summed gradient is not finite; step skipped")


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """A loss in nats per token as bits per UTF-8 byte of text (compares tokenizers)."""
    return loss / math.log(2) / bytes_per_token


def final_share(used: Sized, windows: Sized) -> float:
    """The share of the validation windows an evaluation covers."""
    return len(used) / len(windows) if len(windows) else 1.0


def report_val(log: RunLog, step: int, val_loss: float | None, bytes_per_token: float | None,
               share: float | None = None) -> None:
    """The validation line; `share` (the final evaluation's) is named when it is not all.
    Without bytes_per_token (records) there are no bits per byte: the line leaves them out
    and the record holds null."""
    if val_loss is None:
        return
    bpb = None if bytes_per_token is None else bits_per_byte(val_loss, bytes_per_token)
    part = f" | on {share:.1%} of the validation split" if share is not None and share < 1 else ""
    shown = "" if bpb is None else f" | val bpb {bpb:.4f}"
    log.say(f"step {step} | val loss {fmt_loss(val_loss)} | val ppl {fmt_ppl(val_loss)}"
            f"{shown}{part}")
    log.record(step=step, val_loss=val_loss, val_ppl=perplexity(val_loss), val_bpb=bpb)


def val_bpb_text(val_loss: float | None, bytes_per_token: float | None) -> str:
    if val_loss is None or not math.isfinite(val_loss) or bytes_per_token is None:
        return ""
    return f", {bits_per_byte(val_loss, bytes_per_token):.4f} bits/byte"


def check_not_diverged(run: Any, vocab_size: int, final: str | os.PathLike) -> None:
    """A run whose final loss is worse than twice uniform guessing (2 ln V) diverged: the
    model is saved, but the run fails (status 1) so that scripts and schedulers notice."""
    limit = 2 * math.log(vocab_size)
    for what, loss in (("validation", run.val_loss), ("training", run.last_train_loss)):
        if loss is not None and not loss <= limit:
            raise on_all_ranks(TrainingError(
                f"training diverged: final {what} loss {fmt_loss(loss)} is above 2 ln(V) = "
                f"{limit:.2f} (saved to {final}); lower --learning-rate or raise --warmup-steps"))


def sample_text(model: CLLMModel, tokenizer: Tokenizer, prompt: str, max_tokens: int,
                seed: int) -> str:
    ids = list(tokenizer.encode(prompt)) if prompt else []
    out = list(model.generate(ids, max_tokens=max_tokens, temperature=0.8, top_k=40, seed=seed,
                              stop_ids=(tokenizer.eos_id,), start_id=tokenizer.eos_id,
                              num_tokens=len(tokenizer)))
    return tokenizer.decode(ids + out).strip()


def print_header(trainer: Trainer, log: RunLog) -> None:
    cfg, m, info = trainer.cfg, trainer.mcfg, trainer.data_info
    files, size = trainer.leftovers
    if files:
        log.say(f"removed {files} temporary {plural(files, 'file')} of interrupted runs ({size / 1e6:.1f} MB) "
                f"from {trainer.ckpt_dir}")
    log.say(f"corpus: {info['files']} {plural(info['files'], 'file')}, {info['bytes'] / 1e6:.2f} MB, "
            f"{info['tokens']:,} {plural(info['tokens'], 'token')}"
            f" ({'reused' if info['reused'] else 'tokenized'}: {trainer.ckpt_dir}/{info.get('file', 'dataset.bin')})")
    if info.get("records"):
        log.say(f"records: {info['records']}")
    if info.get("rebuilt_reason"):
        log.warn(f"{trainer.ckpt_dir}/dataset.bin was rebuilt: {info['rebuilt_reason']}")
    log.say(f"vocab: {m.vocab_size:,} {vocabulary_name(cfg, trainer.tokenizer)} tokens | model: "
            f"{family_shape(m)}, {trainer.model.num_params():,} parameters")
    if trainer.lora is not None:
        log.say(lora_line(trainer))
    unk_id = trainer.tokenizer.unk_id
    if unk_id >= 0 and log.shown:          # a pass over the corpus: only where it is printed
        n = len(trainer.train_tokens) + len(trainer.val_tokens)
        unknown = unknown_count(trainer.train_tokens, unk_id) + unknown_count(trainer.val_tokens,
                                                                              unk_id)
        if n and unknown > UNKNOWN_WARNING * n:
            log.warn(f"{unknown / n:.1%} of the corpus's {n:,} tokens are <unk> (not in the "
                     f"vocabulary of {len(trainer.tokenizer):,}): the model learns little from "
                     f"them; raise --vocab-size, or use --tokenizer bpe, which has no <unk>")
    spheres = f"{cfg.threads} {plural(cfg.threads, 'sphere')}"
    log.say(f"training: {trainer.n_windows:,} {plural(trainer.n_windows, 'window')}, "
            f"{trainer.steps_per_epoch} steps/epoch, "
            f"{trainer.total_steps} {plural(trainer.total_steps, 'step')} of {cfg.batch_size} x "
            f"{m.seq_len} tokens, "
            f"{trainer.layout or spheres}, micro-batch {cfg.micro_batch}, "
            f"lock mode {cfg.lock_mode}" + (f", dropout {cfg.dropout:g}" if cfg.dropout else "")
            + (f", precision {cfg.precision}" if cfg.precision != "fp32" else "")
            + (f", matmul {cfg.matmul}" if cfg.matmul != "blas" else ""))
    if len(trainer.val):
        n = len(trainer.val)
        periodic = len(trainer.val_periodic)
        what = "all of them" if periodic == n else f"{periodic:,} of them, evenly spread"
        final = "all" if len(trainer.val_final) == n else \
            f"{len(trainer.val_final):,} ({final_share(trainer.val_final, trainer.val):.1%} of them)"
        when = (f"every {cfg.eval_interval} {plural(cfg.eval_interval, 'step')}"
                if cfg.eval_interval else "never")
        log.say(f"validation: {len(trainer.val_tokens):,} {plural(len(trainer.val_tokens), 'token')} "
                f"in {n:,} {plural(n, 'window')}; evaluated "
                f"{when} on {what}, at the end on {final}")
    elif cfg.val_fraction > 0:
        log.warn(f"--val-fraction {cfg.val_fraction:g} holds out no whole window of this corpus: "
                 f"the run has no validation loss; raise it (or give 0 to say so)")
    if cfg.init_from and not trainer.resumed_from:
        cached = f" (from {trainer.init_path})" if trainer.init_path != cfg.init_from else ""
        log.say(f"initialised from {cfg.init_from}{cached} (AdamW state starts at zero)")
    elif cfg.tokenizer_file and not trainer.resumed_from:
        log.say(f"tokenizer: {cfg.tokenizer_file}")
    if trainer.resumed_from:
        changed = f"; changed: {', '.join(trainer.changed)}" if trainer.changed else ""
        log.say(f"resumed from {trainer.resumed_from} at step {trainer.state.step}{changed}")
    missing = trainer.tokenizer.unknown_tokens(cfg.prompt) if cfg.sample_every else []
    if missing:
        log.warn("--prompt tokens not in the vocabulary, read as <unk>: "
                 + ", ".join(repr(t) for t in missing[:8]) + (" ..." if len(missing) > 8 else ""))
    replaced = trainer.tokenizer.replaced_bytes(cfg.prompt) if cfg.sample_every else []
    if replaced:
        log.warn("--prompt holds bytes that are not UTF-8, read as U+FFFD: "
                 + ", ".join(repr(b) for b in replaced[:8]) + (" ..." if len(replaced) > 8 else ""))
    if cfg.warmup_steps > trainer.total_steps:     # lr_at's warm-up is at the peak at its last step
        log.warn(f"--warmup-steps {cfg.warmup_steps} covers the whole run of "
                 f"{trainer.total_steps} {plural(trainer.total_steps, 'step')}: the learning "
                 f"rate never reaches its peak")


def threaded_training_print_stats(stats: Iterable[Mapping[str, Any]], wall: float,
                                  log: RunLog) -> list[dict[str, Any]]:
    """Per-sphere statistics, as the C trainer's threaded_training_print_stats (with correct
    numbers): micro-batches, mean loss per counted token, share of the run spent working."""
    lines = ["sphere  group  micro-batches  mean loss  busy"]
    rows: list[dict[str, Any]] = []
    for s in stats:
        mean = s["loss_sum"] / s["tokens"] if s["tokens"] else float("nan")
        busy = s["busy_seconds"] / wall if wall > 0 else 0.0
        rows.append(dict(s, mean_loss=mean, busy_share=busy))
        lines.append(f"{s['sphere']:>6}  {s['symmetry_group']:>5}  {s['micro_batches']:>13}  "
                     f"{fmt_loss(mean):>9}  {busy:>4.0%}")
    log.say("\n".join(lines))
    return rows
