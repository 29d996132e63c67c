"""How many threads a tool runs: the default (the cores this process may run on), the bound
every --threads takes, and the warning when the threads outnumber the cores."""
from __future__ import annotations

import os

MAX_THREADS = 1024          # more threads than this only take turns on the cores


def default_threads() -> int:
    """The cores this process may run on (os.sched_getaffinity): the default number of
    threads, and the most that run at once."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_warning(threads: int, ranks: int = 1) -> str | None:
    """The warning (after "<tool>: warning: ") when `threads` threads in each of `ranks`
    processes on this host are more than the cores this process may run on, else None."""
    cores = default_threads()
    if threads * ranks <= cores:
        return None
    each = f" in each of {ranks} processes" if ranks > 1 else ""
    return (f"--threads {threads}{each} is more than the {cores} core"
            f"{'' if cores == 1 else 's'} this process may run on: the threads take turns, "
            f"which is slower (the results are the same)")
