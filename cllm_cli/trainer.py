"""train_model: corpus -> tokens -> spheres -> optimiser -> checkpoints (SPEC sections 2-6).

The loop reads top to bottom: lr_at(step), one global batch through the spheres, the
optimiser step, log, evaluate, sample, checkpoint. Python runs between steps; during a step
the GIL is released and the main thread only waits on the spheres (with a time-out, so a
Ctrl-C is seen within a fraction of a second).
"""
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import _engine
from .checkpoint import (CheckpointError, checkpoint_path, latest_checkpoint, list_checkpoints,
                         load_checkpoint, prune_checkpoints, save_checkpoint)
from .cli import HelpFormatter, Parser, UsageError, name_defaults, run_main
from .config import CLLMConfig
from .batches import epoch_order, eval_windows, gather_windows, num_windows, split_stream
from .dataset import prepare_dataset
from .files import DataError, collect_files
from .tokenizers import EOS, Tokenizer
from .log import Log, duration, fmt_loss, ppl_text
from .model import CLLMModel, engine_config, optimizer_chunks, tensor_at
from .plot import PlotError, plot_metrics, require_matplotlib

WAIT_SLICE = 0.1     # seconds the main thread waits on the spheres before checking signals


class TrainingError(Exception):
    """Training cannot go on (exit status 1); the last good state has been saved."""


class Interrupted(Exception):
    """Ctrl-C: the last good state has been saved (exit status 130)."""


