"""``tf_keras.applications`` CNNs (and the CIFAR ResNets) by snake_case name, offline.

:func:`get` builds a model at any input size (>= the family's minimum, :func:`min_input_size`) and
width (``alpha``, for the families that have one), with random weights or weights read from a
local file; it never downloads (no machine running tfqkd is assumed to reach the internet).
Applications models end in a softmax (``include_softmax=True``, what the family builds) or in
logits (``include_softmax=False``); tfqkd's Distiller takes either (see :mod:`tfqkd.models.heads`).

**Inputs.** Each family expects its own input range. :func:`preprocess_input` is the family's
``tf_keras.applications.<module>.preprocess_input``, the one function data pipelines should apply
to 0..255 pixels (``tfqkd.data.load_dataset(..., normalization="imagenet:<name>")`` does). The
families that carry their preprocessing inside the model (:func:`takes_raw_pixels`: EfficientNet,
EfficientNetV2 and MobileNetV3 have ``Rescaling`` / ``Normalization`` layers) take raw 0..255
pixels, and their ``preprocess_input`` is the identity, so the preprocessing is never applied
twice. The others take ``[-1, 1]`` (MobileNet, MobileNetV2, ResNetV2, NASNet: ``x / 127.5 - 1``),
ImageNet mean/std-scaled RGB (DenseNet) or BGR minus the ImageNet mean (ResNet50/101/152).
:func:`input_adapter` converts between two of these conventions (a teacher of one family on a
student's batches of another).

Example:
    >>> m = get("efficientnet_b0", 10, (32, 32, 3))
    >>> m.output_shape, takes_raw_pixels("efficientnet_b0"), takes_raw_pixels("mobilenet_v2")
    ((None, 10), True, False)
    >>> "mobilenet_v3_small" in names() and "resnet20" in names()
    True
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfqkd._keras import keras, tf
from tfqkd.models import resnet as _resnet

__all__ = ["get", "names", "has_alpha", "smallest_alpha", "preprocess_input", "min_input_size", "takes_raw_pixels",
           "expects_raw_pixels", "input_adapter"]

# name -> (tf_keras.applications module, constructor, has alpha, takes raw 0..255 pixels)
_APPLICATIONS: Dict[str, Tuple[str, str, bool, bool]] = {
    "mobilenet": ("mobilenet", "MobileNet", True, False),
    "mobilenet_v2": ("mobilenet_v2", "MobileNetV2", True, False),
    "mobilenet_v3_small": ("mobilenet_v3", "MobileNetV3Small", True, True),
    "mobilenet_v3_large": ("mobilenet_v3", "MobileNetV3Large", True, True),
    **{f"efficientnet_b{i}": ("efficientnet", f"EfficientNetB{i}", False, True) for i in range(8)},
    **{f"efficientnet_v2_b{i}": ("efficientnet_v2", f"EfficientNetV2B{i}", False, True)
       for i in range(4)},
    **{f"efficientnet_v2_{s}": ("efficientnet_v2", f"EfficientNetV2{s.upper()}", False, True)
       for s in ("s", "m", "l")},
    **{f"resnet{d}": ("resnet", f"ResNet{d}", False, False) for d in (50, 101, 152)},
    **{f"resnet{d}_v2": ("resnet_v2", f"ResNet{d}V2", False, False) for d in (50, 101, 152)},
    **{f"densenet{d}": ("densenet", f"DenseNet{d}", False, False) for d in (121, 169, 201)},
    "nasnet_mobile": ("nasnet", "NASNetMobile", False, False),
}
# tf_keras' own minimum (obtain_input_shape(min_size=32)) for every family above.
_MIN_SIZE = 32
_CIFAR = ("resnet20", "wide_resnet20", "tiny_resnet")


def names() -> List[str]:
    """Every name :func:`get` accepts (Applications families, then the CIFAR ResNets).

    Example:
        >>> names()[:3]
        ['mobilenet', 'mobilenet_v2', 'mobilenet_v3_small']
    """
    return [*_APPLICATIONS, *_CIFAR]


def _key(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key in _APPLICATIONS or key in _CIFAR:
        return key
    # Also accept the class names ("MobileNetV2", "EfficientNetB0", "ResNet50V2").
    squashed = re.sub(r"[^a-z0-9]", "", key)
    for known in (*_APPLICATIONS, *_CIFAR):
        if known.replace("_", "") == squashed:
            return known
    raise ValueError(
        f"unknown model name {name!r}; tfqkd.models.get knows: {', '.join(names())}.")


def min_input_size(name: str) -> int:
    """The smallest input height/width the family builds at (its strides need it).

    Example:
        >>> min_input_size("mobilenet_v2"), min_input_size("tiny_resnet")
        (32, 4)
    """
    return _MIN_SIZE if _key(name) in _APPLICATIONS else 4


def has_alpha(name: str) -> bool:
    """True for the families with a width multiplier ``alpha`` (MobileNet V1/V2/V3).

    Example:
        >>> has_alpha("mobilenet_v2"), has_alpha("efficientnet_b0")
        (True, False)
    """
    key = _key(name)
    return key in _APPLICATIONS and _APPLICATIONS[key][2]


#: The smallest width with published ImageNet weights, per family with an ``alpha``.
_SMALLEST_ALPHA = {"mobilenet": 0.25, "mobilenet_v2": 0.35, "mobilenet_v3_small": 0.75,
                   "mobilenet_v3_large": 0.75}


def smallest_alpha(name: str) -> float:
    """The smallest published width of ``name`` (1.0 for a family without ``alpha``).

    Example:
        >>> smallest_alpha("mobilenet_v2"), smallest_alpha("resnet50")
        (0.35, 1.0)
    """
    return _SMALLEST_ALPHA.get(_key(name), 1.0)


def takes_raw_pixels(name: str) -> bool:
    """True when the model preprocesses inside itself and takes raw 0..255 pixels.

    The CIFAR ResNets take per-channel standardised inputs (``False``).
    """
    key = _key(name)
    return key in _APPLICATIONS and _APPLICATIONS[key][3]


def expects_raw_pixels(model: keras.Model) -> bool:
    """True when a built model preprocesses its inputs itself: its first layer after the input is
    a ``Rescaling`` layer (EfficientNet/V2, MobileNetV3, also quantized, saved and loaded).

    Example:
        >>> expects_raw_pixels(get("mobilenet_v3_small", 3, (32, 32, 3), alpha=0.35))
        True
        >>> expects_raw_pixels(get("tiny_resnet", 3, (8, 8, 1)))
        False
    """
    for layer in getattr(model, "layers", ())[:4]:
        # Skip the input and tfmot's input quantizer (a QAT model); look inside QAT wrappers.
        if isinstance(layer, keras.layers.InputLayer) or type(layer).__name__ == "QuantizeLayer":
            continue
        return isinstance(getattr(layer, "layer", layer), keras.layers.Rescaling)
    return False


def preprocess_input(name: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """The family's ``tf_keras.applications.<module>.preprocess_input`` (0..255 pixels in).

    The identity for the families that preprocess inside the model (:func:`takes_raw_pixels`).
    Any Applications module name or model name is accepted (``"resnet_v2"``, ``"ResNet50V2"``,
    ``"inception_v3"``, ``"convnext_tiny"``...).

    Example:
        >>> preprocess_input("ResNet50V2").__module__
        'tf_keras.src.applications.resnet_v2'
        >>> float(preprocess_input("mobilenet_v2")(tf.constant([255.0])).numpy()[0])
        1.0
    """
    try:
        module = _APPLICATIONS[_key(name)][0]
    except ValueError:
        module = _module_of(name)
    except KeyError:
        raise ValueError(
            f"{name!r} is a CIFAR ResNet: it has no Applications preprocess_input; feed it "
            "per-channel standardised images (normalization=None).") from None
    return importlib.import_module(f"tf_keras.applications.{module}").preprocess_input


# Families beyond the ones get() builds, by prefix of the squashed name (for preprocess_input).
_OTHER_MODULES = (
    (r"mobilenetv3", "mobilenet_v3"), (r"mobilenetv2", "mobilenet_v2"), (r"mobilenet", "mobilenet"),
    (r"efficientnetv2", "efficientnet_v2"), (r"efficientnet", "efficientnet"),
    (r"resnetrs", "resnet_rs"), (r"resnet\d*v2", "resnet_v2"), (r"resnet", "resnet"),
    (r"densenet", "densenet"), (r"nasnet", "nasnet"), (r"inceptionresnetv2", "inception_resnet_v2"),
    (r"inceptionv3", "inception_v3"), (r"xception", "xception"), (r"vgg16", "vgg16"),
    (r"vgg19", "vgg19"), (r"convnext", "convnext"), (r"regnet", "regnet"),
)


def _module_of(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    for pattern, module in _OTHER_MODULES:
        if re.match(pattern, key):
            return module
    raise ValueError(
        f"unknown Applications family {name!r}; use one of {', '.join(_APPLICATIONS)}, or "
        "inception_v3, xception, vgg16, convnext_*, regnet*.")


def _check_weights(weights) -> Optional[str]:
    if weights is None:
        return None
    path = os.fspath(weights) if isinstance(weights, os.PathLike) else weights
    if not isinstance(path, str):
        raise TypeError(f"weights must be None or a local file path, got {type(weights).__name__}.")
    if path.lower() in ("imagenet", "imagenet21k", "noisy-student"):
        raise ValueError(
            f"weights={path!r}: tfqkd never downloads weights. Download the file once on a machine "
            "with internet access (e.g. the .h5 tf_keras.applications fetches, "
            "'..._weights_tf_dim_ordering_tf_kernels.h5') and pass its local path: "
            "weights='/path/to/file.h5'; or weights=None for random initialisation.")
    if not (os.path.exists(path) or os.path.exists(path + ".index")):
        raise FileNotFoundError(
            f"weights file {path!r} does not exist: pass the path of a local .h5 / weights file, "
            "or weights=None.")
    return path


def get(name: str, num_classes: int, input_shape: Sequence[int], *, weights=None,
        alpha: float = 1.0, include_softmax: bool = True, width: float = 1.0,
        seed: Optional[int] = None) -> keras.Model:
    """Builds model ``name`` (see :func:`names`) for ``num_classes`` classes and ``input_shape``.

    Args:
        name: snake_case name (``"mobilenet_v2"``, ``"efficientnet_b0"``, ``"resnet50_v2"``,
            ``"densenet121"``, ``"nasnet_mobile"``, ..., ``"resnet20"``, ``"wide_resnet20"``,
            ``"tiny_resnet"``); the Keras class name (``"MobileNetV2"``) works too.
        num_classes: Classes of the classifier (the head is built for them).
        input_shape: ``(height, width, channels)``; height and width >= :func:`min_input_size`.
        weights: ``None`` (random) or the path of a local weights file (``.h5`` or a TensorFlow
            checkpoint) saved from the same architecture, ``num_classes`` and ``alpha``.
            Never downloads: ``"imagenet"`` is an error that says so.
        alpha: Width multiplier of MobileNet / MobileNetV2 / MobileNetV3 (> 0; with ImageNet
            weights only the published widths exist). Other families have no width: any value
            but 1.0 is an error.
        include_softmax: Applications models end in a softmax (True, as Keras builds them) or in
            logits (False). The CIFAR ResNets always output logits.
        width: Width of ``wide_resnet20`` / ``tiny_resnet``.
        seed: Initial-weight seed of the CIFAR ResNets (Applications models draw from the global
            seed, ``keras.utils.set_random_seed``).

    Returns:
        An uncompiled functional ``tf_keras`` model.

    Example:
        >>> get("mobilenet_v3_small", 5, (48, 48, 3), alpha=0.75).output_shape
        (None, 5)
        >>> get("resnet50", 10, (16, 16, 3))
        Traceback (most recent call last):
        ...
        ValueError: resnet50 needs inputs of at least 32x32 pixels, got input_shape=(16, 16, 3): use --image_size=32 or larger (image_size=32 in load_dataset).
    """
    key = _key(name)
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}.")
    if (isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    low = min_input_size(key)
    if min(shape[:2]) < low:
        raise ValueError(
            f"{key} needs inputs of at least {low}x{low} pixels, got input_shape={shape}: use "
            f"--image_size={low} or larger (image_size={low} in load_dataset).")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}.") from None
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha (the width multiplier) must be > 0, got {alpha!r}.")
    path = _check_weights(weights)
    if key in _CIFAR:
        if alpha != 1.0:
            raise ValueError(f"{key} has no alpha; set its width with width= (--teacher_width).")
        builder = {"resnet20": lambda: _resnet.resnet20(num_classes, shape, seed=seed),
                   "wide_resnet20": lambda: _resnet.wide_resnet20(width, num_classes, shape,
                                                                  seed=seed),
                   "tiny_resnet": lambda: _resnet.tiny_resnet(num_classes, shape, width=width,
                                                              seed=seed)}[key]
        model = builder()
    else:
        module, cls, has_alpha, _ = _APPLICATIONS[key]
        kwargs = dict(include_top=True, weights=None, input_shape=shape,
                      classes=int(num_classes),
                      classifier_activation="softmax" if include_softmax else None)
        if has_alpha:
            kwargs["alpha"] = alpha
        elif alpha != 1.0:
            raise ValueError(
                f"{key} has no width multiplier: alpha={alpha:g} applies to mobilenet, "
                "mobilenet_v2 and mobilenet_v3_* only; leave alpha at 1.0 (pick a smaller family "
                "member instead, e.g. efficientnet_b0).")
        constructor = getattr(keras.applications, cls)
        model = constructor(**kwargs)
    if path is not None:
        _load_weights(model, path, key, num_classes, alpha)
    return model


def _load_weights(model: keras.Model, path: str, key: str, num_classes: int, alpha: float) -> None:
    try:
        model.load_weights(path)
    except (ValueError, tf.errors.OpError, OSError, KeyError) as err:
        head = ""
        text = str(err)
        if re.search(r"shape|Shapes|incompatible", text):
            head = (f" The shapes do not fit: the file was saved from a different architecture, "
                    f"number of classes (this model has num_classes={num_classes}: a file with "
                    "an ImageNet 1000-class head or another data set's head does not fit) or "
                    f"width (alpha={alpha:g}).")
        raise ValueError(
            f"could not load weights {path!r} into {key}.{head} Pass a file saved with "
            f"model.save_weights from tfqkd.models.get({key!r}, {num_classes}, ...) with the same "
            f"options. ({type(err).__name__}: {text.splitlines()[0] if text else ''})") from None


def _affine(normalization: Callable, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` with ``f(x) = x @ A + b`` per pixel, for an affine per-pixel ``f``."""
    probe = np.concatenate([np.zeros((1, channels)), 255.0 * np.eye(channels)]).astype(np.float32)
    out = np.asarray(normalization(tf.constant(probe[None, None])), np.float64)[0, 0]
    b = out[0]
    a = (out[1:] - b) / 255.0
    return a, b


