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
from .cli import UsageError, run_main
from .data import (EOS, DataError, Tokenizer, collect_files, epoch_order, eval_windows,
                   gather_windows, num_windows, prepare_dataset, split_stream)
from .log import Log, duration, fmt_loss, ppl_text
from .options import TrainConfig, parse_args
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
                if hasattr(self.cfg, name) and name not in TrainConfig.run_fields():
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


def main(argv=None):
    data, options = parse_args(argv)
    return run_main("train_model", lambda: train(data, **options),
                    {(UsageError, DataError, CheckpointError): 2, (TrainingError, PlotError): 1},
                    interrupts=(Interrupted,),
                    on_interrupt=lambda: print("train_model: interrupted", file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
