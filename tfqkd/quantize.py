"""Model-level quantization: the tfqkd ``QuantizeScheme``, its registry, and ``quantize_model``.

tfqkd extends tfmot the way tfmot is meant to be extended (like its own ``default_8bit``
package): a :class:`TfqkdQuantizeScheme` bundles a layout transform
(:class:`TfqkdQuantizeLayoutTransform`) and a registry (:class:`TfqkdQuantizeRegistry`) that
hands out the :mod:`tfqkd.quantize_configs` per layer; :func:`quantize_model` annotates the
layers to quantize and calls ``tfmot.quantization.keras.quantize_apply`` with that scheme. The
result is an ordinary tfmot QAT model (layers wrapped in ``QuantizeWrapperV2``).

What gets quantized:

* ``Conv2D``, ``DepthwiseConv2D`` and ``Dense`` kernels: ``weight_bits``-bit symmetric (Eq. 1/2),
  except the first weighted layer(s) and the classifier, found by graph position (weighted
  layers with no weighted layer before / after them), which use ``first_last_bits``.
  Biases stay float.
* With ``activation_bits``: the outputs of ``ReLU`` / ``Activation("relu")`` layers and fused
  ReLU activations, unsigned ``activation_bits``-bit (:class:`~tfqkd.quantizers.ActivationQuantizer`).
* With ``activation_bits``, also every other tensor a full-integer TFLite graph rounds to int8
  (found by graph position, :func:`integer_graph_tensors`), 8-bit, with a range-tracking
  :class:`~tfqkd.quantizers.RangeQuantizer` as tfmot's ``default_8bit`` scheme does: the model
  input (a tfmot ``QuantizeLayer``), the output of a ``BatchNormalization`` / ``Add`` / weighted
  layer that is not fused into a following ReLU (e.g. the signed conv+BN output entering a
  residual ``Add``, the logits) and average-pooling outputs. The exporter writes exactly these
  ranges into the file, so the int8 file rounds where, and as, the QAT model does. With
  ``activation_bits=None`` (W2A32) none of them is added.
* Nothing else: ``BatchNormalization`` stays a separate float layer (no Conv+BN folding during
  training as tfmot's default scheme does: the quantizer sees the conv kernel itself, and the
  exporter folds BN afterwards — per-channel levels survive because BN scales each output
  channel); a conv output feeding its BN is not quantized (the file folds the two into one
  tensor). ``Flatten``, ``Dropout``, max-pooling… pass through untouched.
* Any other layer with weights (``Conv1D``, ``LSTM``, ``Embedding``, ``Conv2DTranspose``…)
  raises a ``ValueError`` naming it: no layer is silently left float.

Example:
    >>> import tfqkd
    >>> model = tfqkd.models.tiny_resnet(10, seed=0)
    >>> qmodel = tfqkd.quantize_model(model, weight_bits=2)
    >>> kernels = quantized_weights(qmodel)
    >>> len(set(kernels["stage1_block1_conv1"].ravel().tolist())) <= 3
    True
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import tensorflow_model_optimization as tfmot

from tfqkd._keras import keras, tf
# The TFLite facts the scheme mirrors (export itself imports this module only inside functions).
from tfqkd.export import PINNED_OUTPUT_RANGES, activation_name
from tfqkd.quantize_configs import (
    ActivationQuantizeConfig,
    OutputQuantizeConfig,
    Conv2DQuantizeConfig,
    DenseQuantizeConfig,
    DepthwiseConv2DQuantizeConfig,
    is_quantizable_relu_layer,
    is_relu_activation,
    is_swish,
    PRE_QUANTIZED_ACTIVATIONS,
)
from tfqkd.quantizers import (
    CLIP_KINDS,
    STEP_KINDS,
    ActivationQuantizer,
    FixedRangeQuantizer,
    RangeQuantizer,
    SymmetricQuantizer,
    check_bits,
    l2_optimal_step,
)

__all__ = [
    "quantize_model",
    "quantize_scope",
    "quantized_weights",
    "quantization_info",
    "first_and_last_layers",
    "integer_graph_tensors",
    "TfqkdQuantizeScheme",
    "TfqkdQuantizeRegistry",
    "TfqkdQuantizeLayoutTransform",
    "SUPPORTED_WEIGHT_LAYERS",
]

_tfmot_q = tfmot.quantization.keras

#: Layer classes whose kernels tfqkd quantizes, with their config class and channel axes.
SUPPORTED_WEIGHT_LAYERS: Dict[type, Tuple[type, Any]] = {
    keras.layers.Conv2D: (Conv2DQuantizeConfig, -1),
    keras.layers.DepthwiseConv2D: (DepthwiseConv2DQuantizeConfig, (2, 3)),
    keras.layers.Dense: (DenseQuantizeConfig, -1),
}

#: Layers that have weights but stay float by design (normalisation: folded at export).
_FLOAT_BY_DESIGN: Tuple[type, ...] = tuple(
    cls for cls in (
        keras.layers.BatchNormalization,
        getattr(keras.layers, "LayerNormalization", None),
        getattr(keras.layers, "GroupNormalization", None),
        getattr(keras.layers, "Normalization", None),
    ) if cls is not None
)


def _is_weight_layer(layer) -> bool:
    # Exact types: Conv2DTranspose / SeparableConv2D subclass Conv2D but have other kernels.
    return type(layer) in SUPPORTED_WEIGHT_LAYERS


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _check_optional_bits(bits, name):
    return None if bits is None else check_bits(bits, name)


def _check_options(weight_bits, activation_bits, first_last_bits, per_channel, step,
                   activation_clip, activation_quantizer):
    weight_bits = check_bits(weight_bits, "weight_bits")
    activation_bits = _check_optional_bits(activation_bits, "activation_bits")
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


# --------------------------------------------------------------------------------------------
# graph position of the weighted layers
# --------------------------------------------------------------------------------------------
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


def _integer_output_quantizer(layer=None):
    # Like tfmot's default_8bit activations: 8-bit, asymmetric EMA min/max (signed tensors such
    # as pre-add BN outputs keep their negative half), the FakeQuantWithMinMaxVars rounding the
    # exporter puts into the file; but the EMA starts from the data, not from ±6. Softmax /
    # sigmoid / tanh outputs: the fixed grid of TFLite's integer kernel.
    pinned = PINNED_OUTPUT_RANGES.get(activation_name(layer)) if layer is not None else None
    if pinned is not None:
        return FixedRangeQuantizer(8, *pinned)
    return RangeQuantizer(8)


def _split_fused_swish(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with each ``Conv2D/Dense(activation="swish")`` split in two layers.

    The kernel layer becomes linear and an ``Activation("swish")`` named ``<layer>_swish``
    follows it (same weights, same function). The int8 file rounds the kernel's output before
    its LOGISTIC and MUL; as a layer of its own the student rounds it too (EfficientNet's
    squeeze-excite ``se_reduce``). ``model`` itself is not changed.
    """
    fused = {id(layer) for layer in model.layers
             if _is_weight_layer(layer) and is_swish(getattr(layer, "activation", None))}
    if not fused:
        return model
    from tfqkd.export import _rebuild  # the functional-graph re-runner (export's forward model)

    copy = keras.models.clone_model(model)  # new layers: the caller's model gains no nodes
    copy.set_weights(model.get_weights())
    finalize_layer_states(copy)
    by_name = {layer.name: layer for layer in model.layers}

    def layer_fn(layer, args, kwargs):
        if id(by_name.get(layer.name)) not in fused:
            return layer(*args, **kwargs)
        config = layer.get_config()
        activation, config["activation"] = config["activation"], "linear"
        linear = type(layer).from_config(config)
        out = linear(*args, **kwargs)
        linear.set_weights(layer.get_weights())
        return keras.layers.Activation(activation, name=f"{layer.name}_swish")(out)

    return _rebuild(copy, layer_fn)


