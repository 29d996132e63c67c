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
import dataclasses
import math
import time

import numpy as np

from cllm_cli.errors import UsageError
from cllm_cli.tasks.items import read_hellaswag, read_lambada
from cllm_cli.tasks.scoring import Scorer

TASKS = ("hellaswag", "lambada")


def mean_stderr(values):
    """Standard error of the mean of `values` (sample standard deviation over sqrt(n)); None
    for fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(values.size))


@dataclasses.dataclass
class TaskResult:
    """What a task evaluation found. loglikelihoods: per item, the summed log-probability of
    each ending (HellaSwag) or of the target word (LAMBADA); greedy (LAMBADA): per item,
    whether every token of the word was the greedy choice; correct (and correct_norm): per
    item, 1 where the prediction is right."""
    task: str
    items: int
    acc: float
    acc_stderr: object
    seconds: float
    loglikelihoods: list
    correct: list
    acc_norm: object = None
    acc_norm_stderr: object = None
    correct_norm: object = None
    perplexity: object = None
    perplexity_stderr: object = None
    greedy: object = None

    @property
    def seconds_per_item(self):
        return self.seconds / self.items

    def summary(self, model=None):
        """The figures `cllm_eval --json` prints, as a dict."""
        out = {"task": self.task, "items": self.items, "acc": self.acc,
               "acc_stderr": self.acc_stderr}
        if self.task == "hellaswag":
            out.update(acc_norm=self.acc_norm, acc_norm_stderr=self.acc_norm_stderr)
        else:
            out.update(perplexity=self.perplexity, perplexity_stderr=self.perplexity_stderr)
        out.update(seconds=self.seconds, seconds_per_item=self.seconds_per_item)
        if model is not None:
            out["model"] = str(model)
        return out


def score_hellaswag(model, tokenizer, items, threads=1, progress=None):
    """TaskResult of HellaSwagItems. progress: None or an object whose add(1) is called after
    each item."""
    _require_items(items)
    start = time.perf_counter()
    scorer = Scorer(model, tokenizer, threads)
    lls, correct, correct_norm = [], [], []
    for item in items:
        sums = [s for s, _ in scorer.loglikelihoods(item.context, [" " + e for e in item.endings],
                                                    item.where)]
        lengths = np.array([len(e) for e in item.endings], dtype=np.float64)
        lls.append(sums)
        correct.append(int(np.argmax(sums)) == item.label)
        correct_norm.append(int(np.argmax(np.array(sums) / lengths)) == item.label)
        if progress is not None:
            progress.add(1)
    return TaskResult("hellaswag", len(items), float(np.mean(correct)), mean_stderr(correct),
                      time.perf_counter() - start, lls, correct,
                      acc_norm=float(np.mean(correct_norm)),
                      acc_norm_stderr=mean_stderr(correct_norm), correct_norm=correct_norm)


def score_lambada(model, tokenizer, items, threads=1, progress=None):
    """TaskResult of LambadaItems (progress as for score_hellaswag)."""
    _require_items(items)
    start = time.perf_counter()
    scorer = Scorer(model, tokenizer, threads)
    lls, greedy = [], []
    for item in items:
        [(ll, is_greedy)] = scorer.loglikelihoods(item.context, [" " + item.word], item.where)
        lls.append(ll)
        greedy.append(is_greedy)
        if progress is not None:
            progress.add(1)
    mean_ll = float(np.mean(lls))
    ll_stderr = mean_stderr(lls)
    perplexity = math.exp(-mean_ll) if -mean_ll < 709 else math.inf
    return TaskResult("lambada", len(items), float(np.mean(greedy)), mean_stderr(greedy),
                      time.perf_counter() - start, lls, greedy, perplexity=perplexity,
                      perplexity_stderr=None if ll_stderr is None else perplexity * ll_stderr,
                      greedy=greedy)


def _require_items(items):
    if not items:
        raise UsageError("no items to evaluate")


def read_items(task, path):
    """The items of the task file at `path` (read_hellaswag or read_lambada)."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return (read_hellaswag if task == "hellaswag" else read_lambada)(path)


def evaluate_task(task, model, tokenizer, items, threads=1, progress=None):
    """TaskResult of `items` (read_items) of `task`. progress: None, or a callable taking the
    number of items and returning an object with add(n) and done(), used as a context
    manager."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    score = score_hellaswag if task == "hellaswag" else score_lambada
    if progress is None:
        return score(model, tokenizer, items, threads)
    with progress(len(items)) as shown:
        result = score(model, tokenizer, items, threads, shown)
        shown.done()
    return result
