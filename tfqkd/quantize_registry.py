"""The tfqkd ``QuantizeRegistry``: which layer gets which ``QuantizeConfig``, found by graph position.

:class:`TfqkdQuantizeRegistry` hands each supported layer its :mod:`tfqkd.quantize_configs`
config: kernels of ``Conv2D`` / ``DepthwiseConv2D`` / ``Dense`` (:data:`SUPPORTED_WEIGHT_LAYERS`)
a :class:`~tfqkd.quantizers.SymmetricQuantizer`, ReLU outputs the activation quantizer, and the
other tensors a full-integer TFLite graph rounds (:func:`integer_graph_tensors`) an 8-bit range
quantizer. Which layers are "first and last" (kept at ``first_last_bits``) and which tensors the
integer graph rounds are read from the graph, never from layer names
(:func:`first_and_last_layers`, :func:`integer_graph_tensors`). The scheme bundling this
registry is :mod:`tfqkd.quantize_scheme`; :func:`tfqkd.quantize.quantize_model` applies it.

Example:
    >>> import tfqkd
    >>> reg = TfqkdQuantizeRegistry(weight_bits=2, activation_bits=4)
    >>> m = tfqkd.models.tiny_resnet(seed=0)
    >>> reg.supports(m.get_layer("stem_relu")), reg.supports(m.get_layer("pool"))
    (True, False)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import tensorflow_model_optimization as tfmot

from tfqkd._keras import keras, tf
from tfqkd.quantize_configs import (
    PINNED_OUTPUT_RANGES,
    PRE_ACTIVATION_LIMITS,
    SOFTMAX_HEAD_RANGES,
    PRE_QUANTIZED_ACTIVATIONS,
    ActivationQuantizeConfig,
    Conv2DQuantizeConfig,
    DenseQuantizeConfig,
    DepthwiseConv2DQuantizeConfig,
    OutputQuantizeConfig,
    activation_name,
    is_quantizable_relu_layer,
    is_relu_activation,
)
from tfqkd.quantizers import (
    CLIP_KINDS,
    STEP_KINDS,
    ActivationQuantizer,
    FixedRangeQuantizer,
    RangeQuantizer,
    SymmetricQuantizer,
    check_bits,
)

__all__ = [
    "TfqkdQuantizeRegistry",
    "SUPPORTED_WEIGHT_LAYERS",
    "first_and_last_layers",
    "integer_graph_tensors",
]

_tfmot_q = tfmot.quantization.keras


#: Layer classes whose kernels tfqkd quantizes, with their config class and channel axes.
SUPPORTED_WEIGHT_LAYERS: Dict[type, Tuple[type, Any]] = {
    keras.layers.Conv2D: (Conv2DQuantizeConfig, -1),
    keras.layers.DepthwiseConv2D: (DepthwiseConv2DQuantizeConfig, (2, 3)),
    keras.layers.Dense: (DenseQuantizeConfig, -1),
}


def _is_weight_layer(layer) -> bool:
    # Exact types: Conv2DTranspose / SeparableConv2D subclass Conv2D but have other kernels.
    return type(layer) in SUPPORTED_WEIGHT_LAYERS


#: ``first_last_bits`` value that leaves the first and last weighted layers unquantized (float).
FLOAT = "float"


def _check_optional_bits(bits, name):
    return None if bits is None else check_bits(bits, name)


def _check_options(weight_bits, activation_bits, first_last_bits, per_channel, step,
                   activation_clip, activation_quantizer):
    weight_bits = check_bits(weight_bits, "weight_bits")
    activation_bits = _check_optional_bits(activation_bits, "activation_bits")
    if first_last_bits != FLOAT:
        first_last_bits = _check_optional_bits(first_last_bits, "first_last_bits")
    if not isinstance(per_channel, (bool, np.bool_)):
        raise ValueError(f"per_channel must be True or False, got {per_channel!r}.")
    if step not in STEP_KINDS:
        raise ValueError(f"step must be one of {STEP_KINDS}, got {step!r}.")
    if activation_clip not in CLIP_KINDS:
        raise ValueError(f"activation_clip must be one of {CLIP_KINDS}, got {activation_clip!r}.")
    if activation_quantizer is not None:
        if not callable(activation_quantizer):
            raise ValueError(
                "activation_quantizer must be a callable bits -> tfmot Quantizer, got "
                f"{activation_quantizer!r}.")
        if activation_bits is None:
            raise ValueError(
                "activation_quantizer was given but activation_bits=None, so no activation would "
                "be quantized; pass activation_bits (e.g. 4) as well.")
    return weight_bits, activation_bits, first_last_bits, bool(per_channel)


def _parents(model: keras.Model) -> Dict[str, Set[str]]:
    """Layer name -> names of the layers feeding it, in this model's own graph."""
    parents: Dict[str, Set[str]] = {layer.name: set() for layer in model.layers}
    if getattr(model, "_is_graph_network", False):
        for nodes in model._nodes_by_depth.values():  # this model's nodes only
            for node in nodes:
                for parent in tf.nest.flatten(node.inbound_layers):
                    parents.setdefault(node.layer.name, set()).add(parent.name)
    else:  # a Sequential model without a known input: its layers are a chain
        layers = model.layers
        for prev, layer in zip(layers, layers[1:]):
            parents[layer.name].add(prev.name)
    return parents


