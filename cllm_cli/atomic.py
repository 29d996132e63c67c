"""Atomic file writes, shared by vocab.txt and dataset.bin (data), `.cllm` checkpoints
(checkpoint) and loss plots (plot).

The bytes go to a temporary file in the destination directory (``.<final name>.<random>.tmp``),
which is flushed, fsync'ed and renamed over the final name, after which the directory is
fsync'ed. A failure at any point removes the temporary file, so the final name holds either
the previous complete file (if there was one) or the new complete file, never a partial one.
"""
import contextlib
import errno
import os
import secrets


def reason(exc):
    """Short text for an OSError (or anything else) without the file name repeated."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def fsync_directory(directory):
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


@contextlib.contextmanager
def atomic_file(path, error, message="{path}: cannot write ({reason})"):
    """Opens a temporary file next to `path` for binary writing and, when the block ends
    without an exception, renames it over `path` (see the module docstring). An OSError
    becomes error(message) with {path} and {reason} filled in; any other exception (one the
    block raises, KeyboardInterrupt) passes through unchanged. Either way the temporary file
    is gone. The directory of `path` must exist."""
    directory = os.path.dirname(os.fspath(path)) or os.curdir
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = None
    created = renamed = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(fd, "wb") as f:
            fd = None                       # owned by f now
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        renamed = True
        fsync_directory(directory)
    except OSError as exc:
        raise error(message.format(path=path, reason=reason(exc))) from None
    finally:
        if fd is not None:
            os.close(fd)
        if created and not renamed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
