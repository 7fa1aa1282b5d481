"""How pixels become model inputs: per-channel statistics of the training split, or an
Applications model's own ``preprocess_input``.

``normalization`` (an argument of :func:`tfqkd.data.load_dataset`) is one of

* ``None`` / ``"mean_std"`` (default): ``(x / 255 - mean) / std`` per channel, with
  :func:`tfqkd.data.dataset_info`'s ``mean`` / ``std``: computed from the **training** split
  (never the test split) of your own data and cached, the canonical constants for CIFAR;
* ``"imagenet:<family>"``: the ``preprocess_input`` of a ``tf_keras.applications`` family
  (``mobilenet_v2``, ``efficientnet_b0``, ``resnet50``, ...), fed 0..255 pixels as those
  functions expect: use it with ImageNet-pretrained weights;
* a callable ``f(images float32 (B, H, W, C) in 0..255) -> model inputs``.

Example:
    >>> import numpy as np
    >>> f = normalizer("imagenet:mobilenet_v2")  # pixels / 127.5 - 1
    >>> f(tf.constant([[[[0.0, 0.5, 1.0]]]])).numpy().tolist()
    [[[[-1.0, 0.0, 1.0]]]]
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._keras import tf
from tfqkd.data import cache, images

__all__ = ["Normalization", "normalizer", "applications_preprocess_input",
           "train_statistics"]

Normalization = Union[None, str, Callable[[tf.Tensor], tf.Tensor]]

def applications_preprocess_input(family: str) -> Callable:
    """``tf_keras.applications.<module>.preprocess_input`` of a model family: delegates to
    :func:`tfqkd.models.preprocess_input`, the one owner of that mapping, so data pipelines and
    models agree (the identity for families that preprocess inside the model: EfficientNet,
    EfficientNetV2, MobileNetV3 take raw 0..255 pixels).

    Example:
        >>> applications_preprocess_input("ResNet50V2").__module__
        'tf_keras.src.applications.resnet_v2'
    """
    from tfqkd.models import applications  # lazy: data loading does not need the model zoo

    try:
        return applications.preprocess_input(family)
    except ValueError as err:
        raise ValueError(f"normalization='imagenet:{family}': {err}") from None


def normalizer(normalization: Normalization, mean: Sequence[float] = (0.0,),
               std: Sequence[float] = (1.0,)) -> Callable[[tf.Tensor], tf.Tensor]:
    """The function that maps ``float32`` pixels scaled to [0, 1] to model inputs (see the module
    docstring for the choices of ``normalization``)."""
    if normalization is None or normalization == "mean_std":
        m = tf.constant(mean, tf.float32)
        # A constant channel has std 0: one grey level keeps it finite instead of NaN.
        s = tf.constant(np.maximum(np.asarray(std, np.float32), 1 / 255), tf.float32)
        return lambda x: (x - m) / s
    if callable(normalization):
        return lambda x: normalization(x * 255.0)
    if isinstance(normalization, str) and normalization.startswith("imagenet:"):
        fn = applications_preprocess_input(normalization.split(":", 1)[1])
        return lambda x: fn(x * 255.0)
    raise ValueError(
        f"normalization={normalization!r}: use None or 'mean_std' (per-channel statistics of the "
        "training split), 'imagenet:<family>' (an Applications model's preprocess_input, e.g. "
        "'imagenet:mobilenet_v2') or a callable on float32 pixels in 0..255.")


def train_statistics(x: np.ndarray, key: str, image_size: Optional[Tuple[int, int]] = None,
                     ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of training images ``x`` (uint8) scaled to [0, 1], after
    resizing to ``image_size``; cached on disk under ``key`` (the source's content key).

    Example:
        >>> x = np.array([[[[0, 255]]], [[[255, 255]]]], np.uint8)  # 2 images, 1 pixel, 2 channels
        >>> train_statistics(x, key="")
        ((0.5, 1.0), (0.5, 0.0))
    """
    path = cache.cache_dir() / f"{key}-stats-{'x'.join(map(str, image_size or ()))}.json"
    found = cache.read_json(path) if key else None
    if found and len(found.get("mean", ())) == x.shape[-1]:
        return tuple(found["mean"]), tuple(found["std"])
    total = np.zeros(x.shape[-1], np.float64)
    squares = np.zeros(x.shape[-1], np.float64)
    count = 0
    for start in range(0, len(x), 2048):  # bounded temporaries for large sets
        chunk = x[start:start + 2048]
        if image_size is not None and tuple(chunk.shape[1:3]) != tuple(image_size):
            chunk = images.resize_uint8(chunk, image_size).numpy()
        chunk = chunk.astype(np.float64).reshape(-1, x.shape[-1]) / 255.0
        total += chunk.sum(axis=0)
        squares += np.square(chunk).sum(axis=0)
        count += len(chunk)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean ** 2, 0.0))
    result = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if key:
        cache.write_json(path, {"mean": result[0], "std": result[1]})
    return result