def first_and_last_layers(model: keras.Model) -> Tuple[List[str], List[str]]:
    """Names of the first and the last quantizable weighted layers, by graph position.

    "First" are the Conv2D/DepthwiseConv2D/Dense layers with no such layer on any path from
    the input (the stem convolution); "last" those with none on any path to an output (the
    classifier). Layer names play no role.

    Example:
        >>> import tfqkd
        >>> first_and_last_layers(tfqkd.models.tiny_resnet(seed=0))
        (['stem_conv'], ['classifier'])
    """
    parents = _parents(model)
    children: Dict[str, Set[str]] = {name: set() for name in parents}
    for name, ps in parents.items():
        for p in ps:
            children.setdefault(p, set()).add(name)
    weighted = {layer.name for layer in model.layers if _is_weight_layer(layer)}

    def reaches_weighted(start: str, edges: Mapping[str, Set[str]]) -> bool:
        seen, stack = set(), list(edges.get(start, ()))
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in weighted:
                return True
            stack.extend(edges.get(name, ()))
        return False

    order = [layer.name for layer in model.layers if layer.name in weighted]
    first = [n for n in order if not reaches_weighted(n, parents)]
    last = [n for n in order if not reaches_weighted(n, children)]
    return first, last


#: Layers whose integer kernel requantizes its output (its range differs from its input's).
_REQUANTIZING_POOLS: Tuple[type, ...] = tuple(
    cls for cls in (
        keras.layers.GlobalAveragePooling2D,
        keras.layers.GlobalAveragePooling1D,
        keras.layers.AveragePooling2D,
        keras.layers.AveragePooling1D,
    ) if cls is not None
)


#: Layers computing a new tensor elementwise or by channel (Applications models: swish and
#: sigmoid activations, squeeze-excite products, DenseNet's concatenations, MobileNetV3 /
#: EfficientNet preprocessing); the integer file stores each output with a range of its own.
_ELEMENTWISE_OUTPUTS: Tuple[type, ...] = tuple(
    cls for cls in (
        keras.layers.Multiply,
        keras.layers.Subtract,
        keras.layers.Concatenate,
        keras.layers.LeakyReLU,
        keras.layers.PReLU,
        keras.layers.ELU,
        keras.layers.Softmax,
        getattr(keras.layers, "Rescaling", None),
        getattr(keras.layers, "Normalization", None),
    ) if cls is not None
)

def integer_graph_tensors(model: keras.Model) -> List[str]:
    """Names of the layers whose output a full-integer graph quantizes but a ReLU quantizer does not.

    A TFLite int8 graph stores every tensor in int8. The ReLU outputs are modelled by the
    activation quantizers; this lists the others (besides the model input), which
    :func:`quantize_model` gives an 8-bit output quantizer when ``activation_bits`` is set:

    * ``BatchNormalization`` and ``Add`` outputs not consumed by exactly one ReLU (the file fuses
      conv+BN+ReLU and add+ReLU into one op with the ReLU's range), e.g. the conv+BN output
      entering a residual ``Add``;
    * outputs of ``Conv2D`` / ``DepthwiseConv2D`` / ``Dense`` layers without a fused ReLU that feed
      neither exactly one BN (folded into the kernel) nor exactly one ReLU, e.g. the logits;
    * average-pooling outputs (the integer mean requantizes);
    * outputs of non-ReLU ``Activation`` layers (swish, sigmoid, softmax...), and of
      ``Multiply``, ``Subtract``, ``Concatenate``, ``LeakyReLU`` / ``PReLU`` / ``ELU``,
      ``Softmax``, ``Rescaling`` and ``Normalization`` layers (Applications models); softmax,
      sigmoid and tanh outputs on TFLite's fixed grids (:data:`tfqkd.export.PINNED_OUTPUT_RANGES`).

    Example:
        >>> import tfqkd
        >>> sorted(integer_graph_tensors(tfqkd.models.tiny_resnet(seed=0)))[:2]
        ['classifier', 'pool']
    """
    parents = _parents(model)
    children: Dict[str, List[str]] = {name: [] for name in parents}
    for name, ps in parents.items():
        for p in ps:
            children.setdefault(p, []).append(name)
    by_name = {layer.name: layer for layer in model.layers}

    def only(name, test):
        kids = children.get(name, [])
        return len(kids) == 1 and test(by_name[kids[0]])

    out = []
    for layer in model.layers:
        relu_next = only(layer.name, is_quantizable_relu_layer)
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Add)):
            if not relu_next:
                out.append(layer.name)
        elif _is_weight_layer(layer):
            if is_relu_activation(getattr(layer, "activation", None)):
                continue  # its own (fused) activation quantizer
            bn_next = only(layer.name, lambda c: isinstance(c, keras.layers.BatchNormalization))
            if not (relu_next or bn_next):
                out.append(layer.name)
        elif isinstance(layer, _REQUANTIZING_POOLS + _ELEMENTWISE_OUTPUTS):
            out.append(layer.name)
        elif type(layer) is keras.layers.Activation and not is_quantizable_relu_layer(layer) \
                and activation_name(layer) != "linear":
            out.append(layer.name)
    return out


