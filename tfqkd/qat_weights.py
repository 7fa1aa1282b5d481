"""The one reader of a QAT layer's weights: forward values ``Q(w)``, integer levels, steps, bits.

Every path that needs to know what a quantized kernel holds reads it here, so that two readings
cannot disagree: the exporter's float rebuild (:func:`tfqkd.export.forward_model`), its bit-widths
and fake-quant grids (``int8`` / ``int4``), the snapping of PTQ files, the packed archive
(:func:`tfqkd.export.pack_weights`) and the public :func:`quantized_weights` /
:func:`quantization_info`.

:func:`read_layer_weights` gives, per weight of a layer (its inner layer if it is a tfmot
``QuantizeWrapper``), a :class:`QuantizedWeight`: the value the forward pass uses (the
quantizer's output in inference mode for a quantized weight), the bit-width the quantizer states
(``bits`` / ``num_bits`` / ``weight_bits``), and the integer levels ``k`` with ``value == step * k``
bit-exactly. The levels are the quantizer's own (``Q(w) / Δ`` of a
:class:`~tfqkd.quantizers.SymmetricQuantizer`; an 8-bit kernel's smallest used level is often not
1, so they cannot be inferred from the values); for any other weight of rank >= 2 they are
inferred from the values (:func:`integer_levels`: one step per tensor, else one per output
channel), which is all a plain float model (or another quantizer) offers.

Example:
    >>> import tfqkd
    >>> q = tfqkd.quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2)
    >>> w = read_layer_weights(q.get_layer("quant_stage1_block1_conv1"))["kernel"]
    >>> w.bits, w.stated, sorted(set(w.levels.ravel().tolist())) <= [-1, 0, 1]
    (2, True, True)
    >>> bool((w.step * w.levels == w.value).all())
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np

from tfqkd._keras import keras
from tfqkd.quantizers import SymmetricQuantizer

__all__ = [
    "QuantizedWeight",
    "read_layer_weights",
    "kernel_weights",
    "quantized_weights",
    "quantization_info",
    "integer_levels",
    "level_bits",
]

#: Layers whose kernel the exporter maps onto an integer kernel (and tfqkd quantizes).
KERNEL_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)

#: Attributes under which quantizers state their bit-width (tfqkd, tfmot, others).
_BITS_ATTRIBUTES = ("bits", "num_bits", "weight_bits")


def _tfmot_classes():
    from tensorflow_model_optimization.python.core.quantization.keras import (
        quantize_aware_activation, quantize_layer, quantize_wrapper)
    return (quantize_wrapper.QuantizeWrapper, quantize_layer.QuantizeLayer,
            quantize_aware_activation.QuantizeAwareActivation)


def _is_wrapper(layer) -> bool:
    return isinstance(layer, _tfmot_classes()[0])


def _is_quantize_layer(layer) -> bool:
    return isinstance(layer, _tfmot_classes()[1])


def _inner(layer):
    return layer.layer if _is_wrapper(layer) else layer


def _weight_short_name(w) -> str:
    return w.name.split("/")[-1].split(":")[0]


def _layer_variables(layer) -> Dict[str, Any]:
    """{short name: variable} of the (inner) layer's own weights.

    tfmot's wrapper assigns the quantized tensor to ``layer.kernel``, which drops the kernel
    variable from the inner layer's ``weights`` (and its name scope is not reliable after
    cloning); the wrapper's ``_weight_vars`` still hold it.
    """
    if not _is_wrapper(layer):
        return {_weight_short_name(w): w for w in layer.weights}
    found = {}
    for weight, _, _ in layer._weight_vars:  # noqa: SLF001 (tfmot API)
        found[_weight_short_name(weight)] = weight
    for w in layer.layer.weights:
        found.setdefault(_weight_short_name(w), w)
    return found


@dataclasses.dataclass(frozen=True, eq=False)  # arrays inside: compare fields yourself
class QuantizedWeight:
    """One weight of a layer as the forward pass uses it, with its integer levels if it has any.

    ``levels`` (int32) and ``step`` (float32: a scalar, or one per output channel shaped to
    broadcast against ``levels``) satisfy ``step * levels == value`` bit-exactly; both are None
    when ``value`` is on no such grid (or the reading was made with ``levels=False``).
    ``stated``: the levels and step are the quantizer's own, not inferred from ``value``.
    ``quantizer`` is None for a weight that is not quantized.

    Example:
        >>> w = QuantizedWeight("kernel", np.array([[0.5, -0.5]], np.float32))
        >>> w.bits is None and w.levels is None
        True
    """

    name: str
    value: np.ndarray
    quantizer: Any = None
    bits: Optional[int] = None
    levels: Optional[np.ndarray] = None
    step: Optional[np.ndarray] = None
    per_channel: bool = False
    axis: Any = None
    stated: bool = False


def _stated_bits(quantizer) -> Optional[int]:
    for attr in _BITS_ATTRIBUTES:
        value = getattr(quantizer, attr, None)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
    return None


def _stated_levels(quantizer, step, value: np.ndarray
                   ) -> Optional[Tuple[np.ndarray, np.ndarray, bool, Any]]:
    """(levels, step, per_channel, axis) as the quantizer computes them, if exactly ``value``."""
    if not isinstance(quantizer, SymmetricQuantizer) or step is None:
        return None
    step = np.asarray(step, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.rint(value / step)
    if not np.all(np.isfinite(k)) or (k.size and np.abs(k).max() > 127):
        return None
    if not np.array_equal((step * k.astype(np.float32)).astype(np.float32), value):
        return None  # e.g. a learned step below the quantizer's floor: infer instead
    per_channel = quantizer.per_channel
    return k.astype(np.int32), step, per_channel, quantizer.axis if per_channel else None


def _reading(name: str, value: np.ndarray, quantizer=None, step=None,
             levels: bool = True) -> QuantizedWeight:
    bits = _stated_bits(quantizer) if quantizer is not None else None
    if not levels:
        return QuantizedWeight(name, value, quantizer, bits)
    if quantizer is not None:
        stated = _stated_levels(quantizer, step, value)
        if stated is not None:
            k, step, per_channel, axis = stated
            return QuantizedWeight(name, value, quantizer, bits, k, step, per_channel, axis, True)
    found = integer_levels(value) if value.ndim >= 2 and value.dtype == np.float32 else None
    if found is None:
        return QuantizedWeight(name, value, quantizer, bits)
    k, step, per_channel = found
    if bits is None:
        bits = level_bits(int(np.abs(k).max()))
    return QuantizedWeight(name, value, quantizer, bits, k, step, per_channel,
                           -1 if per_channel else None)


def read_layer_weights(layer, levels: bool = True) -> Dict[str, QuantizedWeight]:
    """``{short weight name: QuantizedWeight}`` of ``layer`` (its inner layer if wrapped).

    Short names are the variable names (``kernel``, ``bias``, ``gamma``, ``moving_mean``...), in
    the order of the layer's variables. A quantized weight's value is its quantizer's output in
    inference mode, exactly as ``QuantizeWrapperV2.call`` computes it. ``levels=False`` skips the
    levels (values and stated bit-widths only).

    Example:
        >>> d = keras.layers.Dense(2, kernel_initializer="zeros")
        >>> d.build((None, 3))
        >>> sorted(read_layer_weights(d))
        ['bias', 'kernel']
    """
    variables = _layer_variables(layer)
    quantized = {}
    if _is_wrapper(layer):
        for weight, quantizer, qvars in layer._weight_vars:  # noqa: SLF001 (tfmot API)
            quantized[weight.ref()] = (weight, quantizer, qvars)
    out = {}
    for name, var in variables.items():
        if var.ref() in quantized:
            weight, quantizer, qvars = quantized[var.ref()]
            step = None
            if isinstance(quantizer, SymmetricQuantizer):
                # One search gives the value and its step (the levels' grid).
                q, step = quantizer.quantize_with_step(weight, qvars)
            else:
                q = quantizer(weight, training=False, weights=qvars)
            value = np.asarray(q.numpy() if hasattr(q, "numpy") else q, dtype=np.float32)
            out[name] = _reading(name, value, quantizer, step, levels)
        else:
            out[name] = _reading(name, var.numpy(), levels=levels)
    return out


def kernel_weights(model: keras.Model) -> Dict[str, QuantizedWeight]:
    """``{inner layer name: its kernel's QuantizedWeight}`` for every Conv2D/DepthwiseConv2D/Dense.

    What the exporter reads bit-widths, fake-quant grids and the levels it snaps to from.

    Example:
        >>> import tfqkd
        >>> q = tfqkd.quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2)
        >>> kernel_weights(q)["stem_conv"].bits, kernel_weights(q)["classifier"].bits
        (8, 8)
    """
    out = {}
    for layer in model.layers:
        if _is_quantize_layer(layer) or not isinstance(_inner(layer), KERNEL_LAYERS):
            continue
        weights = read_layer_weights(layer)
        kernel = weights.get("kernel", weights.get("depthwise_kernel"))
        if kernel is not None:
            out[_inner(layer).name] = kernel
    return out


def _weight_vars(model: keras.Model) -> Iterator[Tuple[Any, Any, Any, Any]]:
    """Yields (wrapper, float weight, quantizer, quantizer vars) of every quantized weight."""
    for layer in _walk_layers(model):
        if _is_wrapper(layer):
            for weight, quantizer, qvars in getattr(layer, "_weight_vars", []):
                yield layer, weight, quantizer, qvars


def _walk_layers(model) -> Iterator[keras.layers.Layer]:
    for layer in getattr(model, "layers", []):
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk_layers(layer)


def _key(wrapper, weight, n_weights: int) -> str:
    if n_weights == 1:
        return wrapper.layer.name
    return f"{wrapper.layer.name}/{weight.name.split(':')[0].split('/')[-1]}"


def _quantized_readings(model: keras.Model, levels: bool
                        ) -> Iterator[Tuple[str, Any, QuantizedWeight]]:
    """(key, quantizer, reading) of every quantized weight, nested models included."""
    entries = list(_weight_vars(model))
    counts: Dict[int, int] = {}
    for wrapper, *_ in entries:
        counts[id(wrapper)] = counts.get(id(wrapper), 0) + 1
    readings: Dict[int, Dict[str, QuantizedWeight]] = {}
    seen = set()
    for wrapper, weight, quantizer, _ in entries:
        key = _key(wrapper, weight, counts[id(wrapper)])
        if key in seen:
            raise ValueError(
                f"two quantized layers are named {key!r} (a model containing two quantized "
                "models?); pass the quantized model itself, e.g. distiller.student.")
        seen.add(key)
        if id(wrapper) not in readings:
            readings[id(wrapper)] = read_layer_weights(wrapper, levels=levels)
        yield key, quantizer, readings[id(wrapper)][_weight_short_name(weight)]


def quantized_weights(model: keras.Model) -> Dict[str, np.ndarray]:
    """``{inner layer name: the kernel the forward pass uses, Q(w)}`` of a quantized model.

    Computed by calling each wrapper's weight quantizer on its float weight in inference mode,
    exactly as ``QuantizeWrapperV2.call`` does (:func:`read_layer_weights`). Layers with several
    quantized weights are keyed ``"layer/weight"``. Nested models (e.g. a ``Distiller``'s
    student) are searched too.

    Example:
        >>> import tfqkd
        >>> q = tfqkd.quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2)
        >>> sorted(quantized_weights(q))[:2]
        ['classifier', 'stage1_block1_conv1']
    """
    return {key: reading.value for key, _, reading in _quantized_readings(model, levels=False)}


def quantization_info(model: keras.Model) -> Dict[str, Dict[str, Any]]:
    """Per quantized weight: ``bits``, ``step`` (Δ, NumPy), ``per_channel``, ``axis`` and ``levels``.

    ``levels`` are the integers ``Q(w) / Δ`` (int8), what a packed export stores
    (:func:`read_layer_weights`). Only :class:`~tfqkd.quantizers.SymmetricQuantizer` weights are
    listed.

    Example:
        >>> import tfqkd
        >>> info = quantization_info(tfqkd.quantize_model(tfqkd.models.tiny_resnet(seed=0)))
        >>> info["stem_conv"]["bits"], info["stage1_block1_conv1"]["bits"]
        (8, 2)
    """
    out: Dict[str, Dict[str, Any]] = {}
    for key, quantizer, reading in _quantized_readings(model, levels=True):
        if not isinstance(quantizer, SymmetricQuantizer) or reading.levels is None:
            continue
        out[key] = {"bits": quantizer.bits, "step": reading.step,
                    "per_channel": reading.per_channel, "axis": reading.axis,
                    "levels": reading.levels.astype(np.int8)}
    return out


def integer_levels(q: np.ndarray, max_level: int = 127
                   ) -> Optional[Tuple[np.ndarray, np.ndarray, bool]]:
    """Writes ``q`` exactly as ``k * step`` (integer ``k``, ``|k| <= max_level``) if possible.

    Tries one step for the whole tensor, then one per output channel (last axis). Returns
    ``(k int32 array, step float32 (scalar or per channel), per_channel)`` or ``None`` when ``q``
    is not (bit-exactly) on such a grid. This is how :func:`read_layer_weights` reads the
    levels of a weight whose quantizer does not state them (or of a plain float model).

    Example:
        >>> k, step, per_channel = integer_levels(np.array([[0.5, -1.0], [0.0, 0.5]], np.float32))
        >>> k.tolist(), float(step), per_channel
        ([[1, -2], [0, 1]], 0.5, False)
    """
    q = np.asarray(q, dtype=np.float32)
    if q.size == 0 or not np.all(np.isfinite(q)):
        return None

    def fit(values: np.ndarray) -> Optional[Tuple[np.ndarray, np.float32]]:
        mags = np.abs(values[values != 0])
        if mags.size == 0:
            return np.zeros(values.shape, np.int32), np.float32(0.0)
        smallest = np.float32(mags.min())
        for divisor in range(1, 9):  # the smallest used level need not be level 1
            step = np.float32(smallest / np.float32(divisor))
            k = np.rint(values / step)
            if np.abs(k).max() > max_level:
                return None
            if np.array_equal((step * k.astype(np.float32)).astype(np.float32), values):
                return k.astype(np.int32), step
        return None

    whole = fit(q)
    if whole is not None:
        return whole[0], np.asarray(whole[1], np.float32), False
    if q.ndim < 2:
        return None
    cols = q.reshape(-1, q.shape[-1])
    ks, steps = [], []
    for c in range(cols.shape[1]):
        f = fit(cols[:, c])
        if f is None:
            return None
        ks.append(f[0])
        steps.append(f[1])
    return (np.stack(ks, axis=1).reshape(q.shape).astype(np.int32),
            np.asarray(steps, np.float32), True)


def level_bits(kmax: int) -> int:
    """Bits of a signed symmetric code with levels -kmax..kmax (2-bit = ternary).

    Example:
        >>> [level_bits(k) for k in (1, 3, 7, 127)]
        [2, 3, 4, 8]
    """
    return max(1, int(math.ceil(math.log2(2 * kmax + 1))))
