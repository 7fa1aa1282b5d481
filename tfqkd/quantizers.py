"""Symmetric uniform weight quantization (Eq. 1/2), step-size estimators and tfmot quantizers.

The weight quantizer of the paper is symmetric and uniform with step size ``Δ``::

    b = 1:  Q(w) = Δ · sign(w)                                        (Eq. 1, sign(0) := +1)
    b > 1:  Q(w) = sign(w) · Δ · min(floor(|w| / Δ + 0.5), (M − 1) / 2),  M = 2^b − 1   (Eq. 2)

so a ``b``-bit weight takes one of ``M = 2^b − 1`` levels ``{−K, …, 0, …, K} · Δ`` with
``K = 2^(b−1) − 1`` (2 bits is ternary ``{−Δ, 0, Δ}``; 8 bits is TFLite's narrow-range int8),
and a 1-bit weight one of ``{−Δ, +Δ}``.

``Δ`` comes from one of three rules:

* ``"l2"`` (:func:`l2_optimal_step`): minimises ``‖w − Q(w)‖²`` by a batched candidate search
  followed by Lloyd-style alternation (see the function for the algorithm);
* ``"std"`` (:func:`std_step`): a fixed multiple of the weights' RMS, the multiple that is
  L2-optimal for Gaussian weights at that bit-width (:data:`GAUSSIAN_STEP_RATIO`);
* ``"learned"``: an LSQ-style trainable ``Δ`` (Esser et al. 2020), initialised with the L2 step.

:class:`SymmetricQuantizer` applies Q to a layer's kernel during quantization-aware training
with a straight-through gradient to the float "shadow" weights; :class:`ActivationQuantizer`
quantizes non-negative (post-ReLU) activations to an unsigned b-bit grid on ``[0, clip]``.

Example:
    >>> import numpy as np
    >>> from tfqkd.quantizers import symmetric_quantize, l2_optimal_step
    >>> w = np.array([-0.9, -0.6, 0.05, 0.4, 1.1], np.float32)
    >>> symmetric_quantize(w, bits=2, step=0.5).numpy().tolist()
    [-0.5, -0.5, 0.0, 0.5, 0.5]
    >>> step = l2_optimal_step(w, bits=2)
    >>> sorted(set(np.round(symmetric_quantize(w, 2, step).numpy() / step.numpy(), 6).tolist()))
    [-1.0, 0.0, 1.0]
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow_model_optimization as tfmot

from tfqkd._keras import keras, tf

__all__ = [
    "symmetric_quantize",
    "l2_optimal_step",
    "std_step",
    "num_levels",
    "max_level",
    "check_bits",
    "SymmetricQuantizer",
    "ActivationQuantizer",
    "RangeQuantizer",
    "FixedRangeQuantizer",
    "GAUSSIAN_STEP_RATIO",
    "STEP_KINDS",
    "CLIP_KINDS",
]

#: Accepted step-size rules of :class:`SymmetricQuantizer`.
STEP_KINDS: Tuple[str, ...] = ("l2", "std", "learned")
#: Accepted clipping rules of :class:`ActivationQuantizer`.
CLIP_KINDS: Tuple[str, ...] = ("ema", "fixed", "pact")

#: ``Δ / σ`` that minimises the expected squared error of Eq. (1)/(2) for ``w ~ N(0, σ²)``,
#: per bit-width. Computed by numerical integration of ``E[(w − Q(w))²]`` on a fine grid and a
#: bounded scalar minimisation (1 bit: ``sqrt(2/π)`` exactly, the mean of ``|w|``). For a
#: Laplacian the optimum is 0.707, 1.414, 0.822, 0.487, … — larger, because of the heavier
#: tails — which is one reason why the ``"l2"`` rule, that fits the actual weights, is the
#: default.
GAUSSIAN_STEP_RATIO: Dict[int, float] = {
    1: 0.797885, 2: 1.224008, 3: 0.650770, 4: 0.353410,
    5: 0.193250, 6: 0.105488, 7: 0.057261, 8: 0.030870,
}

#: Default number of Lloyd assignment/refit rounds of :func:`l2_optimal_step` after the
#: candidate search. Each round is a few element-wise ops and two reductions.
L2_ITERATIONS = 4
#: Default number of candidate steps scored by :func:`l2_optimal_step` before refining.
L2_CANDIDATES = 8

_TINY = 1e-12  # floor on Δ: keeps all-zero tensors (and channels) finite

# The quantizers are plain TensorFlow ops with only Python-static control flow (loops over a
# fixed number of rounds, branches on the bit-width). Letting AutoGraph convert them, which
# Keras does for every layer call, costs ~0.7 s per call and gains nothing.
_no_autograph = tf.autograph.experimental.do_not_convert


def check_bits(bits: Any, name: str = "bits") -> int:
    """Returns ``bits`` as an ``int`` after checking that it is an integer in 1..8.

    Example:
        >>> check_bits(4)
        4
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= int(bits) <= 8:
        raise ValueError(
            f"{name} must be an integer bit-width in 1..8, got {bits!r}; pass e.g. {name}=2 "
            "(ternary) or 8."
        )
    return int(bits)