def _integer_output_quantizer(layer=None, head_bits: Optional[int] = None):
    # Like tfmot's default_8bit activations: 8-bit, asymmetric EMA min/max (signed tensors such
    # as pre-add BN outputs keep their negative half), the FakeQuantWithMinMaxVars rounding the
    # exporter puts into the file; but the EMA starts from the data, not from ±6. Softmax /
    # sigmoid / tanh outputs: the fixed grid of TFLite's integer kernel; the softmax head
    # (`head_bits` given) the grid of its width.
    pinned = PINNED_OUTPUT_RANGES.get(activation_name(layer)) if layer is not None else None
    if head_bits is not None and pinned is not None and activation_name(layer) == "softmax":
        return FixedRangeQuantizer(head_bits, *SOFTMAX_HEAD_RANGES[head_bits])
    if pinned is not None:
        return FixedRangeQuantizer(8, *pinned)
    return RangeQuantizer(8)


class TfqkdQuantizeRegistry(_tfmot_q.QuantizeRegistry):
    """Hands out the tfqkd ``QuantizeConfig`` of each supported layer.

    Args:
        weight_bits: Bit-width of the kernels.
        activation_bits: Bit-width of ReLU outputs, ``None`` to keep activations float.
        per_channel: One step per output channel.
        step: ``"l2"``, ``"std"`` or ``"learned"`` (see :class:`~tfqkd.quantizers.SymmetricQuantizer`).
        activation_clip: ``"ema"``, ``"fixed"`` or ``"pact"`` (see :class:`~tfqkd.quantizers.ActivationQuantizer`).
        activation_quantizer: Optional ``bits -> Quantizer`` replacing the default activation
            quantizer.
        layer_bits: Per-layer-name weight bit-width overrides (first/last layers, and
            ``quantize_model``'s ``layer_bits``).
        layer_activation_bits: Per-layer-name bit-width overrides of ReLU outputs (a ReLU layer
            or a weighted layer's fused ReLU).
        output_layers: Names of layers whose output gets an 8-bit output quantizer (only with
            ``activation_bits``; :func:`quantize_model` passes :func:`integer_graph_tensors`).
        softmax_head: Name of the softmax layer the model ends in, if any (one of
            ``output_layers``): its output is rounded at ``softmax_head_bits``.
        softmax_logits: Name of the kernel layer computing that softmax's logits (the head
            itself for a ``Dense(activation="softmax")``): at 16 bits they are rounded on a
            16-bit symmetric grid (``RangeQuantizer(16)``), as the file's int16 logits.
        softmax_head_bits: 16 (int16 logits and probabilities in the integer file,
            probabilities in steps of 1/32768) or 8 (int8, 1/256): see
            :data:`tfqkd.quantize_configs.SOFTMAX_HEAD_RANGES` (``quantize_model`` picks it by
            the head's size, :func:`tfqkd.quantize_configs.default_head_bits`).

    Example:
        >>> reg = TfqkdQuantizeRegistry(weight_bits=2, layer_bits={"stem": 8})
        >>> reg.get_quantize_config(keras.layers.Dense(3, name="stem")).weight_quantizer.bits
        8
    """

    def __init__(
        self,
        weight_bits: int = 2,
        activation_bits: Optional[int] = None,
        per_channel: bool = False,
        step: str = "l2",
        activation_clip: str = "ema",
        activation_quantizer: Optional[Callable[[int], Any]] = None,
        layer_bits: Optional[Mapping[str, int]] = None,
        output_layers: Optional[Sequence[str]] = None,
        layer_activation_bits: Optional[Mapping[str, int]] = None,
        softmax_head: Optional[str] = None,
        softmax_head_bits: int = 16,
        softmax_logits: Optional[str] = None,
    ):
        self.weight_bits, self.activation_bits, _, self.per_channel = _check_options(
            weight_bits, activation_bits, None, per_channel, step, activation_clip,
            activation_quantizer)
        self.step = step
        self.activation_clip = activation_clip
        self.activation_quantizer = activation_quantizer
        self.layer_bits = {k: check_bits(v, f"bits of layer {k!r}") for k, v in (layer_bits or {}).items()}
        self.layer_activation_bits = {k: check_bits(v, f"activation bits of layer {k!r}")
                                      for k, v in (layer_activation_bits or {}).items()}
        if self.layer_activation_bits and self.activation_bits is None:
            raise ValueError("layer_activation_bits needs activation_bits, the width of every "
                             "other ReLU output: pass activation_bits too (e.g. 8).")
        # Without activation quantization the model stays W-only (W2A32): no output quantizers.
        self.output_layers = frozenset(output_layers or ()) if self.activation_bits is not None \
            else frozenset()
        if isinstance(softmax_head_bits, bool) or softmax_head_bits not in SOFTMAX_HEAD_RANGES:
            raise ValueError(f"softmax_head_bits must be 8 (an int8 output, steps of 1/256) or "
                             f"16 (int16, steps of 1/32768), got {softmax_head_bits!r}.")
        self.softmax_head, self.softmax_head_bits = softmax_head, int(softmax_head_bits)
        self.softmax_logits = softmax_logits if self.softmax_head_bits == 16 else None

    def _head_bits(self, layer) -> Optional[int]:
        return self.softmax_head_bits if layer.name == self.softmax_head else None

    def _make_activation_quantizer(self, layer_name: Optional[str] = None):
        if self.activation_bits is None:
            return None
        bits = self.layer_activation_bits.get(layer_name, self.activation_bits)
        if self.activation_quantizer is not None:
            quantizer = self.activation_quantizer(bits)
            if not isinstance(quantizer, _tfmot_q.quantizers.Quantizer):
                raise ValueError(
                    "activation_quantizer(bits) must return a "
                    "tfmot.quantization.keras.quantizers.Quantizer, got "
                    f"{type(quantizer).__name__}.")
            return quantizer
        return ActivationQuantizer(bits, clip=self.activation_clip)

    def supports(self, layer) -> bool:
        """Whether this registry quantizes ``layer``."""
        if _is_weight_layer(layer):
            return True
        if self.activation_bits is None:
            return False
        return is_quantizable_relu_layer(layer) or layer.name in self.output_layers

    def get_quantize_config(self, layer):
        """The config for ``layer`` (a fresh object per layer)."""
        if _is_weight_layer(layer):
            config_cls, axis = SUPPORTED_WEIGHT_LAYERS[type(layer)]
            bits = self.layer_bits.get(layer.name, self.weight_bits)
            weight_q = SymmetricQuantizer(bits, step=self.step, per_channel=self.per_channel, axis=axis)
            output_q = None
            pre_q = None
            if layer.name in self.output_layers:
                output_q = _integer_output_quantizer(layer, self._head_bits(layer))
                activation = activation_name(layer)
                logits_bits = 16 if layer.name == self.softmax_logits else 8
                if activation in PRE_QUANTIZED_ACTIVATIONS:
                    # The kernel's own output, before its softmax / sigmoid / tanh.
                    pre_q = RangeQuantizer(logits_bits,
                                           limits=PRE_ACTIVATION_LIMITS.get(activation))
                elif logits_bits == 16:  # the logits of a softmax layer of their own
                    output_q = RangeQuantizer(16)
            return config_cls(weight_q, self._make_activation_quantizer(layer.name),
                              output_quantizer=output_q,
                              pre_activation_quantizer=pre_q)
        if self.supports(layer) and is_quantizable_relu_layer(layer):
            return ActivationQuantizeConfig(self._make_activation_quantizer(layer.name))
        if self.supports(layer):
            return OutputQuantizeConfig(_integer_output_quantizer(layer, self._head_bits(layer)))
        raise ValueError(
            f"layer {layer.name!r} ({type(layer).__name__}) is not quantized by tfqkd; supported: "
            f"{', '.join(c.__name__ for c in SUPPORTED_WEIGHT_LAYERS)} (+ ReLU with activation_bits).")
