"""Zero-shot HellaSwag and LAMBADA, scored and summed up as lm-evaluation-harness reports
them.

    HellaSwag   each ending's summed log-probability after the context, the continuation
                being " " + ending; acc: the ending with the highest sum is the labelled one;
                acc_norm: the same with each sum divided by the ending's length in characters
    LAMBADA     the context is the passage without its last word, the continuation " " + that
                word; acc: every token of the continuation is the model's greedy choice;
                perplexity: exp(-mean over items of the continuation's summed log-probability)

Choices written down here:

- Standard errors: acc_stderr and acc_norm_stderr are the harness's, the sample standard
  deviation (n - 1) of the per-item 0/1 values over sqrt(n) (None for a single item). The
  harness bootstraps the perplexity's; perplexity_stderr here is the delta method,
  perplexity x the standard error of the mean log-likelihood, its first-order value, which is
  exact arithmetic instead of 100,000 random resamples.
- Ties go to the first ending, as numpy's argmax breaks them.
- The items are used as written: the harness's hellaswag task also puts the activity label in
  front of the context and removes the dataset's "[title]"-style markers; feed such text in
  ctx and endings to reproduce its prompts exactly.
- seconds counts the scoring (tokenizing included), not the loading of the model or the file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, ClassVar, Dict, List, NamedTuple, Optional, Protocol, Tuple

import numpy as np
from numpy.typing import ArrayLike

from cllm_cli.api import CLLMModel
from cllm_cli.errors import UsageError
from cllm_cli.evaluation.items import HellaSwagItem, LambadaItem, read_hellaswag, read_lambada
from cllm_cli.evaluation.scoring import Scorer
from cllm_cli.progress import ItemProgress
from cllm_cli.tokenizers import Tokenizer


def mean_stderr(values: ArrayLike) -> float | None:
    """Standard error of the mean of `values` (sample standard deviation over sqrt(n)); None
    for fewer than two values."""
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        return None
    return float(np.std(array, ddof=1) / math.sqrt(array.size))


class Progress(Protocol):
    """What Task.score tells of its progress: add(n) after each item (an ItemProgress)."""

    def add(self, n: int) -> None: ...


class Figure(NamedTuple):
    """One reported figure and its standard error (None where it has none)."""
    value: float
    stderr: Optional[float]


@dataclasses.dataclass
class TaskResult:
    """What a task evaluation found. figures: the reported figures in report order (acc
    first); loglikelihoods: per item, the summed log-probability of each ending (HellaSwag)
    or of the target word (LAMBADA); correct: per item, 1 where the prediction is right;
    per_item: the task's other per-item values (HellaSwag's correct_norm, LAMBADA's greedy)."""
    task: str
    items: int
    seconds: float
    figures: dict[str, Figure]
    loglikelihoods: list[Any]
    correct: list[bool]
    per_item: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    @property
    def seconds_per_item(self) -> float:
        return self.seconds / self.items

    def summary(self, model: object = None) -> dict[str, Any]:
        """The figures `cllm_eval --json` prints, as a dict."""
        out: dict[str, Any] = {"task": self.task, "items": self.items}
        for name, figure in self.figures.items():
            out[name], out[f"{name}_stderr"] = figure
        out.update(seconds=self.seconds, seconds_per_item=self.seconds_per_item)
        if model is not None:
            out["model"] = str(model)
        return out


# what Task.score_items returns: figures, per-item log-likelihoods, per-item correctness,
# the task's other per-item values
Scores = Tuple[Dict[str, Figure], List[Any], List[bool], Dict[str, List[Any]]]


class Task:
    """A zero-shot task: its name, how its file is read (read), and how its items are scored
    (score_items: a Scorer and the items -> figures, per-item log-likelihoods, per-item
    correctness, other per-item values). A new task is a subclass and an entry in TASKS."""
    name: ClassVar[str]

    def read(self, path: str | os.PathLike) -> list[Any]:
        raise NotImplementedError

    def score_items(self, scorer: Scorer, items: list[Any], progress: Progress | None) -> Scores:
        raise NotImplementedError

    def score(self, model: CLLMModel, tokenizer: Tokenizer, items: list[Any], threads: int = 1,
              progress: Progress | None = None) -> TaskResult:
        """TaskResult of `items`. progress: None or an object whose add(1) is called after
        each item."""
        if not items:
            raise UsageError("no items to evaluate")
        start = time.perf_counter()
        figures, lls, correct, per_item = self.score_items(Scorer(model, tokenizer, threads),
                                                           items, progress)
        return TaskResult(self.name, len(items), time.perf_counter() - start, figures, lls,
                          correct, per_item)


class HellaSwag(Task):
    name = "hellaswag"

    def read(self, path: str | os.PathLike) -> list[HellaSwagItem]:
        return read_hellaswag(path)

    def score_items(self, scorer: Scorer, items: list[HellaSwagItem],
                    progress: Progress | None) -> Scores:
        lls: list[list[float]] = []
        correct: list[bool] = []
        correct_norm: list[bool] = []
        for item in items:
            sums = [s for s, _ in scorer.loglikelihoods(item.context,
                                                        [" " + e for e in item.endings],
                                                        item.where)]
            lengths = np.array([len(e) for e in item.endings], dtype=np.float64)
            lls.append(sums)
            correct.append(int(np.argmax(sums)) == item.label)
            correct_norm.append(int(np.argmax(np.array(sums) / lengths)) == item.label)
            if progress is not None:
                progress.add(1)
        figures = {"acc": Figure(float(np.mean(correct)), mean_stderr(correct)),
                   "acc_norm": Figure(float(np.mean(correct_norm)), mean_stderr(correct_norm))}
        return figures, lls, correct, {"correct_norm": correct_norm}


class Lambada(Task):
    name = "lambada"

    def read(self, path: str | os.PathLike) -> list[LambadaItem]:
        return read_lambada(path)

    def score_items(self, scorer: Scorer, items: list[LambadaItem],
                    progress: Progress | None) -> Scores:
        lls: list[float] = []
        greedy: list[bool] = []
        for item in items:
            [(ll, is_greedy)] = scorer.loglikelihoods(item.context, [" " + item.word],
                                                      item.where)
            lls.append(ll)
            greedy.append(is_greedy)
            if progress is not None:
                progress.add(1)
        mean_ll = float(np.mean(lls))
        ll_stderr = mean_stderr(lls)
        perplexity = math.exp(-mean_ll) if -mean_ll < 709 else math.inf
        figures = {"acc": Figure(float(np.mean(greedy)), mean_stderr(greedy)),
                   "perplexity": Figure(perplexity, None if ll_stderr is None
                                        else perplexity * ll_stderr)}
        return figures, lls, greedy, {"greedy": greedy}


TASKS = {task.name: task for task in (HellaSwag(), Lambada())}


def task_named(name: str) -> Task:
    """The Task called `name`; UsageError naming the known ones otherwise."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


def read_items(task: str, path: str | os.PathLike) -> list[Any]:
    """The items of the task file at `path`."""
    return task_named(task).read(path)


def evaluate_task(task: str, model: CLLMModel, tokenizer: Tokenizer, items: list[Any],
                  threads: int = 1,
                  progress: Callable[[int], ItemProgress] | None = None) -> TaskResult:
    """TaskResult of `items` (read_items) of `task`. progress: None, or a callable taking the
    number of items and returning an object with add(n) and done(), used as a context
    manager."""
    scored = task_named(task)
    if progress is None:
        return scored.score(model, tokenizer, items, threads)
    with progress(len(items)) as shown:
        result = scored.score(model, tokenizer, items, threads, shown)
        shown.done()
    return result
