"""Softmax heads: find the softmax a model ends in, and view the model's logits.

Applications models (and many user models) end in a softmax; distillation needs logits, which
the losses soften as ``softmax(z / tau)``. :func:`logits_model` returns a model that outputs the
logits of such a model and SHARES its variables (training the view trains the original), so the
model the user asked for, head included, is the one that is saved and exported.

Example:
    >>> import numpy as np
    >>> from tfqkd import keras
    >>> inputs = keras.Input((4,))
    >>> probs = keras.layers.Dense(3, activation="softmax", name="head")(inputs)
    >>> model = keras.Model(inputs, probs)
    >>> softmax_layer(model)
    'head'
    >>> logits = logits_model(model)
    >>> x = np.ones((2, 4), "float32")
    >>> z = logits(x).numpy()
    >>> np.allclose(np.exp(z) / np.exp(z).sum(-1, keepdims=True), model(x))
    True
    >>> logits_model(logits) is logits  # already logits: returned as is
    True
"""

from __future__ import annotations

from typing import Optional

from tfqkd._keras import keras, tf

__all__ = ["softmax_layer", "logits_model", "PreActivation"]


def _is_softmax(fn) -> bool:
    if fn is None:
        return False
    if fn is keras.activations.softmax or fn is tf.nn.softmax:
        return True
    name = getattr(fn, "__name__", None) or getattr(fn, "name", None)
    # log_softmax is not listed: its outputs are logits up to a per-example constant already.
    return isinstance(name, str) and name == "softmax"


def _activation_is_softmax(layer) -> bool:
    if isinstance(layer, keras.layers.Softmax):
        return True
    act = getattr(layer, "activation", None)
    # tfmot replaces `activation` by a QuantizeAwareActivation holding the original one.
    return _is_softmax(act) or _is_softmax(getattr(act, "activation", None))


def _output_layer(model):
    """The layer producing a model's (first) output: for functional models the one recorded in
    the output tensor's history (``layers[-1]`` is not always it), else the last layer."""
    outputs = getattr(model, "outputs", None)
    if outputs:
        history = getattr(outputs[0], "_keras_history", None)
        if history is not None and getattr(history, "layer", None) is not None:
            return history.layer
    layers = getattr(model, "layers", None)
    return layers[-1] if layers else None


def softmax_layer(model) -> Optional[str]:
    """Name of the layer that makes ``model`` end in a softmax, else None.

    Looks through nested models (the last layer of a Sequential inside a functional model) and the
    wrappers tfmot puts around layers (``QuantizeWrapperV2.layer``, ``QuantizeAwareActivation``).
    A ``Softmax`` layer, an ``Activation("softmax")`` or a Dense/Conv with ``activation="softmax"``
    counts (``log_softmax`` does not: its outputs are logits up to a constant).
    """
    last = _output_layer(model)
    for _ in range(8):  # unwrap wrappers / nested models
        if last is None or isinstance(last, PreActivation):  # a logits view
            return None
        if _activation_is_softmax(last):
            return last.name
        if isinstance(last, keras.Model):
            last = _output_layer(last)
        elif getattr(last, "layer", None) is not None:  # keras.layers.Wrapper / QuantizeWrapper
            if _activation_is_softmax(last.layer):
                return last.name
            last = last.layer
        else:
            return None
    return None


