"""Training: the options (TrainConfig), a run's set-up and state (Trainer), the loop (train),
stop signals, the run directory's lock, the log and the loss plot."""
from cllm_cli.training.config import TrainConfig
from cllm_cli.training.loop import train
from cllm_cli.training.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "train"]
