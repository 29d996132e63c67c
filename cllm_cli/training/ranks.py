"""Setting a run up on many processes: rank 0 alone, the others following.

open_trainer: rank 0 sets the run up alone (directory lock, tokenizing, resuming) and
sends what it decided (world.from_root: the others wait without spinning a core and stop the
job if rank 0 dies meanwhile); every other rank becomes a FollowerTrainer that reads the
vocabulary and memory-maps dataset.bin from the same checkpoint directory, checks that it sees
rank 0's dataset key, vocabulary and model config, and receives the weights from rank 0, and
its share of AdamW's state (distributed.MomentShares: each rank holds m and v of its share of
the trained values only; rank 0 writes the whole of them into checkpoints, every rank taking
part in each save). A rank that sees something else stops every rank (one line naming it).
"""
import hashlib
import os
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np

from cllm_cli._engine import num_parameters, optimizer_chunks
from cllm_cli.api import CLLMModel
from cllm_cli.corpus import INSTRUCTIONS_FILE, dataset_header, load_dataset, load_instructions
from cllm_cli.distributed import MomentShares, on_all_ranks
from cllm_cli.errors import AllRanksStop, CheckpointError, DataError
from cllm_cli.formats import check_vocabulary, checkpoint_path
from cllm_cli.model import MODEL_FIELDS, CLLMConfig, family_of, num_adapter_parameters
from cllm_cli.progress import plural
from cllm_cli.tokenizers import Tokenizer, tokenizer_class
from cllm_cli.training.config import TrainConfig
from cllm_cli.training.engine_settings import EngineSettings
from cllm_cli.training.trainer import Trainer, TrainState


class RankRefused(DataError):
    """A rank other than 0 does not see the run rank 0 set up (exit status 2)."""


def open_trainer(world, make_trainer, checkpoint_dir, threads, exit_status):
    """The run's Trainer on this rank (see the module docstring); checkpoint_dir, threads:
    this rank's --checkpoint-dir and spheres. exit_status(exception) gives the status every
    rank ends with when rank 0's set-up fails."""
    if world.size == 1:
        return make_trainer()
    if world.is_root:
        try:
            trainer = make_trainer()
        except BaseException as e:
            world.from_root(exit_status(e))
            raise on_all_ranks(e)  # noqa: B904 (the error itself, marked, goes on)
        world.from_root(follower_plan(trainer))
        refusals = world.allgather(None)
    else:
        plan = world.from_root(None)        # sleeps between polls; stops if rank 0 dies
        if not isinstance(plan, FollowerPlan):
            raise on_all_ranks(AllRanksStop(plan))
        trainer, refusal = None, None
        try:
            trainer = FollowerTrainer(plan, checkpoint_dir)
        except (DataError, CheckpointError, OSError, ValueError) as e:
            refusal = str(e)
        refusals = world.allgather(refusal)
    refused = [(rank, why) for rank, why in enumerate(refusals) if why]
    if refused:
        if world.is_root:
            trainer.close()
            rank, why = refused[0]
            raise on_all_ranks(RankRefused(f"rank {rank} of {world.size}: {why}"))
        raise on_all_ranks(AllRanksStop(2))
    world.share(trainer.model.flat)
    if trainer.lora is not None:
        world.share(trainer.trained)
    chunks = optimizer_chunks(trainer.mcfg, trainer.lora and trainer.lora.engine_args)
    trainer.moments = MomentShares.scatter(world, chunks, trainer.adam_m, trainer.adam_v)
    trainer.adam_m, trainer.adam_v = trainer.moments.m, trainer.moments.v   # the whole dropped
    trainer.layout = describe_layout(world, threads)
    return trainer


def check_every_rank(world, check, exit_status):
    """check() on every rank: what each host must offer (bf16 instructions, an installed
    package). Failing on every rank, rank 0 raises its error (one line, as one process
    says it) and the others stop with its status; failing on some ranks only, each of those
    raises its own (a line naming the rank, which ends the job) and the others stop."""
    try:
        check()
        failure = None
    except Exception as e:
        failure = e
    statuses = world.allgather(None if failure is None else exit_status(failure))
    if failure is not None:
        raise on_all_ranks(failure) if None not in statuses else failure
    failed = [status for status in statuses if status is not None]
    if failed:
        raise on_all_ranks(AllRanksStop(failed[0]))


@dataclass(frozen=True)
class FollowerPlan:
    """What rank 0 decided in set-up that the other ranks take as it is: the run's resolved
    settings and the engine's, where the run is, and what each rank checks it sees too (the
    dataset key, the vocabulary, the model config)."""
    cfg: TrainConfig
    engine_settings: EngineSettings
    state: TrainState
    changed: list
    resumed_from: Optional[str]
    data_info: dict
    model_config: CLLMConfig
    vocab_hash: str
    stream_key: str
    final_model_ok: bool


