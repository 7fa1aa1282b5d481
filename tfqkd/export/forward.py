"""The float forward model of a QAT student: wrappers stripped, kernels set to ``Q(w)``, BN folding.

:func:`forward_model` rebuilds a *plain* Keras model of the student's architecture whose weights
are what the QAT model's forward pass uses (:func:`forward_weights`, read by
:func:`tfqkd.qat_weights.read_layer_weights`); the converter cannot see through custom
quantizers, so every export mode starts from it. ``_fold_plan`` / ``_fold`` fold a batch norm
into the kernel layer before it (the fake-quant graph and the bias alignment use them).

Example:
    >>> import numpy as np, tfqkd
    >>> q = tfqkd.quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2)
    >>> plain = forward_model(q)
    >>> x = np.zeros((1, 8, 8, 1), "float32")
    >>> bool(np.allclose(plain(x), q(x), atol=1e-5)), type(plain.get_layer("stem_conv")).__name__
    (True, 'Conv2D')
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from tfqkd._graph import finalize_layer_states, rebuild
from tfqkd._keras import keras
from tfqkd.export._common import ExportError
from tfqkd.qat_weights import KERNEL_LAYERS as _KERNEL_LAYERS
from tfqkd.qat_weights import (
    _inner,
    _is_quantize_layer,
    _tfmot_classes,
    _weight_short_name,
    read_layer_weights,
)

__all__ = ["forward_model", "forward_weights"]


def _layer_forward_weights(layer) -> Dict[str, np.ndarray]:
    """{short name: value as the forward pass uses it} for ``layer`` (its inner layer if wrapped)."""
    return {name: w.value for name, w in read_layer_weights(layer, levels=False).items()}


def _rebuild(model: keras.Model, layer_fn: Callable, input_fn: Optional[Callable] = None
             ) -> keras.Model:
    """:func:`tfqkd._graph.rebuild`, a subclassed model being an :class:`ExportError`."""
    return rebuild(model, layer_fn, input_fn, error=ExportError)


def forward_weights(model: keras.Model) -> Dict[str, Dict[str, np.ndarray]]:
    """``{inner layer name: {weight name: value as the forward pass uses it}}``.

    For a QAT model each quantized weight is replaced by ``quantizer(w, training=False, ...)``;
    weight names are the short variable names (``kernel``, ``gamma``, ``moving_mean``...).

    Example:
        >>> import tfqkd
        >>> w = forward_weights(tfqkd.models.tiny_resnet(seed=0))
        >>> w["stem_conv"]["kernel"].shape
        (3, 3, 1, 8)
    """
    out = {}
    for layer in model.layers:
        if _is_quantize_layer(layer):
            continue
        weights = _layer_forward_weights(layer)
        if weights:
            out[_inner(layer).name] = weights
    return out


def _clone_plain_layer(layer):
    """A fresh float layer with the configuration of ``layer`` (the inner layer of a wrapper)."""
    inner = _inner(layer)
    config = inner.get_config()
    if "activation" in config and hasattr(inner, "activation"):
        # tfmot swaps activations for quantize-aware wrappers or a NoOpActivation (when the
        # activation moved to a following layer): export the plain function.
        act = inner.activation
        while isinstance(act, _tfmot_classes()[2]):
            act = act.activation
        if type(act).__name__ == "NoOpActivation":
            act = keras.activations.linear
        config["activation"] = keras.activations.serialize(act)
    if isinstance(inner, keras.Model):
        raise ExportError(
            f"layer {inner.name!r} is a nested model; export supports flat functional models. "
            "Flatten it first (build the student as one functional model).")
    return inner.__class__.from_config(config)


def forward_model(model: keras.Model) -> keras.Model:
    """A plain float Keras model of the same architecture whose kernels are the forward ``Q(w)``.

    tfmot ``QuantizeWrapper``s are replaced by their inner layers (same names), ``QuantizeLayer``s
    are dropped, activation fake-quantization is removed, and every weight is set to what the QAT
    model's forward pass uses (:func:`forward_weights`). A float model comes back as a copy.

    Example:
        >>> import numpy as np, tfqkd
        >>> m = tfqkd.models.tiny_resnet(seed=0)
        >>> f = forward_model(m)
        >>> x = np.zeros((1, 8, 8, 1), "float32")
        >>> bool(np.allclose(f(x), m(x)))
        True
    """
    clones = {}

    def layer_fn(layer, args, kwargs):
        if _is_quantize_layer(layer):
            return args[0] if len(args) == 1 else args
        if id(layer) not in clones:
            clones[id(layer)] = (_clone_plain_layer(layer), layer)
        return clones[id(layer)][0](*args, **kwargs)

    plain = _rebuild(model, layer_fn)
    for new, old in clones.values():
        weights = _layer_forward_weights(old)
        if new.weights:
            try:
                new.set_weights([weights[_weight_short_name(w)] for w in new.weights])
            except KeyError as err:
                raise ExportError(f"layer {new.name!r}: weight {err} not found in the original "
                                  f"layer (has {sorted(weights)}).") from err
    finalize_layer_states(plain)  # a Normalization layer's statistics come from its weights
    return plain


def _consumers(model: keras.Model) -> Dict[int, List[Any]]:
    """{id(layer): [layers consuming its output inside ``model``]}."""
    out: Dict[int, List[Any]] = {}
    for depth in model._nodes_by_depth:  # noqa: SLF001
        for node in model._nodes_by_depth[depth]:  # noqa: SLF001
            if node.is_input:
                continue
            for parent in node.parent_nodes:
                out.setdefault(id(parent.layer), []).append(node.layer)
    return out


def _layer_calls(model: keras.Model) -> Dict[int, List[Any]]:
    """{id(layer): [its call nodes inside ``model``]}: a layer a rebuild reused from another
    model (a TensorFlow-op layer) also has that model's calls among its ``_inbound_nodes``."""
    out: Dict[int, List[Any]] = {}
    for depth in model._nodes_by_depth:  # noqa: SLF001
        for node in model._nodes_by_depth[depth]:  # noqa: SLF001
            if not node.is_input:
                out.setdefault(id(node.layer), []).append(node)
    return out