def default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class TrainConfig:
    """Every option of train_model. Model and optimisation fields are stored in checkpoints
    and taken from there on --resume; run fields (threads, logging, saving) are not."""
    # model
    vocab_size: int = 10000
    embed_dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    ff_dim: int = 0
    seq_len: int = 128
    # data
    tokenizer: str = "word"
    glob: str = "*.txt"
    encoding_errors: str = "strict"
    val_fraction: float = 0.05
    # optimisation
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 32
    micro_batch: int = 4
    epochs: int = 1
    max_steps: int = 0
    seed: int = 1234
    max_bad_steps: int = 3
    # run (not part of the result)
    threads: int = None      # None: every core
    lock_mode: str = "shared"
    checkpoint_dir: str = "checkpoints"
    save_interval: int = 0
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False
    eval_interval: int = 100
    log_interval: int = 10
    metrics_file: str = ""
    sample_every: int = 0
    prompt: str = ""
    sample_tokens: int = 30
    quiet: bool = False
    debug_locks: bool = False
    plot: str = ""

    RUN_FIELDS = ("threads", "lock_mode", "checkpoint_dir", "save_interval", "keep_checkpoints",
                  "resume", "overwrite", "eval_interval", "log_interval", "metrics_file", "sample_every",
                  "prompt", "sample_tokens", "quiet", "debug_locks", "plot")

    def validate(self):
        positive = ("vocab_size", "embed_dim", "num_layers", "num_heads", "seq_len", "batch_size",
                    "micro_batch", "epochs", "max_bad_steps", "threads", "sample_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("ff_dim", "max_steps", "warmup_steps", "save_interval", "keep_checkpoints",
                     "eval_interval", "log_interval", "sample_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        for name in positive + ("ff_dim", "max_steps", "warmup_steps", "save_interval",
                                "keep_checkpoints", "eval_interval", "log_interval",
                                "sample_every", "seed"):
            if getattr(self, name) > 2**31 - 1:
                raise UsageError(f"--{name.replace('_', '-')} is too large: {getattr(self, name)}")
        if self.seed < 0:
            raise UsageError(f"--seed must not be negative, got {self.seed}")
        if self.micro_batch > self.batch_size:
            self.micro_batch = self.batch_size      # a micro-batch never exceeds the batch
        if self.vocab_size < 5:
            raise UsageError(f"--vocab-size must be at least 5 (4 special ids), got {self.vocab_size}")
        if self.embed_dim % self.num_heads:
            raise UsageError(f"--embed-dim {self.embed_dim} is not divisible by --num-heads {self.num_heads}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise UsageError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.weight_decay < 1 / self.learning_rate):
            raise UsageError(f"--weight-decay must be in [0, 1/lr), got {self.weight_decay}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise UsageError(f"--grad-clip must be >= 0 (0 disables), got {self.grad_clip}")
        if not 0 <= self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        choices = {"tokenizer": ("word", "char"), "encoding_errors": ("strict", "replace"),
                   "optimizer": ("adamw", "sgd"), "lr_schedule": ("cosine", "constant"),
                   "lock_mode": ("shared", "exclusive")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")

    def model_config(self, vocab_size):
        return CLLMConfig(vocab_size=vocab_size, embed_dim=self.embed_dim,
                          num_layers=self.num_layers, num_heads=self.num_heads,
                          ff_dim=self.ff_dim, seq_len=self.seq_len)

    def result_fields(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUN_FIELDS}


def lr_at(step, total_steps, cfg):
    """Linear warm-up to the peak over warmup_steps, then cosine to min_lr_ratio x peak at the
    last step (or flat with lr_schedule constant). step is 0-based."""
    lr = cfg.learning_rate
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return lr
    ratio = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps)))
    lr_min = cfg.min_lr_ratio * lr
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - lr_min)


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint, restored by --resume."""
    step: int = 0              # optimiser steps attempted (the next step's index)
    epoch: int = 0
    batch_in_epoch: int = 0    # global batches of this epoch already used
    adam_t: int = 0            # AdamW updates applied (bias correction)
    bad_steps: int = 0         # consecutive skipped steps


class Trainer:
    """One training run: owns the model, the optimiser state, the engine and the data."""

    def __init__(self, data_paths, cfg):
        cfg.validate()
        self.cfg = cfg
        self.ckpt_dir = os.path.abspath(cfg.checkpoint_dir)
        self.state = TrainState()
        files = collect_files(data_paths, cfg.glob, exclude_dir=self.ckpt_dir)
        self._make_checkpoint_dir()
        resume_from = latest_checkpoint(self.ckpt_dir) if cfg.resume else None
        if cfg.resume and resume_from is None:
            raise UsageError(f"--resume: no checkpoint_step_<N>.cllm in {self.ckpt_dir}")
        if not cfg.resume:
            self._clear_previous_run()
        if resume_from is not None:
            tokens = self._restore(resume_from, files)
        else:
            self.tokenizer, tokens, self.data_info = prepare_dataset(
                files, self.ckpt_dir, cfg.tokenizer, cfg.vocab_size, cfg.encoding_errors)
            self.model = CLLMModel(cfg.model_config(len(self.tokenizer)), cfg.seed)
            self.adam_m = np.zeros_like(self.model.flat)
            self.adam_v = np.zeros_like(self.model.flat)
        self.mcfg = self.model.config
        self.train_tokens, self.val_tokens = split_stream(tokens, cfg.val_fraction)
        T = self.mcfg.seq_len
        self.n_windows = num_windows(len(self.train_tokens), T)
        if self.n_windows == 0:
            raise DataError(f"corpus too short: {len(self.train_tokens)} training tokens, "
                            f"a window needs {T + 1} (lower --seq-len or add text)")
        self.steps_per_epoch = math.ceil(self.n_windows / cfg.batch_size)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.val = eval_windows(self.val_tokens, T)
        self._order = (None, None)

    def _make_checkpoint_dir(self):
        try:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            probe = os.path.join(self.ckpt_dir, f".write-test-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise DataError(f"checkpoint directory {self.ckpt_dir} is not writable: {e.strerror or e}")

    def _clear_previous_run(self):
        """A new run must not mix its checkpoints with an earlier run's: refuse, or with
        --overwrite delete the earlier run's model files."""
        previous = [p for _, p in list_checkpoints(self.ckpt_dir)]
        final = os.path.join(self.ckpt_dir, "final_model.cllm")
        if os.path.exists(final):
            previous.append(final)
        if previous and not self.cfg.overwrite:
            raise UsageError(f"{self.ckpt_dir} holds an earlier run ({os.path.basename(previous[-1])}"
                             f"); use --resume to continue it, --overwrite to start over, or "
                             f"another --checkpoint-dir")
        for path in previous:
            try:
                os.remove(path)
            except OSError as e:
                raise DataError(f"--overwrite: cannot remove {path}: {e.strerror or e}") from None

    def _restore(self, path, files):
        """Model, optimiser state, position and training settings from a checkpoint."""
        ckpt = load_checkpoint(path)
        meta = ckpt["meta"]
        try:
            saved = meta["train_config"]
            for name, value in saved.items():
                if hasattr(self.cfg, name) and name not in TrainConfig.RUN_FIELDS:
                    setattr(self.cfg, name, value)
            self.state = TrainState(**meta["state"])
            vocab_hash, dataset_key = meta["vocab_hash"], meta["dataset_key"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: checkpoint lacks training state ({e})")
        if ckpt["adam_m"] is None:
            raise CheckpointError(f"{path}: checkpoint holds no optimiser state; cannot resume")
        vocab_path = os.path.join(self.ckpt_dir, "vocab.txt")
        self.tokenizer = Tokenizer.load(vocab_path, self.cfg.tokenizer)
        if self.tokenizer.vocab_hash != vocab_hash:
            raise CheckpointError(f"{vocab_path} does not match the checkpoint's vocabulary")
        self.tokenizer, tokens, self.data_info = prepare_dataset(
            files, self.ckpt_dir, self.cfg.tokenizer, self.cfg.vocab_size,
            self.cfg.encoding_errors, tokenizer=self.tokenizer)
        if self.data_info["key"] != dataset_key:
            raise DataError("the corpus differs from the one the checkpoint was trained on; "
                            "resume with the same files or start a new --checkpoint-dir")
        self.model = CLLMModel.from_flat(ckpt["config"], ckpt["params"])
        self.adam_m, self.adam_v = ckpt["adam_m"], ckpt["adam_v"]
        self.resumed_from = path
        return tokens

    # -- data ------------------------------------------------------------------------------
    def batch(self, epoch, index):
        """The windows of global batch `index` of `epoch` (the order is seeded by both)."""
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, self.n_windows))
        ids = self._order[1][index * self.cfg.batch_size:(index + 1) * self.cfg.batch_size]
        return gather_windows(self.train_tokens, ids, self.mcfg.seq_len)

    # -- checkpoints -------------------------------------------------------------------------
    def meta(self):
        return {"train_config": self.cfg.result_fields(), "state": dataclasses.asdict(self.state),
                "tokenizer": self.cfg.tokenizer, "vocab_hash": self.tokenizer.vocab_hash,
                "dataset_key": self.data_info["key"],
                "generator": {"kind": "numpy default_rng([seed, epoch]) permutation",
                              "seed": self.cfg.seed, "epoch": self.state.epoch,
                              "batch_in_epoch": self.state.batch_in_epoch}}

    def save(self, path=None):
        """Writes a checkpoint (atomically); a failure to write is a runtime error."""
        path = path or checkpoint_path(self.ckpt_dir, self.state.step)
        try:
            save_checkpoint(path, self.mcfg, self.model.flat, self.adam_m, self.adam_v, self.meta())
            if path != os.path.join(self.ckpt_dir, "final_model.cllm"):
                prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        return path


