"""``tf.data`` pipelines: batched, normalised, optionally augmented and shuffled images."""

from __future__ import annotations

from typing import Optional

import numpy as np

from tfqkd._keras import tf
from tfqkd.data import builtin, normalization as norm_lib, sources
from tfqkd.data.images import resize_uint8
from tfqkd.data.info import ImageSize, PathLike, check_image_size, check_split

__all__ = ["load_dataset", "balanced_subset"]

# Padding (as a fraction of the image height) and flip of the augmentation of your own data:
# CIFAR's (4 pixels at 32, mirrored), a fit for natural images.
_DEFAULT_AUGMENTATION = (4 / 32, True)


def balanced_subset(y: np.ndarray, subset: int, num_classes: int,
                    seed: Optional[int]) -> np.ndarray:
    """Sorted indices of ``subset`` images, ``subset / num_classes`` drawn from every class.

    The choice :func:`load_dataset` makes for its ``subset`` argument (with ``subset_seed``, else
    ``seed``): use it to find the images a subset-trained model saw, or, with
    ``numpy.setdiff1d``, the ones it never saw.

    Args:
        y: Integer labels ``(N,)`` in ``0..num_classes - 1``.
        subset: Images to pick, a multiple of ``num_classes``.
        num_classes: Number of classes.
        seed: Seed of the choice (``None``: a fixed choice, the one of seed 0).

    Raises:
        ValueError: ``subset`` is not a multiple of ``num_classes``, or needs more images of a
            class than ``y`` holds.

    Example:
        >>> idx = balanced_subset(np.array([0, 1, 0, 1, 0, 1]), 4, 2, seed=0)
        >>> len(idx), np.bincount(np.array([0, 1, 0, 1, 0, 1])[idx]).tolist()
        (4, [2, 2])
    """
    counts = np.bincount(y, minlength=num_classes)
    largest = int(counts.min()) * num_classes
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < num_classes:
        raise ValueError(
            f"subset must be an integer number of images, a multiple of the {num_classes} classes "
            f"between {num_classes} and {largest}, got {subset!r}."
        )
    if subset % num_classes:
        lower = subset // num_classes * num_classes
        raise ValueError(
            f"subset={subset} is not divisible by the {num_classes} classes, so it cannot be "
            f"class-balanced: use a multiple of {num_classes}, e.g. {lower} or "
            f"{lower + num_classes}."
        )
    if subset > largest:
        raise ValueError(
            f"subset={subset} is larger than the split allows: a class-balanced subset holds at "
            f"most {largest} images ({int(counts.min())} per class x {num_classes} classes)."
        )
    # The subset is a choice of data, not training noise: seed None still picks a fixed subset.
    rng = np.random.default_rng(0 if seed is None else seed)
    per_class = subset // num_classes
    picks = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(picks))


