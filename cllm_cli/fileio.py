"""Files on disk: atomic writes (every file CLLM writes) and opening a file the user named.

Atomic writes: the bytes go to a temporary file in the destination directory (``.<final name>.<random>.tmp``),
which is flushed, fsync'ed and renamed over the final name, after which the directory is
fsync'ed. A failure at any point removes the temporary file, so the final name holds either
the previous complete file (if there was one) or the new complete file, never a partial one.
A path that is a FIFO, a device or a socket is never replaced (the write is refused).
A failure of the storage itself (no space, quota, file too large, I/O error) may be raised as
its own class (storage_error), as the work could not go on; other failures (no permission, not
a directory) are the path's fault.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import signal
import stat
import threading
from typing import BinaryIO, Callable, Iterator

from cllm_cli.errors import DataError, UsageError

# errnos of storage that failed, rather than of a path that cannot be written
STORAGE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def reason(exc: BaseException) -> str:
    """Short text for an OSError (or anything else) without the file name repeated."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def write_error(exc: OSError, error: Callable[[str], Exception], message: str,
                storage_error: Callable[[str], Exception] | None = None) -> Exception:
    """The exception to raise for OSError `exc` met while writing: storage_error (when given)
    for a storage failure (STORAGE_FAILURES), else error; with message."""
    if storage_error is not None and exc.errno in STORAGE_FAILURES:
        return storage_error(message)
    return error(message)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Delays SIGINT, SIGTERM and SIGHUP until the block ends, so that a handler that raises
    cannot cut a few renames or a clean-up short (in the main thread, where Python runs
    its handlers; elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Makes a rename in `directory` durable. Platforms and file systems that cannot fsync a
    directory are let be; any other failure raises OSError."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return                              # e.g. a platform without directory fds
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def writable_directory(path: str | os.PathLike) -> None:
    """Creates directory `path` if needed and checks that a file can be created in it (a
    probe file, removed again); raises OSError when either fails."""
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-test-{os.getpid()}.tmp")
    with open(probe, "w"):
        pass
    os.remove(probe)


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _special(mode: int) -> str | None:
    """"a FIFO", "a character device", ... for a file mode of such a kind, else None."""
    return next((name for test, name in _KINDS if test(mode)), None)


def special_kind(path: str | os.PathLike) -> str | None:
    """"a FIFO", "a character device", ... when `path` itself (not a link's target) is a
    FIFO, a device or a socket; None for anything else, or nothing."""
    try:
        return _special(os.lstat(path).st_mode)
    except OSError:
        return None


@contextlib.contextmanager
def _replacing(path: str | os.PathLike, error: Callable[[str], Exception], message: str,
               storage_error: Callable[[str], Exception] | None,
               exclusive: bool = False) -> Iterator[str]:
    """Yields a temporary name next to `path`; when the block (which creates, writes and
    fsyncs that file) ends without an exception, renames it over `path` and fsyncs the
    directory. With exclusive, `path` must not exist then: it is created empty (O_EXCL, which
    fails when anything is there) and the file renamed over that claim, so that a file that
    appeared meanwhile is never replaced. OSError -> error(message) (storage_error(message)
    for a storage failure, when given); the temporary file is gone either way."""
    directory = os.path.dirname(os.fspath(path)) or os.curdir
    kind = special_kind(path)
    if kind is not None:        # renamed over, /dev/null would become a regular file
        raise error(message.format(path=path, reason=f"it is {kind}, which a written file "
                                                     f"never replaces"))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    claimed = renamed = False
    try:
        yield tmp
        if exclusive:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                raise error(f"{path} appeared while this file was written (another writer?); "
                            f"it is left as it is") from None
            claimed = True
        os.replace(tmp, path)
        renamed = True
        fsync_directory(directory)
    except OSError as exc:
        text = message.format(path=path, reason=reason(exc))
        raise write_error(exc, error, text, storage_error) from None
    finally:
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if claimed:
                with contextlib.suppress(OSError):
                    os.unlink(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, error: Callable[[str], Exception],
                message: str = "{path}: cannot write ({reason})",
                storage_error: Callable[[str], Exception] | None = None,
                exclusive: bool = False) -> Iterator[str]:
    """Yields the name of a temporary file next to `path` for the block to create and write
    (for writers that take a file name); then as atomic_file: fsync'ed and renamed over
    `path` (with exclusive, only while no file is there: see _replacing), OSError ->
    error(message) (or storage_error), the temporary file gone either way."""
    with _replacing(path, error, message, storage_error, exclusive) as tmp:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, error: Callable[[str], Exception],
                message: str = "{path}: cannot write ({reason})",
                storage_error: Callable[[str], Exception] | None = None) -> Iterator[BinaryIO]:
    """Opens a temporary file next to `path` for binary writing and, when the block ends
    without an exception, renames it over `path` (see the module docstring). An OSError
    becomes error(message) with {path} and {reason} filled in (storage_error(message) for a
    storage failure, when given); any other exception (one the
    block raises, KeyboardInterrupt) passes through unchanged. Either way the temporary file
    is gone. The directory of `path` must exist."""
    with _replacing(path, error, message, storage_error) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())


class NotRegularFile(OSError):
    """A path the user gave is a FIFO, a device or a socket: reading it could block forever
    or never end."""


def open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """Opens `path` for binary reading if it is a regular file (symbolic links followed).
    A directory raises IsADirectoryError, a FIFO, device or socket NotRegularFile; the open
    never blocks, whatever the path is."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "it is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL,
                                 f"it is {_special(mode) or 'a special file'}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_start(path: str | os.PathLike, count: int) -> bytes:
    """The first `count` bytes of the regular file `path` (fewer when it is shorter): what a
    check reads to tell an earlier output of its own from a file that is not. OSError as
    open_regular raises it."""
    with open_regular(path) as f:
        return f.read(count)


def check_regular(path: str | os.PathLike, what: str) -> None:
    """UsageError naming `what` unless `path` opens as a regular file (open_regular)."""
    try:
        open_regular(path).close()
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror or e}") from None


def read_bytes(path: str | os.PathLike) -> bytes:
    """All bytes of `path`; DataError (one line) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def char_cut(data: bytes) -> int:
    """Where a block ending in `data` may be cut without splitting a UTF-8 character or a
    "\r\n": before the last of its last 4 bytes that starts a character (other than a "\n"
    after a "\r"), else at its end (those bytes are stray continuation bytes: no character
    goes on past them). 0 when that place is the start of `data`."""
    for j in range(len(data) - 1, max(len(data) - 5, -1), -1):
        byte = data[j]
        if 0x80 <= byte < 0xC0 or (byte == 0x0A and j > 0 and data[j - 1] == 0x0D):
            continue
        return j
    return len(data)