def run_work(engine, windows, train, step, interrupted):
    """Runs windows through the spheres; returns the per-micro-batch results. On Ctrl-C the
    spheres finish what they hold, and Interrupted is raised (nothing is applied)."""
    engine.start(windows, train, step)
    while not engine.wait(WAIT_SLICE):
        if interrupted():
            engine.abort()
    if interrupted():
        raise Interrupted()
    return engine.results()


def evaluate(engine, trainer, interrupted):
    """Mean validation loss over every validation window (None without validation data)."""
    val = trainer.val
    if len(val) == 0:
        return None
    loss_sum, counted = 0.0, 0
    for start in range(0, len(val), trainer.cfg.batch_size):
        for loss, n, _, valid, _ in run_work(engine, val[start:start + trainer.cfg.batch_size],
                                              False, -1, interrupted):
            loss_sum += loss
            counted += n
    return loss_sum / counted if counted else None


def train(data, engine_hook=None, **options):
    """Trains on the files or directories in `data`; options are TrainConfig fields.

    engine_hook, if given, is called with the Engine before the first step (tests use it to
    inject a NaN: engine.inject_nan(step_index, micro_batch), step_index 0-based).

    Returns a dict with the final step, train loss, validation loss, model path and sphere
    statistics. Raises DataError, CheckpointError or UsageError on bad input, TrainingError
    when too many steps in a row are skipped, Interrupted on Ctrl-C (state saved)."""
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**options)
    if cfg.threads is None:
        cfg.threads = default_threads()
    if cfg.plot:
        require_matplotlib()     # fail now, not after a long run
        if not cfg.metrics_file:
            cfg.metrics_file = os.path.join(cfg.checkpoint_dir, "metrics.jsonl")
    trainer = Trainer(data, cfg)
    flag = {"interrupted": False}

    def on_sigint(signum, frame):
        flag["interrupted"] = True

    in_main = _is_main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    log = engine = None
    try:
        log = Log(cfg, append=cfg.resume)
        engine = _engine.Engine(engine_config(trainer.mcfg), trainer.model.flat, cfg.threads,
                                cfg.micro_batch, cfg.batch_size, cfg.lock_mode,
                                cfg.debug_locks, optimizer_chunks(trainer.mcfg))
        if engine_hook is not None:
            engine_hook(engine)
        result = _train_loop(trainer, engine, log, lambda: flag["interrupted"])
    finally:
        if engine is not None:
            engine.close()
        if log is not None:
            log.close()
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if cfg.plot:
        plot_metrics(cfg.metrics_file, cfg.plot)
        log.say(f"loss plot: {cfg.plot}", always=True)
    return result


