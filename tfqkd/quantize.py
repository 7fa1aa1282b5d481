"""Model-level quantization: ``quantize_model`` and ``quantize_scope``.

tfqkd extends tfmot the way tfmot is meant to be extended (like its own ``default_8bit``
package), one concept per module: scheme → registry → QuantizeConfig → Quantizer. A
:class:`~tfqkd.quantize_scheme.TfqkdQuantizeScheme` bundles a layout transform
(:mod:`tfqkd.quantize_scheme`) and a registry (:mod:`tfqkd.quantize_registry`) that hands out the
:mod:`tfqkd.quantize_configs` per layer, which hold the :mod:`tfqkd.quantizers`;
:func:`quantize_model` annotates the layers to quantize and calls
``tfmot.quantization.keras.quantize_apply`` with that scheme. The result is an ordinary tfmot QAT
model (layers wrapped in ``QuantizeWrapperV2``). What a QAT layer's weights hold (``Q(w)``, its
integer levels, step and bit-width) is read by :mod:`tfqkd.qat_weights`, the one reader the
exporter uses too; :func:`quantized_weights` and :func:`quantization_info` are re-exported here.

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
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow_model_optimization as tfmot

# finalize_layer_states, INPUT_RANGE_WIDEN: re-exported, this module was their home before.
from tfqkd._graph import finalize_layer_states, rebuild  # noqa: F401
from tfqkd._keras import keras, tf
from tfqkd.budget import layer_widths
from tfqkd.layer_bits import BitsSpec, activation_layers, resolve_layer_bits, weighted_layers
from tfqkd.qat_weights import _weight_vars, quantization_info, quantized_weights
from tfqkd.models.heads import softmax_layer
from tfqkd.quantize_configs import (
    PRE_QUANTIZED_ACTIVATIONS,
    activation_name,
    default_head_bits,
    is_quantizable_relu_layer,
    is_relu_activation,
    is_swish,
)
from tfqkd.quantize_registry import (
    FLOAT,
    SUPPORTED_WEIGHT_LAYERS,
    TfqkdQuantizeRegistry,
    _is_weight_layer,
    _check_options,
    _parents,
    first_and_last_layers,
    integer_graph_tensors,
)
from tfqkd.quantize_scheme import (  # noqa: F401
    QuantizeLayer,
    INPUT_RANGE_WIDEN,
    TfqkdQuantizeLayoutTransform,
    TfqkdQuantizeScheme,
)
from tfqkd.quantizers import SymmetricQuantizer, l2_optimal_step

__all__ = [
    "quantize_model",
    "quantize_at_widths",
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


#: Layers that have weights but stay float by design (normalisation: folded at export).
_FLOAT_BY_DESIGN: Tuple[type, ...] = tuple(
    cls for cls in (
        keras.layers.BatchNormalization,
        getattr(keras.layers, "LayerNormalization", None),
        getattr(keras.layers, "GroupNormalization", None),
        getattr(keras.layers, "Normalization", None),
    ) if cls is not None
)


def _is_fused_swish(layer) -> bool:
    return _is_weight_layer(layer) and is_swish(getattr(layer, "activation", None))


def _swish_as_own_layer(layer, args, kwargs):
    """``Conv2D/Dense(activation="swish")`` as the linear layer + ``Activation("swish")`` named
    ``<layer>_swish`` (same weights, same function). The int8 file rounds the kernel's output
    before its LOGISTIC and MUL; as a layer of its own the student rounds it too (EfficientNet's
    squeeze-excite ``se_reduce``)."""
    config = layer.get_config()
    activation, config["activation"] = config["activation"], "linear"
    linear = type(layer).from_config(config)
    out = linear(*args, **kwargs)
    linear.set_weights(layer.get_weights())
    return keras.layers.Activation(activation, name=f"{layer.name}_swish")(out)


def _is_separable(layer) -> bool:
    return type(layer) is keras.layers.SeparableConv2D


def _separable_as_two(layer, args, kwargs):
    """``SeparableConv2D`` as ``<layer>_depthwise`` (``DepthwiseConv2D``, no bias) +
    ``<layer>_pointwise`` (1x1 ``Conv2D`` with the bias and activation): same weights, same
    function (NASNet, Xception).

    The same split as tfmot's ``SeparableConvQuantize`` layout transform, done before annotation
    so the two layers have names of their own: the registry decides by name which outputs the
    integer file rounds, and the depthwise output between the two is one of them.
    """
    c = layer.get_config()
    depthwise = keras.layers.DepthwiseConv2D(
        c["kernel_size"], strides=c["strides"], padding=c["padding"],
        depth_multiplier=c["depth_multiplier"], data_format=c["data_format"],
        dilation_rate=c["dilation_rate"], use_bias=False,
        depthwise_regularizer=c["depthwise_regularizer"],
        depthwise_constraint=c["depthwise_constraint"], trainable=c["trainable"],
        name=f"{layer.name}_depthwise")
    pointwise = keras.layers.Conv2D(
        c["filters"], 1, data_format=c["data_format"], activation=c["activation"],
        use_bias=c["use_bias"], kernel_regularizer=c["pointwise_regularizer"],
        bias_regularizer=c["bias_regularizer"], activity_regularizer=c["activity_regularizer"],
        kernel_constraint=c["pointwise_constraint"], bias_constraint=c["bias_constraint"],
        trainable=c["trainable"], name=f"{layer.name}_pointwise")
    out = pointwise(depthwise(*args, **kwargs))
    weights = layer.get_weights()
    depthwise.set_weights(weights[:1])
    pointwise.set_weights(weights[1:])
    return out


def _rewrite_layers(model: keras.Model,
                    rewrites: Sequence[Tuple[Callable[[Any], bool], Callable]]) -> keras.Model:
    """A copy of ``model`` in which each layer matching a ``(wanted, replace)`` pair's ``wanted``
    is replaced by ``replace(layer, args, kwargs) -> outputs`` (the first pair that matches);
    ``model`` itself when no layer matches. ``model`` is not changed.

    Example:
        >>> m = keras.Sequential([keras.Input((8, 8, 3)),
        ...                       keras.layers.SeparableConv2D(4, 3, name="sep")])
        >>> split = _rewrite_layers(m, [(_is_separable, _separable_as_two)])
        >>> [(layer.name, type(layer).__name__) for layer in split.layers[1:]]
        [('sep_depthwise', 'DepthwiseConv2D'), ('sep_pointwise', 'Conv2D')]
    """
    def replacement(layer) -> Optional[Callable]:
        return next((replace for wanted, replace in rewrites if wanted(layer)), None)

    if not any(replacement(layer) for layer in model.layers):
        return model
    copy = keras.models.clone_model(model)  # new layers: the caller's model gains no nodes
    copy.set_weights(model.get_weights())
    finalize_layer_states(copy)

    def layer_fn(layer, args, kwargs):
        replace = replacement(layer)
        return replace(layer, args, kwargs) if replace else layer(*args, **kwargs)

    return rebuild(copy, layer_fn)


def _check_layers(model: keras.Model) -> None:
    """Raises on layers tfqkd cannot quantize that would otherwise silently stay float."""
    problems = []
    names = {layer.name for layer in model.layers}
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
        if _is_separable(layer):  # split in two (_separable_as_two): their names must be free
            for part in ("_depthwise", "_pointwise"):
                if layer.name + part in names:
                    raise ValueError(f"cannot split SeparableConv2D {layer.name!r}: the model "
                                     f"already has a layer named {layer.name + part!r}; rename it.")
            continue
        if _is_weight_layer(layer) or isinstance(layer, _FLOAT_BY_DESIGN) or not layer.weights:
            continue
        problems.append(f"{layer.name!r} ({type(layer).__name__})")
    if problems:
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_WEIGHT_LAYERS)
        raise ValueError(
            f"cannot quantize the weights of layer(s) {', '.join(problems)}: tfqkd quantizes "
            f"{supported} kernels (BatchNormalization stays float). Replace these layers with "
            "supported ones, or quantize the model without them.")


def quantize_model(
    model: keras.Model,
    weight_bits: int = 2,
    activation_bits: Optional[int] = None,
    first_last_bits: Union[int, str, None] = 8,
    per_channel: bool = False,
    step: str = "l2",
    activation_clip: str = "ema",
    activation_quantizer: Optional[Callable[[int], Any]] = None,
    layer_bits: BitsSpec = None,
    layer_activation_bits: BitsSpec = None,
    softmax_head_bits: Optional[int] = None,
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
            position); ``None`` quantizes them with ``weight_bits`` like the rest; ``"float"``
            leaves them unquantized (as Larq and XNOR-Net-style recipes do; an integer TFLite
            file still stores them at 8 bits, rounded by the converter).
        per_channel: One step per output channel (else one per kernel).
        step: Step-size rule: ``"l2"`` (default), ``"std"`` or ``"learned"`` (LSQ).
        activation_clip: Clip rule of the default activation quantizer: ``"ema"``, ``"fixed"``
            (at 6.0) or ``"pact"``.
        activation_quantizer: Optional callable ``bits -> tfmot Quantizer`` used instead of
            :class:`~tfqkd.quantizers.ActivationQuantizer` for every quantized activation (it
            must be Keras-serialisable to save the model).
        layer_bits: Kernel bit-widths per layer, ``{layer name: bits}`` or a callable
            ``layer -> bits | None`` (:mod:`tfqkd.layer_bits`); they override ``weight_bits``
            and ``first_last_bits`` for the layers they name (mixed precision).
        layer_activation_bits: The same for ReLU outputs (a ReLU layer, or a Conv/Dense with a
            fused ReLU), overriding ``activation_bits``, which must be set.
        softmax_head_bits: With ``activation_bits``, the width of the logits and probabilities
            of the softmax the model ends in (its head), as the student rounds them and the
            integer file computes them (:func:`tfqkd.export.export_tflite`): 16 (int16 logits
            on a symmetric grid, probabilities in steps of 1/32768, LiteRT's 16x8 kernels) or
            8 (int8; probabilities in steps of 1/256, for runtimes that take int8 tensors
            only). ``None`` (default): 16 for a logits kernel of up to 131,072 weights, 8 above
            (:func:`tfqkd.quantize_configs.default_head_bits`: the 16x8 head is slower, 1.22x
            a 1000-class MobileNetV2). With int8 logits, top classes one logit step apart tie
            and argmax takes the lower index (14-306 of 1,000 test images in 10-class
            Applications students, docs/export.md).

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
        >>> mixed = quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2,
        ...                        layer_bits={"stage2_block1_conv2": 4})
        >>> quantization_info(mixed)["stage2_block1_conv2"]["bits"]
        4
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
    rewrites = [(_is_separable, _separable_as_two)]
    if activation_bits is not None:
        rewrites.append((_is_fused_swish, _swish_as_own_layer))
    model = _rewrite_layers(model, rewrites)  # one copy of the model for all of them

    chosen_bits = resolve_layer_bits(model, layer_bits, weighted_layers(model), "layer_bits")
    chosen_activation_bits = resolve_layer_bits(model, layer_activation_bits,
                                                activation_layers(model), "layer_activation_bits")
    # Every kernel's width by the one rule tfqkd.budget prices (the user's per-layer widths win).
    kernel_bits = layer_widths(model, weight_bits,
                               None if first_last_bits == FLOAT else first_last_bits, chosen_bits)
    kept_float: Tuple[str, ...] = ()
    if first_last_bits == FLOAT:
        first, last = first_and_last_layers(model)
        kept_float = tuple(name for name in first + last if name not in chosen_bits)

    logits = _softmax_logits(model)
    registry_kwargs = dict(
        weight_bits=weight_bits, activation_bits=activation_bits, per_channel=per_channel,
        step=step, activation_clip=activation_clip, activation_quantizer=activation_quantizer,
        layer_bits=kernel_bits, layer_activation_bits=chosen_activation_bits,
        output_layers=integer_graph_tensors(model) if activation_bits is not None else (),
        softmax_head=softmax_layer(model),
        softmax_head_bits=_head_bits(model, logits, softmax_head_bits), softmax_logits=logits)
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
        if registry.supports(layer) and layer.name not in kept_float:
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
    missing = [layer.name for layer in model.layers if _is_weight_layer(layer)
               and layer.name not in wrapped and layer.name not in kept_float]
    if missing:  # pragma: no cover - guards against tfmot changing its cloning
        raise RuntimeError(f"layers {missing} were not wrapped for quantization.")
    _init_learned_steps(qmodel)
    return qmodel


#: Layers between a softmax's logits and the softmax that do not change the values.
_VALUE_PRESERVING = (keras.layers.Reshape, keras.layers.Flatten, keras.layers.Dropout)


def _softmax_logits(model: keras.Model) -> Optional[str]:
    """Name of the Conv/Dense layer whose output is the logits of the softmax ``model`` ends in
    (that layer itself for a ``Dense(activation="softmax")``; behind a ``Reshape`` / ``Flatten``
    / ``Dropout`` for MobileNet's and MobileNetV3's ``Activation("softmax")``), else None."""
    name = softmax_layer(model)
    by_name = {layer.name: layer for layer in model.layers}
    parents = _parents(model)  # this model's own graph (its layers may sit in other models too)
    layer = by_name.get(name)
    for _ in range(8):
        if layer is None:
            return None
        if _is_weight_layer(layer):
            return layer.name if activation_name(layer) in ("softmax", "linear") else None
        feeding = parents.get(layer.name, set())
        if len(feeding) != 1:
            return None  # several inputs, or none
        layer = by_name.get(next(iter(feeding)))
        if not isinstance(layer, _VALUE_PRESERVING + (keras.layers.Conv2D, keras.layers.Dense)):
            return None
    return None


def _head_bits(model: keras.Model, logits: Optional[str], requested: Optional[int]) -> int:
    """``requested``, or by default the width :func:`default_head_bits` gives the logits kernel
    (8 when no Conv/Dense computes the logits: the file keeps the converter's int8 head then)."""
    if requested is not None or logits is None:
        return 8 if requested is None else requested  # the registry checks a bad value
    kernel = getattr(model.get_layer(logits), "kernel", None)
    return default_head_bits(None if kernel is None else int(np.prod(kernel.shape)))


def quantize_at_widths(model: keras.Model, widths: Mapping[str, int],
                       **kwargs: Any) -> keras.Model:
    """:func:`quantize_model` with each weighted layer's kernel width given by ``widths``
    (layer name → bits, e.g. a bit-width search's candidate); no first/last default applies.
    ``kwargs``: the other :func:`quantize_model` arguments (``activation_bits``,
    ``per_channel``, ``step``, ...).

    Example:
        >>> import tfqkd
        >>> m = tfqkd.models.tiny_resnet(seed=0)
        >>> widths = {layer.name: 4 for layer in tfqkd.layer_bits.weighted_layers(m)}
        >>> quantization_info(quantize_at_widths(m, dict(widths, classifier=8)))["classifier"]["bits"]
        8
    """
    return quantize_model(model, weight_bits=min(widths.values()), first_last_bits=None,
                          layer_bits=dict(widths), **kwargs)


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


def _init_learned_steps(qmodel: keras.Model) -> None:
    for _, weight, quantizer, qvars in _weight_vars(qmodel):
        if isinstance(quantizer, SymmetricQuantizer) and quantizer.step == "learned" and "step" in qvars:
            axis = quantizer.axis if quantizer.per_channel else None
            qvars["step"].assign(tf.reshape(l2_optimal_step(weight, quantizer.bits, axis=axis),
                                            qvars["step"].shape))


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
    scope = _tfmot_q.quantize_scope(_tfqkd_custom_objects(), *custom_objects)
    # Later dicts win: tfqkd's QuantizeLayer (which marks itself built) replaces tfmot's.
    return keras.utils.custom_object_scope(*scope.custom_objects, {"QuantizeLayer": QuantizeLayer})
