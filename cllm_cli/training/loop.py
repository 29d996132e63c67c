"""train(): corpus -> tokens -> spheres -> optimiser -> checkpoints.

Reads top to bottom, as nanoGPT's train.py: train() sets the run up (a Trainer, trainer.py:
the checkpoint directory and its lock, the tokenizer and token stream, the model and AdamW
state, or all of them from a checkpoint) and starts the spheres; train_loop() runs the epochs
and the final evaluation and checkpoint; threaded_train_epoch() is the step: the next global
batch, lr_at(step), one engine.train_step (micro-batches through the spheres, ordered
accumulation, optimiser), log, evaluate, sample, checkpoint. Python runs only between steps;
during a step the GIL is released and the main thread waits on the spheres, looking at signals
every 0.1 s.

Signals: SIGINT, SIGTERM and SIGHUP during set-up stop at once (nothing to save; temporary
files are removed); during training they let the current step finish, save it and exit with
128 + the signal's number.

On many processes (mpiexec), each rank calls train() with its World; the rank_* helpers put
the many-process pieces (training/ranks.py, cllm_cli.distributed) in place of the
single-process ones.
"""
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from cllm_cli import errors
from cllm_cli._engine import Engine, StepAborted
from cllm_cli.distributed import AgreedStop, DataParallelEngine, Solo, on_all_ranks, run_rank
from cllm_cli.errors import Interrupted, PlotError, TrainingError, UsageError
from cllm_cli.model import precision
from cllm_cli.progress import duration, fmt_loss, ppl_text
from cllm_cli.threads import MAX_THREADS, default_threads
from cllm_cli.training.config import TrainConfig
from cllm_cli.training.log import Log, SilentLog, check_metrics_output
from cllm_cli.training.plot import check_plot_output, plot_metrics, require_matplotlib
from cllm_cli.training.ranks import check_every_rank, open_trainer
from cllm_cli.training.report import (
    check_not_diverged,
    final_share,
    print_header,
    report_skips,
    report_val,
    sample_text,
    threaded_training_print_stats,
    val_bpb_text,
)
from cllm_cli.training.signals import StopSignals
from cllm_cli.training.tensorboard import check_tensorboard
from cllm_cli.training.trainer import Trainer


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


