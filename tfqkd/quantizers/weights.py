"""The weight quantizer: Eq. (1)/(2) forward, straight-through backward, as a tfmot ``Quantizer``.

Example:
    >>> q = SymmetricQuantizer(bits=2, step="std")
    >>> [round(v, 4) for v in q(tf.constant([-1.0, 0.5, 2.0]), training=False, weights={}).numpy().tolist()]
    [-1.6192, 0.0, 1.6192]
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow_model_optimization as tfmot

from tfqkd._keras import keras, tf
from tfqkd.quantizers._base import (
    _TINY, ConfigEquality, _keep_nan, _quantizer_call, _straight_through)
from tfqkd.quantizers.symmetric import (
    L2_ITERATIONS,
    STEP_KINDS,
    _reduction_axes,
    check_bits,
    l2_optimal_step,
    max_level,
    std_step,
    symmetric_quantize,
)

__all__ = ["SymmetricQuantizer"]


def _data_step_impl(w: tf.Tensor, bits: int, kind: str, axis, iterations: int) -> tf.Tensor:
    """Δ from the data (``kind`` "std" or "l2"), shaped to broadcast against ``w``."""
    if kind == "std":
        return std_step(w, bits, axis=axis)
    return l2_optimal_step(w, bits, axis=axis, iterations=iterations)


def _quantize_impl(w: tf.Tensor, bits: int, kind: str, axis, iterations: int
                   ) -> Tuple[tf.Tensor, tf.Tensor]:
    """(Q(w), Δ): the step comes along for readers of levels (`quantize_with_step`). Q(w) needs
    it anyway, so a training graph, which uses Q(w) only, computes nothing more."""
    step = _data_step_impl(w, bits, kind, axis, iterations)
    return symmetric_quantize(w, bits, step), step


# The step search is ~100 small ops per kernel. As graph functions (one trace per bit-width,
# rule, axis and kernel rank, shared by all layers) each wrapper adds a single call op to the
# model graph instead: quantize_model and the first `fit` trace many times faster, and the
# runtime graph is the same after TensorFlow inlines the call.
_GRAPH_FUNCTIONS: Dict[tuple, Any] = {}

#: Kernels of at least this many weights get a graph function of their own static shape. With
#: unknown sizes the search scores all its candidates in one batched op; at a known large size it
#: scores them a few at a time (`symmetric._chunk_size`), which stays in cache. Measured per call
#: (`python tools/benchmark_l2_step.py --parts=layer`, 2 cores, two runs, 2026-12-07), own shape
#: against shared: ResNet50's 3x3x512x512 75-125 ms against 263-322 ms, its 1x1x1024x2048 65-98
#: against 243-270, a 1x1x256x1024 per channel 12 against 15-22; the same values to the bit
#: there (chunks can move a step by summation order: docs/quantization.md).
#: Below this size the shared function stays: a trace per shape would add graphs for little gain.
#: (Large kernels in shared functions whose search scores one candidate per op chain were as fast
#: per call, but ResNet50's first graph-mode KD `fit` took 37-41 s against 25-29 s.)
STATIC_SHAPE_MIN_WEIGHTS = 100_000


def _graph_function(impl, w: tf.Tensor, bits: int, kind: str, axis, iterations: int):
    size = w.shape.num_elements()
    shape = tuple(w.shape.as_list()) if size is not None and size >= STATIC_SHAPE_MIN_WEIGHTS \
        else None
    key = (impl.__name__, bits, kind, axis, iterations, w.shape.rank, shape)
    fn = _GRAPH_FUNCTIONS.get(key)
    if fn is None:
        spec = tf.TensorSpec(shape or [None] * w.shape.rank, tf.float32)
        fn = tf.function(lambda t: impl(t, bits, kind, axis, iterations), input_signature=[spec],
                         autograph=False)
        _GRAPH_FUNCTIONS[key] = fn
    return fn(w)


def _data_step_fn(w, bits, kind, axis, iterations):
    return _graph_function(_data_step_impl, w, bits, kind, axis, iterations)


def _quantize_fn(w, bits, kind, axis, iterations):
    return _graph_function(_quantize_impl, w, bits, kind, axis, iterations)[0]


def _quantize_with_step_fn(w, bits, kind, axis, iterations):
    return _graph_function(_quantize_impl, w, bits, kind, axis, iterations)


def _check_step_kind(step: Any) -> str:
    if step not in STEP_KINDS:
        raise ValueError(f"step must be one of {STEP_KINDS}, got {step!r}.")
    return step


def _normalise_axis(axis):
    if axis is None:
        return None
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
        return int(axis)
    return tuple(int(a) for a in axis)


@keras.utils.register_keras_serializable(package="tfqkd")
class SymmetricQuantizer(ConfigEquality, tfmot.quantization.keras.quantizers.Quantizer):
    """tfmot ``Quantizer`` for weights: Eq. (1)/(2) forward, straight-through backward.

    The forward pass uses ``Q(w)``; the gradient reaches the float shadow weights unchanged
    (``w + stop_gradient(Q(w) − w)``, evaluated so that the forward value is exactly Q(w)). With ``step="l2"`` or ``"std"`` the step is recomputed
    from the current weights at every call and treated as a constant (no gradient); with
    ``step="learned"`` it is a trainable variable (one per output channel if ``per_channel``)
    trained with LSQ's gradient (Esser et al. 2020): ``∂Q/∂Δ = round(w/Δ) − w/Δ`` inside the
    range, ``±K`` outside, scaled by ``1/sqrt(N·K)``; the weights then get the LSQ gradient too,
    straight-through inside ``[−KΔ, KΔ]`` and zero outside. A learned step starts at 0 meaning
    "not initialised", and is replaced by the L2 step until it is set
    (:func:`tfqkd.quantize.quantize_model` sets it from the weights).

    Args:
        bits: Bit-width in 1..8.
        step: ``"l2"``, ``"std"`` or ``"learned"``.
        per_channel: One step per output channel instead of one per tensor.
        axis: The output-channel axis (or axes) used when ``per_channel``: ``-1`` (Conv2D,
            Dense), ``(2, 3)`` for a DepthwiseConv2D kernel.
        l2_iterations: Rounds of :func:`l2_optimal_step`.

    Example:
        >>> q = SymmetricQuantizer(bits=2)
        >>> w = tf.constant([[-1.0, 0.1], [0.6, 2.0]])
        >>> len(set(q(w, training=True, weights={}).numpy().ravel().tolist())) <= 3
        True
    """

    def __init__(
        self,
        bits: int = 2,
        step: str = "l2",
        per_channel: bool = False,
        axis: Union[int, Sequence[int]] = -1,
        l2_iterations: int = L2_ITERATIONS,
    ):
        self.bits = check_bits(bits)
        self.step = _check_step_kind(step)
        if not isinstance(per_channel, (bool, np.bool_)):
            raise ValueError(f"per_channel must be True or False, got {per_channel!r}.")
        self.per_channel = bool(per_channel)
        self.axis = _normalise_axis(axis)
        if isinstance(l2_iterations, bool) or not isinstance(l2_iterations, numbers.Integral) or l2_iterations < 0:
            raise ValueError(f"l2_iterations must be an integer >= 0, got {l2_iterations!r}.")
        self.l2_iterations = int(l2_iterations)

    # -- step size -------------------------------------------------------------------------
    @property
    def _step_axis(self):
        return self.axis if self.per_channel else None

    def _step_shape(self, tensor_shape) -> Tuple[int, ...]:
        shape = tf.TensorShape(tensor_shape)
        if not self.per_channel:
            return ()
        reduce, kept = _reduction_axes(shape.rank, self.axis)
        return tuple(int(d) for d in shape.as_list()[kept[0]:]) if kept else ()

    def _static_args(self):
        kind = "std" if self.step == "std" else "l2"
        return self.bits, kind, self._step_axis, self.l2_iterations

    def _data_step(self, w: tf.Tensor) -> tf.Tensor:
        w = tf.stop_gradient(tf.cast(w, tf.float32))
        return self._shaped_step(_data_step_fn(w, *self._static_args()), w)

    def _shaped_step(self, step: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
        """``step`` with its static shape: a scalar, or the kept axes of ``w`` per channel."""
        if self._step_axis is None:
            return tf.ensure_shape(step, [])
        _, kept = _reduction_axes(w.shape.rank, self._step_axis)
        return tf.ensure_shape(step, w.shape[kept[0]:])

    def compute_step(self, w, weights: Optional[Dict[str, tf.Variable]] = None) -> tf.Tensor:
        """The step ``Δ`` this quantizer uses for ``w`` (the learned one if initialised).

        Example:
            >>> round(float(SymmetricQuantizer(2, "std").compute_step(tf.constant([1.0, -1.0]))), 4)
            1.224
        """
        w = tf.convert_to_tensor(w, tf.float32)
        if self.step == "learned" and weights and "step" in weights:
            var = tf.convert_to_tensor(weights["step"])
            return tf.where(var != 0.0, tf.abs(var), self._data_step(w))
        return self._data_step(w)

    # -- tfmot Quantizer interface ---------------------------------------------------------
    def build(self, tensor_shape, name: str, layer) -> Dict[str, tf.Variable]:
        """Creates the learned step variable (``step="learned"``); nothing otherwise."""
        shape = tf.TensorShape(tensor_shape)
        if self.per_channel:
            self._step_shape(shape)  # validates that an output-channel axis exists
        if self.step != "learned":
            return {}
        var = layer.add_weight(
            f"{name}_step", shape=self._step_shape(shape),
            initializer=keras.initializers.Zeros(), trainable=True,
        )
        return {"step": var}

    def quantize_with_step(self, w, weights: Optional[Dict[str, tf.Variable]] = None
                           ) -> Tuple[tf.Tensor, tf.Tensor]:
        """``(Q(w), Δ)`` in inference mode: the forward value, as the quantizer computes it in a
        layer, and its step (:meth:`compute_step`), from one search instead of two.

        Example:
            >>> q, step = SymmetricQuantizer(2, "std").quantize_with_step(tf.constant([1.0, -0.1]))
            >>> [round(v / float(step)) for v in q.numpy().tolist()]
            [1, 0]
        """
        w = tf.convert_to_tensor(w, tf.float32)
        if self.step == "learned" and weights and "step" in weights:
            return self._lsq(w, weights["step"]), self.compute_step(w, weights)
        q, step = _quantize_with_step_fn(tf.stop_gradient(w), *self._static_args())
        # As __call__ returns it, to the bit (its straight-through sum turns -0.0 into 0.0).
        return _straight_through(tf.ensure_shape(q, w.shape), w), self._shaped_step(step, w)

    @_quantizer_call
    def __call__(self, inputs, training, weights, **kwargs) -> tf.Tensor:
        w = tf.convert_to_tensor(inputs)
        if self.step == "learned" and weights and "step" in weights:
            return self._lsq(w, weights["step"])
        q = tf.ensure_shape(_quantize_fn(tf.stop_gradient(w), *self._static_args()), w.shape)
        return _straight_through(q, w)

    def _lsq(self, w: tf.Tensor, var: tf.Variable) -> tf.Tensor:
        k = float(max_level(self.bits))
        per_step = int(np.prod(w.shape.as_list())) // max(1, int(np.prod(var.shape.as_list() or [1])))
        grad_scale = 1.0 / float(np.sqrt(max(1, per_step) * k))
        value = tf.convert_to_tensor(var)
        # Uninitialised (0) entries fall back to the data step, without gradient.
        s = tf.where(value != 0.0, tf.abs(value), tf.stop_gradient(self._data_step(w)))
        s = tf.maximum(s, _TINY)
        s = _straight_through(s, s * grad_scale)  # value s, gradient scaled by g (LSQ)
        x = tf.clip_by_value(w / s, -k, k)
        if self.bits == 1:
            r = _keep_nan(x, tf.where(x >= 0.0, 1.0, -1.0))
        else:
            r = tf.sign(x) * tf.floor(tf.abs(x) + 0.5)
        return _straight_through(r, x) * s

    def get_config(self) -> Dict[str, Any]:
        return {
            "bits": self.bits, "step": self.step, "per_channel": self.per_channel,
            "axis": list(self.axis) if isinstance(self.axis, tuple) else self.axis,
            "l2_iterations": self.l2_iterations,
        }