def input_adapter(from_normalization: Callable, to_normalization: Callable,
                  channels: int = 3) -> keras.layers.Layer:
    """A fixed (non-trainable) layer mapping inputs normalised by one function to another.

    Both are functions of 0..255 pixels (e.g. two families' :func:`preprocess_input`, or a
    per-channel ``(x / 255 - mean) / std``); every ``preprocess_input`` of tf_keras is affine per
    pixel (scale, offset, channel order), so the map is a 1x1 convolution, exact up to float
    rounding. Used to run a teacher of one family on a student's batches of another.

    Example:
        >>> layer = input_adapter(preprocess_input("mobilenet_v2"), preprocess_input("efficientnet_b0"))
        >>> [round(float(v), 3) for v in layer(tf.constant([[[[-1.0, 0.0, 1.0]]]]))[0, 0, 0]]
        [0.0, 127.5, 255.0]
    """
    a_from, b_from = _affine(from_normalization, channels)
    a_to, b_to = _affine(to_normalization, channels)
    # x_in = p A_f + b_f  ->  p = (x_in - b_f) A_f^-1  ->  x_out = p A_t + b_t.
    inv = np.linalg.inv(a_from)
    kernel = inv @ a_to
    bias = b_to - b_from @ kernel
    layer = keras.layers.Conv2D(channels, 1, name="input_adapter", trainable=False,
                                dtype="float32")
    layer.build((None, None, None, channels))
    layer.set_weights([kernel.reshape(1, 1, channels, channels).astype(np.float32),
                       bias.astype(np.float32)])
    return layer