def train(data, engine_hook=None, world=None, engine_class=Engine, **options):
    """Trains on the files or directories in `data`; options are TrainConfig fields (with
    --resume, the ones given here are the ones the user asks to change).

    engine_class: the Engine the run uses, cllm_cli._engine's. Tests pass
    cllm_cli._engine_testing.Engine (the same engine with its test hooks, built by the
    Makefile's test targets only) and an engine_hook, which is called with the Engine before
    the first step:
    engine_hook=lambda e: _engine_testing.inject_nan(e, step_index, micro_batch) puts a NaN in
    a gradient (step_index 0-based).

    Returns a dict with the final step, train loss, validation loss, model path and sphere
    statistics. Raises DataError, CheckpointError or UsageError on bad input, TrainingError
    when training cannot go on, Interrupted on SIGINT/SIGTERM/SIGHUP (state saved).

    world: the MPI ranks of a many-process run (distributed.world.World), each
    calling train() with the same arguments; None or Solo: one process."""
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**options)
    world = world or Solo()
    if cfg.threads is None:
        cfg.threads = max(1, min(MAX_THREADS, default_threads() // world.local_size))

    def require_extras():        # what this host must offer: fail now, not after tokenizing
        precision.require(cfg.precision)
        precision.require_matmul(cfg.matmul)
        if cfg.plot:
            require_matplotlib()     # not only after a long run

    rank_check(world, require_extras)
    if cfg.plot:
        if not cfg.metrics_file:
            cfg.metrics_file = os.path.join(cfg.checkpoint_dir, "metrics.jsonl")

    def set_up():                # rank 0's, on many processes
        cfg.validate()           # the options' types and values, before any path is looked at
        if cfg.metrics_file:     # fail now, before a corpus or a model given for it is replaced
            check_metrics_output(cfg.metrics_file, cfg.checkpoint_dir)
        if cfg.plot:             # rank 0 draws it: fail now, not after the run
            check_plot_output(cfg.plot, cfg.metrics_file,
                              lambda text: UsageError(f"--plot {text}"), cfg.checkpoint_dir)
        if cfg.tensorboard:      # fail now, not after tokenizing
            check_tensorboard(cfg.tensorboard, cfg.checkpoint_dir, cfg.metrics_file)
        trainer = Trainer(data, cfg, given=options)
        if world.size > 1:       # set up: a signal now waits for the first step, as the others'
            local_stop.hold()
        return trainer

    # on many processes a signal stops rank 0's set-up at once (it removes what it wrote and
    # tells the others); the other ranks, which write nothing, hold it
    with StopSignals(deferred=not world.is_root) as local_stop, \
            open_rank_trainer(world, set_up, cfg.checkpoint_dir, cfg.threads) as trainer:
        stop = rank_stop(world, local_stop)
        stop.defer()             # from here on a signal ends the run after the current step

        def require_run_extras():    # a resumed run's precision may be the checkpoint's
            precision.require(trainer.cfg.precision)
            precision.require_matmul(trainer.engine_settings.matmul)

        rank_check(world, require_run_extras)
        with rank_log(world, trainer) as log, \
                trainer.engine_settings.engine(trainer, cfg.threads, engine_class) as engine:
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
        log.say("the run's steps are done but final_model.cllm is missing or of an earlier "
                "step: finishing it")
    run = RunProgress(t_start=time.perf_counter())
    try:
        while st.step < trainer.total_steps:
            epoch_loss = threaded_train_epoch(trainer, engine, log, stop, run)
            if st.batch_in_epoch >= trainer.steps_per_epoch:
                log.say(f"epoch {st.epoch + 1} done: mean train loss {fmt_loss(epoch_loss)}")
        save_step(trainer, run)
        trainer.save(final)              # before the final evaluation: a stop there loses nothing
        run.val_loss = evaluate(engine, trainer.val_final, stop)
        report_val(log, st.step, run.val_loss, trainer.bytes_per_token,
                   final_share(trainer.val_final, trainer.val))
    except (Interrupted, StepAborted):
        path = save_step(trainer, run)
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
    last_train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    saved_step: Optional[int] = None         # the step whose checkpoint this run last wrote
    saved_path: Optional[str] = None


def save_step(trainer, run):
    """The current step's checkpoint, written once: a stop or the run's end right after a
    periodic save does not write it again (on every rank alike: they save together).
    Returns its path."""
    if run.saved_step != trainer.state.step:
        run.saved_path = trainer.save()
        run.saved_step = trainer.state.step
    return run.saved_path


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
        tokens = windows.shape[0] * trainer.mcfg.seq_len
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
            text = sample_text(trainer.tuned_model(), trainer.tokenizer, cfg.prompt, cfg.sample_tokens,
                               cfg.seed + st.step)
            log.sample(st.step, text)
        if cfg.save_interval and st.step % cfg.save_interval == 0:
            save_step(trainer, run)
        if stop():
            raise Interrupted(stop.signum)
    loss_sum, tokens, _ = engine.epoch_stats()
    return loss_sum / tokens if tokens else None


def evaluate(engine, windows, stop):
    """Mean validation loss over `windows` (None without validation data)."""
    if len(windows) == 0:
        return None
    loss_sum, counted = engine.evaluate(windows, should_stop=stop)
    return loss_sum / counted if counted else None


# -- one process or many: the pieces a rank of a many-process run uses instead ----------------

# train_model's statuses beyond errors.STATUSES: a failure of the run itself
STATUSES: errors.Statuses = {PlotError: 1}


def exit_status(error):
    """The status train_model ends with after `error`: its own STATUSES first, then the
    statuses of every command (errors.STATUSES), as run_main tries them."""
    return errors.exit_status(error, {**STATUSES, **errors.STATUSES})


def open_rank_trainer(world, make_trainer, checkpoint_dir, threads):
    if world.size == 1:
        return make_trainer()
    return open_trainer(world, make_trainer, checkpoint_dir, threads, exit_status)


def rank_check(world, check):
    if world.size == 1:
        check()
    else:
        check_every_rank(world, check, exit_status)


def rank_stop(world, stop):
    return stop if world.size == 1 else AgreedStop(stop)


def rank_log(world, trainer):
    if not world.is_root:
        return SilentLog()
    return Log(trainer.cfg, append=bool(trainer.resumed_from), first_step=trainer.state.step)


def rank_engine(world, engine, trainer):
    if world.size == 1:
        return engine
    return DataParallelEngine(engine, world, trainer.trained, trainer.moments,
                              trainer.cfg.batch_size)


def run_on_ranks(world, body):
    return body() if world.size == 1 else run_rank(world, body, exit_status)