def _fold_plan(plain: keras.Model) -> Dict[int, Any]:
    """{id(kernel layer): batch-norm layer folded into it}."""
    consumers = _consumers(plain)
    plan = {}
    for layer in plain.layers:
        if not isinstance(layer, _KERNEL_LAYERS):
            continue
        if getattr(layer, "activation", None) not in (None, keras.activations.linear):
            continue
        users = consumers.get(id(layer), [])
        if len(users) == 1 and isinstance(users[0], keras.layers.BatchNormalization) and \
                len(users[0]._inbound_nodes) == 1 and users[0].axis in ([-1], [3], [1], -1):  # noqa
            plan[id(layer)] = users[0]
    return plan


def _fold(layer, bn) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kernel, bias and per-output-channel multiplier g of ``layer`` with ``bn`` folded in."""
    weights = layer.get_weights()
    kernel = weights[0].astype(np.float64)
    bias = weights[1].astype(np.float64) if getattr(layer, "use_bias", False) else None
    out_ch = kernel.shape[-1] * (kernel.shape[-2] if isinstance(layer, keras.layers.DepthwiseConv2D)
                                 else 1)
    if bias is None:
        bias = np.zeros(out_ch)
    g = np.ones(out_ch)
    if bn is not None:
        params = dict(zip([w.name.split("/")[-1].split(":")[0] for w in bn.weights],
                          bn.get_weights()))
        gamma = params.get("gamma", np.ones(out_ch))
        beta = params.get("beta", np.zeros(out_ch))
        g = gamma / np.sqrt(params["moving_variance"] + bn.epsilon)
        bias = (bias - params["moving_mean"]) * g + beta
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        shape = kernel.shape
        kernel = (kernel.reshape(shape[:2] + (-1,)) * g).reshape(shape)
    else:
        kernel = kernel * g
    return kernel.astype(np.float32), bias.astype(np.float32), g
