"""The decoded-array cache: one in-memory entry, ``.npz`` files on disk keyed by the source's
content, and the one safe ``.npz`` reader (never ``allow_pickle``).

Decoding images is slow and decoders disagree by a few grey levels, so every image source (CIFAR
archives and folders, ``folder:`` and ``tfds:`` data) is decoded once, with TensorFlow's decoder,
and its arrays are written to ``$TFQKD_CACHE_DIR/<key>.npz`` (default ``~/.cache/tfqkd``). The key
hashes the source's path, its files' sizes and modification times and the decoding options, so a
changed source is decoded again. Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
import zipfile
import zlib
from typing import Callable, Dict, Iterable, Optional

import numpy as np

from tfqkd._io import atomic_open

__all__ = ["CACHE_DIR_ENV", "cache_dir", "source_key", "cached_arrays", "read_npz", "write_npz",
           "read_only", "remember", "memo_get", "read_json", "write_json"]

CACHE_DIR_ENV = "TFQKD_CACHE_DIR"
# Bump when the decoded layout changes so that stale caches are ignored rather than misread.
CACHE_FORMAT = 2
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"

# The arrays of the most recently loaded source: switching splits or building a second pipeline
# must not re-read 180 MB. One entry only, so memory stays bounded.
_MEMO: Dict[str, Dict[str, np.ndarray]] = {}


def read_only(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    # Shared by every caller (memo, lru_cache): an accidental in-place edit must fail loudly.
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


def remember(key: str, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    _MEMO.clear()
    _MEMO[key] = read_only(arrays)
    return _MEMO[key]


def memo_get(key: str) -> Optional[Dict[str, np.ndarray]]:
    return _MEMO.get(key)


def cache_dir() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tfqkd")
    )


def source_key(path: pathlib.Path, *options: object,
               files: Optional[Iterable[pathlib.Path]] = None) -> str:
    """Identifies a source's content cheaply: path, sizes and modification times, and options.

    A file is stamped by its own size and time; a folder by those of ``files`` (default: every
    file below it).
    """
    path = path.resolve()
    if path.is_file():
        st = path.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    else:
        listed = sorted(path.rglob("*")) if files is None else sorted(files)
        stats = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in listed if p.is_file()]
        stamp = hashlib.sha256(repr(stats).encode()).hexdigest()
    raw = f"{CACHE_FORMAT}|{path}|{stamp}|{options!r}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def read_npz(path: pathlib.Path) -> Dict[str, np.ndarray]:
    """Every array of a ``.npz`` file, never unpickling: a clear ``ValueError`` otherwise.

    Example:
        >>> import tempfile, pathlib
        >>> bad = pathlib.Path(tempfile.mkdtemp()) / "random.npz"
        >>> _ = bad.write_bytes(b"\\x93 not a zip file at all")
        >>> try:
        ...     read_npz(bad)
        ... except ValueError as e:
        ...     print("not a .npz" in str(e), "pickle" in str(e))
        True False
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"Cannot read {path}: {e.strerror or e}.") from None
    if head not in (_ZIP_MAGIC, _EMPTY_ZIP_MAGIC):
        # np.load would try to unpickle such a file and advise allow_pickle=True, which runs
        # whatever code the file holds: tfqkd never does that.
        raise ValueError(
            f"{path} is not a .npz archive (a .npz is a zip file as numpy.savez writes it; this "
            f"file starts with the bytes {head!r}). Write it with numpy.savez(path, x_train=..., "
            "y_train=..., x_test=..., y_test=...).")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for k in f.files:
                try:
                    arrays[k] = f[k]
                except ValueError as e:
                    if "pickle" not in str(e):
                        raise
                    raise ValueError(
                        f"{path}: array {k!r} holds Python objects (pickled data), which tfqkd "
                        "never loads because unpickling can run arbitrary code. Save plain "
                        "numeric arrays (images uint8, labels integers, class names as a str "
                        "array).") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise ValueError(f"{path} is a damaged .npz archive ({type(e).__name__}: {e}); write it "
                         "again with numpy.savez.") from None
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path} is not a readable .npz archive of arrays: {e}") from None
    return arrays


def write_npz(path: pathlib.Path, arrays: Dict[str, np.ndarray]) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)  # uncompressed: reading it back takes about a second


def read_json(path: pathlib.Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: pathlib.Path, value: dict) -> None:
    try:
        with atomic_open(path, "w") as f:
            json.dump(value, f)
    except OSError:
        pass  # a statistics cache that cannot be written is only recomputed next time


def cached_arrays(key: str, build: Callable[[], Dict[str, np.ndarray]],
                  validate: Callable[[Dict[str, np.ndarray], str], Dict[str, np.ndarray]],
                  what: str) -> Dict[str, np.ndarray]:
    """Arrays of ``key``: from memory, else from the disk cache, else ``build()`` and cached.

    ``validate(arrays, origin)`` checks (and may normalise) arrays read back from the cache;
    ``what`` names the source in warnings.
    """
    arrays = memo_get(key)
    if arrays is not None:
        return arrays
    cache = cache_dir() / f"{key}.npz"
    if cache.exists():
        try:
            return remember(key, validate(read_npz(cache), str(cache)))
        except ValueError as e:
            warnings.warn(f"Ignoring unreadable cache {cache} ({e}); decoding {what} again.")
    arrays = build()
    try:
        write_npz(cache, arrays)
    except OSError as e:
        warnings.warn(
            f"Could not cache the decoded arrays of {what} at {cache} ({e}); set "
            f"{CACHE_DIR_ENV} to a writable folder to avoid decoding the images on every run.")
    return remember(key, arrays)
