"""Activation quantizers: unsigned ReLU outputs, EMA-tracked signed ranges, TFLite's fixed grids.

* :class:`ActivationQuantizer`: post-ReLU activations on ``[0, clip]`` (EMA, fixed or PACT clip);
* :class:`RangeQuantizer`: a signed tensor on an EMA ``[min, max]`` (what a full-integer file
  rounds besides ReLU outputs);
* :class:`FixedRangeQuantizer`: a fixed ``[min, max]`` (softmax / sigmoid / tanh outputs).

Example:
    >>> q = ActivationQuantizer(2, clip="fixed", clip_value=3.0)
    >>> q(tf.constant([0.4, 1.6, 7.0]), False, {}).numpy().tolist()
    [0.0, 2.0, 3.0]
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Tuple

import numpy as np
import tensorflow_model_optimization as tfmot

from tfqkd._keras import keras, tf
from tfqkd.quantizers._base import (
    _TINY, ConfigEquality, _quantizer_call, _straight_through)
from tfqkd.quantizers.symmetric import check_bits

__all__ = ["ActivationQuantizer", "RangeQuantizer", "FixedRangeQuantizer", "CLIP_KINDS",
           "requantized_levels"]

#: Accepted clipping rules of :class:`ActivationQuantizer`.
CLIP_KINDS: Tuple[str, ...] = ("ema", "fixed", "pact")


def _check_signed_range(signed_range: Any, name: str = "signed_range"
                        ) -> Optional[Tuple[float, float]]:
    if signed_range is None:
        return None
    try:
        lo, hi = (float(v) for v in signed_range)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not lo < 0.0 < hi or not np.isfinite([lo, hi]).all():
        raise ValueError(f"{name} must be None or (lo, hi) with lo < 0 < hi, got "
                         f"{signed_range!r}.")
    return lo, hi


def _check_clip_kind(clip: Any) -> str:
    if clip not in CLIP_KINDS:
        raise ValueError(f"clip must be one of {CLIP_KINDS}, got {clip!r}.")
    return clip


def _check_requant_shifts(shifts: Any) -> Optional[Tuple[int, ...]]:
    if shifts is None:
        return None
    try:
        values = tuple(int(v) for v in shifts)
        ok = len(values) > 0 and all(v == s and 0 <= v <= 31 for v, s in zip(values, shifts))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"requant_shifts must be None or a non-empty sequence of integers in "
                         f"0..31 (one per channel, or one for all), got {shifts!r}.")
    return values


def requantized_levels(units: tf.Tensor, shifts: Tuple[int, ...],
                       half_away: bool = False) -> tf.Tensor:
    """The integer levels LiteRT's built-in integer kernels give ``units`` when they requantize.

    Those kernels apply the multiplier ``s_in * s_w / s_out = M * 2^-shift / 2^31`` (an int32
    ``M``) to the int32 accumulator in two roundings: to an integer number of ``2^-shift``
    steps, then to a step, both half up (measured on LiteRT 2.3's x86 kernels, convolutions and
    depthwise convolutions, every output equal; :mod:`tfqkd.export.requant`). Together that is
    ``floor(units + 1/2 + 2^-(shift + 1))`` for ``shift >= 1``: values within ``2^-(shift+1)``
    below a half round up, 3 % of them at ``shift = 4`` (a 4-bit kernel into a 4-bit
    activation), 25 % at ``shift = 1``. With ``shift = 0`` (a left shift) it rounds once, half
    up. XNNPACK rounds once, in float; a file whose kernels run on the built-in ones (its INT4
    convolutions, which XNNPACK does not take) needs this rounding in the student.

    ``half_away``: both roundings half away from zero, as TFLite's
    ``MultiplyByQuantizedMultiplier`` does them (the built-in ``MEAN``): negative values mirror
    the positive ones, ``-floor(|units| + 1/2 + 2^-(shift + 1))``. The convolutions round half
    up for either sign.

    Args:
        units: The exact output in steps, zero point excluded (``x / scale``).
        shifts: The right shift per channel (last axis), or one for all.
        half_away: Round negative values as the mirror image of positive ones.

    Example:
        >>> requantized_levels(tf.constant([2.47, 2.44, -2.53, 2.5]), (4,)).numpy().tolist()
        [3.0, 2.0, -2.0, 3.0]
        >>> requantized_levels(tf.constant([-2.47, -2.53]), (4,), half_away=True).numpy().tolist()
        [-3.0, -3.0]
    """
    shift = np.asarray(shifts, np.float64)
    nudge = tf.constant(np.where(shift > 0, np.exp2(-shift - 1.0), 0.0), tf.float64)
    # float64: a nudge of 2^-(shift + 1) must survive next to units of up to 2^8.
    t = tf.cast(units, tf.float64)
    if half_away:
        return tf.cast(tf.sign(t) * tf.floor(tf.abs(t) + (0.5 + nudge)), units.dtype)
    return tf.cast(tf.floor(t + (0.5 + nudge)), units.dtype)


@keras.utils.register_keras_serializable(package="tfqkd")
class ActivationQuantizer(ConfigEquality, tfmot.quantization.keras.quantizers.Quantizer):
    """tfmot ``Quantizer`` for non-negative activations: unsigned uniform ``bits``-bit on [0, c].

    ``Q(x) = s · round(clip(x, 0, c) / s)`` with ``s = c / (2^b − 1)``: the ``2^b`` levels
    ``0, s, …, c``. The gradient is straight-through inside ``[0, c]`` and zero outside.
    The clip ``c``:

    * ``"ema"``: exponential moving average (``ema_decay``) of the per-batch maximum, updated
      in training (the first batch sets it); before any training step ``clip_value`` is used;
    * ``"fixed"``: ``clip_value``;
    * ``"pact"``: a trainable ``α`` started at ``clip_value`` with the PACT gradient
      (Choi et al. 2018): ``∂Q/∂α = 1`` where ``x ≥ α``, 0 elsewhere.

    ``signed_range`` is set by the exporter's ``align_student`` (never needed by hand): when a
    ReLU output shares one scale with signed tensors in the integer file (a concatenation
    group), its clip is set to the span ``hi − lo`` of the file's range ``[lo, hi]`` so that it
    rounds on the file's grid, and the range is kept here, in the config, so that exporting
    the saved and reloaded model again gives the group the same range. It is read only while
    the clip still equals that span (it no longer does once the EMA moves).

    ``requant_shifts`` is also set by ``align_student`` (for an ``int4`` file): the output is
    then rounded as LiteRT's built-in kernels requantize it (:func:`requantized_levels`).

    Example:
        >>> q = ActivationQuantizer(2, clip="fixed", clip_value=3.0)
        >>> q(tf.constant([-1.0, 0.4, 1.6, 2.9, 7.0]), False, {}).numpy().tolist()
        [0.0, 0.0, 2.0, 3.0, 3.0]
    """

    def __init__(self, bits: int = 8, clip: str = "ema", clip_value: float = 6.0, ema_decay: float = 0.99,
                 signed_range: Optional[Tuple[float, float]] = None,
                 requant_shifts: Optional[Tuple[int, ...]] = None):
        self.bits = check_bits(bits)
        self.clip = _check_clip_kind(clip)
        if not isinstance(clip_value, numbers.Real) or isinstance(clip_value, bool) or not clip_value > 0:
            raise ValueError(f"clip_value must be a number > 0, got {clip_value!r}.")
        if not isinstance(ema_decay, numbers.Real) or isinstance(ema_decay, bool) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
        self.clip_value = float(clip_value)
        self.ema_decay = float(ema_decay)
        self.signed_range = _check_signed_range(signed_range)
        self.requant_shifts = _check_requant_shifts(requant_shifts)

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

    @_quantizer_call
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
        if self.requant_shifts is None:
            q = tf.floor(y / scale + 0.5) * scale
        else:
            q = requantized_levels(y / scale, self.requant_shifts) * scale
        return _straight_through(q, y)

    def get_config(self) -> Dict[str, Any]:
        config = {"bits": self.bits, "clip": self.clip, "clip_value": self.clip_value,
                  "ema_decay": self.ema_decay}
        if self.signed_range is not None:  # absent key: configs saved before it existed load
            config["signed_range"] = list(self.signed_range)
        if self.requant_shifts is not None:  # likewise
            config["requant_shifts"] = list(self.requant_shifts)
        return config


@keras.utils.register_keras_serializable(package="tfqkd")
class RangeQuantizer(ConfigEquality, tfmot.quantization.keras.quantizers.Quantizer):
    """Asymmetric ``bits``-bit quantizer of a signed tensor with an EMA-tracked ``[min, max]`` range.

    ``Q(x) = FakeQuantWithMinMaxVars(x, min, max, bits)``: the rounding a full-integer TFLite
    tensor with that range applies (TFLite nudges the range so that 0 is exact; so does the
    op). ``min``/``max`` (variables ``min_var``/``max_var``, always ``min <= 0 <= max``) follow
    an exponential moving average of the per-batch minimum/maximum during training, started
    from the first batch (tfmot's ``MovingAverageQuantizer`` starts from ±6 with decay 0.999,
    which a short fine-tune never leaves). Before any training step the range is empty and the
    quantizer passes its input through. tfqkd puts it (with ``activation_bits``) on the tensors
    of a residual network that the integer file quantizes besides ReLU outputs (pre-add conv+BN
    outputs, pooled features, logits); the exporter writes ``[min, max]`` into the file. With
    ``limits=(lo, hi)`` the range used is ``[max(min, lo), min(max, hi)]`` (the variables keep
    tracking the data): the input of a sigmoid or tanh, whose output stops changing beyond them.
    ``bits=16`` rounds on the symmetric int16 grid of TFLite's 16x8 kernels instead: steps of
    ``max(|min|, |max|) / 32767``, zero point 0 (the logits of a 16-bit softmax head).
    ``requant_shifts`` (8 bits; set by ``align_student`` for an ``int4`` file, or for a file run
    on the built-in kernels) rounds as LiteRT's built-in kernels requantize
    (:func:`requantized_levels`), on the same nudged grid; with ``requant_half_away`` (a global
    pooling's MEAN there) negative values round as the mirror of positive ones.

    Example:
        >>> import numpy as np
        >>> from tfqkd._keras import keras
        >>> layer = keras.layers.Layer()
        >>> logits = RangeQuantizer(16)
        >>> v = logits.build((), "logits", layer)
        >>> _ = logits(tf.constant([-3.0, 7.0]), True, v)
        >>> [round(x * 32767 / 7.0) for x in logits.range_of(v)]
        [-32768, 32767]
        >>> gate_input = RangeQuantizer(8, limits=(-8.0, 8.0))
        >>> v = gate_input.build((), "gate", layer)
        >>> _ = gate_input(tf.constant([-78.0, 51.0]), True, v)
        >>> gate_input.range_of(v)
        (-8.0, 8.0)
        >>> q = RangeQuantizer(8)
        >>> v = q.build((4,), "out", layer)
        >>> x = tf.constant([-1.0, -0.1, 0.3, 2.0])
        >>> y = q(x, True, v)
        >>> float(v["min_var"].numpy()), float(v["max_var"].numpy())
        (-1.0, 2.0)
        >>> bool(np.allclose(q(x, False, v).numpy(), x.numpy(), atol=3.0 / 255 / 2 + 1e-6))
        True
    """

    def __init__(self, bits: int = 8, ema_decay: float = 0.99, widen: float = 0.0,
                 mean_window: Optional[int] = None,
                 limits: Optional[Tuple[float, float]] = None,
                 requant_shifts: Optional[Tuple[int, ...]] = None,
                 requant_half_away: bool = False):
        # 16: the int16 grid of TFLite's 16x8 kernels, symmetric (zero point 0): steps of
        # max(|min|, |max|) / 32767, levels -32768..32767. The logits of a softmax head.
        self.bits = 16 if _is_sixteen(bits) else check_bits(bits, "bits")
        # The range is never wider than ``limits`` (lo < 0 < hi): the input of a sigmoid or tanh
        # whose output is rounded on TFLite's fixed grid, beyond which every input gives the same
        # output level (the registry's PRE_ACTIVATION_LIMITS). A squeeze-excite gate's EMA range
        # reached [-78, 51] in an EfficientNetB0 student: a 0.5 step on the sigmoid's input, so a
        # one-step flip between the student and its file moved the gate by 32 output steps.
        self.limits = _check_signed_range(limits, "limits")
        # Set by the exporter's align_student on an average pooling's output quantizer (never
        # needed by hand; kept in the config so a saved, reloaded student rounds the same): the
        # values one pooling window holds. The file runs the pooling with its input's scale and
        # rounds the mean of the window's int8 values half away from zero (LiteRT's
        # AVERAGE_POOL_2D, XNNPACK and reference kernels alike); FakeQuant rounds the float
        # mean half up, with float noise deciding the exact halves, which a 3x3 "same" pooling
        # at small maps gives on ~15 % of its values (means of 4 or 6 values at the edges).
        if mean_window is not None and (isinstance(mean_window, bool) or
                                        not isinstance(mean_window, numbers.Integral) or
                                        mean_window < 1):
            raise ValueError(f"mean_window must be None or an integer >= 1, got {mean_window!r}.")
        self.mean_window = None if mean_window is None else int(mean_window)
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
        self.requant_shifts = _check_requant_shifts(requant_shifts)
        if self.requant_shifts is not None and (self.bits != 8 or self.mean_window is not None):
            raise ValueError("requant_shifts applies to an 8-bit RangeQuantizer without "
                             f"mean_window (a kernel's output), got bits={self.bits}, "
                             f"mean_window={self.mean_window}.")
        if not isinstance(requant_half_away, (bool, np.bool_)):
            raise ValueError(f"requant_half_away must be True or False, got "
                             f"{requant_half_away!r}.")
        # Set with requant_shifts by align_student on a global pooling's quantizer for the
        # built-in kernels, whose MEAN rounds negative sums as the mirror of positive ones.
        self.requant_half_away = bool(requant_half_away)

    def build(self, tensor_shape, name: str, layer) -> Dict[str, tf.Variable]:
        """Creates ``min_var`` / ``max_var`` (non-trainable, 0 = not yet seen data)."""
        make = lambda suffix: layer.add_weight(  # noqa: E731
            f"{name}_{suffix}", shape=(), initializer=keras.initializers.Zeros(), trainable=False,
            aggregation=tf.VariableAggregation.MEAN)
        return {"min_var": make("min"), "max_var": make("max")}

    @_quantizer_call
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
        if self.limits is not None:
            lo, hi = tf.maximum(lo, self.limits[0]), tf.minimum(hi, self.limits[1])
        lo, hi = tf.where(empty, -1.0, lo), tf.where(empty, 1.0, hi)
        if self.bits == 16:
            lo, hi = _int16_range(lo, hi)
        if self.mean_window is not None and self.bits == 8:
            q = _integer_mean_rounding(x, lo, hi, self.mean_window)
        elif self.requant_shifts is not None:
            q = _requantized_rounding(x, lo, hi, self.requant_shifts, self.requant_half_away)
        else:
            q = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=self.bits,
                                                             narrow_range=False)
        return tf.where(empty, x, q)

    def range_of(self, weights) -> Tuple[float, float]:
        """The ``(min, max)`` this quantizer rounds on at inference (what the file must use)."""
        scale = 1.0 + self.widen
        lo = float(np.asarray(weights["min_var"])) * scale
        hi = float(np.asarray(weights["max_var"])) * scale
        if self.limits is not None and hi > lo:
            lo, hi = max(lo, self.limits[0]), min(hi, self.limits[1])
        if self.bits == 16 and hi > lo:
            lo, hi = (float(v) for v in _int16_range(np.float32(lo), np.float32(hi)))
        return lo, hi

    def get_config(self) -> Dict[str, Any]:
        config = {"bits": self.bits, "ema_decay": self.ema_decay}
        if self.widen:
            config["widen"] = self.widen
        if self.mean_window is not None:  # absent key: configs saved before it existed load
            config["mean_window"] = self.mean_window
        if self.limits is not None:  # likewise
            config["limits"] = list(self.limits)
        if self.requant_shifts is not None:  # likewise
            config["requant_shifts"] = list(self.requant_shifts)
        if self.requant_half_away:  # likewise
            config["requant_half_away"] = True
        return config


def _is_sixteen(bits) -> bool:
    return isinstance(bits, numbers.Integral) and not isinstance(bits, bool) and int(bits) == 16


def _int16_range(lo, hi):
    """``[-32768 s, 32767 s]`` with ``s = max(|lo|, |hi|) / 32767``: FakeQuant at 16 bits on it
    rounds on multiples of ``s`` with zero at level 32768, the int16 zero point 0."""
    step = np.maximum(np.abs(lo), np.abs(hi)) / np.float32(32767.0) if isinstance(lo, np.floating) \
        else tf.maximum(tf.abs(lo), tf.abs(hi)) / 32767.0
    return -32768.0 * step, 32767.0 * step


#: Largest pooling window whose means are snapped to their exact grid: the means of up to
#: ``n`` int8 values are multiples of ``1/lcm(1..n)``, exact in float32 up to n = 12.
_MAX_SNAPPED_WINDOW = 12


def _nudged_grid(lo: tf.Tensor, hi: tf.Tensor):
    """``(scale, zero_point, low, high)`` of the 8-bit grid FakeQuant rounds ``[lo, hi]`` on: the
    range nudged so that 0 is a level (``zero_point`` in 0..255, ``[low, high]`` its span)."""
    scale = (hi - lo) / 255.0
    zero_point = tf.clip_by_value(tf.floor(-lo / scale + 0.5), 0.0, 255.0)  # as FakeQuant's nudge
    return scale, zero_point, -zero_point * scale, (255.0 - zero_point) * scale


def _integer_mean_rounding(x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor, window: int) -> tf.Tensor:
    """8-bit rounding of ``x`` on ``[lo, hi]`` (nudged as FakeQuant nudges it), exact halves of
    int8 units away from zero: the int8 output of an integer average pooling whose input has
    the same grid. The gradient is straight-through inside the range, as FakeQuant's.
    """
    scale, zero_point, low, high = _nudged_grid(lo, hi)
    units = x / scale + (zero_point - 128.0)  # int8 units: a mean of integers
    if window <= _MAX_SNAPPED_WINDOW:
        # The mean of k <= window integers is a multiple of 1/k, hence of 1/lcm(1..window):
        # snapping to that grid removes the float noise that would decide the exact halves.
        grid = float(np.lcm.reduce(np.arange(1, window + 1)))
        units = tf.round(units * grid) / grid
    levels = tf.clip_by_value(tf.sign(units) * tf.floor(tf.abs(units) + 0.5), -128.0, 127.0)
    q = (levels + 128.0 - zero_point) * scale
    return _straight_through(q, tf.clip_by_value(x, low, high))


def _requantized_rounding(x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor,
                          shifts: Tuple[int, ...], half_away: bool = False) -> tf.Tensor:
    """8-bit rounding of ``x`` on ``[lo, hi]`` (nudged as FakeQuant nudges it) as a built-in
    integer kernel requantizes: :func:`requantized_levels` of ``x / scale`` (the zero point is
    added after the rounding), clamped to the int8 range. Straight-through gradient inside the
    range, as FakeQuant's."""
    scale, zero_point, low, high = _nudged_grid(lo, hi)
    levels = tf.clip_by_value(requantized_levels(x / scale, shifts, half_away), -zero_point,
                              255.0 - zero_point)
    return _straight_through(levels * scale, tf.clip_by_value(x, low, high))


@keras.utils.register_keras_serializable(package="tfqkd")
class FixedRangeQuantizer(ConfigEquality, tfmot.quantization.keras.quantizers.Quantizer):
    """``bits``-bit rounding on a fixed ``[min, max]``: the grids TFLite's integer kernels demand.

    TFLite's int8 ``SOFTMAX`` and ``LOGISTIC`` (sigmoid) outputs have scale 1/256 and zero point
    -128, i.e. the range ``[0, 255/256]``; ``TANH`` has ``[-1, 127/128]``. tfqkd rounds those
    outputs on the same grid in the student (:func:`tfqkd.quantize.quantize_model` with
    ``activation_bits``), so the file and the student agree on them, ties included. A softmax
    head (the model's output) can be int16 in the file: 16 bits on ``[-1, 32767/32768]``
    (scale 1/32768, zero point 0).

    Args:
        bits: 2..8, or 16 (an int16 tensor).
        min, max: The range; ``min <= 0 <= max``.

    Example:
        >>> q = FixedRangeQuantizer(8, 0.0, 255.0 / 256.0)
        >>> float(q(tf.constant(0.3), False, {}).numpy()) * 256
        77.0
        >>> float(FixedRangeQuantizer(16, -1.0, 32767 / 32768)(tf.constant(0.3), False, {})) * 32768
        9830.0
    """

    def __init__(self, bits: int = 8, min: float = 0.0, max: float = 255.0 / 256.0):  # noqa: A002
        # fake_quant rounds at 2..16 bits; TFLite stores 2..8 as int8 and 16 as int16.
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or \
                int(bits) not in (2, 3, 4, 5, 6, 7, 8, 16):
            raise ValueError(f"bits must be an integer in 2..8 (an int8 tensor) or 16 (int16), "
                             f"got {bits!r}.")
        self.bits = int(bits)
        if not float(min) <= 0.0 <= float(max) or float(max) <= float(min):
            raise ValueError(f"need min <= 0 <= max and min < max, got [{min!r}, {max!r}].")
        self.min, self.max = float(min), float(max)

    def build(self, tensor_shape, name: str, layer) -> Dict[str, tf.Variable]:
        return {}

    @_quantizer_call
    def __call__(self, inputs, training, weights, **kwargs) -> tf.Tensor:
        return tf.quantization.fake_quant_with_min_max_args(
            tf.convert_to_tensor(inputs), min=self.min, max=self.max, num_bits=self.bits)

    def range_of(self, weights) -> Tuple[float, float]:
        """The fixed ``(min, max)``."""
        return self.min, self.max

    def get_config(self) -> Dict[str, Any]:
        return {"bits": self.bits, "min": self.min, "max": self.max}
