"""EngineSettings: what the engine of a run is built with, apart from its sphere count.

Set-up resolves them once from the run's settings (on --resume the checkpoint's values where the
command line leaves them out; Trainer.engine_settings). On many processes rank 0 sends them to
every other rank with the rest of its plan (training/ranks.py), so that every rank builds its
engine from the same record and only the sphere count (--threads, which changes speed and never
results) is its own: no rank reads these settings from its own command line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cllm_cli._engine import Engine
from cllm_cli.training.config import TrainConfig


@dataclass(frozen=True)
class EngineSettings:
    micro_batch: int
    batch_size: int
    lock_mode: str
    debug_locks: bool
    pad_id: int
    dropout: float
    seed: int
    precision: str
    labelled: bool = False        # windows carry labels (instruction data)
    matmul: str = "blas"          # the kernel of the fp32 weight products

    @classmethod
    def of_run(cls, cfg: TrainConfig, pad_id: int, labelled: bool = False) -> EngineSettings:
        """The settings of a run whose options set-up has resolved (`cfg`), whose tokenizer's
        padding id is `pad_id`; labelled: its windows carry labels (records of .jsonl files)."""
        return cls(micro_batch=cfg.micro_batch, batch_size=cfg.batch_size,
                   lock_mode=cfg.lock_mode, debug_locks=cfg.debug_locks, pad_id=pad_id,
                   dropout=cfg.dropout, seed=cfg.seed, precision=cfg.precision,
                   labelled=labelled, matmul=cfg.matmul)

    def engine(self, trainer: Any, threads: int, engine_class: type = Engine) -> Any:
        """The run's Engine (an engine_class) of `threads` spheres over the trainer's model
        (and adapters)."""
        return engine_class(trainer.mcfg, trainer.model.flat, threads, self.micro_batch,
                            self.batch_size, self.lock_mode, self.debug_locks, self.pad_id,
                            self.dropout, self.seed, self.precision, adapters=trainer.adapters,
                            lora=trainer.lora and trainer.lora.engine_args,
                            labelled=self.labelled, matmul=self.matmul)