def _check_layers(model: keras.Model) -> None:
    """Raises on layers tfqkd cannot quantize that would otherwise silently stay float."""
    problems = []
    for layer in model.layers:
        if isinstance(layer, _tfmot_q.QuantizeWrapperV2) or isinstance(
                layer, tfmot.quantization.keras.QuantizeWrapper):
            raise ValueError(
                f"the model is already quantized (layer {layer.name!r} is a QuantizeWrapper); "
                "pass the float model to quantize_model.")
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"layer {layer.name!r} is a nested model ({type(layer).__name__}); tfmot cannot "
                "quantize models inside models: rebuild it as one flat Functional or Sequential "
                "model.")
        if _is_weight_layer(layer) or isinstance(layer, _FLOAT_BY_DESIGN) or not layer.weights:
            continue
        problems.append(f"{layer.name!r} ({type(layer).__name__})")
    if problems:
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_WEIGHT_LAYERS)
        raise ValueError(
            f"cannot quantize the weights of layer(s) {', '.join(problems)}: tfqkd quantizes "
            f"{supported} kernels (BatchNormalization stays float). Replace these layers with "
            "supported ones, or quantize the model without them."
            + (" A SeparableConv2D (NASNet, Xception) is a DepthwiseConv2D followed by a 1x1 "
               "Conv2D (use_bias on the second): build the model with those two layers, which "
               "tfqkd quantizes and exports." if any("SeparableConv2D" in p for p in problems)
               else ""))


