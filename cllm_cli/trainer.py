"""train_model: corpus -> tokens -> spheres -> optimiser -> checkpoints (SPEC sections 2-6).

Reads top to bottom, as nanoGPT's train.py: train() sets the run up (Trainer: the checkpoint
directory and its lock, the tokenizer and token stream, the model and AdamW state, or all of
them from a checkpoint) and starts the spheres; train_loop() runs the epochs and the final
evaluation and checkpoint; threaded_train_epoch() is the step: the next global batch,
lr_at(step), one engine.train_step (micro-batches through the spheres, ordered accumulation,
optimiser), log, evaluate, sample, checkpoint. Python runs only between steps; during a step
the GIL is released and the main thread waits on the spheres, looking at signals every 0.1 s.

Signals: SIGINT, SIGTERM and SIGHUP during set-up stop at once (nothing to save; temporary
files are removed); during training they let the current step finish, save it and exit with
128 + the signal's number.
"""
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import _engine, precision
from .checkpoint import (CheckpointError, checkpoint_path, latest_checkpoint, list_checkpoints,
                         load_checkpoint, prune_checkpoints, save_checkpoint)
from .bpe import BPETokenizer
from .batches import epoch_order, eval_windows, gather_windows, num_windows, split_stream
from .cli import UsageError, check_regular, run_main
from .dataset import prepare_dataset
from .distributed import AllRanksStop, DistributedError, Solo, on_all_ranks, world as mpi_world
from .files import DataError, collect_files
from .precision import PrecisionError
from .tokenizers import Tokenizer, tokenizer_class
from .log import Log, duration, fmt_loss, fmt_ppl, perplexity, ppl_text
from .hf import ConversionError, load_pretrained
from .model import CLLMModel, shorten_positions
from .options import TrainConfig, parse_args
from .plot import PlotError, plot_metrics, require_matplotlib
from .rundir import DirectoryLock, remove_leftovers

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TrainingError(Exception):
    """Training cannot go on (exit status 1); the last good state has been saved."""


class Interrupted(Exception):
    """A stop signal: the last completed step has been saved (if training had started).
    The exit status is 128 + the signal's number."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.status = 128 + signum


def default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def lr_at(step, total_steps, cfg):
    """Linear warm-up to the peak over warmup_steps, then cosine to min_lr_ratio x peak at the
    last step (or flat with lr_schedule constant). step is 0-based. A resumed run whose length
    changed follows the schedule of the new length from its current step on."""
    lr = cfg.learning_rate
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return lr
    ratio = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps)))
    lr_min = cfg.min_lr_ratio * lr
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - lr_min)


@dataclass
class Pretrained:
    """What --init-from starts from."""
    config: object
    flat: np.ndarray
    tokenizer: Tokenizer


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint, restored by --resume."""
    step: int = 0              # optimiser steps attempted (the next step's index)
    epoch: int = 0
    batch_in_epoch: int = 0    # global batches of this epoch already used
    adam_t: int = 0            # AdamW updates applied (bias correction)
    bad_steps: int = 0         # consecutive skipped steps


