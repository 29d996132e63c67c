"""Pass 2 over a corpus in worker processes: each block of text decoded and turned into a
result (a scanner's scan, a tokenizer's encode) by a pool of processes, the results handed
back in block order, so the stream is the same whatever the number of workers.

    BlockRunner        the blocks of a corpus -> (result, last) in order, in this process
                       (workers <= 1) or in a pool of at most `workers` processes

At most 2 blocks per worker are in flight (bounded read-ahead). The pool's processes are
killed, not waited for, when the runner's iteration ends or is closed early (a fault, a
signal), so a stopped build leaves no worker behind. A parent killed outright (kill -9) takes
its workers with it: on Linux each worker asks the kernel for SIGKILL when its parent dies
(prctl PR_SET_PDEATHSIG), then ends at once if the parent is already gone (it died before
the prctl). Elsewhere a worker notices only when it next reads its parent's pipe.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Protocol

from cllm_cli.corpus.files import decode_block
from cllm_cli.errors import DataError
from cllm_cli.progress import ByteProgress
from cllm_cli.tokenizers import Tokenizer


class Blocks(Protocol):
    """A corpus read in blocks (dataset._Corpus)."""

    def blocks(self, cut: Callable[[bytes], int]) -> Iterator[tuple[Path, int, bytes, bool]]: ...


class BlockRunner:
    """Pass 2 over a corpus: the text of each block, decoded and turned into a result by a
    function (a scanner's scan, a tokenizer's encode) in this process or in worker processes,
    the results handed back in block order."""

    def __init__(self, corpus: Blocks, encoding_errors: str, total: int, workers: int) -> None:
        self.corpus, self.encoding_errors = corpus, encoding_errors
        self.total, self.workers = total, workers

    def texts(self, cut: Callable[[bytes], int],
              progress: ByteProgress) -> Generator[tuple[str, bool], None, None]:
        """(text, last) of every block, decoded in this process."""
        for path, offset, data, last in self.corpus.blocks(cut):
            yield decode_block(path, data, offset, self.encoding_errors), last
            progress.add(len(data))

    def results(self, cut: Callable[[bytes], int], work: Callable[[str], Any] | None,
                progress: ByteProgress,
                tokenizer: Tokenizer | None = None) -> Generator[tuple[Any, bool], None, None]:
        """(work(text), last) of every block in order. work=None: tokenizer.encode."""
        if self.workers <= 1:
            work = tokenizer.encode if work is None else work     # type: ignore[union-attr]
            for text, last in self.texts(cut, progress):
                yield work(text), last
            return
        pending: collections.deque[tuple[concurrent.futures.Future, int, bool]] = collections.deque()
        with _WorkerPool(self.workers, tokenizer) as pool:
            def collect() -> tuple[Any, bool]:
                future, nbytes, last = pending.popleft()
                result = pool.result(future)
                progress.add(nbytes)
                return result, last

            for path, offset, data, last in self.corpus.blocks(cut):
                task = (work or _encode_in_worker, path, offset, data, self.encoding_errors)
                pending.append((pool.submit(task), len(data), last))
                if len(pending) > 2 * self.workers:        # bounded read-ahead
                    yield collect()
            while pending:
                yield collect()


# Worker processes: forked where the platform can (spawn would run the caller's main script
# again in each worker: a script without the `if __name__ == "__main__":` guard would start
# its work over), spawned elsewhere. Ctrl-C is left to the parent, which ends them at once
# when it stops; the parent's stop handlers are not inherited.

_worker_tokenizer: Any = None          # the worker's Tokenizer (_start_worker)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """SIGKILL for this process when its parent dies; ends it now if `parent` (the pid that
    started it) is no longer its parent."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL),
                                                     0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _start_worker(tokenizer: Tokenizer | None, parent: int) -> None:
    global _worker_tokenizer
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _worker_tokenizer = tokenizer


def _encode_in_worker(text: str) -> Any:
    return _worker_tokenizer.encode(text)


def _decode_and_work(task: tuple[Callable[[str], Any], Path, int, bytes, str]) -> Any:
    work, path, offset, data, encoding_errors = task
    return work(decode_block(path, data, offset, encoding_errors))


class _WorkerPool:
    """A process pool whose workers are killed, not waited for, when it is left."""

    def __init__(self, workers: int, tokenizer: Tokenizer | None) -> None:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(method),
            initializer=_start_worker, initargs=(tokenizer, os.getpid()))

    def __enter__(self) -> _WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(OSError, ValueError):
                process.terminate()
        for process in processes:
            with contextlib.suppress(OSError, ValueError, AssertionError):
                process.join()

    def submit(self, task: tuple[Callable[[str], Any], Path, int, bytes, str]) -> concurrent.futures.Future:
        return self.executor.submit(_decode_and_work, task)

    @staticmethod
    def result(future: concurrent.futures.Future) -> Any:
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError("a tokenizing worker process died (out of memory?)") from None
