"""SPEQ: stochastic-precision ensemble self-distillation for quantized networks.

Boo et al., "Stochastic Precision Ensemble: Self-Knowledge Distillation for Quantized Deep Neural
Networks" (AAAI 2021). There is no separate teacher: the teacher is the quantized student itself,
sharing every parameter, run with a *randomly chosen activation precision at each layer in each
forward pass*. Because the bit assignment changes at every step the teacher behaves like an
ensemble of networks of different precisions, and its soft labels are at least as good as the
student's own. The student (at its target precision) learns from them with a cosine-similarity
loss rather than the KL divergence.

The pieces:

* :class:`StochasticPrecisionQuantizer`: a tfmot ``Quantizer`` for activations. In a *student* pass
  it quantizes deterministically at the target bit-width (the same fake-quant op the exported
  model uses). Inside :func:`stochastic_precision` each instance draws its own Bernoulli(p) on every
  forward pass and, when it comes up, uses ``high_bits`` (8 bits, or float for ``None``) instead.
  Both precisions share one pair of range variables, so the teacher adds no weights.
* :func:`speq_quantize`: builds a SPEQ-ready QAT model from a float model with
  :func:`tfqkd.quantize_model` (``activation_quantizer=``) and this quantizer.
* :class:`SPEQ`: a :class:`tfqkd.Distiller` whose teacher probabilities come from the student run
  under :func:`stochastic_precision` (no gradient, batch-norm moving statistics untouched).

Example:
    >>> import numpy as np, tfqkd
    >>> from tfqkd.speq import StochasticPrecisionQuantizer, stochastic_precision
    >>> q = StochasticPrecisionQuantizer(bits=2, high_bits=None, probability=1.0)
    >>> q.get_config()["bits"], q.get_config()["high_bits"]
    (2, None)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, Optional, Union

import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

from tfqkd._keras import keras

__all__ = [
    "StochasticPrecisionQuantizer",
    "stochastic_precision",
    "stochastic_precision_enabled",
    "stochastic_quantizers",
    "speq_quantize",
    "SPEQ",
]

_MIN_BITS, _MAX_BITS = 2, 16  # the range tf.quantization.fake_quant_* accepts

# --------------------------------------------------------------------------------------------
# Precision mode: a trace-time switch with an optional run-time (tensor) flag.
# --------------------------------------------------------------------------------------------
# Why a context and not a model variable: the student graph must stay exactly the target-bit
# fake-quant graph (no random ops, no conditionals) so that it exports to integer TFLite like any
# other tfqkd model, and the mode must not add variables to the model. SPEQ's train step traces
# the student pass outside and the teacher pass inside the context, so one `tf.function` holds
# both and nothing retraces from step to step. The stack is thread-local because
# `tf.distribute` runs each replica's step in its own thread; the context is entered inside the
# step, so every replica sees it.
_STATE = threading.local()

FlagLike = Union[bool, tf.Tensor, tf.Variable]


def _stack() -> list:
    if not hasattr(_STATE, "stack"):
        _STATE.stack = []
    return _STATE.stack


@contextlib.contextmanager
def stochastic_precision(enabled: FlagLike = True) -> Iterator[None]:
    """Runs (or traces) the :class:`StochasticPrecisionQuantizer`\\ s inside it in teacher mode.

    In teacher mode every quantizer draws its own Bernoulli(``probability``) on each forward pass
    and uses its high precision when the draw succeeds; outside, it quantizes deterministically at
    its target bit-width.

    The switch acts where the graph is *built*: a ``tf.function`` traced outside the context keeps
    student behaviour when later called inside it (e.g. a ``predict_function`` Keras cached
    earlier). For a switch that acts at run time, pass a boolean scalar tensor or a
    ``tf.Variable`` as ``enabled`` and trace inside the context: the graph then reads the flag on
    every call.

    Args:
        enabled: ``True``/``False``, or a scalar boolean tensor / variable read at run time.

    Example:
        >>> import numpy as np, tfqkd
        >>> from tfqkd.speq import StochasticPrecisionQuantizer, stochastic_precision
        >>> layer = tfqkd.keras.layers.Layer()
        >>> q = StochasticPrecisionQuantizer(bits=2, high_bits=None, probability=1.0)
        >>> w = q.build((None, 4), "act", layer)
        >>> x = tfqkd.keras.backend.constant([[0.1, 0.7, 2.9, 4.2]])
        >>> with stochastic_precision():
        ...     teacher = q(x, False, w)   # probability 1: always float
        >>> np.allclose(teacher, x), np.allclose(q(x, False, w), x)
        (True, False)
    """
    if not isinstance(enabled, (bool, tf.Tensor, tf.Variable)):
        raise TypeError(
            f"enabled must be a Python bool, a boolean scalar tensor or a tf.Variable, got "
            f"{enabled!r} of type {type(enabled).__name__}."
        )
    stack = _stack()
    stack.append(enabled)
    try:
        yield
    finally:
        stack.pop()


def stochastic_precision_enabled() -> FlagLike:
    """The innermost :func:`stochastic_precision` flag, ``False`` outside any such context."""
    stack = _stack()
    return stack[-1] if stack else False


# --------------------------------------------------------------------------------------------
# The quantizer.
# --------------------------------------------------------------------------------------------
def _check_bits(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not _MIN_BITS <= value <= _MAX_BITS:
        extra = " or None (float)" if allow_none else ""
        raise ValueError(
            f"{name} must be an integer in [{_MIN_BITS}, {_MAX_BITS}]{extra}, got {value!r}. "
            "Activations of 1 bit are not supported by the fake-quant op; use 2 or more."
        )


@keras.utils.register_keras_serializable(package="tfqkd")
class StochasticPrecisionQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
    """Activation quantizer whose precision is switched per layer and per forward pass.

    Outside :func:`stochastic_precision` (the student pass, inference, export) it is an
    asymmetric uniform ``bits``-bit fake quantizer whose range ``[min, max]`` is an exponential
    moving average of the batch range during training (tfmot's ``MovingAverageQuantizer``
    arithmetic, so TFLite reads the range from the graph). Inside the context (the teacher
    pass) it draws ``u ~ U(0, 1)`` on every call and uses ``high_bits`` (same range) or no
    quantization at all (``high_bits=None``) when ``u < probability``. The draw is a graph op, so
    a traced step draws afresh on every execution without retracing; each quantizer instance
    (one per layer) draws independently.

    Args:
        bits: Target activation bit-width of the student, 2..16.
        high_bits: The teacher's alternative precision: an integer > ``bits`` or ``None`` for
            float (unquantized) activations.
        probability: Chance, per layer and per teacher forward pass, of the high precision;
            0 makes the teacher identical to the student.
        ema_decay: Decay of the moving average of the activation range (tfmot uses 0.999, which
            is very slow for short fine-tuning runs).
        narrow_range: Passed to the fake-quant op (``[1, 2^b − 1]`` instead of ``[0, 2^b − 1]``).

    Example:
        >>> from tfqkd.speq import StochasticPrecisionQuantizer
        >>> q = StochasticPrecisionQuantizer(bits=4, high_bits=8, probability=0.5)
        >>> StochasticPrecisionQuantizer.from_config(q.get_config()) == q
        True
    """

    def __init__(
        self,
        bits: int = 2,
        high_bits: Optional[int] = 8,
        probability: float = 0.5,
        ema_decay: float = 0.99,
        narrow_range: bool = False,
    ):
        _check_bits("bits", bits)
        _check_bits("high_bits", high_bits, allow_none=True)
        if high_bits is not None and high_bits < bits:
            raise ValueError(
                f"high_bits ({high_bits}) must be >= bits ({bits}): the teacher's alternative "
                "precision is the higher one. Use high_bits=None for float activations."
            )
        if isinstance(probability, bool) or not 0.0 <= float(probability) <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability!r}.")
        if not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}.")
        self.bits = int(bits)
        self.high_bits = None if high_bits is None else int(high_bits)
        self.probability = float(probability)
        self.ema_decay = float(ema_decay)
        self.narrow_range = bool(narrow_range)

    @property
    def is_stochastic(self) -> bool:
        """Whether a teacher pass can differ from the student pass at all."""
        return self.probability > 0.0 and self.high_bits != self.bits

    def build(self, tensor_shape, name: str, layer) -> Dict[str, tf.Variable]:
        # One range shared by both precisions: the teacher adds no variables.
        min_var = layer.add_weight(
            name + "_min", shape=None, initializer=keras.initializers.Constant(-6.0),
            trainable=False,
        )
        max_var = layer.add_weight(
            name + "_max", shape=None, initializer=keras.initializers.Constant(6.0),
            trainable=False,
        )
        return {"min_var": min_var, "max_var": max_var}

    def __call__(self, inputs, training, weights, **kwargs):
        inputs = tf.convert_to_tensor(inputs)
        low = quant_ops.MovingAvgQuantize(
            inputs, weights["min_var"], weights["max_var"], ema_decay=self.ema_decay,
            is_training=training, num_bits=self.bits, narrow_range=self.narrow_range,
        )
        flag = stochastic_precision_enabled()
        if flag is False or not self.is_stochastic:
            return low  # student pass: exactly the graph that is exported
        if self.high_bits is None:
            high = inputs
        else:
            high = tf.quantization.fake_quant_with_min_max_vars(
                inputs, tf.identity(weights["min_var"]), tf.identity(weights["max_var"]),
                num_bits=self.high_bits, narrow_range=self.narrow_range,
            )
        use_high = tf.random.uniform([], dtype=tf.float32) < self.probability
        if flag is not True:
            use_high = tf.logical_and(tf.cast(flag, tf.bool), use_high)
        return tf.where(use_high, high, low)

    def get_config(self) -> Dict[str, Any]:
        return {
            "bits": self.bits,
            "high_bits": self.high_bits,
            "probability": self.probability,
            "ema_decay": self.ema_decay,
            "narrow_range": self.narrow_range,
        }

    def __eq__(self, other) -> bool:
        return isinstance(other, StochasticPrecisionQuantizer) and (
            self.get_config() == other.get_config()
        )

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __repr__(self) -> str:
        return (
            f"StochasticPrecisionQuantizer(bits={self.bits}, high_bits={self.high_bits}, "
            f"probability={self.probability})"
        )
