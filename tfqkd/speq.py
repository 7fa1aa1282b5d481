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
  it quantizes deterministically at the target bit-width: it then is exactly
  :class:`tfqkd.quantizers.ActivationQuantizer` (same graph, same variables, same export).
  Inside :func:`stochastic_precision` each instance draws its own Bernoulli(p) on every forward
  pass and, when it comes up, uses ``high_bits`` (8 bits, or float for ``None``) instead. Both
  precisions share the clip variable, so the teacher adds no weights.
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
import numbers
import threading
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from tfqkd._keras import keras, tf
from tfqkd.distiller import Distiller
from tfqkd.quantizers import ActivationQuantizer, check_bits
from tfqkd.quantizers._base import _quantizer_call

__all__ = [
    "StochasticPrecisionQuantizer",
    "stochastic_precision",
    "stochastic_precision_enabled",
    "stochastic_quantizers",
    "speq_quantize",
    "SPEQ",
    "stochastic_teacher_accuracy",
]

# --------------------------------------------------------------------------------------------
# Precision mode: a trace-time switch with an optional run-time (tensor) flag.
# --------------------------------------------------------------------------------------------
# Why a context and not a model variable: the student graph must stay exactly the
# ActivationQuantizer graph (no random ops, no conditionals) so that it exports to integer TFLite
# like any other tfqkd model, and the mode must not add variables to the model. SPEQ's train step traces
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
@keras.utils.register_keras_serializable(package="tfqkd")
class StochasticPrecisionQuantizer(ActivationQuantizer):
    """Activation quantizer whose precision is switched per layer and per forward pass.

    Outside :func:`stochastic_precision` (the student pass, inference, export) it IS
    :class:`tfqkd.quantizers.ActivationQuantizer`: unsigned uniform ``bits``-bit on ``[0, c]``
    with the same clip rules (``"ema"``, ``"fixed"``, ``"pact"``), the same variables and the
    same graph, so everything that handles an ``ActivationQuantizer`` (export included) handles
    this one. Inside the context (the teacher pass) it draws ``u ~ U(0, 1)`` on every call and,
    when ``u < probability``, uses ``high_bits`` on the same ``[0, c]`` or, for
    ``high_bits=None``, leaves the activation unquantized (float). The draw is a graph op, so a
    traced step draws afresh on every execution without retracing; each instance (one per
    quantized activation) draws independently. Both precisions share the clip variable: the
    teacher adds no weights.

    Args:
        bits: The student's activation bit-width, 1..8.
        high_bits: The teacher's alternative precision: an integer in ``bits..8`` or ``None`` for
            float activations. ``high_bits == bits`` makes the quantizer deterministic.
        probability: Chance, per layer and per teacher forward pass, of the high precision;
            0 makes the teacher identical to the student.
        clip, clip_value, ema_decay, signed_range: As for
            :class:`~tfqkd.quantizers.ActivationQuantizer`.

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
        clip: str = "ema",
        clip_value: float = 6.0,
        ema_decay: float = 0.99,
        signed_range: Optional[Tuple[float, float]] = None,
    ):
        super().__init__(bits, clip=clip, clip_value=clip_value, ema_decay=ema_decay,
                         signed_range=signed_range)
        if high_bits is not None:
            high_bits = check_bits(high_bits, "high_bits")
            if high_bits < self.bits:
                raise ValueError(
                    f"high_bits ({high_bits}) must be >= bits ({self.bits}): it is the teacher's "
                    "higher precision. Use high_bits=None for float activations."
                )
        if isinstance(probability, bool) or not isinstance(probability, numbers.Real) or \
                not 0.0 <= float(probability) <= 1.0:
            raise ValueError(
                f"probability must be a number in [0, 1] (the per-layer chance of the teacher's "
                f"high precision), got {probability!r}."
            )
        self.high_bits = high_bits
        self.probability = float(probability)
        self._high = None if high_bits is None else ActivationQuantizer(
            high_bits, clip=clip, clip_value=clip_value, ema_decay=ema_decay)

    @property
    def is_stochastic(self) -> bool:
        """Whether a teacher pass can differ from the student pass at all."""
        return self.probability > 0.0 and self.high_bits != self.bits

    @_quantizer_call
    def __call__(self, inputs, training, weights, **kwargs):
        inputs = tf.convert_to_tensor(inputs)
        low = super().__call__(inputs, training, weights, **kwargs)
        flag = stochastic_precision_enabled()
        if flag is False or not self.is_stochastic:
            return low  # student pass: exactly ActivationQuantizer's graph
        if self._high is None:
            high = tf.cast(inputs, low.dtype)
        else:
            # training=False: read the clip the student pass maintains, never update it twice.
            high = self._high(inputs, False, weights)
        use_high = tf.random.uniform([], dtype=tf.float32) < self.probability
        if flag is not True:
            use_high = tf.logical_and(tf.cast(flag, tf.bool), use_high)
        return tf.where(use_high, high, low)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(high_bits=self.high_bits, probability=self.probability)
        return config

    def __eq__(self, other) -> bool:
        return isinstance(other, StochasticPrecisionQuantizer) and (
            self.get_config() == other.get_config()
        )

    def __ne__(self, other) -> bool:
        return not self.__eq__(other)

    def __repr__(self) -> str:
        return (
            f"StochasticPrecisionQuantizer(bits={self.bits}, high_bits={self.high_bits}, "
            f"probability={self.probability}, clip={self.clip!r})"
        )


# --------------------------------------------------------------------------------------------
# Building a SPEQ model.
# --------------------------------------------------------------------------------------------
def _collect(obj, found: Dict[int, StochasticPrecisionQuantizer], depth: int = 0) -> None:
    if depth > 3 or obj is None:
        return
    if isinstance(obj, StochasticPrecisionQuantizer):
        found.setdefault(id(obj), obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _collect(item, found, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect(item, found, depth + 1)
    elif hasattr(obj, "quantizer"):  # tfmot's QuantizeAwareActivation
        _collect(obj.quantizer, found, depth + 1)


def stochastic_quantizers(model: keras.Model) -> list:
    """The :class:`StochasticPrecisionQuantizer` instances in ``model`` (one per quantized tensor).

    Looks into tfmot's wrappers: output quantizers, quantize-aware activations, input
    ``QuantizeLayer``\\ s and weight quantizers.

    Example:
        >>> import tfqkd
        >>> stochastic_quantizers(tfqkd.models.tiny_resnet(seed=0))  # a float model has none
        []
    """
    found: Dict[int, StochasticPrecisionQuantizer] = {}
    modules = [model] + [m for m in model.submodules if isinstance(m, keras.layers.Layer)]
    for module in modules:
        for name, value in vars(module).items():
            if name.startswith("_obj_") or name in ("_self_setattr_tracking",):
                continue
            _collect(value, found)
    return list(found.values())


def speq_quantize(
    model: keras.Model,
    weight_bits: int = 2,
    activation_bits: int = 2,
    *,
    high_bits: Optional[int] = 8,
    probability: float = 0.5,
    activation_clip: str = "ema",
    clip_value: float = 6.0,
    ema_decay: float = 0.99,
    **quantize_kwargs,
) -> keras.Model:
    """Quantizes a float model for SPEQ: weights as usual, activations stochastic-precision.

    Calls :func:`tfqkd.quantize_model` with ``activation_quantizer=`` a factory of
    :class:`StochasticPrecisionQuantizer`\\ s, so every quantized activation (all at
    ``activation_bits``: ``first_last_bits`` sets the first and last layers' *weight* bits only)
    can switch to ``high_bits`` in the teacher pass. Quantized activations already at or above
    ``high_bits`` stay deterministic.

    Args:
        model: A float functional ``tf_keras`` model outputting logits.
        weight_bits: Weight bit-width of the quantized layers.
        activation_bits: The student's activation bit-width (2..16).
        high_bits: The teacher's alternative activation precision (> ``activation_bits``), or
            ``None`` for float.
        probability: Per-layer, per-teacher-pass chance of ``high_bits``.
        activation_clip, clip_value, ema_decay: The activation clip rule (``"ema"``, ``"fixed"``,
            ``"pact"``) and its parameters, as for :class:`~tfqkd.quantizers.ActivationQuantizer`.
        **quantize_kwargs: Passed to :func:`tfqkd.quantize_model` (``first_last_bits``,
            ``per_channel``, ``step``, ...).

    Returns:
        The QAT model; its weights are the student's and the teacher's.

    Example:
        >>> import tfqkd
        >>> from tfqkd.speq import speq_quantize, stochastic_quantizers
        >>> q = speq_quantize(tfqkd.models.tiny_resnet(seed=0), 4, 4, probability=0.5)
        >>> len(stochastic_quantizers(q)) > 0
        True
    """
    from tfqkd.quantize import quantize_model  # lazy: tfqkd.quantize pulls in the whole scheme

    if activation_bits is None:
        raise ValueError(
            "activation_bits is None, but SPEQ's teacher varies the activation precision: give "
            "the student's activation bit-width, e.g. activation_bits=2."
        )
    # Validate once here so that a bad value is reported before the model is rewritten.
    clip_kw = dict(clip=activation_clip, clip_value=clip_value, ema_decay=ema_decay)
    StochasticPrecisionQuantizer(activation_bits, high_bits, probability, **clip_kw)

    def factory(bits: int) -> StochasticPrecisionQuantizer:
        bits = int(bits)
        high = high_bits
        if high is not None and bits >= high:
            high = bits  # already at (or above) the teacher's precision: deterministic
        return StochasticPrecisionQuantizer(bits, high, probability, **clip_kw)

    if "activation_quantizer" in quantize_kwargs:
        raise ValueError(
            "speq_quantize sets activation_quantizer itself (stochastic precision); call "
            "tfqkd.quantize_model directly to use another activation quantizer."
        )
    return quantize_model(
        model, weight_bits=weight_bits, activation_bits=activation_bits,
        activation_clip=activation_clip, activation_quantizer=factory, **quantize_kwargs,
    )


# --------------------------------------------------------------------------------------------
# The self-distilling model.
# --------------------------------------------------------------------------------------------
_TEACHER_BN = ("inference", "batch")


@keras.utils.register_keras_serializable(package="tfqkd")
class SPEQ(Distiller):
    """Self-distillation of a quantized model from itself at stochastic activation precision.

    One training step runs the network twice with the SAME weights:

    1. teacher pass, without gradient: inside :func:`stochastic_precision` every
       :class:`StochasticPrecisionQuantizer` draws its own precision; the softened output
       ``p_T = softmax(z_T / tau)`` is the soft target (averaged over ``teacher_passes`` passes);
    2. student pass, with gradient, at the target precision;

    and minimises ``(1 − λ)·H(y, p_S) + λ·cosine_distance(p_T, p_S)`` (the soft loss is
    configurable). Everything else is :class:`tfqkd.Distiller`: ``coefficient`` and
    ``temperature`` variables for the schedulers, the logged metrics, the distribution-correct
    loss, ``evaluate`` (the soft loss there is against a fresh stochastic teacher).

    **Batch normalisation.** ``teacher_bn="inference"`` (default) runs the teacher with
    ``training=False``: batch norm uses its moving statistics and nothing is updated (neither the
    moving statistics nor the activation ranges), so only the student pass changes state, once
    per step, as in plain training. This is right when fine-tuning from a trained float model (the
    usual SPEQ set-up). From scratch the moving statistics lag for the first few hundred steps and
    the teacher is poor then; ``teacher_bn="batch"`` runs the teacher with ``training=True`` (batch
    statistics, like the student) and restores every non-trainable variable of the student
    afterwards, so the teacher still leaves no trace.

    Args:
        student: A model built with :func:`speq_quantize` (it must contain
            :class:`StochasticPrecisionQuantizer`\\ s).
        temperature: Initial tau > 0.
        coefficient: Initial lambda in [0, 1].
        soft_loss: ``"cosine"`` (SPEQ's choice), or any :func:`tfqkd.losses.get` identifier.
        teacher_passes: Stochastic teacher passes averaged per step (the paper uses 1).
        teacher_bn: ``"inference"`` or ``"batch"`` (see above).
        temperature_squared: As for :class:`tfqkd.Distiller`.
        name: Model name.

    Example:
        >>> import numpy as np, tfqkd
        >>> from tfqkd.speq import SPEQ, speq_quantize
        >>> student = speq_quantize(tfqkd.models.tiny_resnet(seed=0), 4, 4)
        >>> model = SPEQ(student, temperature=2.0, coefficient=0.5)
        >>> model.compile(tfqkd.keras.optimizers.SGD(0.01), metrics=["accuracy"])
        >>> x = np.random.rand(32, 8, 8, 1).astype("float32"); y = np.arange(32) % 10
        >>> sorted(model.fit(x, y, batch_size=16, verbose=0).history)
        ['accuracy', 'coefficient', 'hard_loss', 'loss', 'soft_loss', 'temperature']
    """

    def __init__(
        self,
        student: keras.Model,
        *,
        temperature: float = 1.0,
        coefficient: float = 0.5,
        soft_loss: Any = "cosine",
        teacher_passes: int = 1,
        teacher_bn: str = "inference",
        temperature_squared: bool = False,
        name: str = "speq",
        **kwargs,
    ):
        kwargs.pop("teacher", None)  # configs of the base class carry teacher=None
        super().__init__(
            student, None, temperature=temperature, coefficient=coefficient,
            soft_loss=soft_loss, temperature_squared=temperature_squared, name=name, **kwargs,
        )
        if not stochastic_quantizers(student):
            raise ValueError(
                f"The student {student.name!r} has no StochasticPrecisionQuantizer, so SPEQ's "
                "teacher would be the student itself. Build it with "
                "tfqkd.speq.speq_quantize(float_model, weight_bits, activation_bits), or "
                "tfqkd.quantize_model(..., activation_quantizer=lambda b: "
                "StochasticPrecisionQuantizer(b))."
            )
        if isinstance(teacher_passes, bool) or not isinstance(teacher_passes, int) or \
                teacher_passes < 1:
            raise ValueError(f"teacher_passes must be an integer >= 1, got {teacher_passes!r}.")
        if teacher_bn not in _TEACHER_BN:
            raise ValueError(
                f"teacher_bn must be one of {_TEACHER_BN}, got {teacher_bn!r}: 'inference' runs "
                "the teacher with moving batch-norm statistics, 'batch' with batch statistics."
            )
        self.teacher_passes = teacher_passes
        self.teacher_bn = teacher_bn

    def teacher_logits(self, x) -> tf.Tensor:
        """One stochastic-precision pass of the shared network (no state changes).

        Example:
            >>> import numpy as np, tfqkd
            >>> from tfqkd.speq import SPEQ, speq_quantize
            >>> m = SPEQ(speq_quantize(tfqkd.models.tiny_resnet(seed=0), 4, 4))
            >>> m.teacher_logits(np.zeros((2, 8, 8, 1), "float32")).shape
            TensorShape([2, 10])
        """
        if self.teacher_bn == "inference":
            with stochastic_precision(True):
                return self._student_logits(x, training=False)
        state = self.student.non_trainable_variables
        saved = [tf.identity(v) for v in state]
        with tf.control_dependencies(saved):
            with stochastic_precision(True):
                logits = self._student_logits(x, training=True)
        with tf.control_dependencies([logits]):
            restored = [v.assign(s) for v, s in zip(state, saved)]
        with tf.control_dependencies(restored):
            return tf.identity(logits)

    def teacher_probabilities(self, x) -> tf.Tensor:
        """``softmax(z_T / tau)`` averaged over ``teacher_passes`` stochastic passes."""
        probs = [self.soften(self.teacher_logits(x)) for _ in range(self.teacher_passes)]
        probs = probs[0] if len(probs) == 1 else tf.add_n(probs) / float(len(probs))
        return tf.stop_gradient(probs)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.pop("teacher", None)
        config.update(teacher_passes=self.teacher_passes, teacher_bn=self.teacher_bn)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config.pop("teacher", None)
        config["student"] = keras.utils.deserialize_keras_object(
            config["student"], custom_objects=custom_objects)
        return cls(**config)


def stochastic_teacher_accuracy(model: keras.Model, dataset: tf.data.Dataset) -> float:
    """Top-1 accuracy of ONE stochastic-precision pass of ``model`` per batch (the SPEQ teacher).

    ``model`` is a SPEQ student (see :func:`speq_quantize`), run in inference mode (batch norm
    with its moving statistics) under :func:`stochastic_precision`: every quantizer draws its
    precision afresh on each batch, so the figure varies from call to call unless
    ``probability`` is 0 or 1. Raises ``ValueError`` on an empty data set.

    Example:
        >>> from tfqkd import models
        >>> student = speq_quantize(models.tiny_resnet(10, seed=0), 2, 2, probability=0.5)
        >>> ds = tf.data.Dataset.from_tensor_slices((tf.zeros([5, 8, 8, 1]), [0] * 5)).batch(2)
        >>> 0.0 <= stochastic_teacher_accuracy(student, ds) <= 1.0
        True
    """
    from tfqkd.training import evaluate_accuracy

    # The graph is traced inside the context (on the first batch), so it is a teacher graph.
    with stochastic_precision(True):
        return evaluate_accuracy(model, dataset)
