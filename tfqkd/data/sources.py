"""Data set names and specs → arrays and :class:`~tfqkd.data.DatasetInfo`: :func:`dataset_info`
and :func:`load_arrays`, with the validation split carved the same way for every source."""

from __future__ import annotations

import os
import pathlib
from typing import Optional, Tuple, Union

import numpy as np

from tfqkd.data import builtin, folder, images, normalization, npz, tfds_source
from tfqkd.data.info import (
    DatasetInfo, ImageSize, PathLike, Source, check_image_size, check_split)

__all__ = ["dataset_info", "load_arrays", "parse_name", "split_arrays", "validation_indices"]

_KINDS = ("folder", "npz", "tfds")
Validation = Union[None, float]


def parse_name(name: str) -> Tuple[str, str]:
    """``(kind, argument)`` of a data set name: ``("builtin", "cifar10")``, ``("folder", PATH)``...

    Example:
        >>> parse_name("folder:/data/flowers"), parse_name("CIFAR10")
        (('folder', '/data/flowers'), ('builtin', 'cifar10'))
    """
    if isinstance(name, str):
        kind, sep, arg = name.partition(":")
        if sep and kind.lower() in _KINDS:
            if not arg:
                what = "data set" if kind.lower() == "tfds" else "path"
                raise ValueError(f"Data set {name!r} names no {what} after '{kind}:'.")
            return kind.lower(), arg
        if name.lower() in builtin.KNOWN_DATASETS:
            return "builtin", name.lower()
    hint = ""
    if isinstance(name, str) and name and os.path.exists(os.path.expanduser(name)):
        kind = "npz" if name.lower().endswith(".npz") else "folder"
        hint = f" {name!r} is a path: pass {kind}:{name} to read it."
    raise ValueError(
        f"Unknown data set {name!r}: choose one of {', '.join(builtin.KNOWN_DATASETS)}, or name "
        "your own data as folder:PATH (PATH/train/<class>/*.jpg, PATH/test/<class>/*.jpg), "
        f"npz:PATH (x_train, y_train, x_test, y_test) or tfds:NAME.{hint}")


def _path(arg: str, data_dir: Optional[PathLike]) -> pathlib.Path:
    path = pathlib.Path(arg).expanduser()
    if not path.is_absolute() and data_dir is not None:
        path = pathlib.Path(os.fspath(data_dir)).expanduser() / path
    return path


def _resolve(kind: str, arg: str, data_dir: Optional[PathLike], size: Optional[Tuple[int, int]],
             skip_corrupt: bool, download: bool) -> Source:
    if kind == "folder":
        return folder.load_folder(_path(arg, data_dir), image_size=size,
                                  skip_corrupt=skip_corrupt)
    if kind == "npz":
        return npz.load_npz(_path(arg, data_dir))
    if kind == "tfds":
        return tfds_source.load_tfds(arg, data_dir=data_dir, image_size=size, download=download,
                                     skip_corrupt=skip_corrupt)
    info = builtin.builtin_info(arg)
    arrays = builtin.load_builtin(arg, data_dir, download, skip_corrupt)
    arrays = {k: v for k, v in arrays.items() if k.startswith(("x_", "y_"))}
    return Source(arg, arrays, info.class_names, "", f"{arg} has {info.num_classes} classes")


def dataset_info(name: str, *, data_dir: Optional[PathLike] = None, image_size: ImageSize = None,
                 skip_corrupt: bool = False, download: bool = False) -> DatasetInfo:
    """Describes data set ``name`` (a built-in name or a ``folder:`` / ``npz:`` / ``tfds:`` spec).

    Built-in sets are described without loading them (their statistics are the canonical ones);
    your own data is loaded (decoded once and cached) and its ``mean`` / ``std`` computed from
    its training split at ``image_size``. Arguments are those of :func:`load_arrays`.

    Example:
        >>> info = dataset_info("digits")
        >>> info.num_classes, info.input_shape, info.train_size
        (10, (8, 8, 1), 1437)
        >>> dataset_info("cifar10", image_size=96).input_shape
        (96, 96, 3)
    """
    kind, arg = parse_name(name)
    size = check_image_size(image_size)
    if kind == "builtin":
        info = builtin.builtin_info(arg)
        if size is not None:
            info = dataclasses_replace(info, input_shape=size + info.input_shape[2:])
        return info
    source = _resolve(kind, arg, data_dir, size, bool(skip_corrupt), bool(download))
    x = source.arrays["x_train"]
    shape = (size or tuple(x.shape[1:3])) + (int(x.shape[3]),)
    mean, std = normalization.train_statistics(x, source.key, shape[:2])
    return DatasetInfo(
        name, len(source.class_names), tuple(int(d) for d in shape), mean, std,
        source.class_names, len(x), len(source.arrays["x_test"]),
        len(source.arrays.get("x_validation", ())))


def dataclasses_replace(info: DatasetInfo, **changes) -> DatasetInfo:
    import dataclasses

    return dataclasses.replace(info, **changes)


def _check_validation(validation: Validation) -> Optional[float]:
    if validation is None:
        return None
    if isinstance(validation, bool) or not isinstance(validation, (float, int, np.floating)) \
            or not 0 < float(validation) < 1:
        raise ValueError(f"validation must be a fraction of the training images between 0 and 1 "
                         f"(e.g. 0.1), or None, got {validation!r}.")
    return float(validation)


