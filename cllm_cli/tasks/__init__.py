"""Zero-shot task evaluation (cllm_eval --task): HellaSwag and LAMBADA items read from their
files, scored through the engine's Decoder as lm-evaluation-harness scores them, and summed
up with the harness's standard errors."""
from cllm_cli.tasks.items import HellaSwagItem, LambadaItem, read_hellaswag, read_lambada
from cllm_cli.tasks.run import (
    TASKS,
    TaskResult,
    evaluate_task,
    mean_stderr,
    read_items,
    score_hellaswag,
    score_lambada,
)
from cllm_cli.tasks.scoring import Scorer, encode_pair

__all__ = ["TASKS", "HellaSwagItem", "LambadaItem", "Scorer", "TaskResult", "encode_pair",
           "evaluate_task", "mean_stderr", "read_hellaswag", "read_items", "read_lambada",
           "score_hellaswag", "score_lambada"]