# --------------------------------------------------------------------------------------------
# the scheme: registry + layout transform
# --------------------------------------------------------------------------------------------
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
        layer_bits: Per-layer-name weight bit-width overrides (first/last layers).
        output_layers: Names of layers whose output gets an 8-bit output quantizer (only with
            ``activation_bits``; :func:`quantize_model` passes :func:`integer_graph_tensors`).

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
    ):
        self.weight_bits, self.activation_bits, _, self.per_channel = _check_options(
            weight_bits, activation_bits, None, per_channel, step, activation_clip,
            activation_quantizer)
        self.step = step
        self.activation_clip = activation_clip
        self.activation_quantizer = activation_quantizer
        self.layer_bits = {k: check_bits(v, f"bits of layer {k!r}") for k, v in (layer_bits or {}).items()}
        # Without activation quantization the model stays W-only (W2A32): no output quantizers.
        self.output_layers = frozenset(output_layers or ()) if self.activation_bits is not None \
            else frozenset()

    def _make_activation_quantizer(self):
        if self.activation_bits is None:
            return None
        if self.activation_quantizer is not None:
            quantizer = self.activation_quantizer(self.activation_bits)
            if not isinstance(quantizer, _tfmot_q.quantizers.Quantizer):
                raise ValueError(
                    "activation_quantizer(bits) must return a "
                    "tfmot.quantization.keras.quantizers.Quantizer, got "
                    f"{type(quantizer).__name__}.")
            return quantizer
        return ActivationQuantizer(self.activation_bits, clip=self.activation_clip)

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
                output_q = _integer_output_quantizer(layer)
                if activation_name(layer) in PRE_QUANTIZED_ACTIVATIONS:
                    pre_q = RangeQuantizer(8)  # the kernel's own output, before its softmax
            return config_cls(weight_q, self._make_activation_quantizer(), output_quantizer=output_q,
                              pre_activation_quantizer=pre_q)
        if self.supports(layer) and is_quantizable_relu_layer(layer):
            return ActivationQuantizeConfig(self._make_activation_quantizer())
        if self.supports(layer):
            return OutputQuantizeConfig(_integer_output_quantizer(layer))
        raise ValueError(
            f"layer {layer.name!r} ({type(layer).__name__}) is not quantized by tfqkd; supported: "
            f"{', '.join(c.__name__ for c in SUPPORTED_WEIGHT_LAYERS)} (+ ReLU with activation_bits).")


class TfqkdQuantizeLayoutTransform(_tfmot_q.QuantizeLayoutTransform):
    """tfqkd's layout transforms: of tfmot's default ones only the input quantizer.

    tfmot's default 8-bit scheme folds Conv+BN and inserts an input quantizer to mimic the
    TFLite kernels. tfqkd keeps the Keras graph as it is: the weight quantizer must see the
    convolution kernel itself (Eq. 1/2 is defined on it) and BN stays float; the exporter folds
    BN afterwards. With ``activation_bits`` the scheme passes tfmot's ``InputLayerQuantize``
    (a ``QuantizeLayer`` after each input, here with an 8-bit :class:`RangeQuantizer`: the
    integer file's input is int8 too). ``transforms`` (tfmot ``Transform`` objects) are applied with
    tfmot's ``ModelTransformer``.

    Example:
        >>> TfqkdQuantizeLayoutTransform().transforms
        []
    """

    def __init__(self, transforms: Optional[List[Any]] = None):
        self.transforms = list(transforms or [])

    def apply(self, model, layer_quantize_map):
        if not self.transforms:
            return model, layer_quantize_map
        return _tfmot_q.graph_transformations.model_transformer.ModelTransformer(
            model, self.transforms, set(layer_quantize_map.keys()), layer_quantize_map
        ).transform()