def num_levels(bits: int) -> int:
    """Number of distinct values Q can produce: 2 for 1 bit, ``2^b − 1`` otherwise.

    Example:
        >>> [num_levels(b) for b in (1, 2, 3, 8)]
        [2, 3, 7, 255]
    """
    bits = check_bits(bits)
    return 2 if bits == 1 else 2 ** bits - 1


def max_level(bits: int) -> int:
    """Largest integer level ``K = (M − 1) / 2 = 2^(b−1) − 1`` (1 for 1 bit: ``±Δ``).

    Example:
        >>> [max_level(b) for b in (1, 2, 3, 8)]
        [1, 1, 3, 127]
    """
    bits = check_bits(bits)
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


@_no_autograph
def symmetric_quantize(w, bits: int, step) -> tf.Tensor:
    """Eq. (1)/(2): the symmetric uniform ``bits``-bit quantization of ``w`` with step ``step``.

    Args:
        w: Tensor (or array) to quantize.
        bits: Bit-width, an integer in 1..8.
        step: ``Δ > 0``: a scalar, or a tensor broadcastable against ``w`` (a per-channel vector
            for the last axis, as returned by :func:`l2_optimal_step` with ``axis=-1``).

    Returns:
        A float32 tensor shaped like ``w`` whose values are integer multiples of ``Δ`` in
        ``[−KΔ, KΔ]``; for ``bits=1`` exactly ``±Δ`` (zero maps to ``+Δ``). No gradient trick
        is applied here (see :class:`SymmetricQuantizer`).

    Example:
        >>> symmetric_quantize([0.0, -0.3, 0.3], bits=1, step=0.25).numpy().tolist()
        [0.25, -0.25, 0.25]
    """
    bits = check_bits(bits)
    w = tf.convert_to_tensor(w, tf.float32)
    step = tf.convert_to_tensor(step, tf.float32)
    if bits == 1:
        # sign(0) would give a third level 0; Eq. (1) has two levels, so 0 goes to +Δ. A NaN
        # stays NaN (w >= 0 is False for NaN, which would silently make it −Δ).
        return _keep_nan(w, tf.where(w >= 0.0, step, -step) * tf.ones_like(w))
    k = float(max_level(bits))
    n = tf.minimum(tf.floor(tf.abs(w) / step + 0.5), k)
    return tf.sign(w) * step * n


def _keep_nan(source: tf.Tensor, value: tf.Tensor) -> tf.Tensor:
    """``value`` with NaN wherever ``source`` is NaN: comparisons are False for NaN, so a
    ``tf.where`` on them would otherwise turn a NaN into a level."""
    return tf.where(tf.math.is_nan(source), source, value)


