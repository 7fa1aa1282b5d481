"""All-or-nothing file writes, shared by every module that writes files.

A reader (or a process restarted after SIGKILL) sees either the old file or the complete new one,
never half of one: data goes to a temporary file in the target's directory (same file system, so the
rename is atomic), is flushed to disk, and only then renamed over the target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator, Union

__all__ = ["atomic_open", "atomic_path", "atomic_write", "writes_in_progress"]

PathLike = Union[str, "os.PathLike[str]"]

#: Number of atomic writes under way (a Ctrl-C handler interrupts one by raising, so that its
#: temporary file is removed, and exits at once otherwise; see ``writes_in_progress``).
_WRITES = 0

# mkstemp creates 0600 files; finished files should get the permissions a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yields a temporary path beside ``path``; renamed over ``path`` if the block ends cleanly.

    For writers that want a file name rather than a file object (``model.save``, h5py). On any
    exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is left as it
    was. Missing parent directories are created.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "c.txt")
        >>> with atomic_path(p) as tmp:
        ...     _ = open(tmp, "w").write("ok")
        >>> open(p).read()
        'ok'
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    global _WRITES
    _WRITES += 1
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    finally:
        _WRITES -= 1


def writes_in_progress() -> bool:
    """Whether an :func:`atomic_path` / :func:`atomic_open` block is running in this process.

    Example:
        >>> writes_in_progress()
        False
    """
    return _WRITES > 0


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Opens a temporary file that replaces ``path`` when the ``with`` block ends without error.

    The data is flushed to disk before the rename. See :func:`atomic_path` for the guarantees.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> with atomic_open(p) as f:
        ...     _ = f.write("done")
        >>> open(p).read()
        'done'
    """
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def atomic_write(path: PathLike, data: Union[str, bytes]) -> None:
    """Writes ``data`` (text or bytes) to ``path`` atomically (see :func:`atomic_open`).

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "b.bin")
        >>> atomic_write(p, b"\\x00\\x01"); os.path.getsize(p)
        2
    """
    if isinstance(data, bytes):
        with atomic_open(path, "wb") as f:
            f.write(data)
    else:
        with atomic_open(path, "w", newline="") as f:
            f.write(data)