def _augment(images: tf.Tensor, seed: tf.Tensor, padding: int, flip: bool) -> tf.Tensor:
    """Pad + random crop (+ horizontal flip) of a batch, each image its own draw."""
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    top = tf.random.stateless_uniform([batch], seeds[0], 0, 2 * padding + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([batch], seeds[1], 0, 2 * padding + 1, dtype=tf.int32)
    rows = top[:, None] + tf.range(height)[None, :]
    cols = left[:, None] + tf.range(width)[None, :]
    # Two batched gathers crop every image at its own offset in one vectorised op.
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    if flip:
        mirror = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
        out = tf.where(mirror[:, None, None, None], tf.reverse(out, axis=[2]), out)
    return out


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: Optional[PathLike] = None,
    batch_size: int = 128,
    augment: Optional[bool] = None,
    subset: Optional[int] = None,
    seed: Optional[int] = None,
    shuffle: Optional[bool] = None,
    drop_remainder: bool = False,
    download: bool = False,
    subset_seed: Optional[int] = None,
    image_size: ImageSize = None,
    skip_corrupt: bool = False,
    validation: Optional[float] = None,
    normalization: norm_lib.Normalization = None,
) -> tf.data.Dataset:
    """A batched, normalised, optionally augmented and shuffled ``tf.data`` pipeline.

    Args:
        name: ``cifar10``, ``cifar100``, ``digits``, or your own data: ``folder:PATH``,
            ``npz:PATH`` or ``tfds:NAME`` (see :mod:`tfqkd.data`).
        split: ``train``, ``test`` or ``validation`` (see ``validation``).
        data_dir: Where the data is (see :func:`tfqkd.data.load_arrays`); for built-in names it
            defaults to ``$TFQKD_DATA_DIR``.
        batch_size: Images per batch (>= 1).
        augment: Standard augmentation; ``None`` means "on for the training split".
        subset: Use only this many images, the same number from every class (must be a multiple
            of the number of classes); chosen by ``subset_seed``, default ``seed`` (``None``:
            a fixed choice).
        seed: Makes shuffling, augmentation and the subset reproducible: the same seed gives the
            same batches. Like every TensorFlow op seed, the shuffle order and augmentation
            draws combine it with TensorFlow's global seed (``tf.random.set_seed``,
            ``keras.utils.set_random_seed``): the same pair gives the same batches (the subset
            depends on ``subset_seed``, else ``seed``, alone). ``None`` draws them at random.
        subset_seed: Seed of the subset choice only, when it must stay fixed while ``seed``
            varies (runs with different seeds on the same images); default ``seed``.
        shuffle: Shuffle every epoch; ``None`` means "on for the training split".
        drop_remainder: Drop the last, smaller batch.
        download: Let tensorflow-datasets download the data if no local source has it.
        image_size: Resize every image to ``(height, width)`` (an integer: square); ``None``
            keeps the data's own size.
        skip_corrupt: Leave undecodable image files out with one warning, instead of an error
            naming the first.
        validation: Hold out this fraction of the training images (class by class, always the
            same ones) as the ``validation`` split, and leave them out of ``train``; ``None``:
            ``validation`` is the source's own split, if it has one.
        normalization: ``None`` / ``"mean_std"`` (the per-channel ``mean`` / ``std`` of
            :func:`tfqkd.data.dataset_info`, from the training split), ``"imagenet:<family>"``
            (an Applications model's ``preprocess_input``, e.g. ``"imagenet:mobilenet_v2"``), or
            a callable on ``float32`` pixels in 0..255.

    Returns:
        A dataset of ``(images float32 (B, H, W, C), labels int32 (B,))``, images normalised as
        ``normalization`` says.

    Example:
        >>> ds = load_dataset("digits", "test", batch_size=100)
        >>> [int(y.shape[0]) for _, y in ds]
        [100, 100, 100, 60]
    """
    split = check_split(split)
    size = check_image_size(image_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    for flag, value in (("augment", augment), ("shuffle", shuffle)):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{flag} must be True, False or None (split default), got {value!r}.")
    for flag, value in (("seed", seed), ("subset_seed", subset_seed)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, np.integer))):
            raise ValueError(f"{flag} must be an integer or None, got {value!r}.")
    norm_lib.normalizer(normalization)  # a bad choice fails before any data is read
    source_kw = dict(data_dir=data_dir, download=download, image_size=size,
                     skip_corrupt=skip_corrupt)
    info = sources.dataset_info(name, **source_kw)
    augment = split == "train" if augment is None else bool(augment)
    shuffle = split == "train" if shuffle is None else bool(shuffle)

    x, y, _ = sources.split_arrays(name, split, validation=validation, **source_kw)
    if subset is not None:
        keep = balanced_subset(y, subset, info.num_classes,
                               seed if subset_seed is None else subset_seed)
        x, y = x[keep], y[keep]

    images = tf.constant(x)
    labels = tf.constant(y.astype(np.int32))
    normalise = norm_lib.normalizer(normalization, info.mean, info.std)
    height, width = info.input_shape[:2]
    resize = tuple(x.shape[1:3]) != (height, width)
    kind, arg = sources.parse_name(name)
    fraction, flip = builtin.AUGMENTATION[arg] if kind == "builtin" else _DEFAULT_AUGMENTATION
    padding = max(1, int(round(fraction * height)))

    # Shuffle and batch indices, then gather: the shuffle buffer holds integers, not images.
    ds = tf.data.Dataset.range(len(y))
    if shuffle:
        ds = ds.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(int(batch_size), drop_remainder=bool(drop_remainder))

    def prepare(idx, aug_seed=None):
        batch = tf.gather(images, idx)
        if resize:  # the same resize as load_arrays(image_size=...), batch by batch
            batch = resize_uint8(batch, (height, width))
        batch = tf.cast(batch, tf.float32) / 255.0
        if aug_seed is not None:
            batch = _augment(batch, aug_seed, padding, flip)
        return normalise(batch), tf.gather(labels, idx)

    if augment:
        # One stateless seed pair per batch from a seeded stream: reproducible for a given seed,
        # fresh draws every epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