class Trainer:
    """One training run's set-up and state: the locked checkpoint directory, the tokenizer and
    token stream, the model and its AdamW state, the position in the data. `given` names the
    options the user set explicitly (--resume applies or refuses them)."""

    layout = None              # "K ranks x N sphere(s) (...)" on many processes

    def __init__(self, data_paths, cfg, given=()):
        cfg.validate()
        self.cfg = cfg
        self.ckpt_dir = os.path.abspath(cfg.checkpoint_dir)
        self.state = TrainState()
        self.changed = []          # options a resumed run changed: "--name old -> new"
        self.resumed_from = None
        files = collect_files(data_paths, cfg.glob, exclude_dir=self.ckpt_dir)
        self._make_checkpoint_dir()
        self.lock = DirectoryLock(self.ckpt_dir)
        try:
            self.leftovers = remove_leftovers(self.ckpt_dir)
            tokens = self._start_or_resume(files, set(given))
            self.plan(tokens)
        except BaseException:
            self.close()
            raise

    def plan(self, tokens):
        """The splits, windows and run length, from the token stream and the settings."""
        cfg = self.cfg
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
        every = cfg.eval_interval * cfg.batch_size * T // 4
        self.val_periodic = spread_windows(self.val, every if cfg.eval_tokens is None
                                           else cfg.eval_tokens)
        self.val_final = spread_windows(self.val, cfg.final_eval_tokens)
        self._order = (None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Releases the checkpoint directory."""
        self.lock.close()

    def _make_checkpoint_dir(self):
        try:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            probe = os.path.join(self.ckpt_dir, f".write-test-{os.getpid()}.tmp")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise DataError(f"checkpoint directory {self.ckpt_dir} is not writable: {e.strerror or e}")

    def _start_or_resume(self, files, given):
        cfg = self.cfg
        resume_from = latest_checkpoint(self.ckpt_dir) if cfg.resume else None
        if cfg.resume is True and resume_from is None:
            raise UsageError(f"--resume: no checkpoint_step_<N>.cllm in {self.ckpt_dir}")
        if resume_from is not None:
            return self._restore(resume_from, files, given)
        self._clear_previous_run()
        tokenizer = start = None
        if cfg.init_from:
            start = self._pretrained(given)
            tokenizer = start.tokenizer
        elif cfg.tokenizer_file:
            tokenizer = self._tokenizer_file(given)
        self.tokenizer, tokens, self.data_info = prepare_dataset(
            files, self.ckpt_dir, cfg.tokenizer, cfg.vocab_size, cfg.encoding_errors,
            tokenizer=tokenizer)
        if start is None:
            self.model = CLLMModel(cfg.model_config(len(self.tokenizer)), cfg.seed)
        else:
            self.model = CLLMModel.from_flat(start.config, start.flat)
        self.adam_m = np.zeros_like(self.model.flat)
        self.adam_v = np.zeros_like(self.model.flat)
        return tokens

    def _take(self, name, value, given, source):
        """Sets option `name` to what `source` prescribes; refuses a different value given."""
        mine = getattr(self.cfg, name)
        if name == "ff_dim" and mine == 0:
            mine = 4 * self.cfg.embed_dim
        if name in given and mine != value:
            raise UsageError(f"--{name.replace('_', '-')} {mine} differs from {source}'s {value}"
                             f"; leave it out to take it from there")
        setattr(self.cfg, name, value)

    def _tokenizer_file(self, given):
        """The tokenizer.json of --tokenizer-file; the run takes its kind and size."""
        cfg, source = self.cfg, f"--tokenizer-file {self.cfg.tokenizer_file}"
        if "tokenizer" in given and cfg.tokenizer != "bpe":
            raise UsageError(f"--tokenizer {cfg.tokenizer} cannot read {source} (a tokenizer.json "
                             f"is --tokenizer bpe)")
        check_regular(cfg.tokenizer_file, "--tokenizer-file")
        tokenizer = BPETokenizer.read(cfg.tokenizer_file)
        self._take("tokenizer", "bpe", given, source)
        self._take("vocab_size", len(tokenizer), given, source)
        return tokenizer

    def _pretrained(self, given):
        """The model and tokenizer of --init-from; the run takes their shape and kind. A
        smaller --seq-len keeps the first rows of the position table."""
        cfg, source = self.cfg, f"--init-from {self.cfg.init_from}"
        try:
            mcfg, flat, tokenizer = load_pretrained(cfg.init_from)
        except ConversionError as e:
            raise DataError(f"--init-from: {e}") from None
        if "seq_len" in given and cfg.seq_len < mcfg.seq_len:
            mcfg, flat = shorten_positions(mcfg, flat, cfg.seq_len)
        for name in ("embed_dim", "num_layers", "num_heads", "ff_dim", "seq_len", "vocab_size"):
            self._take(name, getattr(mcfg, name), given, source)
        self._take("tokenizer", tokenizer.kind, given, source)
        cfg.validate()
        return Pretrained(mcfg, flat, tokenizer)

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

    def _restore(self, path, files, given):
        """Model, optimiser state, position and training settings from a checkpoint. Options
        given again are applied when they may change and refused when they may not."""
        ckpt = load_checkpoint(path)
        meta = ckpt["meta"]
        try:
            saved = dict(meta["train_config"])
            saved.setdefault("precision", "fp32")     # checkpoints from before --precision
            state = TrainState(**meta["state"])
            vocab_hash, dataset_key = meta["vocab_hash"], meta["dataset_key"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: checkpoint lacks training state ({e})") from None
        if ckpt["adam_m"] is None:
            raise CheckpointError(f"{path}: checkpoint holds no optimiser state; cannot resume")
        run, fixed = TrainConfig.run_fields(), TrainConfig.fixed_fields()
        stored = dataclasses.replace(self.cfg, **{k: v for k, v in saved.items()
                                                 if hasattr(self.cfg, k) and k not in run})
        try:
            stored.validate()
        except UsageError as e:
            raise CheckpointError(f"{path}: bad training setting in the checkpoint ({e})") from None
        for name, value in saved.items():
            if not hasattr(self.cfg, name) or name in run:
                continue
            mine = getattr(self.cfg, name)
            flag = "--" + name.replace("_", "-")
            if name in given and mine != value:
                if name in fixed:
                    raise UsageError(f"{flag} cannot change when resuming (the checkpoint has "
                                     f"{value}, given {mine}); start a new run to change it")
                self.changed.append(f"{flag} {value} -> {mine}")
                continue
            setattr(self.cfg, name, value)
        self.cfg.validate()
        self.state = state
        vocab_path = os.path.join(self.ckpt_dir, tokenizer_class(self.cfg.tokenizer).file_name)
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
    @property
    def bytes_per_token(self):
        """UTF-8 bytes of the corpus per token: turns a loss per token into bits per byte."""
        return self.data_info["bytes"] / self.data_info["tokens"]

    @property
    def final_path(self):
        return os.path.join(self.ckpt_dir, "final_model.cllm")

    def meta(self):
        return {"train_config": self.cfg.result_fields(), "state": dataclasses.asdict(self.state),
                "tokenizer": self.cfg.tokenizer, "vocab_hash": self.tokenizer.vocab_hash,
                "dataset_key": self.data_info["key"], "corpus_bytes": self.data_info["bytes"],
                "corpus_tokens": self.data_info["tokens"],
                "generator": {"kind": "numpy default_rng([seed, epoch]) permutation",
                              "seed": self.cfg.seed, "epoch": self.state.epoch,
                              "batch_in_epoch": self.state.batch_in_epoch}}

    def save(self, path=None, prune=True):
        """Writes a checkpoint (atomically) and prunes old step checkpoints; a failure to
        write is a runtime error."""
        path = path or checkpoint_path(self.ckpt_dir, self.state.step)
        try:
            save_checkpoint(path, self.mcfg, self.model.flat, self.adam_m, self.adam_v, self.meta())
            if prune and path != self.final_path:
                prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        return path

    def final_model_ok(self):
        """final_model.cllm exists and loads (a kill while writing it leaves none)."""
        try:
            load_checkpoint(self.final_path)
        except CheckpointError:
            return False
        return True


# -- the run ------------------------------------------------------------------------------

def train(data, engine_hook=None, world=None, **options):
    """Trains on the files or directories in `data`; options are TrainConfig fields (with
    --resume, the ones given here are the ones the user asks to change).

    engine_hook, if given, is called with the Engine before the first step (tests use it to
    inject a NaN: engine.inject_nan(step_index, micro_batch), step_index 0-based).

    Returns a dict with the final step, train loss, validation loss, model path and sphere
    statistics. Raises DataError, CheckpointError or UsageError on bad input, TrainingError
    when training cannot go on, Interrupted on SIGINT/SIGTERM/SIGHUP (state saved).

    world: the MPI ranks of a many-process run (distributed.World; SPEC section 8), each
    calling train() with the same arguments; None or Solo: one process."""
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**options)
    world = world or Solo()
    if cfg.threads is None:
        cfg.threads = max(1, default_threads() // world.local_size)
    precision.require(cfg.precision)   # fail now, not after tokenizing
    if cfg.plot:
        require_matplotlib()     # fail now, not after a long run
        if not cfg.metrics_file:
            cfg.metrics_file = os.path.join(cfg.checkpoint_dir, "metrics.jsonl")
    with StopSignals() as local_stop, \
            open_rank_trainer(world, lambda: Trainer(data, cfg, given=options),
                              cfg.checkpoint_dir) as trainer:
        stop = rank_stop(world, local_stop)
        stop.defer()             # from here on a signal ends the run after the current step
        precision.require(trainer.cfg.precision)     # a resumed run's may be the checkpoint's
        with rank_log(world, trainer) as log, \
                _engine.Engine(trainer.mcfg, trainer.model.flat, cfg.threads, cfg.micro_batch,
                               cfg.batch_size, cfg.lock_mode, cfg.debug_locks,
                               trainer.tokenizer.pad_id, cfg.dropout, cfg.seed,
                               trainer.cfg.precision) as engine:
            if engine_hook is not None:
                engine_hook(engine)
            result = train_loop(trainer, rank_engine(world, engine, trainer), log, stop)
    if cfg.plot and world.is_root:
        plot_metrics(cfg.metrics_file, cfg.plot)
        log.say(f"loss plot: {cfg.plot}", always=True)
    return result


def train_loop(trainer, engine, log, stop):
    """The run: epochs of steps, then the final evaluation and checkpoints and the sphere
    statistics. On a stop signal the last completed step is saved and Interrupted raised."""
    st = trainer.state
    print_header(trainer, log)
    final = trainer.final_path
    if st.step >= trainer.total_steps and trainer.final_model_ok():
        log.say(f"the run in {trainer.ckpt_dir} is already complete ({st.step} of "
                f"{trainer.total_steps} steps); nothing to do", always=True)
        return {"step": st.step, "train_loss": None, "val_loss": None, "final_model": final,
                "spheres": [], "seconds": 0.0}
    if st.step >= trainer.total_steps:
        log.say("the run's steps are done but final_model.cllm is missing: finishing it")
    run = RunProgress(t_start=time.perf_counter())
    try:
        while st.step < trainer.total_steps:
            epoch_loss = threaded_train_epoch(trainer, engine, log, stop, run)
            if st.batch_in_epoch >= trainer.steps_per_epoch:
                log.say(f"epoch {st.epoch + 1} done: mean train loss {fmt_loss(epoch_loss)}")
        run.val_loss = evaluate(engine, trainer.val_final, stop)
        report_val(log, st.step, run.val_loss, trainer.bytes_per_token)
        trainer.save()
        trainer.save(final)
    except (Interrupted, _engine.StepAborted):
        path = trainer.save()
        log.say(f"interrupted ({stop.name()}): saved step {st.step} to {path}; --resume "
                f"continues", always=True)
        raise on_all_ranks(Interrupted(stop.signum)) from None
    elapsed = time.perf_counter() - run.t_start
    stats = threaded_training_print_stats(engine.sphere_stats(), elapsed, log)
    log.say(f"done in {duration(elapsed)}: train loss {fmt_loss(run.last_train_loss)}"
            f"{ppl_text(run.last_train_loss)}, val loss {fmt_loss(run.val_loss)}{ppl_text(run.val_loss)}"
            f"{val_bpb_text(run.val_loss, trainer.bytes_per_token)}; "
            f"model saved to {final}", always=True)
    check_not_diverged(run, trainer.mcfg.vocab_size, final)
    return {"step": st.step, "train_loss": run.last_train_loss, "val_loss": run.val_loss,
            "final_model": final, "spheres": stats, "seconds": elapsed}


@dataclass
class RunProgress:
    """What the loop reports beyond the checkpointed state."""
    t_start: float
    tokens_seen: int = 0
    last_train_loss: float = None
    val_loss: float = None


def threaded_train_epoch(trainer, engine, log, stop, run):
    """The rest of the current epoch (or of the run), one global batch per step: the batch,
    lr_at(step), the engine's step (spheres, ordered accumulation, optimiser), log, evaluate,
    sample, checkpoint. Returns the epoch's mean training loss over the kept micro-batches."""
    cfg, st = trainer.cfg, trainer.state
    if st.batch_in_epoch >= trainer.steps_per_epoch:
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
    engine.begin_epoch()
    while st.step < trainer.total_steps and st.batch_in_epoch < trainer.steps_per_epoch:
        t0 = time.perf_counter()
        windows = trainer.batch(st.epoch, st.batch_in_epoch)
        lr = lr_at(st.step, trainer.total_steps, cfg)
        result = engine.train_step(windows, st.step, trainer.adam_m, trainer.adam_v,
                                   adamw=cfg.optimizer == "adamw", lr=lr,
                                   weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                                   t=st.adam_t + 1, should_stop=stop)
        report_skips(log, st.step + 1, result)
        st.step += 1
        st.batch_in_epoch += 1
        if result.applied:
            st.adam_t += 1
            st.bad_steps = 0
            run.last_train_loss = result.loss
        else:
            st.bad_steps += 1
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        run.tokens_seen += tokens
        tps = tokens / (time.perf_counter() - t0)
        log.record(step=st.step, epoch=st.epoch + 1, loss=result.loss, lr=lr,
                   grad_norm=result.grad_norm, tokens_per_s=tps, **getattr(engine, "exchange", {}))
        eta = (time.perf_counter() - run.t_start) / run.tokens_seen * \
            (trainer.total_steps - st.step) * cfg.batch_size * trainer.mcfg.seq_len
        log.progress(st.step, trainer.total_steps,
                     f"step {st.step}/{trainer.total_steps} | epoch {st.epoch + 1} | loss "
                     f"{fmt_loss(result.loss)} | lr {lr:.2e} | grad norm "
                     f"{fmt_loss(result.grad_norm)} | {tps:,.0f} tok/s | ETA {duration(eta)}")
        if st.bad_steps >= cfg.max_bad_steps:
            path = trainer.save(prune=False)     # keep the older, distinct states
            raise on_all_ranks(TrainingError(
                f"{st.bad_steps} steps in a row were skipped for non-finite values; stopped "
                f"with the last good state in {path}"))
        if cfg.eval_interval and st.step % cfg.eval_interval == 0 and st.step < trainer.total_steps:
            run.val_loss = evaluate(engine, trainer.val_periodic, stop)
            report_val(log, st.step, run.val_loss, trainer.bytes_per_token)
        if cfg.sample_every and st.step % cfg.sample_every == 0:
            text = sample_text(trainer.model, trainer.tokenizer, cfg.prompt, cfg.sample_tokens,
                               cfg.seed + st.step)
            log.say(f"sample: {text}")
        if cfg.save_interval and st.step % cfg.save_interval == 0:
            trainer.save()
        if stop():
            raise Interrupted(stop.signum)
    loss_sum, tokens, _ = engine.epoch_stats()
    return loss_sum / tokens if tokens else None


# -- what the loop calls ------------------------------------------------------------------

class StopSignals:
    """SIGINT, SIGTERM and SIGHUP. Until defer() a signal raises Interrupted at once (set-up:
    nothing to save, and the atomic writes remove their temporary files); after it, a signal
    only sets the flag that calling this object returns, and the loop stops after the current
    step. Installed only on the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self):
        self.signum = None
        self.deferred = False
        self.previous = {}

    def __call__(self):
        return self.signum is not None

    def name(self):
        return signal.Signals(self.signum).name if self.signum else "stopped"

    def defer(self):
        self.deferred = True
        if self.signum is not None:          # arrived between set-up and now
            raise Interrupted(self.signum)

    def _on_signal(self, signum, frame):
        self.signum = signum
        if not self.deferred:
            raise Interrupted(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def spread_windows(windows, tokens):
    """The validation windows an evaluation of about `tokens` tokens uses: that many windows'
    worth, evenly spread over the split (fixed, so every evaluation sees the same ones); all
    of them for 0 or more tokens than the split holds."""
    per_window = max(1, windows.shape[1] - 1)
    wanted = -(-tokens // per_window)
    if tokens == 0 or wanted >= len(windows):
        return windows
    return windows[np.linspace(0, len(windows) - 1, wanted).round().astype(np.int64)]


def evaluate(engine, windows, stop):
    """Mean validation loss over `windows` (None without validation data)."""
    if len(windows) == 0:
        return None
    loss_sum, counted = engine.evaluate(windows, should_stop=stop)
    return loss_sum / counted if counted else None


def report_skips(log, step, result):
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


def bits_per_byte(loss, bytes_per_token):
    """A loss in nats per token as bits per UTF-8 byte of text (compares tokenizers)."""
    return loss / math.log(2) / bytes_per_token


def report_val(log, step, val_loss, bytes_per_token):
    if val_loss is None:
        return
    bpb = bits_per_byte(val_loss, bytes_per_token)
    log.say(f"step {step} | val loss {fmt_loss(val_loss)} | val ppl {fmt_ppl(val_loss)} | val bpb "
            f"{bpb:.4f}")
    log.record(step=step, val_loss=val_loss, val_ppl=perplexity(val_loss), val_bpb=bpb)


def val_bpb_text(val_loss, bytes_per_token):
    if val_loss is None or not math.isfinite(val_loss):
        return ""
    return f", {bits_per_byte(val_loss, bytes_per_token):.4f} bits/byte"


def check_not_diverged(run, vocab_size, final):
    """A run whose final loss is worse than twice uniform guessing (2 ln V) diverged: the
    model is saved, but the run fails (status 1) so that scripts and schedulers notice."""
    limit = 2 * math.log(vocab_size)
    for what, loss in (("validation", run.val_loss), ("training", run.last_train_loss)):
        if loss is not None and not loss <= limit:
            raise on_all_ranks(TrainingError(
                f"training diverged: final {what} loss {fmt_loss(loss)} is above 2 ln(V) = "
                f"{limit:.2f} (saved to {final}); lower --learning-rate or raise --warmup-steps"))


def sample_text(model, tokenizer, prompt, max_tokens, seed):
    ids = list(tokenizer.encode(prompt)) if prompt else []
    out = list(model.generate(ids, max_tokens=max_tokens, temperature=0.8, top_k=40, seed=seed,
                              stop_ids=(tokenizer.eos_id,)))
    return tokenizer.decode(ids + out).strip()


def print_header(trainer, log):
    cfg, m, info = trainer.cfg, trainer.mcfg, trainer.data_info
    files, size = trainer.leftovers
    if files:
        log.say(f"removed {files} temporary file(s) of interrupted runs ({size / 1e6:.1f} MB) "
                f"from {trainer.ckpt_dir}")
    log.say(f"corpus: {info['files']} file(s), {info['bytes'] / 1e6:.2f} MB, {info['tokens']:,} tokens"
            f" ({'reused' if info['reused'] else 'tokenized'}: {trainer.ckpt_dir}/dataset.bin)")
    log.say(f"vocab: {m.vocab_size:,} {cfg.tokenizer} tokens | model: d {m.embed_dim}, "
            f"{m.num_layers} layers, {m.num_heads} heads, ff {m.ff_dim}, seq {m.seq_len}, "
            f"{trainer.model.num_params():,} parameters")
    log.say(f"training: {trainer.n_windows:,} windows, {trainer.steps_per_epoch} steps/epoch, "
            f"{trainer.total_steps} steps of {cfg.batch_size} x {m.seq_len} tokens, "
            f"{trainer.layout or f'{cfg.threads} sphere(s)'}, micro-batch {cfg.micro_batch}, "
            f"lock mode {cfg.lock_mode}" + (f", dropout {cfg.dropout:g}" if cfg.dropout else "")
            + (f", precision {cfg.precision}" if cfg.precision != "fp32" else ""))
    if len(trainer.val):
        T, n = trainer.mcfg.seq_len, len(trainer.val)
        periodic = len(trainer.val_periodic)
        what = "all of them" if periodic == n else f"{periodic:,} of them, evenly spread"
        final = "all" if len(trainer.val_final) == n else f"{len(trainer.val_final):,}"
        when = f"every {cfg.eval_interval} steps" if cfg.eval_interval else "never"
        log.say(f"validation: {len(trainer.val_tokens):,} tokens in {n:,} windows; evaluated "
                f"{when} on {what}, at the end on {final}")
    if cfg.init_from and not trainer.resumed_from:
        log.say(f"initialised from {cfg.init_from} (AdamW state starts at zero)")
    elif cfg.tokenizer_file and not trainer.resumed_from:
        log.say(f"tokenizer: {cfg.tokenizer_file}")
    if trainer.resumed_from:
        changed = f"; changed: {', '.join(trainer.changed)}" if trainer.changed else ""
        log.say(f"resumed from {trainer.resumed_from} at step {trainer.state.step}{changed}")
    missing = trainer.tokenizer.unknown_tokens(cfg.prompt) if cfg.sample_every else []
    if missing:
        log.warn("--prompt tokens not in the vocabulary, read as <unk>: "
                 + ", ".join(repr(t) for t in missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if cfg.warmup_steps >= trainer.total_steps:
        log.warn(f"--warmup-steps {cfg.warmup_steps} covers the whole run of "
                 f"{trainer.total_steps} steps: the learning rate never reaches its peak")


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


# -- many processes (SPEC section 8; the pieces are in parallel.py) -------------------------

STATUSES = {(UsageError, DataError, CheckpointError, DistributedError, PrecisionError): 2,
            (TrainingError, PlotError, _engine.ProductError): 1}


def exit_status(error):
    """The status train_model ends with after `error`."""
    if isinstance(error, (Interrupted, AllRanksStop)):
        return error.status
    if isinstance(error, KeyboardInterrupt):
        return 130
    return next((status for classes, status in STATUSES.items() if isinstance(error, classes)), 1)


def open_rank_trainer(world, make_trainer, checkpoint_dir):
    if world.size == 1:
        return make_trainer()
    from . import parallel
    return parallel.open_trainer(world, make_trainer, checkpoint_dir, exit_status)


def rank_stop(world, stop):
    if world.size == 1:
        return stop
    from . import parallel
    return parallel.AgreedStop(stop)


def rank_log(world, trainer):
    if world.is_root:
        return Log(trainer.cfg, append=bool(trainer.resumed_from))
    from . import parallel
    return parallel.SilentLog()


def rank_engine(world, engine, trainer):
    if world.size == 1:
        return engine
    from . import parallel
    return parallel.DataParallelEngine(engine, world, trainer.mcfg, trainer.cfg.batch_size)


def run_on_ranks(world, body):
    if world.size == 1:
        return body()
    from . import parallel
    return parallel.run_rank(world, body, exit_status)


def main(argv=None):
    data, options = parse_args(argv)
    stopped = {}

    def command():
        world = mpi_world()
        try:
            run_on_ranks(world, lambda: train(data, world=world, **options))
        except Interrupted as e:
            stopped["status"] = e.status
            print(f"train_model: interrupted by {signal.Signals(e.signum).name}", file=sys.stderr)
        except AllRanksStop as e:
            stopped["status"] = e.status      # rank 0 said why

    status = run_main("train_model", command, STATUSES)
    return stopped.get("status", status)


if __name__ == "__main__":
    sys.exit(main())
