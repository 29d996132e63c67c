"""Stop signals during a run: SIGINT, SIGTERM and SIGHUP."""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from cllm_cli.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP. Until defer() a signal raises Interrupted at once (set-up:
    nothing to save, and the atomic writes remove their temporary files); after it, a signal
    only sets the flag that calling this object returns, and the loop stops after the current
    step; the first signal is the one the run ends with. Installed only on the main thread
    (signal handlers cannot be set elsewhere)."""

    def __init__(self, deferred: bool = False) -> None:
        """deferred: a signal only sets the flag from the start."""
        self.signum: int | None = None
        self.deferred = deferred
        self.previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "stopped"

    def hold(self) -> None:
        """From now on a signal only sets the flag; one that came before stays pending."""
        self.deferred = True

    def defer(self) -> None:
        self.hold()
        if self.signum is not None:          # arrived between set-up and now
            raise Interrupted(self.signum)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:          # a second signal does not change how the run ends
            self.signum = signum
        if not self.deferred:
            raise Interrupted(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
