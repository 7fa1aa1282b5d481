"""``folder:PATH``: your own images, ``PATH/<split>/<class>/*.jpg|jpeg|png`` (also bmp, gif, webp).

Splits are ``train/`` and ``test/`` (both required) and, optionally, ``val/`` or
``validation/``. Labels are the class folders of ``train/`` in sorted order (``0`` is the first
name), the same for every split; a class folder of another split that ``train/`` lacks is an
error. ``PATH`` may also be a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive of such a tree.

Every image is decoded once by TensorFlow's decoder (grey images stay grey when all are grey,
else RGB), resized to ``image_size`` when given (every image must share one size otherwise), and
the arrays are cached (see :mod:`tfqkd.data.cache`).

Example:
    >>> import pathlib, tempfile
    >>> from tfqkd._keras import tf
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for split, cls in [("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "dog")]:
    ...     (root / split / cls).mkdir(parents=True)
    ...     img = tf.fill((6, 6, 3), tf.constant(200 if cls == "dog" else 10, tf.uint8))
    ...     _ = (root / split / cls / "1.png").write_bytes(tf.io.encode_png(img).numpy())
    >>> source = load_folder(root, image_size=None, skip_corrupt=False)
    >>> source.class_names, source.arrays["x_train"].shape, source.arrays["y_train"].tolist()
    (('cat', 'dog'), (2, 6, 6, 3), [0, 1])
"""

from __future__ import annotations

import pathlib
from typing import Dict, Optional, Tuple

import numpy as np

from tfqkd.data import cache, images
from tfqkd.data.info import ALL_SPLITS, DataNotFoundError, Source

__all__ = ["load_folder"]


def _layout_error(path: pathlib.Path, files: Dict[str, list]) -> Optional[str]:
    missing = [s for s in ("train", "test") if not files[s]]
    if not missing:
        return None
    found = sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    hint = ""
    if found and not set(found) & set(images.SPLIT_FOLDERS):
        hint = (f" {path} holds the folders {', '.join(found[:8])}: if these are classes, move "
                f"them into {path}/train/ and put test images in {path}/test/<class>/.")
    return (f"folder:{path} has no {' and no '.join(s + '/<class>/' for s in missing)} images "
            f"(expected {path}/train/<class>/*.jpg|png and {path}/test/<class>/*.jpg|png, "
            f"optionally val/<class>/).{hint}")


def _decode(path: pathlib.Path, image_size: Optional[Tuple[int, int]]) -> Dict[str, np.ndarray]:
    origin = f"folder:{path}"
    files, ignored = images.collect_tree(path)
    error = _layout_error(path, files)
    if error:
        raise ValueError(error)
    class_names = sorted({cls for cls, _, _ in files["train"]})
    index = {c: i for i, c in enumerate(class_names)}
    for split in ALL_SPLITS:
        extra = sorted({cls for cls, _, _ in files[split]} - set(index))
        if extra:
            raise ValueError(
                f"{origin}: {split} holds class folder{'s' if len(extra) > 1 else ''} "
                f"{', '.join(extra)} with images that train/ lacks, so "
                f"{'they have' if len(extra) > 1 else 'it has'} no label: add training images in "
                f"train/{extra[0]}/ or remove the folder from {split}/.")
    # One decode for every split: they share one size and one channel count.
    items, splits = [], []
    for split in ALL_SPLITS:
        part = sorted(files[split], key=lambda t: (index[t[0]], t[1]))
        items += part
        splits += [split] * len(part)
    x, kept, bad = images.decode_images([t[2] for t in items], [t[1] for t in items],
                                        origin=origin, image_size=image_size)
    kept_splits = np.array(splits)[kept]
    labels = np.array([index[items[i][0]] for i in kept], np.int64)
    out = {"class_names": np.array(class_names, str),
           "skipped": np.array([f"{n}: {r}" for n, r in bad], str),
           "ignored": np.array(ignored, str)}
    for split in ALL_SPLITS:
        if split == "validation" and not files[split]:
            continue
        mask = kept_splits == split
        out[f"x_{split}"] = x[mask]
        out[f"y_{split}"] = labels[mask]
    return out


def _check_cached(arrays: Dict[str, np.ndarray], origin: str) -> Dict[str, np.ndarray]:
    need = ("x_train", "y_train", "x_test", "y_test", "class_names", "skipped", "ignored")
    if any(k not in arrays for k in need) or arrays["x_train"].dtype != np.uint8:
        raise ValueError(f"{origin} is not a tfqkd folder cache")
    return arrays


def load_folder(path: pathlib.Path, *, image_size: Optional[Tuple[int, int]],
                skip_corrupt: bool) -> Source:
    """The arrays of an image folder (or an archive of one), decoded once and cached."""
    origin = f"folder:{path}"
    if not path.exists():
        raise DataNotFoundError(f"{origin}: {path} does not exist. Point folder: at a folder "
                                "holding train/<class>/ and test/<class>/ image folders.")
    if path.is_file() and not images.is_archive(path):
        raise ValueError(f"{origin} is a file, neither a folder nor a .tar/.tar.gz/.tgz archive "
                         "of one (for a .npz of arrays use npz:PATH).")
    key = f"folder-{cache.source_key(path, 'folder', image_size)}"
    arrays = cache.cached_arrays(key, lambda: _decode(path, image_size), _check_cached, origin)
    images.report_corrupt(list(arrays["skipped"]), origin, skip_corrupt)
    images.ignored_warning(list(arrays["ignored"]), origin)
    data = {k: v for k, v in arrays.items() if k.startswith(("x_", "y_"))}
    if not len(data["x_train"]):
        raise ValueError(f"{origin}: no training image could be decoded.")
    return Source(origin, data, tuple(str(c) for c in arrays["class_names"]), key,
                  "one class per folder of train/")
