"""The checkpoint directory of a run: one run at a time holds it (a lock), the holder
removes what killed runs left behind, and a run whose set-up fails takes back what it added.

The lock is `.lock` in the directory, held with flock(2) for as long as the run lives: the
kernel releases it when the process ends, however it ends, so a lock left by a dead process
never blocks. The file records who holds it (pid, host, start time) for the refusal message.
A child forked while the lock is held (a tokenizing worker) closes its copy of the lock's
descriptor at once, so that a child outliving its run never keeps the directory locked; the
descriptor is close-on-exec, so programs the run starts do not get it either.

A run refused during set-up removes the lock file too when it created it, while it still
holds the lock; a run that had opened that file meanwhile finds, once it has the lock, that
the name no longer leads to the file it locked, and locks the file now there instead.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import socket
import stat
import time

from cllm_cli.corpus.instructions import INSTRUCTIONS_FILE
from cllm_cli.errors import DataError, UsageError
from cllm_cli.fileio import reason, writable_directory
from cllm_cli.tokenizers import TOKENIZERS
from cllm_cli.tokenizers.chat_template import TEMPLATE_FILE

LOCK_NAME = ".lock"
_held: set[DirectoryLock] = set()          # the DirectoryLocks this process holds


def _close_in_child() -> None:
    """After fork, in the child: its copies of the held locks' descriptors are closed (the
    lock stays with the parent's)."""
    for lock in list(_held):
        try:
            os.close(lock.fd)       # type: ignore[arg-type]  # a held lock has its descriptor
        except OSError:
            pass
        lock.fd = None
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class DirectoryLock:
    """Holds `directory`'s lock until close(); UsageError naming the holder when another
    process has it. `created`: this process created the lock file."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd: int | None
        while True:
            self.fd, self.created = _open_lock_file(self.path)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(self.fd)
                os.close(self.fd)
                self.fd = None
                raise UsageError(f"{directory} is in use by another run ({holder}); wait for "
                                 f"it to end or use another --checkpoint-dir") from None
            if _same_file(self.fd, self.path):
                break
            os.close(self.fd)        # removed by a refused run meanwhile: lock the new one
        _held.add(self)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def close(self) -> None:
        _held.discard(self)
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)     # no holder any more; the empty file is harmless
            except OSError:
                pass
            os.close(self.fd)                # releases the lock
            self.fd = None


def _open_lock_file(path: str) -> tuple[int, bool]:
    """(descriptor, created) of the lock file at `path`, created when missing; DataError when
    `path` is something else (a directory, a FIFO) or cannot be opened."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue                 # removed between the two opens: create it
        except IsADirectoryError:
            raise _not_a_lock_file(path) from None
        except OSError as e:
            raise DataError(f"{path}: cannot open the run's lock file ({reason(e)})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _not_a_lock_file(path)
        return fd, False


def _not_a_lock_file(path: str) -> DataError:
    return DataError(f"{path} is not a regular file, so it cannot be the run's lock file; "
                     f"remove it or use another --checkpoint-dir")


def _same_file(fd: int, path: str) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


class RunDirectory:
    """The checkpoint directory `path` taken for a run: created when missing (DataError when
    it cannot be created or written), locked (DirectoryLock), and what it held then noted.
    discard() takes back what the run added, and puts back the files set aside (set_aside)
    that it replaced, for a run whose set-up failed; close() keeps it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.created = first_missing(path)      # the topmost directory this run creates
        try:
            writable_directory(path)
        except OSError as e:
            self._remove_created()
            raise DataError(f"checkpoint directory {path} is not writable: "
                            f"{e.strerror or e}") from None
        self.lock = DirectoryLock(path)
        self.found = set(os.listdir(path))
        self.kept: dict[str, str] = {}          # name -> the hard link keeping its content

    def set_aside(self) -> None:
        """Keeps what the files found hold now (hard links under temporary names, which a
        later run removes as leftovers when this one is killed), for discard() to put back
        when the set-up replaces them and then fails; a file system without hard links keeps
        nothing."""
        for name in sorted(self.found):
            path = os.path.join(self.path, name)
            if name.startswith(".") or not os.path.isfile(path) or os.path.islink(path):
                continue
            kept = os.path.join(self.path, f".{name}.{secrets.token_hex(6)}.tmp")
            try:
                os.link(path, kept)
            except OSError:
                continue
            self.kept[name] = kept

    def drop_set_aside(self) -> None:
        """Removes the hard links of set_aside(): the set-up succeeded."""
        for kept in self.kept.values():
            try:
                os.unlink(kept)
            except OSError:
                pass
        self.kept = {}

    def close(self) -> None:
        """Releases the directory."""
        self.drop_set_aside()
        self.lock.close()

    def discard(self) -> None:
        """Puts back the files set aside, removes the files added since the directory was
        taken, the lock file and the directories when this run created them (and they are
        empty), and releases it."""
        if self.lock.fd is not None:             # files are removed only under the lock
            for name, kept in self.kept.items():
                try:
                    os.replace(kept, os.path.join(self.path, name))
                except OSError:
                    pass
            self.kept = {}
            try:
                added = set(os.listdir(self.path)) - self.found
            except OSError:
                added = set()
            for name in added:
                try:
                    os.unlink(os.path.join(self.path, name))
                except OSError:
                    pass
            if self.lock.created:
                try:
                    os.unlink(self.lock.path)
                except OSError:
                    pass
        self.close()
        self._remove_created()

    def _remove_created(self) -> None:
        """Removes the directories this run created, from `path` up, while they are empty."""
        if self.created is None:
            return
        path = self.path
        while True:
            try:
                os.rmdir(path)
            except OSError:
                return                           # not empty: someone else's now
            if path == self.created:
                return
            path = os.path.dirname(path)


def run_file(path: str | os.PathLike, directory: str | os.PathLike) -> str | None:
    """The name of `path` when it is one of the files a run in `directory` writes there (its
    lock, token stream, tokenizer, chat template, checkpoints), which no other output of the
    run may be; otherwise None."""
    where = os.path.realpath(path)
    if os.path.dirname(where) != os.path.realpath(directory):
        return None
    name = os.path.basename(where)
    own = {LOCK_NAME, "dataset.bin", INSTRUCTIONS_FILE, TEMPLATE_FILE,
           *(kind.file_name for kind in TOKENIZERS.values())}
    return name if name in own or name.endswith(".cllm") else None


def first_missing(path: str) -> str | None:
    """The topmost directory on the way to `path` (itself included) that does not exist, or
    None when `path` exists."""
    missing = None
    while not os.path.lexists(path):
        missing = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def remove_leftovers(directory: str) -> tuple[int, int]:
    """Deletes the temporary files of interrupted writes (`.<name>.<random>.tmp`, spill files
    of a tokenisation). Call only while holding the lock. Returns (files, bytes) removed."""
    count = size = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0, 0
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            try:
                length = entry.stat().st_size
                os.unlink(entry.path)
            except OSError:
                continue
            count += 1
            size += length
    return count, size
