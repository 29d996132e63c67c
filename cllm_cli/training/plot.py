"""Loss curves from a train_model --metrics-file: plot_metrics() and the cllm_plot command.

The metrics file holds JSON lines: one per optimiser step ({"step", "loss", ...}) and one per
evaluation ({"step", "val_loss", ...}). A file that a resumed run appended to may repeat
steps (those after the checkpoint it resumed from); the last record of a step wins, which is
the curve of the run that went on. A skipped step (its loss written as null, or NaN) leaves a
gap in the line.

matplotlib is an optional dependency, imported only when a plot is drawn; without it
plot_metrics raises PlotError("matplotlib is not installed: pip install matplotlib").
An existing file at the PNG's path is replaced only when it is a PNG image (an earlier
plot), never when it is a model, the metrics or anything else. The PNG is written atomically
(cllm_cli.fileio: a temporary file next to the destination, renamed over it), so a failed
plot never leaves a damaged file.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable, List, Sequence, Tuple, TypeVar

from cllm_cli.errors import MissingDependency, PlotError
from cllm_cli.fileio import atomic_file, file_start, open_regular, reason
from cllm_cli.jsonfile import JSONError, loads
from cllm_cli.progress import fmt_ppl

if TYPE_CHECKING:
    import numpy as np  # imported where it is used: the plot alone needs it

# a curve of the plot: (step, loss) pairs, by step
Curve = List[Tuple[int, float]]
_Path = TypeVar("_Path", str, os.PathLike)

MISSING_MATPLOTLIB = "matplotlib is not installed: pip install matplotlib"


def require_matplotlib() -> None:
    """Raises MissingDependency unless matplotlib can be imported. train_model calls it before
    training starts, so that --plot does not fail only at the end of a long run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency(MISSING_MATPLOTLIB) from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_plot_output(out: str | os.PathLike, metrics_path: str | os.PathLike,
                      error: Callable[[str], Exception] = PlotError,
                      made: str | os.PathLike | None = None) -> None:
    """Raises error(...) when the PNG `out` cannot or must not be written: it is the metrics
    file, a directory, a name not ending in .png (so never a model, metrics or tokenizer file
    a run writes later, whose name the check cannot know in advance), below no directory
    (other than `made`, one the caller will create), or an existing file other than an
    earlier plot (a PNG image), which the plot would replace. train_model calls it before
    training starts, and the plot again before it writes."""
    if os.path.abspath(out) == os.path.abspath(metrics_path):
        raise error(f"{out} is the metrics file itself; choose another")
    if os.path.isdir(out):
        raise error(f"{out}: cannot write (it is a directory)")
    if os.path.splitext(os.fspath(out))[1].lower() != ".png":
        raise error(f"{out}: a plot is a PNG image; give a name ending in .png")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        if made is not None and parent == os.path.abspath(made):
            return              # the run creates it: nothing in it yet to replace
        raise error(f"{out}: cannot write (its directory {parent} does not exist)")
    if not os.path.lexists(out):
        return
    try:
        signature = file_start(out, len(PNG_SIGNATURE))
    except OSError as e:
        raise error(f"{out}: cannot write ({reason(e)})") from None
    if signature != PNG_SIGNATURE:
        raise error(f"{out} exists and is not a PNG image: a plot replaces only an earlier "
                    f"plot; remove it or choose another")


def read_metrics(path: str | os.PathLike) -> tuple[Curve, Curve]:
    """(train, val): lists of (step, value) sorted by step, from a metrics JSON-lines file."""
    try:
        with open_regular(path) as f:
            data = f.read()
        lines = data.decode("utf-8").splitlines()
    except OSError as e:
        raise PlotError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise PlotError(f"{path}: not valid UTF-8 (bad byte at offset {e.start})") from None
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for k, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = loads(line)
        except JSONError as e:
            if k == len(lines) and not data.endswith(b"\n"):
                break        # a last record cut mid-write (a full disk, a kill): left out
            raise PlotError(f"{path}:{k}: {e}") from None
        if not isinstance(record, dict) or not _whole(record.get("step")):
            raise PlotError(f"{path}:{k}: expected an object with a whole \"step\" number")
        step = int(record["step"])
        for key, curve in (("loss", train), ("val_loss", val)):
            if key in record:
                value = record[key]
                if value is not None and not _number(value):
                    raise PlotError(f"{path}:{k}: \"{key}\" is not a number")
                # null is a skipped step's loss (JSON has no NaN): a gap in the line
                curve[step] = math.nan if value is None else float(value)
    if not train and not val:
        raise PlotError(f"{path}: no training or validation loss records "
                        f"(is it a train_model --metrics-file?)")
    return sorted(train.items()), sorted(val.items())


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _whole(x: object) -> bool:
    """A step: an integer, or a float that holds one (not NaN or infinite)."""
    return isinstance(x, int) and not isinstance(x, bool) or isinstance(x, float) and x.is_integer()


def smoothed(values: Sequence[float], window: int) -> np.ndarray:
    """Centred mean over `window` values, NaN left out (NaN where a window holds none)."""
    import numpy as np
    array = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(array)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, array, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def draw(train: Curve, val: Curve, out_png: str | os.PathLike, title: str) -> None:
    """Draws the curves into out_png (atomically)."""
    require_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        window = len(losses) // 25 | 1          # odd, so that the mean is centred
        if len(losses) >= 100:
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8,
                    label="training loss (per step)")
            ax.plot(steps, smoothed(losses, window), color="tab:blue", linewidth=1.8,
                    label=f"training loss (mean of {window} steps)")
        else:
            ax.plot(steps, losses, color="tab:blue", linewidth=1.5, label="training loss")
    if val:
        steps, losses = zip(*val)
        last = losses[-1]
        ppl = f", ppl {fmt_ppl(last, 1)}" if math.isfinite(last) else ""
        ax.plot(steps, losses, color="tab:orange", marker="o", markersize=4, linewidth=1.8,
                label=f"validation loss (last {last:.3f}{ppl})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.set_title(title, parse_math=False)     # a "$" in a file name or title is text
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    with atomic_file(out_png, PlotError) as f:
        fig.savefig(f, format="png")


def plot_metrics(metrics_path: str | os.PathLike, out_png: _Path,
                 title: str | None = None) -> _Path:
    """Draws training loss (per step) and validation loss (per evaluation) against steps from
    a train_model --metrics-file into the PNG out_png. Raises PlotError (MissingDependency
    without matplotlib; the metrics are read first, so bad input is reported either way)."""
    train, val = read_metrics(metrics_path)
    check_plot_output(out_png, metrics_path)
    draw(train, val, out_png, title or f"CLLM training: {os.path.basename(str(metrics_path))}")
    return out_png
