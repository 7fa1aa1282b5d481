"""Functional-graph helpers shared by quantization and export (private).

:func:`rebuild` re-runs a functional Keras model layer by layer with a function of your choice
(the exporter's float rebuild and fake-quant graph, the quantizer's split of fused swish);
:func:`finalize_layer_states` refreshes what layers derive from their weights after those weights
were assigned. Both layers of tfqkd need them, so they live below both.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from tfqkd._keras import keras, tf

__all__ = ["rebuild", "finalize_layer_states", "GraphError"]


class GraphError(RuntimeError):
    """The model is not a functional graph that can be re-run layer by layer."""


def rebuild(model: keras.Model, layer_fn: Callable, input_fn: Optional[Callable] = None,
            error: type = GraphError) -> keras.Model:
    """Re-runs the functional graph of ``model`` with ``layer_fn(layer, args, kwargs) -> outputs``.

    ``input_fn(new_input)``, when given, maps each new model input before its consumers see it.
    ``error`` is the exception class raised for a subclassed model (the exporter passes its
    ``ExportError``).

    Example:
        >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="d")])
        >>> rebuild(m, lambda layer, args, kwargs: layer(*args, **kwargs)).output_shape
        (None, 3)
    """
    if not getattr(model, "_is_graph_network", False):
        raise error(
            f"model {model.name!r} is a subclassed model ({type(model).__name__}); export needs a "
            "functional or Sequential Keras model (its graph is rebuilt layer by layer). For a "
            "Distiller pass distiller.student.")
    new_inputs = [keras.Input(shape=t.shape[1:], batch_size=None, dtype=t.dtype,
                              name=t.name.split(":")[0]) for t in model.inputs]
    tensors: Dict[int, Any] = {}
    for old, new in zip(model.inputs, new_inputs):
        tensors[id(old)] = input_fn(new) if input_fn else new

    def lookup(x):
        # Call arguments may hold Python constants (MobileNetV3's hard-swish: ``x + 3.0``,
        # ``x * (1 / 6)``), which is_keras_tensor rejects: pass them through as they are.
        if tf.is_tensor(x) and keras.backend.is_keras_tensor(x):
            return tensors[id(x)]
        return x

    for depth in sorted(model._nodes_by_depth, reverse=True):  # noqa: SLF001 (as Functional does)
        for node in model._nodes_by_depth[depth]:  # noqa: SLF001
            if node.is_input:
                continue
            args = tf.nest.map_structure(lookup, node.call_args)
            kwargs = {k: tf.nest.map_structure(lookup, v) for k, v in node.call_kwargs.items()
                      if k not in ("training", "mask")}
            outputs = layer_fn(node.layer, args, kwargs)
            for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
                tensors[id(old)] = new
    outputs = [tensors[id(t)] for t in model.outputs]
    return keras.Model(new_inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)


def finalize_layer_states(model: keras.Model) -> None:
    """Recomputes the state layers derive from their weights after ``set_weights`` / ``assign``.

    A ``Normalization`` layer computes its mean and variance tensors from its ``adapt_mean`` /
    ``adapt_variance`` weights once (``finalize_state``); assigning new weights afterwards leaves
    the old tensors in use (e.g. EfficientNet's ImageNet statistics would be lost on a copy).

    Example:
        >>> import numpy as np
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
