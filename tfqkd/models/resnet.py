"""CIFAR ResNets: ResNet20, WideResNet20xN and a tiny family for tests and the quick start.

All models output logits (no softmax): the distillation losses soften them with a temperature.
Downsampling shortcuts are 1x1 convolutions + batch norm (He et al.'s option B), which converts to
TFLite and quantizes like every other convolution; ResNet20 then has 0.27 M parameters.

Example:
    >>> import tfqkd
    >>> model = tfqkd.models.resnet20(num_classes=10, seed=0)
    >>> 260_000 < model.count_params() < 280_000
    True
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

from tfqkd._keras import keras

__all__ = ["resnet20", "wide_resnet20", "tiny_resnet", "cifar_resnet", "PAPER_WIDTHS"]

#: Teacher widths studied in the paper (WideResNet20xN; N=1 is ResNet20).
PAPER_WIDTHS: Tuple[float, ...] = (1, 1.2, 1.5, 1.7, 2, 3, 4, 5, 10)


class _Seeds:
    """Hands out one distinct seed per initializer so that a model seed fixes every weight."""

    def __init__(self, seed: Optional[int]):
        self._seed = seed
        self._count = 0

    def __call__(self) -> Optional[int]:
        if self._seed is None:
            return None
        self._count += 1
        return self._seed * 1000 + self._count


def _check_width(width: float) -> None:
    if not isinstance(width, (int, float)) or isinstance(width, bool) or width <= 0:
        raise ValueError(
            f"width must be a positive number (e.g. one of {PAPER_WIDTHS}), got {width!r}."
        )


def cifar_resnet(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    stage_filters: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 3,
    weight_decay: float = 1e-4,
    seed: Optional[int] = None,
    name: str = "resnet",
) -> keras.Model:
    """Builds a CIFAR-style ResNet of basic blocks (He et al. 2016, section 4.2).

    A 3x3 stem convolution with ``stage_filters[0]`` filters, then one stage per entry of
    ``stage_filters`` with ``blocks_per_stage`` basic blocks each (stride 2 at the start of every
    stage but the first), global average pooling and a dense classifier producing logits.

    Args:
        num_classes: Number of output logits.
        input_shape: Shape of one input image (height, width, channels).
        stage_filters: Filters of each stage.
        blocks_per_stage: Basic blocks per stage (3 gives ResNet20 for three stages).
        weight_decay: Decoupled-style weight decay coefficient expressed as an L2 regularizer on
            kernels: the regularizer adds ``weight_decay / 2 * sum(w**2)`` so that its gradient is
            ``weight_decay * w``, the usual SGD weight decay. 0 disables it.
        seed: Makes the initial weights deterministic; ``None`` draws them at random.
        name: Model name.

    Returns:
        An uncompiled functional ``tf_keras`` model.

    Example:
        >>> m = cifar_resnet(10, (8, 8, 1), stage_filters=(4, 8), blocks_per_stage=1, seed=1)
        >>> m.output_shape
        (None, 10)
    """
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Real)
        or int(num_classes) != num_classes
        or num_classes < 2
    ):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if blocks_per_stage < 1 or not stage_filters:
        raise ValueError("need at least one stage and one block per stage.")
    seeds = _Seeds(seed)
    reg = keras.regularizers.l2(weight_decay / 2.0) if weight_decay else None

    def conv(x, filters, kernel, stride, lname):
        return keras.layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False,
            kernel_initializer=keras.initializers.HeNormal(seed=seeds()),
            kernel_regularizer=reg, name=lname,
        )(x)

    def bn(x, lname):
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=lname)(x)

    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = conv(inputs, stage_filters[0], 3, 1, "stem_conv")
    x = bn(x, "stem_bn")
    x = keras.layers.ReLU(name="stem_relu")(x)
    for s, filters in enumerate(stage_filters):
        for b in range(blocks_per_stage):
            stride = 2 if (s > 0 and b == 0) else 1
            p = f"stage{s + 1}_block{b + 1}"
            shortcut = x
            y = conv(x, filters, 3, stride, f"{p}_conv1")
            y = bn(y, f"{p}_bn1")
            y = keras.layers.ReLU(name=f"{p}_relu1")(y)
            y = conv(y, filters, 3, 1, f"{p}_conv2")
            y = bn(y, f"{p}_bn2")
            if stride != 1 or shortcut.shape[-1] != filters:
                shortcut = conv(shortcut, filters, 1, stride, f"{p}_proj_conv")
                shortcut = bn(shortcut, f"{p}_proj_bn")
            x = keras.layers.Add(name=f"{p}_add")([y, shortcut])
            x = keras.layers.ReLU(name=f"{p}_relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(
        int(num_classes),
        kernel_initializer=keras.initializers.HeNormal(seed=seeds()),
        kernel_regularizer=reg, name="classifier",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def wide_resnet20(
    width: float,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    weight_decay: float = 1e-4,
    seed: Optional[int] = None,
) -> keras.Model:
    """WideResNet20xN: ResNet20 with every stage's filters multiplied by ``width``.

    Fractional widths round to the nearest integer number of filters (x1.5 gives 24/48/96);
    ``width=1`` builds exactly :func:`resnet20`.

    Example:
        >>> wide_resnet20(2, seed=0).count_params() > resnet20(seed=0).count_params()
        True
    """
    _check_width(width)
    filters = tuple(max(1, int(round(f * width))) for f in (16, 32, 64))
    label = f"{width:g}".replace(".", "_")
    return cifar_resnet(
        num_classes, input_shape, stage_filters=filters, blocks_per_stage=3,
        weight_decay=weight_decay, seed=seed,
        name="resnet20" if width == 1 else f"wide_resnet20x{label}",
    )


def resnet20(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    *,
    weight_decay: float = 1e-4,
    seed: Optional[int] = None,
) -> keras.Model:
    """The CIFAR ResNet20 of He et al. 2016: 3 stages x 3 basic blocks, 16/32/64 filters.

    Example:
        >>> resnet20(100, seed=0).output_shape
        (None, 100)
    """
    return wide_resnet20(1, num_classes, input_shape, weight_decay=weight_decay, seed=seed)


def tiny_resnet(
    num_classes: int = 10,
    input_shape: Sequence[int] = (8, 8, 1),
    *,
    width: float = 1,
    weight_decay: float = 0.0,
    seed: Optional[int] = None,
) -> keras.Model:
    """A two-stage, one-block-per-stage ResNet (8/16 filters x ``width``) for tests and demos.

    It has every layer type of ResNet20 (conv, batch norm, ReLU, add, projection shortcut, pooling,
    dense), so code tested on it behaves the same on the real networks, in a fraction of the time.
    The default input shape is that of the built-in ``digits`` data set.

    Example:
        >>> tiny_resnet(10, seed=0).count_params() < 10_000
        True
    """
    _check_width(width)
    filters = tuple(max(1, int(round(f * width))) for f in (8, 16))
    label = f"{width:g}".replace(".", "_")
    return cifar_resnet(
        num_classes, input_shape, stage_filters=filters, blocks_per_stage=1,
        weight_decay=weight_decay, seed=seed, name=f"tiny_resnetx{label}",
    )