def _reduction_axes(rank: int, axis) -> Tuple[Optional[list], Optional[Tuple[int, ...]]]:
    """(axes to reduce over, kept axes) for ``axis`` (None, an int or a tuple of ints)."""
    if axis is None:
        return list(range(rank)), None
    kept = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    if rank < 2 or not kept:
        raise ValueError(
            f"per-channel steps need a tensor with an output-channel axis (rank >= 2), got a "
            f"rank-{rank} tensor with axis={axis!r}; use axis=None (per-tensor) instead."
        )
    norm = []
    for a in kept:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral) or not -rank <= a < rank:
            raise ValueError(
                f"axis={axis!r} is out of range for a rank-{rank} tensor; pass the output-channel "
                f"axis in [-{rank}, {rank - 1}] (-1 for Conv2D/Dense, (2, 3) for DepthwiseConv2D)."
            )
        norm.append(int(a) % rank)
    if len(set(norm)) == rank:
        raise ValueError(f"axis={axis!r} keeps every axis of a rank-{rank} tensor: nothing to reduce.")
    reduce = [i for i in range(rank) if i not in norm]
    return reduce, tuple(sorted(norm))


def _squeeze_leading(step: tf.Tensor, kept: Optional[Tuple[int, ...]]) -> tf.Tensor:
    """Drops the size-1 axes before the first kept axis, so a last-axis step is a vector."""
    if kept is None:
        return tf.reshape(step, [])
    return tf.reshape(step, tf.shape(step)[kept[0]:])


def _rms(absw: tf.Tensor, reduce) -> tf.Tensor:
    return tf.sqrt(tf.reduce_mean(tf.square(absw), axis=reduce, keepdims=True))


def _std_step_keepdims(absw: tf.Tensor, bits: int, reduce) -> tf.Tensor:
    return tf.maximum(GAUSSIAN_STEP_RATIO[bits] * _rms(absw, reduce), _TINY)


def _sum(x, reduce):
    return tf.reduce_sum(x, axis=reduce, keepdims=True)


def _l2_step_keepdims(absw: tf.Tensor, bits: int, reduce, iterations: int, candidates: int) -> tf.Tensor:
    # Every statistic keeps the reduced axes (size 1) so that it broadcasts against |w|.
    if bits == 1:
        # Closed form: for Q = Δ·sign(w) the error Σ(|w| − Δ)² is minimal at Δ = mean|w|.
        return tf.maximum(tf.reduce_mean(absw, axis=reduce, keepdims=True), _TINY)
    k = float(max_level(bits))
    std = _std_step_keepdims(absw, bits, reduce)
    # 1. Candidate search: the std step plus a geometric grid between 0.7·min and max of the
    #    std step and the no-clipping step max|w|/K, all scored in one batched op.
    no_clip = tf.maximum(tf.reduce_max(absw, axis=reduce, keepdims=True) / k, _TINY)
    lo, hi = 0.7 * tf.minimum(std, no_clip), tf.maximum(std, no_clip)
    rank = absw.shape.rank
    grid = tf.reshape(tf.linspace(0.0, 1.0, max(1, candidates - 1)), [-1] + [1] * rank)
    cands = tf.concat([std[None], lo[None] * tf.pow(hi / lo, grid)], axis=0)  # (C, *keepdims)
    c_reduce = [a + 1 for a in reduce]
    n = tf.minimum(tf.floor(absw[None] / cands + 0.5), k)
    errs = tf.reduce_sum(tf.square(absw[None] - cands * n), axis=c_reduce, keepdims=True)
    pick = tf.one_hot(tf.argmin(errs, axis=0), tf.shape(cands)[0], axis=0, dtype=absw.dtype)
    best = tf.reduce_sum(cands * pick, axis=0)
    best_err = tf.reduce_min(errs, axis=0)

    # 2. Lloyd refinement from the best candidate.
    step = best
    for _ in range(iterations):
        n = tf.minimum(tf.floor(absw / step + 0.5), k)  # assignment: nearest level for this Δ
        num, den = _sum(absw * n, reduce), _sum(n * n, reduce)
        # refit: the least-squares Δ for these levels (keep Δ where every weight rounds to 0)
        step = tf.maximum(tf.where(den > 0.0, tf.math.divide_no_nan(num, den), step), _TINY)
    if iterations == 0:
        return best
    # Each round cannot increase the error in exact arithmetic; in float32 keep the better of
    # the two, so "l2 error <= std error" holds to the last bit (std is a candidate).
    final_err = _sum(tf.square(absw - step * tf.minimum(tf.floor(absw / step + 0.5), k)), reduce)
    return tf.where(final_err <= best_err, step, best)


