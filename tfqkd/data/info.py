"""What every data source shares: :class:`DatasetInfo`, :class:`DataNotFoundError`, split names,
argument checks and the label check that turns an out-of-range label into a clear error."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["DatasetInfo", "DataNotFoundError", "SPLITS", "PathLike", "ImageSize", "check_split",
           "check_image_size", "check_labels", "Source"]

PathLike = Union[str, os.PathLike]
ImageSize = Union[int, Sequence[int], None]

#: Split names every source answers (``validation``: the source's own or one carved from
#: ``train``, see :func:`tfqkd.data.load_arrays`).
SPLITS: Tuple[str, ...] = ("train", "test")
ALL_SPLITS: Tuple[str, ...] = ("train", "validation", "test")


class DataNotFoundError(FileNotFoundError):
    """No source holds the requested data set; the message lists the sources tried and the fixes.

    Example:
        >>> from tfqkd.data import load_arrays
        >>> try:
        ...     load_arrays("cifar10", "train", data_dir="/no/such/folder")
        ... except DataNotFoundError as e:
        ...     print("TFQKD_DATA_DIR" in str(e))
        True
    """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set.

    Attributes:
        name: The data set's name or spec, as passed to :func:`tfqkd.data.load_dataset`.
        num_classes: Number of classes (labels are ``0 .. num_classes - 1``).
        input_shape: Shape of one image as the pipelines deliver it, ``(height, width,
            channels)`` (``image_size`` applied).
        mean: Per-channel mean of the training images scaled to [0, 1], used to normalise.
        std: Per-channel standard deviation, idem.
        class_names: Class names in label order.
        train_size: Number of training images (the whole training split).
        test_size: Number of test images.
        validation_size: Number of images of the source's own validation split (0 when it has
            none; one can still be carved from ``train``, see :func:`tfqkd.data.load_arrays`).

    Example:
        >>> from tfqkd.data import dataset_info
        >>> dataset_info("cifar10").class_names[:3]
        ('airplane', 'automobile', 'bird')
    """

    name: str
    num_classes: int
    input_shape: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    class_names: Tuple[str, ...]
    train_size: int
    test_size: int
    validation_size: int = 0


@dataclasses.dataclass(frozen=True)
class Source:
    """The loaded arrays of one source (internal): ``x_/y_`` of ``train``, ``test`` and maybe
    ``validation``, at the source's own size."""

    origin: str  # names the source in messages, e.g. "folder:/data/flowers"
    arrays: Dict[str, np.ndarray]
    class_names: Tuple[str, ...]
    key: str  # identifies the content (statistics are cached under it)
    why: str  # where the class count comes from, for label errors


def check_split(split: str) -> str:
    if split not in ALL_SPLITS:
        raise ValueError(f"Unknown split {split!r}: choose one of {', '.join(ALL_SPLITS)}.")
    return split


def check_image_size(image_size: ImageSize) -> Optional[Tuple[int, int]]:
    """``None``, or ``(height, width)`` from an integer (square) or a pair of integers."""
    if image_size is None:
        return None
    if isinstance(image_size, str) and image_size.strip().isdigit():
        image_size = int(image_size)  # "96" from a command line or a config file
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    else:
        try:
            size = tuple(int(s) for s in image_size)
            ok = len(size) == 2 and all(
                not isinstance(s, bool) and int(s) == s for s in image_size)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"image_size must be an integer (square images) or a pair (height, width) of "
                f"integers, got {image_size!r}.")
    if min(size) < 1:
        raise ValueError(f"image_size must be >= 1 pixel, got {image_size!r}.")
    return size


def check_labels(arrays: Dict[str, np.ndarray], num_classes: int, origin: str,
                 why: str) -> None:
    """Raises a ``ValueError`` naming the source, split, label and class count for a label
    outside ``0 .. num_classes - 1`` (instead of a graph error deep inside training).

    ``why`` says where the class count comes from (e.g. "the class_names array").
    """
    for split in ALL_SPLITS:
        y = arrays.get(f"y_{split}")
        if y is None or not len(y):
            continue
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"{origin}: y_{split} has labels in [{y.min()}, {y.max()}]: label {y[i]} (index "
                f"{i}, one of {len(bad)} out of range) is not one of the {num_classes} classes "
                f"0..{num_classes - 1} ({why}). Fix the labels, or give every class a name so "
                f"that the class count is right.")