#: The model input's range is widened by this fraction (see ``RangeQuantizer``'s ``widen``): no
#: regular pixel grid then falls on a rounding tie, where TensorFlow and TFLite round apart.
INPUT_RANGE_WIDEN = 1.0 / 1024


def _input_layer_quantize():
    """tfmot's ``InputLayerQuantize`` transform with tfqkd's :class:`RangeQuantizer` in the layer.

    tfmot's own uses an ``AllValuesQuantizer`` whose range starts at [0, 0]: before the first
    training step it would map every input to 0. ``RangeQuantizer`` passes its input through
    until it has seen data.
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_transforms)
    from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (
        transforms)

    class InputLayerRangeQuantize(default_8bit_transforms.InputLayerQuantize):
        def replacement(self, match_layer):
            layer = quantize_layer.QuantizeLayer(RangeQuantizer(8, widen=INPUT_RANGE_WIDEN))
            config = keras.utils.legacy.serialize_keras_object(layer)
            config["name"] = layer.name
            return transforms.LayerNode(config, input_layers=[match_layer])

        def custom_objects(self):
            return {**super().custom_objects(), "RangeQuantizer": RangeQuantizer,
                    "tfqkd>RangeQuantizer": RangeQuantizer}

    return InputLayerRangeQuantize()


class TfqkdQuantizeScheme(_tfmot_q.QuantizeScheme):
    """The tfqkd ``QuantizeScheme``: pass it to ``tfmot.quantization.keras.quantize_apply``.

    Takes the :class:`TfqkdQuantizeRegistry` arguments. :func:`quantize_model` builds it for
    you; use it directly to quantize a model annotated by hand
    (``tfmot.quantization.keras.quantize_annotate_layer``).

    Example:
        >>> scheme = TfqkdQuantizeScheme(weight_bits=4)
        >>> scheme.get_quantize_registry().weight_bits
        4
    """

    def __init__(self, **registry_kwargs):
        self._registry = TfqkdQuantizeRegistry(**registry_kwargs)

    def get_layout_transformer(self):
        if self._registry.activation_bits is None:
            return TfqkdQuantizeLayoutTransform()
        return TfqkdQuantizeLayoutTransform([_input_layer_quantize()])

    def get_quantize_registry(self):
        return self._registry


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def quantize_model(
    model: keras.Model,
    weight_bits: int = 2,
    activation_bits: Optional[int] = None,
    first_last_bits: Optional[int] = 8,
    per_channel: bool = False,
    step: str = "l2",
    activation_clip: str = "ema",
    activation_quantizer: Optional[Callable[[int], Any]] = None,
) -> keras.Model:
    """Returns a quantization-aware-training copy of ``model`` (tfmot ``QuantizeWrapperV2`` layers).

    The copy starts from ``model``'s weights (the float shadow weights) and is ready for
    ``compile``/``fit``; ``model`` itself is not changed.

    Args:
        model: A built Functional or Sequential ``tf_keras`` model.
        weight_bits: Kernel bit-width in 1..8 (2 = ternary, the paper's setting).
        activation_bits: ReLU-output bit-width in 1..8, or ``None`` (float activations, the
            paper's W2A32).
        first_last_bits: Bit-width of the first weighted layer and the classifier (found by graph
            position); ``None`` quantizes them with ``weight_bits`` like the rest.
        per_channel: One step per output channel (else one per kernel).
        step: Step-size rule: ``"l2"`` (default), ``"std"`` or ``"learned"`` (LSQ).
        activation_clip: Clip rule of the default activation quantizer: ``"ema"``, ``"fixed"``
            (at 6.0) or ``"pact"``.
        activation_quantizer: Optional callable ``bits -> tfmot Quantizer`` used instead of
            :class:`~tfqkd.quantizers.ActivationQuantizer` for every quantized activation (it
            must be Keras-serialisable to save the model).

    Returns:
        The QAT model, named like ``model``; layer ``x`` becomes ``quant_x``.

    Raises:
        ValueError: on a bad bit-width / step / clip / per_channel, on a model that is already
            quantized, nested, or has weighted layers tfqkd cannot quantize (named).

    Example:
        >>> import tfqkd
        >>> q = quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2, activation_bits=4)
        >>> q.get_layer("quant_stem_relu").__class__.__name__
        'QuantizeWrapperV2'
    """
    weight_bits, activation_bits, first_last_bits, per_channel = _check_options(
        weight_bits, activation_bits, first_last_bits, per_channel, step, activation_clip,
        activation_quantizer)
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"model must be a tf_keras Model (build it with `from tfqkd import keras`), got "
            f"{type(model).__module__}.{type(model).__name__}.")
    if not (isinstance(model, keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise ValueError(
            f"model must be a Functional or Sequential model, got a subclassed "
            f"{type(model).__name__}; tfmot can only rewrite graph models.")
    if not model.built:
        raise ValueError("model is not built: call model.build(input_shape) or give it an Input.")
    _check_layers(model)
    if activation_bits is not None:
        model = _split_fused_swish(model)

    layer_bits: Dict[str, int] = {}
    if first_last_bits is not None:
        first, last = first_and_last_layers(model)
        layer_bits = {name: first_last_bits for name in first + last}

    registry_kwargs = dict(
        weight_bits=weight_bits, activation_bits=activation_bits, per_channel=per_channel,
        step=step, activation_clip=activation_clip, activation_quantizer=activation_quantizer,
        layer_bits=layer_bits,
        output_layers=integer_graph_tensors(model) if activation_bits is not None else ())
    scheme = TfqkdQuantizeScheme(**registry_kwargs)
    registry = scheme.get_quantize_registry()

    if activation_bits is not None:
        # Tensors the integer file rounds but the student cannot: raw TensorFlow ops in the
        # graph (TFOpLambda, e.g. MobileNetV3's hard-swish `x + 3.0`, `* (1 / 6)`) and ReLUs
        # with a threshold or slope (a fused swish was split off above).
        rounded = set(registry.output_layers)
        float_layers = [
            layer.name for layer in model.layers
            if (type(layer).__name__ in ("TFOpLambda", "SlicingOpLambda")
                or (type(layer) is keras.layers.ReLU and not is_quantizable_relu_layer(layer))
                or (_is_weight_layer(layer) and layer.name in rounded
                    and activation_name(layer) not in PRE_QUANTIZED_ACTIVATIONS
                    and not is_relu_activation(getattr(layer, "activation", None))
                    and activation_name(layer) != "linear"))]
        if float_layers:
            shown = ", ".join(repr(n) for n in float_layers[:8])
            more = f" and {len(float_layers) - 8} more" if len(float_layers) > 8 else ""
            warnings.warn(
                f"layer(s) {shown}{more} stay float in the student, but an integer TFLite file "
                "rounds their outputs to int8 (TensorFlow ops in the graph, ReLUs with a threshold "
                "or slope, the input of an activation other than ReLU, softmax, sigmoid, tanh or "
                "swish fused into a Conv/Dense): the file can disagree with the student "
                "there. Non-ReLU activations are rounded at 8 bits, ReLU outputs at "
                "activation_bits.", stacklevel=2)

    def annotate(layer):
        if registry.supports(layer):
            return _tfmot_q.quantize_annotate_layer(layer)
        return layer  # pass-through (shared with `model` here; quantize_apply copies it)

    with _tfmot_q.quantize_scope(_tfqkd_custom_objects(import_all=False)):
        annotated = keras.models.clone_model(model, clone_function=annotate)
        applied = _tfmot_q.quantize_apply(annotated, scheme=scheme)
        # quantize_apply reuses the pass-through layers (BN, ReLU, Add…) of its intermediate
        # models, so they carry several graph nodes and `q.get_layer(n).output` points into a
        # dead graph. One more clone gives a model that owns all its layers.
        qmodel = keras.models.clone_model(applied)
    _copy_weights(applied, qmodel)
    del applied, annotated

    wrapped = {layer.layer.name for layer in qmodel.layers
               if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)}
    missing = [layer.name for layer in model.layers if _is_weight_layer(layer) and layer.name not in wrapped]
    if missing:  # pragma: no cover - guards against tfmot changing its cloning
        raise RuntimeError(f"layers {missing} were not wrapped for quantization.")
    _init_learned_steps(qmodel)
    return qmodel


def _copy_weights(src: keras.Model, dst: keras.Model) -> None:
    """Copies weights between two clones layer by layer, wrapper variables by name.

    ``set_weights`` on the whole model is not safe: a wrapper built from its config orders a
    quantizer's trainable variable (a learned step) differently from one built by tfmot.
    """
    for a, b in zip(src.layers, dst.layers):
        if a.name != b.name:  # pragma: no cover - clone_model keeps the order
            raise RuntimeError(f"clone mismatch: {a.name!r} vs {b.name!r}")
        if isinstance(a, tfmot.quantization.keras.QuantizeWrapper):
            b.layer.set_weights(a.layer.get_weights())
            inner_a = {id(v) for v in a.layer.weights}
            inner_b = {id(v) for v in b.layer.weights}
            own_a = {v.name.split("/")[-1]: v for v in a.weights if id(v) not in inner_a}
            own_b = {v.name.split("/")[-1]: v for v in b.weights if id(v) not in inner_b}
            if set(own_a) != set(own_b):  # pragma: no cover
                raise RuntimeError(f"wrapper {a.name!r}: variables {sorted(own_a)} vs {sorted(own_b)}")
            for name, var in own_a.items():
                own_b[name].assign(var)
        else:
            b.set_weights(a.get_weights())
    finalize_layer_states(dst)


def finalize_layer_states(model: keras.Model) -> None:
    """Recomputes the state layers derive from their weights after ``set_weights`` / ``assign``.

    A ``Normalization`` layer computes its mean and variance tensors from its ``adapt_mean`` /
    ``adapt_variance`` weights once (``finalize_state``); assigning new weights afterwards leaves
    the old tensors in use (e.g. EfficientNet's ImageNet statistics would be lost on a copy).

    Example:
        >>> layer = keras.layers.Normalization(axis=-1)
        >>> _ = keras.Sequential([keras.Input((2,)), layer])
        >>> layer.set_weights([np.ones(2), np.full(2, 4.0), np.array(1)])
        >>> finalize_layer_states(keras.Sequential([layer]))
        >>> layer(np.array([[3.0, 5.0]], np.float32)).numpy().tolist()
        [[1.0, 2.0]]
    """
    for layer in model.submodules:
        if isinstance(layer, keras.layers.Layer) and layer.built and \
                type(layer).__name__ == "Normalization" and hasattr(layer, "finalize_state"):
            layer.finalize_state()


def _weight_vars(model: keras.Model) -> Iterator[Tuple[Any, Any, Any, Any]]:
    """Yields (wrapper, float weight, quantizer, quantizer vars) of every quantized weight."""
    for layer in _walk_layers(model):
        if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper):
            for weight, quantizer, qvars in getattr(layer, "_weight_vars", []):
                yield layer, weight, quantizer, qvars


def _walk_layers(model) -> Iterator[keras.layers.Layer]:
    for layer in getattr(model, "layers", []):
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk_layers(layer)


def _init_learned_steps(qmodel: keras.Model) -> None:
    for _, weight, quantizer, qvars in _weight_vars(qmodel):
        if isinstance(quantizer, SymmetricQuantizer) and quantizer.step == "learned" and "step" in qvars:
            axis = quantizer.axis if quantizer.per_channel else None
            qvars["step"].assign(tf.reshape(l2_optimal_step(weight, quantizer.bits, axis=axis),
                                            qvars["step"].shape))


def _key(wrapper, weight, n_weights: int) -> str:
    if n_weights == 1:
        return wrapper.layer.name
    return f"{wrapper.layer.name}/{weight.name.split(':')[0].split('/')[-1]}"


def quantized_weights(model: keras.Model) -> Dict[str, np.ndarray]:
    """``{inner layer name: the kernel the forward pass uses, Q(w)}`` of a quantized model.

    Computed by calling each wrapper's weight quantizer on its float weight in inference mode,
    exactly as ``QuantizeWrapperV2.call`` does. Layers with several quantized weights are keyed
    ``"layer/weight"``. Nested models (e.g. a ``Distiller``'s student) are searched too.

    Example:
        >>> import tfqkd
        >>> q = quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2)
        >>> sorted(quantized_weights(q))[:2]
        ['classifier', 'stage1_block1_conv1']
    """
    out: Dict[str, np.ndarray] = {}
    entries = list(_weight_vars(model))
    counts: Dict[int, int] = {}
    for wrapper, *_ in entries:
        counts[id(wrapper)] = counts.get(id(wrapper), 0) + 1
    for wrapper, weight, quantizer, qvars in entries:
        key = _key(wrapper, weight, counts[id(wrapper)])
        if key in out:
            raise ValueError(
                f"two quantized layers are named {key!r} (a model containing two quantized "
                "models?); pass the quantized model itself, e.g. distiller.student.")
        out[key] = np.asarray(quantizer(tf.convert_to_tensor(weight), False, qvars))
    return out


def quantization_info(model: keras.Model) -> Dict[str, Dict[str, Any]]:
    """Per quantized weight: ``bits``, ``step`` (Δ, NumPy), ``per_channel``, ``axis`` and ``levels``.

    ``levels`` are the integers ``Q(w) / Δ`` (int8), what a packed export stores. Only
    :class:`~tfqkd.quantizers.SymmetricQuantizer` weights are listed.

    Example:
        >>> import tfqkd
        >>> info = quantization_info(quantize_model(tfqkd.models.tiny_resnet(seed=0)))
        >>> info["stem_conv"]["bits"], info["stage1_block1_conv1"]["bits"]
        (8, 2)
    """
    out: Dict[str, Dict[str, Any]] = {}
    entries = list(_weight_vars(model))
    counts: Dict[int, int] = {}
    for wrapper, *_ in entries:
        counts[id(wrapper)] = counts.get(id(wrapper), 0) + 1
    for wrapper, weight, quantizer, qvars in entries:
        if not isinstance(quantizer, SymmetricQuantizer):
            continue
        w = tf.convert_to_tensor(weight)
        step = quantizer.compute_step(w, qvars)
        q = quantizer(w, False, qvars)
        levels = np.rint(np.asarray(q) / np.asarray(step)).astype(np.int8)
        out[_key(wrapper, weight, counts[id(wrapper)])] = {
            "bits": quantizer.bits, "step": np.asarray(step), "per_channel": quantizer.per_channel,
            "axis": quantizer.axis if quantizer.per_channel else None, "levels": levels,
        }
    return out


#: tfqkd modules that define Keras-serialisable objects; importing them registers those objects.
_SERIALISABLE_MODULES = ("quantizers", "quantize_configs", "losses", "distiller", "callbacks", "speq", "qkd")


def _tfqkd_custom_objects(import_all: bool = True) -> Dict[str, Any]:
    if import_all:
        for mod in _SERIALISABLE_MODULES:
            try:
                importlib.import_module(f"tfqkd.{mod}")
            except ModuleNotFoundError as err:  # a module not installed: nothing of it was saved
                if err.name != f"tfqkd.{mod}":
                    raise
            except Exception as err:  # noqa: BLE001 - one broken module must not block loading
                warnings.warn(f"quantize_scope: could not import tfqkd.{mod} ({err!r}); objects "
                              "it defines cannot be loaded.", stacklevel=3)
    objects = {}
    for key, obj in keras.utils.get_custom_objects().items():
        if key.startswith("tfqkd>"):
            objects[key] = obj
            objects[key.split(">", 1)[1]] = obj
    return objects


def quantize_scope(*custom_objects: Mapping[str, Any]):
    """Context manager under which ``keras.models.load_model`` understands tfqkd models.

    It is tfmot's ``quantize_scope`` plus every tfqkd Keras object (quantizers, configs and the
    objects of the other tfqkd modules). Extra ``{name: object}`` dicts may be passed.

    Formats: HDF5 (``model.save("m.h5")``, what the recipes use, fast) and the Keras zip format
    (``"m.keras"``) are tested to load back and predict identically, learned steps and
    activation quantizers included; the TensorFlow SavedModel directory works too but saves
    ~10x slower. (:func:`quantize_model` returns wrappers built from their config, like the
    ones ``load_model`` builds, so variable order and count agree between save and load.)

    Example:
        >>> import os, tempfile, tfqkd
        >>> q = quantize_model(tfqkd.models.tiny_resnet(seed=0))
        >>> path = os.path.join(tempfile.mkdtemp(), "q.h5")
        >>> q.save(path)
        >>> with quantize_scope():
        ...     loaded = keras.models.load_model(path)
        >>> loaded.count_params() == q.count_params()
        True
    """
    return _tfmot_q.quantize_scope(_tfqkd_custom_objects(), *custom_objects)
