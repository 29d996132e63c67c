"""Evaluation: a model's loss on text (any text files, or a run's own split: text.py), and
zero-shot tasks (cllm_eval --task): HellaSwag and LAMBADA items read from their files
(items.py), scored through the engine's Decoder as lm-evaluation-harness scores them
(scoring.py) and summed up with the harness's standard errors (tasks.py)."""
from cllm_cli.evaluation.items import HellaSwagItem, LambadaItem, read_hellaswag, read_lambada
from cllm_cli.evaluation.scoring import Scorer, encode_pair
from cllm_cli.evaluation.tasks import (
    TASKS,
    Figure,
    HellaSwag,
    Lambada,
    Task,
    TaskResult,
    evaluate_task,
    mean_stderr,
    read_items,
    task_named,
)
from cllm_cli.evaluation.text import (
    TextLoss,
    evaluate_stream,
    evaluate_windows,
    records_of_run,
    split_of_run,
    text_stream,
)

__all__ = ["TASKS", "Figure", "HellaSwag", "HellaSwagItem", "Lambada", "LambadaItem", "Scorer",
           "Task", "TaskResult", "TextLoss", "encode_pair", "evaluate_stream", "evaluate_task",
           "evaluate_windows", "records_of_run",
           "mean_stderr", "read_hellaswag", "read_items", "read_lambada", "split_of_run",
           "task_named", "text_stream"]
