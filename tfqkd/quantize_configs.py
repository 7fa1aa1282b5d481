"""tfmot ``QuantizeConfig``s of tfqkd: which tensors of a layer get which quantizer.

* :class:`KernelQuantizeConfig` (and its per-layer-type subclasses :class:`Conv2DQuantizeConfig`,
  :class:`DepthwiseConv2DQuantizeConfig`, :class:`DenseQuantizeConfig`): the kernel gets a
  :class:`~tfqkd.quantizers.SymmetricQuantizer`; a fused ReLU activation gets the activation
  quantizer when one is given. Biases stay float (TFLite stores them as int32 anyway).
* :class:`ActivationQuantizeConfig`: the output of a ``ReLU`` / ``Activation("relu")`` layer gets
  the activation quantizer.
* :class:`OutputQuantizeConfig`: the output of any other layer (a ``BatchNormalization`` feeding a
  residual ``Add``, a global average pooling…) gets an output quantizer, weights untouched. With
  ``activation_bits``, tfqkd uses it (and ``KernelQuantizeConfig(output_quantizer=...)`` for the
  logits) to model every tensor the full-integer TFLite graph rounds to int8.

They are registered with Keras (package ``tfqkd``) so that saved quantized models load back.
The registry that hands them out is :mod:`tfqkd.quantize_registry`. The activation facts the
registry and the exporter share (:data:`PINNED_OUTPUT_RANGES`, :func:`activation_name`) live here,
below both.

Example:
    >>> from tfqkd._keras import keras
    >>> from tfqkd.quantizers import SymmetricQuantizer
    >>> cfg = Conv2DQuantizeConfig(SymmetricQuantizer(2))
    >>> layer = keras.layers.Conv2D(4, 3)
    >>> layer.build((None, 8, 8, 1))
    >>> [q.bits for _, q in cfg.get_weights_and_quantizers(layer)]
    [2]
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import tensorflow_model_optimization as tfmot

from tfqkd._keras import keras, tf
from tfqkd.quantizers import SymmetricQuantizer  # noqa: F401  (the examples below use it)

__all__ = [
    "KernelQuantizeConfig",
    "Conv2DQuantizeConfig",
    "DepthwiseConv2DQuantizeConfig",
    "DenseQuantizeConfig",
    "ActivationQuantizeConfig",
    "OutputQuantizeConfig",
    "is_relu_activation",
    "is_quantizable_relu_layer",
    "PRE_QUANTIZED_ACTIVATIONS",
    "integer_swish",
    "is_swish",
    "PINNED_OUTPUT_RANGES",
    "SIXTEEN_BIT_HEAD_MAX_WEIGHTS",
    "default_head_bits",
    "SOFTMAX_HEAD_RANGES",
    "PRE_ACTIVATION_LIMITS",
    "activation_name",
]

_serialize = keras.utils.legacy.serialize_keras_object
_deserialize = keras.utils.legacy.deserialize_keras_object

#: Output ranges TFLite's int8 kernels require: LOGISTIC and SOFTMAX scale 1/256 and zero point
#: -128, TANH scale 1/128 and zero point 0 (FakeQuant ranges giving exactly those grids). The
#: student rounds these outputs on the same grids (its registry hands out a
#: ``FixedRangeQuantizer`` there) and the exporter pins the file's ranges to them
#: (``tfqkd.export`` re-exports both names).
PINNED_OUTPUT_RANGES: Dict[str, Tuple[float, float]] = {
    "softmax": (0.0, 255.0 / 256.0), "sigmoid": (0.0, 255.0 / 256.0),
    "tanh": (-1.0, 127.0 / 128.0)}

#: Output grids of a softmax head (the softmax a model ends in), by bit-width. 8: the int8
#: ``SOFTMAX`` output above. 16: the head on LiteRT's 16x8 kernels (:mod:`tfqkd.export.heads`):
#: int16 logits, and probabilities at zero point 0 (``DEQUANTIZE`` takes int16 only there),
#: scale 1/32768 on ``[-1, 32767/32768]``. With int8 logits, top classes one logit step apart
#: tie and argmax takes the lower index.
SOFTMAX_HEAD_RANGES: Dict[int, Tuple[float, float]] = {
    8: PINNED_OUTPUT_RANGES["softmax"], 16: (-1.0, 32767.0 / 32768.0)}
#: Largest logits kernel (in weights) whose softmax head is 16-bit by default
#: (:func:`default_head_bits`). The 16x8 head does not run on XNNPACK: on a 1000-class
#: MobileNetV2 (α 1.0, 224x224, W8A8; a 1.28 M-weight head) it cost 0.34 ms at 1 thread and 0.38
#: ms at 2, 1.22x and 1.46x the int8-headed file (AMD EPYC, 2026-12-07); a 10-class head is
#: 1 % of that kernel.
SIXTEEN_BIT_HEAD_MAX_WEIGHTS = 131_072


def default_head_bits(logits_weights: Optional[int]) -> int:
    """The default width of a softmax head whose logits kernel has ``logits_weights`` weights:
    16 up to :data:`SIXTEEN_BIT_HEAD_MAX_WEIGHTS` (or when unknown), else 8.

    Example:
        >>> default_head_bits(1024 * 10), default_head_bits(1280 * 1000)
        (16, 8)
    """
    if logits_weights is None or logits_weights <= SIXTEEN_BIT_HEAD_MAX_WEIGHTS:
        return 16
    return 8


def activation_name(layer) -> str:
    """Name of the activation a kernel, ``Activation`` or ``Softmax`` layer applies.

    ``"linear"`` if none; tfqkd's ``integer_swish`` reads as ``"swish"``.

    Example:
        >>> activation_name(keras.layers.Dense(2, activation="sigmoid"))
        'sigmoid'
        >>> activation_name(keras.layers.Softmax()), activation_name(keras.layers.Flatten())
        ('softmax', 'linear')
    """
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    act = getattr(layer, "activation", None)
    if act is None:
        return "linear"
    return getattr(act, "__name__", type(act).__name__)


#: Ranges the input of a sigmoid / tanh on its pinned output grid is clipped to (the registry's
#: pre-activation ``RangeQuantizer(limits=...)``). Beyond them the output level no longer changes:
#: ``round(256·sigmoid(x))`` is 255 from x = ln(254.5 / 1.5) = 5.13 and 0 below
#: ln(0.5 / 255.5) = -6.24; ``round(128·tanh(x))`` is 127 from atanh(126.5 / 128) = 2.57 and -128
#: below -atanh(127.5 / 128) = -3.12. Each limit lies more than one input step (16/255, 8/255)
#: beyond them, so clipping changes no output and keeps the input step fine. Softmax has no
#: limit: it depends on differences of its inputs, not on their values.
PRE_ACTIVATION_LIMITS: Dict[str, Tuple[float, float]] = {
    "sigmoid": (-8.0, 8.0), "tanh": (-4.0, 4.0)}

#: Fused activations whose INPUT the integer file rounds (tfmot's QuantizeAwareActivation quantizes
#: before them): they run as their own SOFTMAX / LOGISTIC / TANH op after the kernel's output.
PRE_QUANTIZED_ACTIVATIONS = frozenset({"softmax", "sigmoid", "tanh"})

#: Activation functions whose output is non-negative, hence fit an unsigned activation quantizer.
_RELU_NAMES = frozenset({"relu", "relu6"})


def is_relu_activation(fn: Any) -> bool:
    """Whether ``fn`` (an activation function) is ReLU or ReLU6.

    Example:
        >>> is_relu_activation(keras.activations.relu), is_relu_activation(keras.activations.tanh)
        (True, False)
    """
    return getattr(fn, "__name__", None) in _RELU_NAMES


def is_quantizable_relu_layer(layer: keras.layers.Layer) -> bool:
    """Whether ``layer`` is a ReLU-like layer whose output is in ``[0, ∞)`` (or ``[0, max]``).

    ``ReLU`` with a negative slope or a threshold and other activations are not: an unsigned
    quantizer would change what they compute.

    Example:
        >>> is_quantizable_relu_layer(keras.layers.ReLU()), is_quantizable_relu_layer(keras.layers.LeakyReLU())
        (True, False)
    """
    if type(layer) is keras.layers.ReLU:
        return float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0
    if type(layer) is keras.layers.Activation:
        return is_relu_activation(layer.activation)
    return False


def integer_swish(x):
    """Swish as an int8 TFLite file computes it: ``x * Q(sigmoid(x))``, Q on LOGISTIC's grid.

    TFLite has no integer swish: the file runs ``LOGISTIC`` (output scale 1/256, zero point -128)
    then ``MUL``. tfqkd's QAT layers use this function in place of ``swish`` (gradients pass
    straight through the rounding).

    Example:
        >>> import numpy as np
        >>> x = np.array([-2.0, 0.5, 3.0], np.float32)
        >>> gate = np.floor(256 / (1 + np.exp(-x)) + 0.5) / 256
        >>> bool(np.allclose(integer_swish(x).numpy(), x * gate, atol=1e-6))
        True
    """
    lo, hi = PINNED_OUTPUT_RANGES["sigmoid"]
    gate = tf.quantization.fake_quant_with_min_max_args(tf.sigmoid(x), min=lo, max=hi, num_bits=8)
    return x * gate


# Saved as "swish" (Keras serialises an unregistered function by its name): a saved QAT model
# stores the standard activation, and its quantize config swaps this one in again when the
# wrapper is built on load. The exporter reads it as swish too.
integer_swish.__name__ = "swish"


def is_swish(fn: Any) -> bool:
    """Whether ``fn`` (an activation function) is swish / SiLU (``integer_swish`` included).

    Example:
        >>> is_swish(keras.activations.swish), is_swish(integer_swish), is_swish(keras.activations.relu)
        (True, True, False)
    """
    return getattr(fn, "__name__", None) in ("swish", "silu")


def _deserialize_quantizer(config):
    if config is None or isinstance(config, tfmot.quantization.keras.quantizers.Quantizer):
        return config
    # tfmot's own quantizers (the 8-bit range-tracking ones tfqkd uses for the integer graph's
    # tensors) are not registered with Keras: resolve them by class name.
    tfmot_quantizers = tfmot.quantization.keras.quantizers
    objects = dict(globals())
    objects.update({name: getattr(tfmot_quantizers, name) for name in (
        "MovingAverageQuantizer", "AllValuesQuantizer", "LastValueQuantizer")})
    return _deserialize(config, module_objects=objects, printable_module_name="quantizer")


@keras.utils.register_keras_serializable(package="tfqkd")
class KernelQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """Quantizes a layer's kernel(s) with ``weight_quantizer`` (and a fused ReLU's output).

    Args:
        weight_quantizer: The quantizer of the kernel (a :class:`SymmetricQuantizer` or any tfmot
            ``Quantizer``).
        activation_quantizer: Optional quantizer for the output of the layer's own ReLU
            activation (``Conv2D(..., activation="relu")``); other fused activations stay float.
        weight_attrs: Names of the layer attributes holding the kernels.
        output_quantizer: Optional quantizer of the layer's output (tfqkd gives the classifier
            an 8-bit range-tracking one with ``activation_bits``: the integer file rounds the
            logits to int8).
        pre_activation_quantizer: Optional quantizer of the input of a fused softmax, sigmoid
            or tanh (``Dense(activation="softmax")``, a squeeze-excite gate): the integer file
            rounds the pre-activation tensor before its SOFTMAX / LOGISTIC / TANH op. tfmot's
            ``QuantizeAwareActivation`` applies it before those activations. tfqkd's registry
            limits it to :data:`PRE_ACTIVATION_LIMITS` for sigmoid and tanh.

    Example:
        >>> cfg = DenseQuantizeConfig(SymmetricQuantizer(4))
        >>> DenseQuantizeConfig.from_config(cfg.get_config()).weight_quantizer.bits
        4
    """

    weight_attrs_default: Sequence[str] = ("kernel",)

    def __init__(
        self,
        weight_quantizer,
        activation_quantizer=None,
        weight_attrs: Optional[Sequence[str]] = None,
        output_quantizer=None,
        pre_activation_quantizer=None,
    ):
        self.weight_quantizer = _deserialize_quantizer(weight_quantizer)
        self.pre_activation_quantizer = _deserialize_quantizer(pre_activation_quantizer)
        self.activation_quantizer = _deserialize_quantizer(activation_quantizer)
        self.weight_attrs = list(weight_attrs or self.weight_attrs_default)
        self.output_quantizer = _deserialize_quantizer(output_quantizer)

    def _quantizes_activation(self, layer) -> bool:
        return self.activation_quantizer is not None and is_relu_activation(
            getattr(layer, "activation", None))

    def get_weights_and_quantizers(self, layer) -> List:
        return [(getattr(layer, attr), self.weight_quantizer) for attr in self.weight_attrs]

    def get_activations_and_quantizers(self, layer) -> List:
        if self._quantizes_activation(layer):
            return [(layer.activation, self.activation_quantizer)]
        if self.pre_activation_quantizer is not None and getattr(
                getattr(layer, "activation", None), "__name__", None) in PRE_QUANTIZED_ACTIVATIONS:
            return [(layer.activation, self.pre_activation_quantizer)]
        return []

    def set_quantize_weights(self, layer, quantize_weights) -> None:
        if len(quantize_weights) != len(self.weight_attrs):
            raise ValueError(
                f"layer {layer.name!r} expects {len(self.weight_attrs)} quantized weights "
                f"({self.weight_attrs}), got {len(quantize_weights)}.")
        for attr, weight in zip(self.weight_attrs, quantize_weights):
            current = getattr(layer, attr)
            if current.shape != weight.shape:
                raise ValueError(
                    f"quantized {attr} of layer {layer.name!r} has shape {weight.shape}, the "
                    f"layer's is {current.shape}.")
            setattr(layer, attr, weight)

    def set_quantize_activations(self, layer, quantize_activations) -> None:
        # Called with what get_activations_and_quantizers returned: nothing, or the activation.
        if quantize_activations:
            layer.activation = quantize_activations[0]
        elif self.output_quantizer is not None and is_swish(getattr(layer, "activation", None)):
            layer.activation = integer_swish  # the int8 file's LOGISTIC + MUL

    def get_output_quantizers(self, layer) -> List:
        return [] if self.output_quantizer is None else [self.output_quantizer]

    def get_config(self) -> Dict[str, Any]:
        config = {
            "weight_quantizer": _serialize(self.weight_quantizer),
            "activation_quantizer": (
                None if self.activation_quantizer is None else _serialize(self.activation_quantizer)),
            "weight_attrs": list(self.weight_attrs),
        }
        if self.output_quantizer is not None:  # absent key: configs saved before it existed load
            config["output_quantizer"] = _serialize(self.output_quantizer)
        if self.pre_activation_quantizer is not None:
            config["pre_activation_quantizer"] = _serialize(self.pre_activation_quantizer)
        return config

    @classmethod
    def from_config(cls, config: Dict[str, Any]):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


@keras.utils.register_keras_serializable(package="tfqkd")
class Conv2DQuantizeConfig(KernelQuantizeConfig):
    """Config for ``Conv2D``: quantizes ``kernel`` ``(h, w, in, out)``; channel axis -1.

    Example:
        >>> Conv2DQuantizeConfig(SymmetricQuantizer(2)).weight_attrs
        ['kernel']
    """


@keras.utils.register_keras_serializable(package="tfqkd")
class DenseQuantizeConfig(KernelQuantizeConfig):
    """Config for ``Dense``: quantizes ``kernel`` ``(in, out)``; channel axis -1.

    Example:
        >>> DenseQuantizeConfig(SymmetricQuantizer(8)).weight_quantizer.bits
        8
    """


@keras.utils.register_keras_serializable(package="tfqkd")
class DepthwiseConv2DQuantizeConfig(KernelQuantizeConfig):
    """Config for ``DepthwiseConv2D``: quantizes ``depthwise_kernel`` ``(h, w, in, mult)``.

    Its output channels are the ``in × mult`` pairs, so per-channel steps use axes ``(2, 3)``.

    Example:
        >>> DepthwiseConv2DQuantizeConfig(SymmetricQuantizer(2, axis=(2, 3))).weight_attrs
        ['depthwise_kernel']
    """

    weight_attrs_default = ("depthwise_kernel",)


@keras.utils.register_keras_serializable(package="tfqkd")
class OutputQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """Quantizes the output of any layer with ``output_quantizer``; its weights stay float.

    tfqkd uses it (with ``activation_bits``) on the tensors a full-integer TFLite graph rounds
    to int8 but that are not ReLU outputs: a ``BatchNormalization`` output entering a residual
    ``Add`` (signed), a global-average-pooling output. tfqkd's quantizer there is an 8-bit
    :class:`~tfqkd.quantizers.RangeQuantizer` (asymmetric EMA min/max, zero exactly
    representable), the same ``FakeQuantWithMinMaxVars`` rounding the exporter writes into the
    file at that tensor; any tfmot ``Quantizer`` works.

    Example:
        >>> import tensorflow_model_optimization as tfmot
        >>> q = tfmot.quantization.keras.quantizers.MovingAverageQuantizer(8, False, False, False)
        >>> cfg = OutputQuantizeConfig(q)
        >>> type(OutputQuantizeConfig.from_config(cfg.get_config()).output_quantizer).__name__
        'MovingAverageQuantizer'
    """

    def __init__(self, output_quantizer):
        self.output_quantizer = _deserialize_quantizer(output_quantizer)

    def get_weights_and_quantizers(self, layer) -> List:
        return []

    def get_activations_and_quantizers(self, layer) -> List:
        return []

    def set_quantize_weights(self, layer, quantize_weights) -> None:
        pass

    def set_quantize_activations(self, layer, quantize_activations) -> None:
        # A swish Activation layer computes it as the int8 file does (LOGISTIC + MUL).
        if type(layer) is keras.layers.Activation and is_swish(layer.activation):
            layer.activation = integer_swish

    def get_output_quantizers(self, layer) -> List:
        return [self.output_quantizer]

    def get_config(self) -> Dict[str, Any]:
        return {"output_quantizer": _serialize(self.output_quantizer)}

    @classmethod
    def from_config(cls, config: Dict[str, Any]):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


@keras.utils.register_keras_serializable(package="tfqkd")
class ActivationQuantizeConfig(OutputQuantizeConfig):
    """Config for ``ReLU`` / ``Activation("relu")`` layers: their output is quantized.

    An :class:`OutputQuantizeConfig` whose quantizer is the activation quantizer (saved under the
    ``activation_quantizer`` key).

    Example:
        >>> from tfqkd.quantizers import ActivationQuantizer
        >>> cfg = ActivationQuantizeConfig(ActivationQuantizer(4))
        >>> cfg.get_output_quantizers(keras.layers.ReLU())[0].bits
        4
    """

    def __init__(self, activation_quantizer):
        super().__init__(activation_quantizer)

    @property
    def activation_quantizer(self):
        return self.output_quantizer

    def get_config(self) -> Dict[str, Any]:
        return {"activation_quantizer": _serialize(self.output_quantizer)}
