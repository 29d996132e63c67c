"""The checkpoint directory of a run: one run at a time holds it (a lock), and the holder
removes what killed runs left behind.

The lock is `.lock` in the directory, held with flock(2) for as long as the run lives: the
kernel releases it when the process ends, however it ends, so a lock left by a dead process
never blocks. The file records who holds it (pid, host, start time) for the refusal message.
A child forked while the lock is held (a tokenizing worker) closes its copy of the lock's
descriptor at once, so that a child outliving its run never keeps the directory locked; the
descriptor is close-on-exec, so programs the run starts do not get it either.
"""
import fcntl
import os
import socket
import time

from cllm_cli.errors import UsageError

LOCK_NAME = ".lock"
_held = set()          # the DirectoryLocks this process holds


def _close_in_child():
    """After fork, in the child: its copies of the held locks' descriptors are closed (the
    lock stays with the parent's)."""
    for lock in list(_held):
        try:
            os.close(lock.fd)
        except OSError:
            pass
        lock.fd = None
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class DirectoryLock:
    """Holds `directory`'s lock until close(); UsageError naming the holder when another
    process has it."""

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(self.fd)
            os.close(self.fd)
            self.fd = None
            raise UsageError(f"{directory} is in use by another run ({holder}); wait for it "
                             f"to end or use another --checkpoint-dir") from None
        _held.add(self)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def close(self):
        _held.discard(self)
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)     # no holder any more; the empty file is harmless
            except OSError:
                pass
            os.close(self.fd)                # releases the lock
            self.fd = None


def _read_holder(fd):
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def remove_leftovers(directory):
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
