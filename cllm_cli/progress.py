"""Time left and work done: the duration, loss and perplexity formats every command prints and
the progress line of a long pass over a corpus (bytes) or over a task's items."""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO, TypeVar


def plural(n: float, noun: str, nouns: str | None = None) -> str:
    """`noun` when n is 1, else `nouns` (by default `noun` + "s"): f"{n} {plural(n, 'item')}"."""
    return noun if n == 1 else nouns or noun + "s"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


LARGE = 1e6     # from here on losses and perplexities are shown as 1.234e+07


def fmt_loss(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4g}" if abs(x) >= LARGE else f"{x:.4f}"


def perplexity(loss: float) -> float:
    """exp(loss), inf where it overflows."""
    return math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf


def fmt_ppl(loss: float, decimals: int = 2) -> str:
    """The perplexity of `loss`: fixed-point below LARGE, then 1.23e+07 style, "inf" past
    the float range (a diverged run)."""
    ppl = perplexity(loss)
    return f"{ppl:.{decimals}f}" if ppl < LARGE else f"{ppl:.3g}"


def ppl_text(loss: float | None) -> str:
    return "" if loss is None or math.isnan(loss) else f" (ppl {fmt_ppl(loss)})"


_Progress = TypeVar("_Progress", bound="ByteProgress")


class ByteProgress:
    """The progress line of a long pass over a corpus, on stderr and only when stderr is a
    terminal: "tokenizing: 412.0 of 1228.8 MB, 85.3 MB/s, ETA 0:09", rewritten a few times a
    second; done() leaves "tokenizing: 1228.8 MB in 0:14, 85.9 MB/s" on screen, close()
    without done() (a fault, a signal) wipes the line. ItemProgress counts items instead."""

    REFRESH = 0.2

    def __init__(self, label: str, total: float, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.label, self.total = label, total
        try:
            self.tty = self.stream is not None and self.stream.isatty()
        except (AttributeError, ValueError, OSError):
            self.tty = False
        self.done_bytes = 0
        self.start = self.last_draw = time.monotonic()
        self.showing = False

    def __enter__(self: _Progress) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        now = time.monotonic()
        if self.tty and now - self.last_draw >= self.REFRESH:
            rate = self.done_bytes / max(now - self.start, 1e-9)
            left = duration((self.total - self.done_bytes) / rate) if rate > 0 else "?"
            self._out(f"\r{self.label}: {self.progress_text(rate)}, ETA {left}\x1b[K")
            self.last_draw = now

    def done(self) -> None:
        if self.showing:
            seconds = time.monotonic() - self.start
            self._out(f"\r{self.label}: {self.final_text(seconds)}\x1b[K\n")
            self.showing = False

    def progress_text(self, rate: float) -> str:
        return (f"{self.done_bytes / 1e6:.1f} of {self.total / 1e6:.1f} MB, "
                f"{rate / 1e6:.1f} MB/s")

    def final_text(self, seconds: float) -> str:
        return (f"{self.done_bytes / 1e6:.1f} MB in {duration(seconds)}, "
                f"{self.done_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s")

    def close(self) -> None:
        if self.showing:
            self._out("\r\x1b[K")
            self.showing = False

    def _out(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
            self.showing = not text.endswith("\n")
        except (OSError, ValueError):
            self.tty = self.showing = False


class ItemProgress(ByteProgress):
    """The same line for a pass over items: "hellaswag: 120 of 10042 items, 0.45 s per item,
    ETA 1:14:10"; done() leaves "hellaswag: 10042 items in 1:15:02, 0.45 s per item". add(n)
    counts n more items; `unit` names them ("window": "evaluating: 12 of 80 windows, ...")."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 unit: str = "item") -> None:
        super().__init__(label, total, stream)
        self.unit = unit

    def progress_text(self, rate: float) -> str:
        return (f"{self.done_bytes} of {self.total} {plural(self.total, self.unit)}, "
                f"{1 / rate:.3g} s per {self.unit}")

    def final_text(self, seconds: float) -> str:
        per = seconds / max(self.done_bytes, 1)
        return (f"{self.done_bytes} {plural(self.done_bytes, self.unit)} in {duration(seconds)}, "
                f"{per:.3g} s per {self.unit}")