def _is_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def _header(trainer, log):
    cfg, m, info = trainer.cfg, trainer.mcfg, trainer.data_info
    log.say(f"corpus: {info['files']} file(s), {info['bytes'] / 1e6:.2f} MB, {info['tokens']:,} tokens"
            f" ({'reused' if info['reused'] else 'tokenized'}: {trainer.ckpt_dir}/dataset.bin)")
    log.say(f"vocab: {m.vocab_size:,} {cfg.tokenizer} tokens | model: d {m.embed_dim}, "
            f"{m.num_layers} layers, {m.num_heads} heads, ff {m.ff_dim}, seq {m.seq_len}, "
            f"{trainer.model.num_params():,} parameters")
    log.say(f"training: {trainer.n_windows:,} windows, {trainer.steps_per_epoch} steps/epoch, "
            f"{trainer.total_steps} steps of {cfg.batch_size} x {m.seq_len} tokens, "
            f"{cfg.threads} sphere(s), micro-batch {cfg.micro_batch}, lock mode {cfg.lock_mode}")
    if getattr(trainer, "resumed_from", None):
        log.say(f"resumed from {trainer.resumed_from} at step {trainer.state.step}")
    missing = trainer.tokenizer.unknown_tokens(cfg.prompt) if cfg.sample_every else []
    if missing:
        log.warn("--prompt tokens not in the vocabulary, read as <unk>: "
                 + ", ".join(repr(t) for t in missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if cfg.warmup_steps >= trainer.total_steps:
        log.warn(f"--warmup-steps {cfg.warmup_steps} covers the whole run of "
                 f"{trainer.total_steps} steps: the learning rate never reaches its peak")


@dataclass
class RunProgress:
    """What the loop reports beyond the checkpointed state."""
    t_start: float
    tokens_seen: int = 0
    last_train_loss: float = None
    val_loss: float = None


def threaded_train_epoch(trainer, engine, log, interrupted, run):
    """Runs the rest of the current epoch (or of the run): for each global batch, the spheres'
    pass, the optimiser step, logging, evaluation, samples and checkpoints. Returns the
    epoch's mean training loss over the micro-batches that were kept."""
    cfg, st = trainer.cfg, trainer.state
    if st.batch_in_epoch >= trainer.steps_per_epoch:
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
    engine.begin_epoch()
    while st.step < trainer.total_steps and st.batch_in_epoch < trainer.steps_per_epoch:
        t0 = time.perf_counter()
        windows = trainer.batch(st.epoch, st.batch_in_epoch)
        results = run_work(engine, windows, True, st.step, interrupted)
        lr = lr_at(st.step, trainer.total_steps, cfg)
        loss, norm, applied = _apply(trainer, engine, results, lr, log)
        st.step += 1
        st.batch_in_epoch += 1
        if applied:
            st.adam_t += 1
            st.bad_steps = 0
            run.last_train_loss = loss
        else:
            st.bad_steps += 1
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        run.tokens_seen += tokens
        tps = tokens / (time.perf_counter() - t0)
        log.record(step=st.step, epoch=st.epoch + 1, loss=loss, lr=lr, grad_norm=norm,
                   tokens_per_s=tps)
        eta = (time.perf_counter() - run.t_start) / run.tokens_seen * \
            (trainer.total_steps - st.step) * cfg.batch_size * trainer.mcfg.seq_len
        log.progress(st.step, trainer.total_steps,
                     f"step {st.step}/{trainer.total_steps} | epoch {st.epoch + 1} | loss "
                     f"{fmt_loss(loss)} | lr {lr:.2e} | grad norm {fmt_loss(norm)} | "
                     f"{tps:,.0f} tok/s | ETA {duration(eta)}")
        if st.bad_steps >= cfg.max_bad_steps:
            path = trainer.save()
            raise TrainingError(f"{st.bad_steps} steps in a row were skipped for non-finite "
                                f"values; stopped with the last good state in {path}")
        if cfg.eval_interval and st.step % cfg.eval_interval == 0 and st.step < trainer.total_steps:
            run.val_loss = evaluate(engine, trainer, interrupted)
            _report_val(log, st.step, run.val_loss)
        if cfg.sample_every and st.step % cfg.sample_every == 0:
            text = sample_text(trainer.model, trainer.tokenizer, cfg.prompt, cfg.sample_tokens,
                               cfg.seed + st.step)
            log.say(f"sample: {text}")
        if cfg.save_interval and st.step % cfg.save_interval == 0:
            trainer.save()
        if interrupted():
            raise Interrupted()
    loss_sum, tokens, _ = engine.epoch_stats()
    return loss_sum / tokens if tokens else None


def _train_loop(trainer, engine, log, interrupted):
    st = trainer.state
    _header(trainer, log)
    final = os.path.join(trainer.ckpt_dir, "final_model.cllm")
    if st.step >= trainer.total_steps:     # --resume of a finished run: nothing to redo
        log.say(f"the run in {trainer.ckpt_dir} is already complete ({st.step} of "
                f"{trainer.total_steps} steps); nothing to do", always=True)
        return {"step": st.step, "train_loss": None, "val_loss": None, "final_model": final,
                "spheres": [], "seconds": 0.0}
    run = RunProgress(t_start=time.perf_counter())
    try:
        while st.step < trainer.total_steps:
            epoch_loss = threaded_train_epoch(trainer, engine, log, interrupted, run)
            if st.batch_in_epoch >= trainer.steps_per_epoch:
                log.say(f"epoch {st.epoch + 1} done: mean train loss {fmt_loss(epoch_loss)}")
        run.val_loss = evaluate(engine, trainer, interrupted)
        _report_val(log, st.step, run.val_loss)
        trainer.save()
        trainer.save(final)
    except Interrupted:
        path = trainer.save()
        log.say(f"interrupted: saved step {st.step} to {path}; --resume continues", always=True)
        raise
    elapsed = time.perf_counter() - run.t_start
    stats = threaded_training_print_stats(engine.sphere_stats(), elapsed, log)
    log.say(f"done in {duration(elapsed)}: train loss {fmt_loss(run.last_train_loss)}"
            f"{ppl_text(run.last_train_loss)}, val loss {fmt_loss(run.val_loss)}{ppl_text(run.val_loss)}; "
            f"model saved to {final}", always=True)
    return {"step": st.step, "train_loss": run.last_train_loss, "val_loss": run.val_loss,
            "final_model": final, "spheres": stats, "seconds": elapsed}


def _apply(trainer, engine, results, lr, log):
    """Sums the micro-batch results in order, reports bad ones, runs the optimiser step.
    Returns (loss, grad_norm, applied)."""
    cfg, st = trainer.cfg, trainer.state
    loss_sum, counted = 0.0, 0
    for index, (loss, n, sphere, valid, bad_index) in enumerate(results):
        if valid:
            loss_sum += loss
            counted += n
        else:
            where = [] if math.isfinite(loss) else ["the loss"]
            if bad_index >= 0:
                where.append(f"the gradient of {tensor_at(trainer.mcfg, bad_index)} "
                             f"(first bad tensor)")
            where = " and ".join(where)
            log.warn(f"step {st.step + 1}: micro-batch {index} (sphere {sphere}) has a "
                     f"non-finite value in {where}; left out of the step")
    if counted == 0:
        log.warn(f"step {st.step + 1}: no valid micro-batch; step skipped")
        return float("nan"), float("nan"), False
    norm, applied = engine.optimizer_step(
        counted, trainer.adam_m, trainer.adam_v,
        adamw=cfg.optimizer == "adamw", lr=lr, weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip, t=st.adam_t + 1)
    if not applied:
        log.warn(f"step {st.step + 1}: the summed gradient is not finite; step skipped")
    return loss_sum / counted, norm, applied


def _report_val(log, step, val_loss):
    if val_loss is None:
        return
    log.say(f"step {step} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 700)):.2f}")
    log.record(step=step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 700)))


