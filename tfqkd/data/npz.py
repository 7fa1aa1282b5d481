"""``npz:PATH``: your own arrays in one ``.npz`` file (``numpy.savez``).

Arrays: ``x_train, y_train, x_test, y_test`` (required), ``x_val, y_val`` (or ``x_validation,
y_validation``: the source's own validation split, optional) and ``class_names`` (a str array,
optional). Images are ``uint8`` ``(N, H, W, C)`` (or ``(N, H, W)`` for grey), one size for every
split; labels integers ``(N,)`` or ``(N, 1)``. The number of classes is ``len(class_names)`` when
given, else one more than the largest training label; a label outside it is an error naming the
split. The file is read without ``allow_pickle`` (unpickling can run code): an object array is
refused with a clear message.

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "mine.npz"
    >>> np.savez(path, x_train=np.zeros((4, 5, 5, 3), np.uint8), y_train=[0, 1, 2, 1],
    ...          x_test=np.zeros((2, 5, 5, 3), np.uint8), y_test=[2, 0])
    >>> source = load_npz(path)
    >>> source.class_names, source.arrays["y_test"].tolist()
    (('0', '1', '2'), [2, 0])
"""

from __future__ import annotations

import pathlib
from typing import Dict

import numpy as np

from tfqkd.data import cache
from tfqkd.data.info import DataNotFoundError, Source, check_labels

__all__ = ["load_npz"]

_ALIASES = {"train": ("train",), "test": ("test",), "validation": ("val", "validation")}


def _labels(y: np.ndarray, name: str, n: int, origin: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] > 1:
        raise ValueError(
            f"{origin}: {name} has shape {y.shape}, which looks one-hot: store integer class "
            f"indices, e.g. {name}.argmax(axis=1).")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and len(y) and np.all(y == np.round(y)):
            y = y.astype(np.int64)  # integral floats (a common keras export) are fine
        else:
            raise ValueError(f"{origin}: {name} has dtype {y.dtype}, expected integer labels.")
    y = y.reshape(-1)
    if len(y) != n:
        raise ValueError(f"{origin}: x_{name[2:]} holds {n} images but {name} {len(y)} labels.")
    return y.astype(np.int64)


def _images(x: np.ndarray, name: str, origin: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]  # (N, H, W) grey images
    if x.ndim != 4:
        raise ValueError(f"{origin}: {name} has shape {x.shape}, expected images (N, height, "
                         "width, channels) or (N, height, width).")
    if x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        raise ValueError(f"{origin}: {name} has shape {x.shape}, which looks like NCHW: store "
                         f"NHWC images, e.g. {name}.transpose(0, 2, 3, 1).")
    if x.dtype != np.uint8:
        raise ValueError(f"{origin}: {name} has dtype {x.dtype}, expected uint8 pixel values "
                         "0..255 (e.g. np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for "
                         "images in [0, 1]).")
    return x


def _arrays(raw: Dict[str, np.ndarray], origin: str) -> Dict[str, np.ndarray]:
    out = {}
    for split, aliases in _ALIASES.items():
        found = [a for a in aliases if f"x_{a}" in raw or f"y_{a}" in raw]
        if not found:
            if split != "validation":
                raise ValueError(f"{origin} lacks x_{split} and y_{split}: an npz data set needs "
                                 "x_train, y_train, x_test and y_test (x_val, y_val optional).")
            continue
        a = found[0]
        if f"x_{a}" not in raw or f"y_{a}" not in raw:
            raise ValueError(f"{origin} has {'x' if f'x_{a}' in raw else 'y'}_{a} but not "
                             f"{'y' if f'x_{a}' in raw else 'x'}_{a}.")
        x = _images(raw[f"x_{a}"], f"x_{a}", origin)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = _labels(raw[f"y_{a}"], f"y_{a}", len(x), origin)
    shapes = {k: v.shape[1:] for k, v in out.items() if k.startswith("x_")}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{origin}: the splits' images differ in shape ({shapes}); store them "
                         "at one size (the pipelines resize all of them with image_size).")
    return out


def load_npz(path: pathlib.Path) -> Source:
    """The arrays of an ``.npz`` data set, checked; kept in memory until another source loads."""
    origin = f"npz:{path}"
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataNotFoundError(
            f"{origin}: {path} {what}; point npz: at a .npz file written by numpy.savez.")
    key = f"npz-{cache.source_key(path, 'npz')}"
    raw = cache.memo_get(key)
    if raw is None:
        raw = cache.read_npz(path)
        names = raw.pop("class_names", None)
        raw = _arrays(raw, origin)
        if names is not None:
            raw["class_names"] = np.asarray(names).astype(str).reshape(-1)
        cache.remember(key, raw)
    arrays = {k: v for k, v in raw.items() if k != "class_names"}
    if "class_names" in raw:
        names = tuple(str(c) for c in raw["class_names"])
        why = f"the {len(names)} entries of its class_names array"
    else:
        count = int(arrays["y_train"].max()) + 1 if len(arrays["y_train"]) else 0
        names = tuple(str(c) for c in range(count))
        why = (f"one more than y_train's largest label, {count - 1}; store a class_names array "
               "to state the count")
    check_labels(arrays, len(names), origin, why)
    return Source(origin, arrays, names, key, why)