@keras.utils.register_keras_serializable(package="tfqkd")
class PreActivation(keras.layers.Wrapper):
    """Calls a layer whose activation is a softmax without the softmax: its logits.

    The wrapped layer (a Dense / Conv, or a tfmot ``QuantizeWrapperV2`` around one) is the SAME
    object as in the original model, so its variables are shared. In a QAT layer the softmax's
    input quantizer (tfmot's pre-activation quantizer) still applies, so the logits are exactly
    what the softmax of the original model receives; the wrapper's output quantizer (fitted to
    the probabilities) is skipped.
    """

    def call(self, inputs, training=None):
        wrapper = self.layer
        target = getattr(wrapper, "layer", None) or wrapper
        saved = target.activation
        quantize_acts = list(getattr(wrapper, "_quantize_activations", None) or ())
        saved_qa = [qa.activation for qa in quantize_acts]
        # An output quantizer of the wrapper rounds the PROBABILITIES (its range is theirs): the
        # logits skip it, and the view's training must not move that range onto logits.
        # object.__setattr__: a temporary swap, not a change Keras should track.
        saved_out = getattr(wrapper, "_output_quantizers", None)
        try:
            if saved_out:
                object.__setattr__(wrapper, "_output_quantizers", [])
            if quantize_acts:
                # tfmot re-installs its QuantizeAwareActivations on every call: make those the
                # identity (keeping their input quantizer) rather than the layer's activation.
                for qa in quantize_acts:
                    qa.activation = _named_identity(qa.activation)
            else:
                target.activation = keras.activations.linear
            if wrapper is target:
                return target.call(inputs)
            return wrapper(inputs, training=training)
        finally:
            target.activation = saved
            if saved_out:
                object.__setattr__(wrapper, "_output_quantizers", saved_out)
            for qa, act in zip(quantize_acts, saved_qa):
                qa.activation = act

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def _named_identity(activation):
    """The identity, under ``activation``'s name: tfmot decides from the NAME whether to quantize
    an activation's input (softmax: yes) or output, so the input quantizer keeps applying."""

    def identity(x, *args, **kwargs):
        del args, kwargs
        return x

    identity.__name__ = getattr(activation, "__name__", "softmax")
    return identity


def _inbound_tensor(model):
    layer, node_index, _ = model.outputs[0]._keras_history  # pylint: disable=protected-access
    node = layer._inbound_nodes[node_index]  # pylint: disable=protected-access
    inputs = node.input_tensors
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != 1:
            raise ValueError(f"the softmax layer {layer.name!r} takes {len(inputs)} inputs.")
        inputs = inputs[0]
    return layer, inputs


def logits_model(model: keras.Model) -> keras.Model:
    """A model outputting the logits of ``model``, sharing its variables; ``model`` if it already
    ends in logits.

    Handles a final ``Softmax`` / ``Activation("softmax")`` layer (the view ends at its input) and
    a final Dense / Conv with ``activation="softmax"`` (the view calls the same layer without the
    activation, :class:`PreActivation`), also inside tfmot's ``QuantizeWrapperV2`` (a QAT model).
    ``softmax(logits_model(m)(x)) == m(x)``; training the view trains ``model``.

    Raises:
        ValueError: for a softmax-ended model that is not a functional (graph) model with one
            output, or whose softmax is inside a nested model: rebuild it functionally.
    """
    name = softmax_layer(model)
    if name is None:
        return model
    outputs = getattr(model, "outputs", None)
    if not getattr(model, "_is_graph_network", False) or not outputs or len(outputs) != 1:
        raise ValueError(
            f"model {getattr(model, 'name', model)!r} ends in a softmax (layer {name!r}) but is not "
            "a functional model with one output, so its logits cannot be reached: build it with "
            "keras.Input / keras.Model, or end it in logits (activation=None).")
    layer, inputs = _inbound_tensor(model)
    if layer.name != name:
        raise ValueError(
            f"model {model.name!r} ends in a nested model whose last layer {name!r} is a softmax: "
            "tfqkd.models.logits_model reaches only a softmax of the outer model. Flatten the "
            "model (call the nested model's layers in the outer one) or end it in logits.")
    inner = getattr(layer, "layer", None) or layer
    if isinstance(inner, keras.layers.Softmax) or isinstance(inner, keras.layers.Activation):
        logits = inputs
    else:
        logits = PreActivation(layer, name=f"{layer.name}_logits")(inputs)
    return keras.Model(model.inputs, logits, name=f"{model.name}_logits")