def validation_indices(y: np.ndarray, fraction: float, num_classes: int) -> np.ndarray:
    """Sorted indices of the training images carved out as the validation split.

    ``round(fraction * n)`` images of every class of ``n`` images (at least one, and at least one
    left for training, when a class has two or more), drawn with a fixed seed: the same images
    for every run, whatever its ``seed``.

    Example:
        >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
        >>> idx = validation_indices(y, 0.25, 2)
        >>> np.bincount(y[idx]).tolist(), idx.tolist() == validation_indices(y, 0.25, 2).tolist()
        ([1, 2], True)
    """
    rng = np.random.default_rng(0)  # a choice of data, not training noise: never the run's seed
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        n = len(members)
        k = min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 else 0
        picks.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def load_arrays(
    name: str,
    split: str,
    *,
    data_dir: Optional[PathLike] = None,
    download: bool = False,
    image_size: ImageSize = None,
    skip_corrupt: bool = False,
    validation: Validation = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Raw images and labels of one split: ``(x uint8 (N, H, W, C), y int64 (N,))``.

    Args:
        name: ``cifar10``, ``cifar100``, ``digits``, or your own data: ``folder:PATH``,
            ``npz:PATH`` or ``tfds:NAME`` (see :mod:`tfqkd.data`).
        split: ``train``, ``test`` or ``validation``.
        data_dir: For built-in names, an offline source (folder, ``.tar.gz`` archive or ``.npz``
            file; default ``$TFQKD_DATA_DIR``); for ``tfds:``, tfds' data folder; for
            ``folder:`` / ``npz:``, the folder a relative ``PATH`` is relative to.
        download: Let tensorflow-datasets download the data if it is not prepared (needs
            internet; off by default so that an offline machine fails fast instead of hanging).
        image_size: Resize every image to this ``(height, width)`` (an integer: square), with
            the bilinear, antialiased resize of :func:`tfqkd.data.images.resize_uint8`.
            ``None``: keep the images' size (a folder whose images differ in size then needs it).
        skip_corrupt: Leave undecodable image files out, with one warning naming how many and the
            first few; by default such a file is an error naming it.
        validation: A fraction (e.g. ``0.1``) of the training images to hold out as the
            ``validation`` split: class by class, with a fixed seed, so the same images every
            time; ``train`` then excludes them. ``None``: ``train`` is the whole training split,
            and ``validation`` is the source's own validation split (an error if it has none).

    Returns:
        NumPy arrays; without ``image_size`` they are read-only and shared with later calls
        (copy them to modify them).

    Raises:
        DataNotFoundError: no source holds the data (the message lists the sources and fixes).
        ValueError: bad arguments, or a source that exists but is malformed (a message naming
            the file, split or label at fault).

    Example:
        >>> x, y = load_arrays("digits", "test")
        >>> x.shape, x.dtype.name, y.dtype.name
        ((360, 8, 8, 1), 'uint8', 'int64')
        >>> xv, _ = load_arrays("digits", "validation", validation=0.1)
        >>> xt, _ = load_arrays("digits", "train", validation=0.1)
        >>> len(xv), len(xt)
        (142, 1295)
    """
    x, y, _ = split_arrays(name, split, data_dir=data_dir, download=download,
                           image_size=image_size, skip_corrupt=skip_corrupt,
                           validation=validation)
    size = check_image_size(image_size)
    if size is not None and tuple(x.shape[1:3]) != size:
        x = np.concatenate([images.resize_uint8(x[i:i + 2048], size).numpy()
                            for i in range(0, len(x), 2048)] or [x[:0]])
    return x, y


def split_arrays(name: str, split: str, *, data_dir, download, image_size, skip_corrupt,
                 validation) -> Tuple[np.ndarray, np.ndarray, Source]:
    """One split's arrays at the source's own size (the pipelines resize them per batch)."""
    kind, arg = parse_name(name)
    split = check_split(split)
    fraction = _check_validation(validation)
    size = check_image_size(image_size)
    source = _resolve(kind, arg, data_dir, size, bool(skip_corrupt), bool(download))
    arrays = source.arrays
    own = "x_validation" in arrays
    if fraction is not None and own:
        raise ValueError(
            f"{source.origin} has its own validation split ({len(arrays['x_validation'])} "
            f"images): drop validation={validation!r}, or remove that split from the source to "
            "carve one from the training images.")
    if split == "test" or (split == "validation" and own) \
            or (split == "train" and fraction is None):
        return arrays[f"x_{split}"], arrays[f"y_{split}"], source
    if fraction is None:
        raise ValueError(
            f"{source.origin} has no validation split of its own: pass validation=0.1 to hold "
            "out 10% of the training images, class by class, as the validation split (and leave "
            "them out of train).")
    x, y = arrays["x_train"], arrays["y_train"]
    held = validation_indices(y, fraction, len(source.class_names))
    if split == "validation":
        return x[held], y[held], source
    keep = np.setdiff1d(np.arange(len(y)), held)
    return x[keep], y[keep], source