@_no_autograph
def l2_optimal_step(
    w, bits: int, axis=None, iterations: int = L2_ITERATIONS, candidates: int = L2_CANDIDATES,
) -> tf.Tensor:
    """The step ``Δ`` minimising ``‖w − Q(w)‖²`` (per tensor, or per output channel).

    Algorithm (a fixed amount of vectorised work, so it is one static graph and fast):

    1. *candidate search*: score ``candidates`` steps at once — the Gaussian-optimal
       :func:`std_step` and a geometric grid from ``0.7·min(std, max|w|/K)`` to
       ``max(std, max|w|/K)`` (``max|w|/K`` is the step that clips nothing) — and take the one
       with the least error. This finds the right basin even for heavy-tailed weights at high
       bit-widths, where clipping dominates the error and Lloyd alone converges very slowly;
    2. *Lloyd refinement*, ``iterations`` rounds of: assign ``n_i = min(floor(|w_i|/Δ + 0.5), K)``
       (the nearest level for this ``Δ``), then refit ``Δ = Σ|w_i|·n_i / Σ n_i²`` (the
       least-squares ``Δ`` for these levels). Neither half-step can raise the error;
    3. return the better of the refined and the best candidate step.

    The std step is a candidate, so the result is never worse than :func:`std_step`. For 1 bit
    the optimum is closed-form, ``Δ = mean|w|``. On Gaussian, Laplacian and Student-t(3)
    samples the error is within 0.2 % of a brute-force search at 2–3 bits and within ~10 % at
    6–8 bits (where the error is tiny and bumpy in ``Δ``).

    Args:
        w: The weights.
        bits: Bit-width in 1..8.
        axis: ``None`` for one step per tensor; else the output-channel axis (or axes) whose
            every index gets its own step: ``-1`` for Conv2D ``(h, w, in, out)`` and Dense
            ``(in, out)`` kernels, ``(2, 3)`` for a DepthwiseConv2D ``(h, w, in, mult)`` kernel
            (its output channels are the ``in × mult`` pairs).
        iterations: Lloyd rounds after the candidate search.
        candidates: Number of candidate steps (>= 1; 1 scores the std step only).

    Returns:
        A scalar, or the per-channel steps shaped to broadcast against ``w`` (the axes before
        the first kept axis dropped: shape ``(out,)`` for ``axis=-1``).

    Example:
        >>> import numpy as np
        >>> w = np.random.default_rng(0).normal(size=(3, 3, 8, 4)).astype("float32")
        >>> l2_optimal_step(w, 2, axis=-1).shape
        TensorShape([4])
    """
    bits = check_bits(bits)
    for name, value, low in (("iterations", iterations, 0), ("candidates", candidates, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    w = tf.convert_to_tensor(w, tf.float32)
    reduce, kept = _reduction_axes(w.shape.rank, axis)
    step = _l2_step_keepdims(tf.abs(w), bits, reduce, int(iterations), int(candidates))
    return _squeeze_leading(step, kept)


@_no_autograph
def std_step(w, bits: int, axis=None) -> tf.Tensor:
    """``Δ = c_b · σ``: the step that is L2-optimal if the weights were Gaussian.

    ``σ`` is the root-mean-square of the weights (their standard deviation about zero: the
    quantizer is symmetric about zero, and trained kernels are near zero-mean) and ``c_b`` is
    :data:`GAUSSIAN_STEP_RATIO` (0.798 for 1 bit, 1.224 for 2 bits, 0.354 for 4, 0.031 for 8).

    Args:
        w: The weights.
        bits: Bit-width in 1..8.
        axis: As in :func:`l2_optimal_step`.

    Example:
        >>> round(float(std_step([1.0, -1.0], bits=2)), 4)
        1.224
    """
    bits = check_bits(bits)
    w = tf.convert_to_tensor(w, tf.float32)
    reduce, kept = _reduction_axes(w.shape.rank, axis)
    return _squeeze_leading(_std_step_keepdims(tf.abs(w), bits, reduce), kept)


def _data_step_impl(w: tf.Tensor, bits: int, kind: str, axis, iterations: int) -> tf.Tensor:
    """Δ from the data (``kind`` "std" or "l2"), shaped to broadcast against ``w``."""
    if kind == "std":
        return std_step(w, bits, axis=axis)
    return l2_optimal_step(w, bits, axis=axis, iterations=iterations)


def _quantize_impl(w: tf.Tensor, bits: int, kind: str, axis, iterations: int) -> tf.Tensor:
    return symmetric_quantize(w, bits, _data_step_impl(w, bits, kind, axis, iterations))


# The step search is ~100 small ops per kernel. As graph functions (one trace per bit-width,
# rule, axis and kernel rank, shared by all layers) each wrapper adds a single call op to the
# model graph instead: quantize_model and the first `fit` trace many times faster, and the
# runtime graph is the same after TensorFlow inlines the call.
_GRAPH_FUNCTIONS: Dict[tuple, Any] = {}


def _graph_function(impl, w: tf.Tensor, bits: int, kind: str, axis, iterations: int):
    key = (impl.__name__, bits, kind, axis, iterations, w.shape.rank)
    fn = _GRAPH_FUNCTIONS.get(key)
    if fn is None:
        spec = tf.TensorSpec([None] * w.shape.rank, tf.float32)
        fn = tf.function(lambda t: impl(t, bits, kind, axis, iterations), input_signature=[spec],
                         autograph=False)
        _GRAPH_FUNCTIONS[key] = fn
    return fn(w)


def _data_step_fn(w, bits, kind, axis, iterations):
    return _graph_function(_data_step_impl, w, bits, kind, axis, iterations)


def _quantize_fn(w, bits, kind, axis, iterations):
    return _graph_function(_quantize_impl, w, bits, kind, axis, iterations)


def _straight_through(value: tf.Tensor, grad_source: tf.Tensor) -> tf.Tensor:
    """``value`` in the forward pass, the gradient of ``grad_source`` in the backward pass.

    Mathematically ``grad_source + stop_gradient(value − grad_source)``, but written as
    ``value + (grad_source − stop_gradient(grad_source))``: ``x − x`` is exactly 0 in floating
    point, so the forward value is bit-exactly ``value`` — a ternary kernel has exactly three
    distinct values, not three clusters of values one rounding error apart.
    """
    return tf.stop_gradient(value) + (grad_source - tf.stop_gradient(grad_source))


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
class SymmetricQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
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
        step = _data_step_fn(w, *self._static_args())
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

    @_no_autograph
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

    def __eq__(self, other):
        return isinstance(other, SymmetricQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return f"SymmetricQuantizer({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"


def _check_clip_kind(clip: Any) -> str:
    if clip not in CLIP_KINDS:
        raise ValueError(f"clip must be one of {CLIP_KINDS}, got {clip!r}.")
    return clip


@keras.utils.register_keras_serializable(package="tfqkd")
class ActivationQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
    """tfmot ``Quantizer`` for non-negative activations: unsigned uniform ``bits``-bit on [0, c].

    ``Q(x) = s · round(clip(x, 0, c) / s)`` with ``s = c / (2^b − 1)``: the ``2^b`` levels
    ``0, s, …, c``. The gradient is straight-through inside ``[0, c]`` and zero outside.
    The clip ``c``:

    * ``"ema"``: exponential moving average (``ema_decay``) of the per-batch maximum, updated
      in training (the first batch sets it); before any training step ``clip_value`` is used;
    * ``"fixed"``: ``clip_value``;
    * ``"pact"``: a trainable ``α`` started at ``clip_value`` with the PACT gradient
      (Choi et al. 2018): ``∂Q/∂α = 1`` where ``x ≥ α``, 0 elsewhere.

    Example:
        >>> q = ActivationQuantizer(2, clip="fixed", clip_value=3.0)
        >>> q(tf.constant([-1.0, 0.4, 1.6, 2.9, 7.0]), False, {}).numpy().tolist()
        [0.0, 0.0, 2.0, 3.0, 3.0]
    """

    def __init__(self, bits: int = 8, clip: str = "ema", clip_value: float = 6.0, ema_decay: float = 0.99):
        self.bits = check_bits(bits)
        self.clip = _check_clip_kind(clip)
        if not isinstance(clip_value, numbers.Real) or isinstance(clip_value, bool) or not clip_value > 0:
            raise ValueError(f"clip_value must be a number > 0, got {clip_value!r}.")
        if not isinstance(ema_decay, numbers.Real) or isinstance(ema_decay, bool) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
        self.clip_value = float(clip_value)
        self.ema_decay = float(ema_decay)

    def build(self, tensor_shape, name: str, layer) -> Dict[str, tf.Variable]:
        """Creates the clip variable (non-trainable for ``"ema"``, trainable for ``"pact"``)."""
        if self.clip == "fixed":
            return {}
        if self.clip == "ema":
            # MEAN: under a distribution strategy every replica assigns its own EMA update.
            var = layer.add_weight(
                f"{name}_clip", shape=(), initializer=keras.initializers.Zeros(), trainable=False,
                aggregation=tf.VariableAggregation.MEAN)
        else:
            var = layer.add_weight(
                f"{name}_alpha", shape=(), trainable=True,
                initializer=keras.initializers.Constant(self.clip_value))
        return {"clip": var}

    def clip_of(self, weights: Optional[Dict[str, tf.Variable]]) -> tf.Tensor:
        """The clip ``c`` used at inference."""
        if self.clip == "fixed" or not weights or "clip" not in weights:
            return tf.constant(self.clip_value, tf.float32)
        value = tf.convert_to_tensor(weights["clip"])
        if self.clip == "ema":
            # 0 = not yet trained; a NaN clip (diverged training) stays NaN, never a level.
            return tf.where((value > 0.0) | tf.math.is_nan(value), value, self.clip_value)
        return value

    @_no_autograph
    def __call__(self, inputs, training, weights, **kwargs) -> tf.Tensor:
        x = tf.convert_to_tensor(inputs)
        if self.clip == "ema" and weights and "clip" in weights:
            var = weights["clip"]
            if training:
                batch_max = tf.stop_gradient(tf.reduce_max(x))
                old = tf.convert_to_tensor(var)
                started = (old > 0.0) | tf.math.is_nan(old)  # a NaN clip is never restarted
                new = tf.where(started, self.ema_decay * old + (1.0 - self.ema_decay) * batch_max, batch_max)
                with tf.control_dependencies([var.assign(new)]):
                    clip = tf.identity(new)
            else:
                clip = self.clip_of(weights)
            clip = tf.stop_gradient(clip)
        elif self.clip == "pact" and weights and "clip" in weights:
            clip = tf.convert_to_tensor(weights["clip"])
        else:
            clip = tf.constant(self.clip_value, tf.float32)
        clip = tf.maximum(clip, _TINY) if self.clip != "pact" else clip
        # min(relu(x), α): the PACT gradient (1 where x >= α) reaches α through tf.minimum.
        y = tf.minimum(tf.nn.relu(x), clip)
        scale = tf.stop_gradient(tf.maximum(clip, _TINY)) / float(2 ** self.bits - 1)
        q = tf.floor(y / scale + 0.5) * scale
        return _straight_through(q, y)

    def get_config(self) -> Dict[str, Any]:
        return {"bits": self.bits, "clip": self.clip, "clip_value": self.clip_value,
                "ema_decay": self.ema_decay}

    def __eq__(self, other):
        return isinstance(other, ActivationQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return f"ActivationQuantizer({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"


@keras.utils.register_keras_serializable(package="tfqkd")
class RangeQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
    """Asymmetric ``bits``-bit quantizer of a signed tensor with an EMA-tracked ``[min, max]`` range.

    ``Q(x) = FakeQuantWithMinMaxVars(x, min, max, bits)``: the rounding a full-integer TFLite
    tensor with that range applies (TFLite nudges the range so that 0 is exact; so does the
    op). ``min``/``max`` (variables ``min_var``/``max_var``, always ``min <= 0 <= max``) follow
    an exponential moving average of the per-batch minimum/maximum during training, started
    from the first batch (tfmot's ``MovingAverageQuantizer`` starts from ±6 with decay 0.999,
    which a short fine-tune never leaves). Before any training step the range is empty and the
    quantizer passes its input through. tfqkd puts it (with ``activation_bits``) on the tensors
    of a residual network that the integer file quantizes besides ReLU outputs (pre-add conv+BN
    outputs, pooled features, logits); the exporter writes ``[min, max]`` into the file.

    Example:
        >>> import numpy as np
        >>> from tfqkd._keras import keras
        >>> layer = keras.layers.Layer()
        >>> q = RangeQuantizer(8)
        >>> v = q.build((4,), "out", layer)
        >>> x = tf.constant([-1.0, -0.1, 0.3, 2.0])
        >>> y = q(x, True, v)
        >>> float(v["min_var"].numpy()), float(v["max_var"].numpy())
        (-1.0, 2.0)
        >>> bool(np.allclose(q(x, False, v).numpy(), x.numpy(), atol=3.0 / 255 / 2 + 1e-6))
        True
    """

    def __init__(self, bits: int = 8, ema_decay: float = 0.99, widen: float = 0.0):
        self.bits = check_bits(bits, "bits")
        if not 0.0 <= float(widen) < 0.5:
            raise ValueError(f"widen must be in [0, 0.5), got {widen!r}.")
        # Rounds on [min, max] * (1 + widen). The model input gets widen = 1/1024: inputs on a
        # regular pixel grid (x / 127.5 - 1, MobileNet's preprocessing) would otherwise sit
        # exactly halfway between two int8 levels of the [-1, 1] range, where TensorFlow's
        # FakeQuant rounds up and TFLite's QUANTIZE rounds to even (XNNPACK) or away from zero
        # (reference kernels): the student and its file would disagree on every other pixel.
        self.widen = float(widen)
        if self.bits < 2:
            raise ValueError(f"RangeQuantizer needs bits >= 2 (got {bits!r}): an asymmetric "
                             "range with an exact zero needs at least 2 levels per side.")
        if not isinstance(ema_decay, numbers.Real) or isinstance(ema_decay, bool) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
        self.ema_decay = float(ema_decay)

    def build(self, tensor_shape, name: str, layer) -> Dict[str, tf.Variable]:
        """Creates ``min_var`` / ``max_var`` (non-trainable, 0 = not yet seen data)."""
        make = lambda suffix: layer.add_weight(  # noqa: E731
            f"{name}_{suffix}", shape=(), initializer=keras.initializers.Zeros(), trainable=False,
            aggregation=tf.VariableAggregation.MEAN)
        return {"min_var": make("min"), "max_var": make("max")}

    @_no_autograph
    def __call__(self, inputs, training, weights, **kwargs) -> tf.Tensor:
        x = tf.convert_to_tensor(inputs)
        lo_var, hi_var = weights["min_var"], weights["max_var"]
        lo, hi = tf.convert_to_tensor(lo_var), tf.convert_to_tensor(hi_var)
        if training:
            batch_lo = tf.stop_gradient(tf.minimum(tf.reduce_min(x), 0.0))
            batch_hi = tf.stop_gradient(tf.maximum(tf.reduce_max(x), 0.0))
            # A NaN range (diverged training) is kept NaN rather than restarted from this batch.
            seen = (hi > lo) | tf.math.is_nan(hi) | tf.math.is_nan(lo)
            d = self.ema_decay
            lo = tf.where(seen, d * lo + (1.0 - d) * batch_lo, batch_lo)
            hi = tf.where(seen, d * hi + (1.0 - d) * batch_hi, batch_hi)
            with tf.control_dependencies([lo_var.assign(lo), hi_var.assign(hi)]):
                lo, hi = tf.identity(lo), tf.identity(hi)
        lo, hi = tf.stop_gradient(lo), tf.stop_gradient(hi)
        empty = hi <= lo
        if self.widen:
            lo, hi = lo * (1.0 + self.widen), hi * (1.0 + self.widen)
        q = tf.quantization.fake_quant_with_min_max_vars(
            x, tf.where(empty, -1.0, lo), tf.where(empty, 1.0, hi), num_bits=self.bits,
            narrow_range=False)
        return tf.where(empty, x, q)

    def range_of(self, weights) -> Tuple[float, float]:
        """The ``(min, max)`` this quantizer rounds on at inference (what the file must use)."""
        scale = 1.0 + self.widen
        return (float(np.asarray(weights["min_var"])) * scale,
                float(np.asarray(weights["max_var"])) * scale)

    def get_config(self) -> Dict[str, Any]:
        config = {"bits": self.bits, "ema_decay": self.ema_decay}
        if self.widen:
            config["widen"] = self.widen
        return config

    def __eq__(self, other):
        return isinstance(other, RangeQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        widen = f", widen={self.widen}" if self.widen else ""
        return f"RangeQuantizer(bits={self.bits}, ema_decay={self.ema_decay}{widen})"


@keras.utils.register_keras_serializable(package="tfqkd")
class FixedRangeQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
    """``bits``-bit rounding on a fixed ``[min, max]``: the grids TFLite's integer kernels demand.

    TFLite's int8 ``SOFTMAX`` and ``LOGISTIC`` (sigmoid) outputs have scale 1/256 and zero point
    -128, i.e. the range ``[0, 255/256]``; ``TANH`` has ``[-1, 127/128]``. tfqkd rounds those
    outputs on the same grid in the student (:func:`tfqkd.quantize.quantize_model` with
    ``activation_bits``), so the file and the student agree on them, ties included.

    Example:
        >>> q = FixedRangeQuantizer(8, 0.0, 255.0 / 256.0)
        >>> float(q(tf.constant(0.3), False, {}).numpy()) * 256
        77.0
    """

    def __init__(self, bits: int = 8, min: float = 0.0, max: float = 255.0 / 256.0):  # noqa: A002
        self.bits = check_bits(bits, "bits")
        if not float(min) <= 0.0 <= float(max) or float(max) <= float(min):
            raise ValueError(f"need min <= 0 <= max and min < max, got [{min!r}, {max!r}].")
        self.min, self.max = float(min), float(max)

    def build(self, tensor_shape, name: str, layer) -> Dict[str, tf.Variable]:
        return {}

    @_no_autograph
    def __call__(self, inputs, training, weights, **kwargs) -> tf.Tensor:
        return tf.quantization.fake_quant_with_min_max_args(
            tf.convert_to_tensor(inputs), min=self.min, max=self.max, num_bits=self.bits)

    def range_of(self, weights) -> Tuple[float, float]:
        """The fixed ``(min, max)``."""
        return self.min, self.max

    def get_config(self) -> Dict[str, Any]:
        return {"bits": self.bits, "min": self.min, "max": self.max}

    def __eq__(self, other):
        return isinstance(other, FixedRangeQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return f"FixedRangeQuantizer(bits={self.bits}, min={self.min}, max={self.max})"