def sample_text(model, tokenizer, prompt, max_tokens, seed):
    ids = list(tokenizer.encode(prompt)) if prompt else []
    out = list(model.generate(ids, max_tokens=max_tokens, temperature=0.8, top_k=40, seed=seed,
                              stop_ids=(EOS,)))
    return tokenizer.decode(ids + out).strip()


def threaded_training_print_stats(stats, wall, log):
    """Per-sphere statistics, as the original's threaded_training_print_stats (with correct
    numbers): micro-batches, mean loss per counted token, share of the run spent working."""
    lines = ["sphere  group  micro-batches  mean loss  busy"]
    rows = []
    for s in stats:
        mean = s["loss_sum"] / s["tokens"] if s["tokens"] else float("nan")
        busy = s["busy_seconds"] / wall if wall > 0 else 0.0
        rows.append(dict(s, mean_loss=mean, busy_share=busy))
        lines.append(f"{s['sphere']:>6}  {s['symmetry_group']:>5}  {s['micro_batches']:>13}  "
                     f"{fmt_loss(mean):>9}  {busy:>4.0%}")
    log.say("\n".join(lines))
    return rows


def build_parser():
    d = TrainConfig()
    p = Parser(
        prog="train_model",
        description="Train a small causal language model (CLLM) on plain-text files, on every "
                    "CPU core. --threads changes speed, never results.",
        formatter_class=HelpFormatter)
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="text files, or directories (every file matching --glob below them)")
    g = p.add_argument_group("data")
    g.add_argument("--tokenizer", choices=("word", "char"), default=d.tokenizer)
    g.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="largest vocabulary, the 4 special ids included")
    g.add_argument("--glob", default=d.glob, help="file pattern inside directories")
    g.add_argument("--encoding-errors", choices=("strict", "replace"), default=d.encoding_errors,
                   help="refuse non-UTF-8 or binary files, or replace bad bytes with U+FFFD")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the token stream held out for validation")
    g = p.add_argument_group("model")
    g.add_argument("--embed-dim", type=int, default=d.embed_dim)
    g.add_argument("--num-layers", type=int, default=d.num_layers)
    g.add_argument("--num-heads", type=int, default=d.num_heads)
    g.add_argument("--ff-dim", type=int, default=d.ff_dim, help="0 means 4 x embed-dim")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="context length T")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer)
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=("cosine", "constant"), default=d.lr_schedule)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="final learning rate as a share of the peak (cosine)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="decoupled weight decay on 2-D tensors")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="global gradient norm limit (0 disables)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per optimiser step")
    g.add_argument("--micro-batch", type=int, default=d.micro_batch,
                   help="windows per unit of sphere work")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="stop after this many steps (0: run --epochs)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                   help="stop after this many consecutive steps skipped for NaN/Inf")
    g = p.add_argument_group("threads")
    g.add_argument("--threads", type=int, default=None,
                   help="worker spheres (default: all cores)")
    g.add_argument("--lock-mode", choices=("shared", "exclusive"), default=d.lock_mode,
                   help="shared: passes run in parallel; exclusive: one pass at a time, "
                        "as the original's fix")
    g.add_argument("--debug-locks", action="store_true",
                   help="abort on a lock taken out of the order model_lock -> gradient_lock")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", default=d.checkpoint_dir)
    g.add_argument("--save-interval", type=int, default=d.save_interval,
                   help="save checkpoint_step_<N>.cllm every N steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="step checkpoints to keep (0 keeps all)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir (model and "
                        "optimisation settings come from the checkpoint)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --checkpoint-dir that holds an earlier run's "
                        "checkpoints (they are deleted)")
    g = p.add_argument_group("output")
    g.add_argument("--log-interval", type=int, default=d.log_interval, help="steps between log lines")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval,
                   help="steps between validation runs (0: only at the end)")
    g.add_argument("--metrics-file", default=d.metrics_file,
                   help="write one JSON object per step and per evaluation to this file")
    g.add_argument("--sample-every", type=int, default=d.sample_every,
                   help="print a sample every N steps (0: never)")
    g.add_argument("--prompt", default=d.prompt, help="start of the samples")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens)
    g.add_argument("--quiet", action="store_true", help="print only errors and the summary")
    g.add_argument("--plot", metavar="PNG", default=d.plot,
                   help="after training, draw training and validation loss into this PNG "
                        "(needs matplotlib; uses --metrics-file, by default "
                        "CHECKPOINT_DIR/metrics.jsonl)")
    return name_defaults(p)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    options = vars(args)
    data = options.pop("data")
    return run_main("train_model", lambda: train(data, **options),
                    {(UsageError, DataError, CheckpointError): 2, (TrainingError, PlotError): 1},
                    interrupts=(Interrupted,),
                    on_interrupt=lambda: print("train_model: interrupted", file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