def follower_plan(trainer):
    """The FollowerPlan of rank 0's trainer."""
    return FollowerPlan(cfg=trainer.cfg, engine_settings=trainer.engine_settings,
                        state=trainer.state, changed=trainer.changed,
                        resumed_from=trainer.resumed_from, data_info=trainer.data_info,
                        model_config=trainer.mcfg, vocab_hash=trainer.tokenizer.vocab_hash,
                        stream_key=data_key(trainer.ckpt_dir, trainer.instruct),
                        final_model_ok=trainer.final_model_ok())


def data_key(ckpt_dir, instruct):
    """The key of the data every rank trains on: dataset.bin's stream key, or the sha256 of
    the records' labelled windows."""
    if instruct:
        windows = load_instructions(os.path.join(ckpt_dir, INSTRUCTIONS_FILE))
        return hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest()
    return dataset_header(os.path.join(ckpt_dir, "dataset.bin"))["key"]


def describe_layout(world, threads):
    """'K ranks x N spheres' ('x 2/1 spheres' when the ranks' own --threads differ, in rank
    order) and where each rank runs (the launcher names a rank that dies by its pid);
    threads: this rank's spheres."""
    ranks = world.allgather((threads, f"rank {world.rank} pid {os.getpid()} on "
                                      f"{socket.gethostname()}"))
    counts = [n for n, _ in ranks]
    spheres = f"{threads} {plural(threads, 'sphere')}" if len(set(counts)) == 1 \
        else f"{'/'.join(map(str, counts))} spheres"
    return f"{world.size} ranks x {spheres} ({', '.join(where for _, where in ranks)})"


class FollowerTrainer(Trainer):
    """A Trainer's data and state on a rank other than 0: read, never written."""

    def __init__(self, plan, own_checkpoint_dir):
        self.cfg, self.state = plan.cfg, plan.state
        self.engine_settings = plan.engine_settings
        self.ckpt_dir = os.path.abspath(own_checkpoint_dir)     # the same one, when shared
        self.cfg.checkpoint_dir = own_checkpoint_dir
        self.changed, self.resumed_from = plan.changed, plan.resumed_from
        self.data_info, self.leftovers = plan.data_info, (0, 0)
        self._final_model_ok = plan.final_model_ok
        hint = f" (is {self.ckpt_dir} on a filesystem every rank shares?)"
        vocab_path = os.path.join(self.ckpt_dir, tokenizer_class(self.cfg.tokenizer).file_name)
        self.instruct = plan.engine_settings.labelled
        bin_path = os.path.join(self.ckpt_dir, INSTRUCTIONS_FILE if self.instruct
                                else "dataset.bin")
        if not os.path.isfile(bin_path) or not os.path.isfile(vocab_path):
            raise DataError(f"{bin_path} or {vocab_path} is missing here{hint}")
        if data_key(self.ckpt_dir, self.instruct) != plan.stream_key:
            raise DataError(f"{bin_path} has another dataset key than rank 0's{hint}")
        self.tokenizer = Tokenizer.load(vocab_path, self.cfg.tokenizer)
        try:
            check_vocabulary(self.tokenizer.vocab_hash, vocab_path, plan.vocab_hash,
                             "rank 0's run")
        except CheckpointError as e:
            raise DataError(f"{e}{hint}") from None
        tokens = load_instructions(bin_path) if self.instruct else load_dataset(bin_path)
        # the options' sizes must be the model's; what only a model file holds (a Llama
        # form's norm epsilon, q/k/v biases) comes with rank 0's config
        config = self.cfg.model_config(len(self.tokenizer))
        if any(getattr(config, f) != getattr(plan.model_config, f) for f in MODEL_FIELDS) \
                or config.family != plan.model_config.family:
            raise DataError(f"model config {config} differs from rank 0's {plan.model_config}")
        config = plan.model_config
        self.model = CLLMModel.from_flat(config, np.zeros(num_parameters(config),
                                                          dtype=np.float32))
        self.lora = self.cfg.lora_spec(family_of(config))
        if self.lora is not None:
            self.adapters = np.zeros(num_adapter_parameters(config, self.lora), dtype=np.float32)
        self.adam_m = self.adam_v = None        # this rank's share comes from rank 0
        self.plan(tokens)

    def close(self):
        pass

    def save(self, path=None, prune=True):
        """Rank 0 writes, reading this rank's share of AdamW's state; the path it writes to."""
        self.moments.serve()
        return path or checkpoint_path(self.ckpt_dir, self.state.step)

    def final_model_ok(self):
        return self._final_model_ok
