"""Pieces every tfqkd quantizer shares (private): the straight-through estimator, NaN handling,
the decorator of every quantizer's ``__call__``, and equality / repr from ``get_config``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict

from tfqkd._keras import tf

_TINY = 1e-12  # floor on Δ: keeps all-zero tensors (and channels) finite

# The quantizers are plain TensorFlow ops with only Python-static control flow (loops over a
# fixed number of rounds, branches on the bit-width). Letting AutoGraph convert them, which
# Keras does for every layer call, costs ~0.7 s per call and gains nothing.
_no_autograph = tf.autograph.experimental.do_not_convert


def _infers_output_signature() -> bool:
    """Whether the current graph is one in which Keras runs a layer only for the shape and dtype
    of its outputs (``Layer._infer_output_signature`` and ``compute_output_shape`` call the layer
    in a throw-away ``FuncGraph`` named ``<layer>_scratch_graph``)."""
    graph = tf.compat.v1.get_default_graph()
    return isinstance(graph, tf.__internal__.FuncGraph) and graph.name.endswith("_scratch_graph")


def _quantizer_call(call: Callable) -> Callable:
    """Decorates a quantizer's ``__call__(inputs, training, weights, **kwargs)``: no AutoGraph
    (above), and in a graph where Keras only infers output signatures, ``inputs`` itself.

    Every quantizer returns a tensor of its input's shape and dtype, which is all such a graph
    is run for. Building the quantizer's ops there (the L2 step search of each kernel) is what
    made a model's functional construction slow: each clone in ``quantize_model`` and each
    ``load_model`` calls every layer once that way (DenseNet121's ``quantize_model`` 30 s ->
    20-24 s here, 2026-12-07). A graph that computes values (eager calls, ``tf.function``
    traces such as ``fit``'s) is never named so.
    """
    # Only the wrapper is marked: AutoGraph never converts what an unconverted function calls.
    @functools.wraps(call)
    def wrapper(self, inputs, training, weights, **kwargs):
        if _infers_output_signature():
            return tf.identity(inputs)
        return call(self, inputs, training, weights, **kwargs)

    return _no_autograph(wrapper)


def _keep_nan(source: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
    """``value`` with NaN wherever ``source`` is NaN: comparisons are False for NaN, so a
    ``tf.where`` on them would otherwise turn a NaN into a level."""
    return tf.where(tf.math.is_nan(source), source, value)


def _straight_through(value: tf.Tensor, grad_source: tf.Tensor) -> tf.Tensor:
    """``value`` in the forward pass, the gradient of ``grad_source`` in the backward pass.

    Mathematically ``grad_source + stop_gradient(value − grad_source)``, but written as
    ``value + (grad_source − stop_gradient(grad_source))``: ``x − x`` is exactly 0 in floating
    point, so the forward value is bit-exactly ``value`` — a ternary kernel has exactly three
    distinct values, not three clusters of values one rounding error apart.
    """
    return tf.stop_gradient(value) + (grad_source - tf.stop_gradient(grad_source))


class ConfigEquality:
    """Equality and ``repr`` of a serialisable object, both from its ``get_config()``.

    Two quantizers are equal when they are of the same class with the same configuration (what
    tfmot compares when it checks a wrapper's config); ``repr`` lists the configuration.
    """

    def get_config(self) -> Dict[str, Any]:  # pragma: no cover - every user defines it
        raise NotImplementedError

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        config = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({config})"
