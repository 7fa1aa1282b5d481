"""Knowledge distillation as a Keras model: ``Distiller(student, teacher).fit(...)``.

The loss is the paper's Eq. (3),

    L = (1 - lambda) * H(y, p_S) + lambda * s * soft(p_T, p_S),   p = softmax(z / tau),

with the hard term ``H(y, p_S)`` the loss given to :meth:`Distiller.compile` (on the student's raw
logits, i.e. at temperature 1, as in Hinton et al.), the soft term one of :mod:`tfqkd.losses`
(``"kl"`` by default; ``"ce"`` is literally the ``H(p_T, p_S)`` of Eq. 3, same gradient) and
``s = tau**2`` when ``temperature_squared=True`` else 1.

**Why ``temperature_squared=False`` is the default.** The gradient of the soft term with respect to
the student's logits scales like ``1 / tau**2``; Hinton et al. multiply by ``tau**2`` so that the
balance between the hard and soft terms does not change when ``tau`` does. The paper this toolkit
reproduces writes Eq. (3) without that factor and tunes ``lambda`` and ``tau`` against it, so the
default follows the paper: results and tuned values carry over. At ``tau = 1`` the two agree. Turn
it on when you sweep ``tau > 1`` and want ``lambda`` to keep its meaning.

``distiller.coefficient`` (lambda) and ``distiller.temperature`` (tau) are non-trainable
``tf.Variable``s read inside the compiled step, so callbacks
(:class:`tfqkd.callbacks.CoefficientScheduler`, :class:`~tfqkd.callbacks.TemperatureScheduler`)
change them between steps without retracing.

The teacher is not a tracked sub-model: its weights are not in ``distiller.weights``, not trained,
not in the Distiller's checkpoints (rebuild or reload it when you resume). ``distiller.student`` is
the product to save and export; the Distiller itself never is.

Example:
    >>> import numpy as np
    >>> import tfqkd
    >>> from tfqkd import keras
    >>> teacher = tfqkd.models.tiny_resnet(10, width=2, seed=0)
    >>> student = tfqkd.models.tiny_resnet(10, seed=1)
    >>> d = tfqkd.Distiller(student, teacher, temperature=2.0, coefficient=0.5)
    >>> d.compile(keras.optimizers.SGD(0.01), metrics=["accuracy"])
    >>> x = np.random.rand(32, 8, 8, 1).astype("float32"); y = np.arange(32) % 10
    >>> h = d.fit(x, y, batch_size=16, epochs=1, verbose=0)
    >>> sorted(h.history)
    ['accuracy', 'coefficient', 'hard_loss', 'loss', 'soft_loss', 'temperature']
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from tfqkd import losses as _losses
from tfqkd import finite as _finite
from tfqkd._keras import keras, tf
from tfqkd.models.heads import logits_model, softmax_layer
from tfqkd.teacher_inference import InferenceTeacher, resolve_teacher_dtype
from tfqkd.teachers import PROBABILITY_EPSILON  # noqa: F401  (importable from here)
from tfqkd.teachers import (TeacherArg, _as_teacher_list, _check_model,
                            _check_teacher_input, _model_name, _num_classes,
                            precompute_teacher_logits, teacher_logits, unpack_batch)
from tfqkd.training import global_batch_size

__all__ = ["Distiller", "precompute_teacher_logits", "teacher_logits"]



# --------------------------------------------------------------------------------------------
# Argument checks (shared with the schedulers, which validate the values they set)
# --------------------------------------------------------------------------------------------
def check_temperature(value: Any, what: str = "temperature") -> float:
    """Returns ``value`` as a float, or raises a ``ValueError`` if it is not a number > 0."""
    try:
        tau = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number > 0, got {value!r}.") from None
    if not np.isfinite(tau) or tau <= 0:
        raise ValueError(
            f"{what} (tau) must be > 0, got {value!r}: the logits are divided by it. "
            "Use 1.0 for plain softmax, larger values (e.g. 2-8) for softer targets."
        )
    return tau


def check_coefficient(value: Any, what: str = "coefficient") -> float:
    """Returns ``value`` as a float, or raises a ``ValueError`` if it is not in [0, 1]."""
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}.") from None
    if not (0.0 <= lam <= 1.0):
        raise ValueError(
            f"{what} (lambda) must be in [0, 1], got {value!r}: the loss is "
            "(1 - lambda) * hard + lambda * soft. 0 trains on the labels only, 1 on the teacher only."
        )
    return lam


def _sparse_hard_loss(distiller) -> bool:
    loss = getattr(distiller, "_hard_loss_id", None)
    if loss is None:
        return True
    if isinstance(loss, str):
        return "sparse" in loss.lower()
    return isinstance(loss, keras.losses.SparseCategoricalCrossentropy)


def _check_fit_data(distiller, x, y, training: bool = True) -> None:
    """Checks what ``fit``/``evaluate`` get before Keras traces a step: a missing teacher and
    one-hot labels otherwise fail deep inside the step with a graph error."""
    if isinstance(x, tf.data.Dataset):
        batch = x.element_spec
    elif y is not None:
        batch = (x, y)
    elif isinstance(x, (tuple, list, dict)):
        batch = x
    else:
        return  # a generator or a Sequence: checked when traced
    try:
        _, labels, _, teacher_logits = Distiller.unpack_data(batch)
    except ValueError:
        return  # train_step reports the malformed batch itself
    if training and not distiller._has_teacher_source(teacher_logits):
        raise ValueError(
            f"This Distiller has no teacher (coefficient λ = "
            f"{float(distiller.coefficient.numpy()):g}), and the batches carry no teacher "
            "logits: pass `teacher=` (a model or a list), feed (x, y, teacher_logits) batches "
            "(see tfqkd.distiller.precompute_teacher_logits), or train the student alone with "
            "`student.fit` for hard labels only."
        )
    shape = getattr(labels, "shape", None)
    n = _num_classes(distiller.student)
    if (shape is not None and len(shape) == 2 and n and n > 1 and shape[-1] == n
            and _sparse_hard_loss(distiller)):
        raise ValueError(
            f"The labels have shape {tuple(shape)}: they look one-hot, but the Distiller's hard "
            "loss takes integer class ids (sparse categorical cross-entropy). Pass "
            "`y.argmax(-1)` (or map `tf.argmax(y, -1)` over the data set), or compile with "
            "`loss='categorical_crossentropy'` for one-hot labels."
        )


class _CurrentValue(keras.metrics.Metric):
    """Reports the latest value given to it (not an average): lambda and tau in the logs.

    A metric rather than a plain tensor in the step's outputs because Keras sums per-replica
    outputs under ``MirroredStrategy`` (it would report 2 * lambda on two devices); metric results
    are aggregated by Keras and read once. ONLY_FIRST_REPLICA: every replica holds the same value.
    """

    def __init__(self, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self.value = self.add_weight(
            name="value", initializer="zeros",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    def update_state(self, value, sample_weight=None):
        del sample_weight
        return self.value.assign(tf.cast(value, self.dtype))

    def result(self):
        return tf.identity(self.value)

    def reset_state(self):
        # Keep the value across epochs: it is a setting, not an accumulation.
        pass


# --------------------------------------------------------------------------------------------
# Distiller
# --------------------------------------------------------------------------------------------
@keras.utils.register_keras_serializable(package="tfqkd")
class Distiller(keras.Model):
    """Trains ``student`` on ``(1 - lambda) * hard + lambda * soft`` with ``teacher``'s soft targets.

    Args:
        student: The model to train. Must be built. If it ends in a softmax (a ``Softmax`` /
            ``Activation("softmax")`` layer or a Dense/Conv with ``activation="softmax"``, also
            inside tfmot's QAT wrappers) it is trained through
            ``tfqkd.models.logits_model(student)``, a view of its logits sharing its variables
            (a warning names the layer); ``distiller.student`` stays the model given, head
            included, for saving and export. Accuracy metrics are unchanged (same argmax).
        teacher: A model outputting logits or ending in a softmax (its log-probabilities, clipped
            at ``PROBABILITY_EPSILON``, are used as logits: equal up to a per-example constant, so
            ``softmax(log p / tau)`` is exact), a list of such models (an ensemble: the soft targets
            are the average of the teachers' softened probabilities, paper section 4.6), or
            ``None`` when every batch carries precomputed teacher logits (see
            :func:`precompute_teacher_logits`) or a subclass overrides
            :meth:`teacher_probabilities`. Teachers run with ``training=False`` and no gradient;
            they are not tracked: not trained, not in the Distiller's weights or checkpoints.
        temperature: Initial tau > 0 (``distiller.temperature``, a non-trainable variable).
        coefficient: Initial lambda in [0, 1] (``distiller.coefficient``).
        soft_loss: ``"kl"`` (default), ``"ce"``, ``"cosine"`` or a callable
            ``fn(teacher_probs, student_logits, temperature) -> (B,)`` (see :mod:`tfqkd.losses`).
        temperature_squared: Multiply the soft term by tau**2 (Hinton et al.). Default ``False``,
            the paper's Eq. (3); see the module docstring for why.
        teacher_inference: Run each teacher as a frozen copy with batch norm folded into its
            kernels (:class:`tfqkd.teacher_inference.InferenceTeacher`, same logits to float32
            rounding), refreshed from the teacher at every ``fit``/``evaluate``. Default True;
            False runs the teacher itself (needed only if a callback changes it during ``fit``).
        teacher_dtype: The copy's compute type: ``"float32"`` (default: the teacher's logits to
            float32 rounding), ``"bfloat16"`` or ``"auto"`` (bfloat16 where the CPU runs it
            natively, AMX/AVX512-BF16 without a GPU, else float32; see
            :func:`tfqkd.teacher_inference.resolve_teacher_dtype`). bfloat16 ran the teacher ~5x
            faster here (KD step 0.7x) with the same top-1 and 99.5 % top-1 agreement (evidence
            in ``docs/distillation.md``); recommended wherever "auto" picks it. Needs
            ``teacher_inference``.
        name: Model name.

    Data: each element is ``(x, y)``, ``(x, y, teacher_logits)`` (rank >= 2: skips the teacher
    forward; shape (B, C), or (B, K, C) for a K-teacher ensemble), ``(x, y, sample_weight)`` (rank
    1), ``(x, y, teacher_logits, sample_weight)`` or a dict with keys ``"x"``, ``"y"`` and
    optionally ``"teacher_logits"``, ``"sample_weight"``.

    Logs: ``loss`` (the minimised total, with regularization losses), ``hard_loss`` and
    ``soft_loss`` (per-example means of the unweighted terms: no lambda, no tau**2),
    ``coefficient``, ``temperature`` and the compiled metrics computed on the student's logits.
    ``evaluate`` measures the student: ``loss`` is then the hard loss plus regularization (what
    ``student.evaluate`` reports with the same compile), ``hard_loss`` and, when a teacher or
    precomputed logits are available, ``soft_loss``.

    Example:
        >>> import tfqkd
        >>> from tfqkd import keras
        >>> d = tfqkd.Distiller(tfqkd.models.tiny_resnet(seed=1),
        ...                     [tfqkd.models.tiny_resnet(width=2, seed=s) for s in (2, 3)],
        ...                     temperature=4.0, coefficient=0.5, soft_loss="ce")
        >>> d.compile(keras.optimizers.Adam(1e-3))
        >>> float(d.coefficient.numpy()), float(d.temperature.numpy()), len(d.teachers)
        (0.5, 4.0, 2)
    """

    #: ``train_step`` wraps the soft targets in ``tf.stop_gradient``. A subclass whose soft targets
    #: should carry gradient (to its own trainable weights) sets this to False.
    stop_teacher_gradient: bool = True

    #: Check every train step's inputs, loss, gradients and weights for NaN/inf (recorded in
    #: ``non_finite_flags`` for :class:`tfqkd.finite.StopOnNonFinite`) and skip a non-finite
    #: update. ``tools/benchmark_distill.py`` measures its cost; set False on an instance to
    #: compare.
    check_finite: bool = True

    def __init__(
        self,
        student: keras.Model,
        teacher: TeacherArg = None,
        *,
        temperature: float = 1.0,
        coefficient: float = 0.5,
        soft_loss: Union[str, Callable] = "kl",
        temperature_squared: bool = False,
        teacher_inference: bool = True,
        teacher_dtype: str = "float32",
        name: str = "distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        _check_model(student, "student")
        teachers = _as_teacher_list(teacher)
        for i, t in enumerate(teachers):
            _check_model(t, "teacher" if len(teachers) == 1 else f"teacher[{i}]")
        for i, t in enumerate(teachers):
            _check_teacher_input(student, t, "teacher" if len(teachers) == 1 else f"teacher[{i}]")
        tau = check_temperature(temperature)
        lam = check_coefficient(coefficient)
        n_student = _num_classes(student)
        for i, t in enumerate(teachers):
            n_teacher = _num_classes(t)
            if n_student is not None and n_teacher is not None and n_student != n_teacher:
                raise ValueError(
                    f"The teacher {_model_name(t)!r} outputs {n_teacher} classes but the student "
                    f"{_model_name(student)!r} outputs {n_student}: distillation compares "
                    "probabilities class by class, so both must predict the same classes. Use a "
                    "teacher trained on the same data set (same num_classes)."
                )
        if not isinstance(temperature_squared, bool):
            raise ValueError(f"temperature_squared must be True or False, got {temperature_squared!r}.")

        self.student = student
        # A softmax-ended student trains through a view of its logits that shares its variables
        # (not tracked: the same variables are tracked through `student`); `student` keeps the
        # head the user asked for, and is what is saved and exported.
        object.__setattr__(self, "_student_logits", logits_model(student))
        head = softmax_layer(student)
        if head is not None:
            warnings.warn(
                f"The student {_model_name(student)!r} ends in a softmax (layer {head!r}): the "
                "Distiller trains it through tfqkd.models.logits_model(student), the same "
                "variables without the softmax; distiller.student keeps its softmax head.",
                stacklevel=2)
        object.__setattr__(self, "_teacher_softmax",
                           tuple(softmax_layer(t) is not None for t in teachers))
        # Not tracked (object.__setattr__ bypasses Keras' attribute tracking): the teacher's
        # weights must not appear in `trainable_variables` (the optimizer would build slots for
        # them, BackupAndRestore would rebuild them) nor in the Distiller's checkpoints.
        object.__setattr__(self, "_teacher_arg", teacher)
        object.__setattr__(self, "_teachers", teachers)
        resolve_teacher_dtype(teacher_dtype)  # checks the value
        if teacher_dtype == "bfloat16" and not teacher_inference:
            raise ValueError(f"teacher_dtype={teacher_dtype!r} needs teacher_inference=True (the "
                             "teacher itself runs in its own dtype).")
        self.teacher_inference, self.teacher_dtype = bool(teacher_inference), teacher_dtype
        # The teachers' inference copies (untracked, like the teachers): what the steps run.
        object.__setattr__(self, "_teacher_runners", tuple(
            InferenceTeacher(t, teacher_dtype) if teacher_inference else t for t in teachers))
        self._soft_loss_id = soft_loss
        self.soft_loss_fn = _losses.get(soft_loss)
        self.temperature_squared = temperature_squared
        self.coefficient = self.add_weight(
            name="coefficient", shape=(), dtype=tf.float32, trainable=False,
            initializer=keras.initializers.Constant(lam),
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.temperature = self.add_weight(
            name="temperature", shape=(), dtype=tf.float32, trainable=False,
            initializer=keras.initializers.Constant(tau),
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        # What the last train step found non-finite (tfqkd.finite.CHECKS), read by
        # StopOnNonFinite. Not tracked: a per-step flag is not state to checkpoint.
        object.__setattr__(self, "non_finite_flags", _finite.new_flags_variable())
        # Metrics are not tracked either: their running totals are not model weights (they would
        # show up in count_params(), summary() and every checkpoint). `metrics` lists them.
        for attr, metric in (
            ("_loss_tracker", keras.metrics.Mean(name="loss")),
            ("_hard_tracker", keras.metrics.Mean(name="hard_loss")),
            ("_soft_tracker", keras.metrics.Mean(name="soft_loss")),
            ("_coefficient_tracker", _CurrentValue("coefficient")),
            ("_temperature_tracker", _CurrentValue("temperature")),
        ):
            object.__setattr__(self, attr, metric)
        self.hard_loss_fn: Optional[Callable] = None
        # The student exists, so the Distiller's variables do: mark it built so that
        # BackupAndRestore, save_weights and summary() work before the first fit().
        self.built = True

    # ---- properties ------------------------------------------------------------------------
    @property
    def teacher(self) -> TeacherArg:
        """The teacher as given: a model, a list of models, or None."""
        return self._teacher_arg

    @property
    def teachers(self) -> Tuple[keras.Model, ...]:
        """The teachers as a tuple (empty when the soft targets come from elsewhere)."""
        return self._teachers

    @property
    def metrics(self) -> List[keras.metrics.Metric]:
        metrics = [
            self._loss_tracker, self._hard_tracker, self._soft_tracker,
            self._coefficient_tracker, self._temperature_tracker,
        ]
        if self.compiled_metrics is not None:
            metrics += self.compiled_metrics.metrics
        return metrics

    # ---- compile ---------------------------------------------------------------------------
    def compile(self, optimizer="rmsprop", loss=None, metrics=None, weighted_metrics=None,
                **kwargs):
        """Configures training; ``loss`` is the HARD loss on the student's logits.

        Args:
            optimizer: Any Keras optimizer (trains the student's trainable weights only).
            loss: Hard loss ``H(y, p_S)``: ``None`` (default) for sparse categorical cross-entropy
                from logits, a ``keras.losses.Loss`` (its per-example values are used, so that the
                loss scales with the global batch size under ``tf.distribute``), a function
                ``fn(y_true, y_pred) -> (B,)``, or a name. The names ``"sparse_categorical_crossentropy"``
                and ``"categorical_crossentropy"`` mean ``from_logits=True`` here, since the student
                outputs logits.
            metrics, weighted_metrics: Metrics of the student, as for ``Model.compile``.
            **kwargs: Passed to ``Model.compile`` (``run_eagerly``, ``jit_compile``,
                ``steps_per_execution``...); ``loss_weights`` is not supported.

        Example:
            >>> import tfqkd
            >>> d = tfqkd.Distiller(tfqkd.models.tiny_resnet(seed=1), tfqkd.models.tiny_resnet(seed=2))
            >>> d.compile("sgd", loss=tfqkd.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        """
        if kwargs.get("loss_weights") is not None:
            raise ValueError("Distiller.compile does not support loss_weights; weight the hard and "
                             "soft terms with the coefficient (lambda).")
        kwargs.pop("loss_weights", None)
        super().compile(optimizer=optimizer, metrics=metrics, weighted_metrics=weighted_metrics,
                        **kwargs)
        self.hard_loss_fn = self._resolve_hard_loss(loss)
        self._hard_loss_id = loss

    @staticmethod
    def _resolve_hard_loss(loss) -> Callable:
        if loss is None:
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True).call
        if isinstance(loss, str):
            key = loss.lower()
            if key in ("sparse_categorical_crossentropy", "sparsecategoricalcrossentropy"):
                return keras.losses.SparseCategoricalCrossentropy(from_logits=True).call
            if key in ("categorical_crossentropy", "categoricalcrossentropy"):
                return keras.losses.CategoricalCrossentropy(from_logits=True).call
            loss = keras.losses.get(loss)
        if isinstance(loss, keras.losses.Loss):
            # Loss.call gives the per-example values, before the Loss's own reduction.
            return loss.call
        if callable(loss):
            return loss
        raise ValueError(
            f"loss must be None, a keras.losses.Loss, a function fn(y_true, y_pred) -> (B,) or a "
            f"loss name, got {loss!r}."
        )

    # ---- soft targets ----------------------------------------------------------------------
    def soften(self, logits) -> tf.Tensor:
        """``softmax(logits / tau)`` in float32; (B, K, C) ensemble logits are averaged over K.

        Example:
            >>> import tfqkd, numpy as np
            >>> d = tfqkd.Distiller(tfqkd.models.tiny_resnet(seed=1), temperature=2.0)
            >>> float(d.soften(np.zeros((1, 10), "float32")).numpy().sum().round(5))
            1.0
        """
        logits = tf.cast(logits, tf.float32)
        probs = tf.nn.softmax(logits / self.temperature, axis=-1)
        if logits.shape.rank == 3:
            probs = tf.reduce_mean(probs, axis=1)
        return probs

    def teacher_probabilities(self, x) -> tf.Tensor:
        """Soft targets ``(B, classes)`` for inputs ``x``: the teachers' averaged softened outputs.

        Override this in a subclass to take soft targets from elsewhere (SPEQ: the student itself
        at stochastic precision). It is called outside the gradient tape; the result is wrapped in
        ``tf.stop_gradient`` when :attr:`stop_teacher_gradient` is True.

        Example:
            >>> import tfqkd, numpy as np
            >>> d = tfqkd.Distiller(tfqkd.models.tiny_resnet(seed=1), tfqkd.models.tiny_resnet(seed=2))
            >>> d.teacher_probabilities(np.zeros((3, 8, 8, 1), "float32")).shape
            TensorShape([3, 10])
        """
        if not self._teachers:
            raise ValueError(
                "This Distiller has no teacher: pass `teacher=` (a model or a list), feed batches "
                "(x, y, teacher_logits) (see tfqkd.distiller.precompute_teacher_logits), or "
                "override teacher_probabilities() in a subclass."
            )
        if tf.executing_eagerly():
            self._refresh_teachers()
        probs = [self.soften(teacher_logits(t, x, softmax))
                 for t, softmax in zip(self._teacher_runners, self._teacher_softmax)]
        return probs[0] if len(probs) == 1 else tf.add_n(probs) / float(len(probs))

    def _refresh_teachers(self) -> None:
        for runner in self._teacher_runners:
            if isinstance(runner, InferenceTeacher):
                runner.refresh()

    def _has_teacher_source(self, teacher_logits) -> bool:
        overridden = type(self).teacher_probabilities is not Distiller.teacher_probabilities
        return teacher_logits is not None or bool(self._teachers) or overridden

    def _soft_targets(self, x, teacher_logits) -> tf.Tensor:
        if teacher_logits is not None:
            probs = self.soften(teacher_logits)
        else:
            probs = self.teacher_probabilities(x)
        if self.stop_teacher_gradient:
            probs = tf.stop_gradient(probs)
        return probs

    # ---- data ------------------------------------------------------------------------------
    unpack_data = staticmethod(unpack_batch)

    # ---- the loss --------------------------------------------------------------------------
    def _per_example_hard(self, y, student_logits) -> tf.Tensor:
        if self.hard_loss_fn is None:
            raise RuntimeError("Call distiller.compile(optimizer, ...) before fit/evaluate.")
        if y is None:
            raise ValueError("The Distiller needs labels y: feed (x, y) or (x, y, teacher_logits).")
        hard = self.hard_loss_fn(y, tf.cast(student_logits, tf.float32))
        hard = tf.cast(hard, tf.float32)
        if hard.shape.rank is not None and hard.shape.rank > 1:
            hard = tf.reduce_mean(hard, axis=list(range(1, hard.shape.rank)))
        return hard

    def _check_classes(self, student_logits, probs) -> None:
        n_s, n_t = student_logits.shape[-1], probs.shape[-1]
        if n_s is not None and n_t is not None and n_s != n_t:
            raise ValueError(
                f"The soft targets have {n_t} classes but the student outputs {n_s}: teacher and "
                "student must predict the same classes."
            )

    def _soft_scale(self) -> tf.Tensor:
        if self.temperature_squared:
            return tf.square(self.temperature)
        return tf.constant(1.0, tf.float32)

    def compute_distillation_loss(self, y, student_logits, teacher_probs, sample_weight=None):
        """Per-example hard, soft and total losses and the scalar to minimise on this replica.

        Returns:
            ``(loss, hard, soft, total, reg)``: ``loss`` is ``sum(total * sample_weight) /
            global_batch_size`` plus the student's regularization losses divided by the number of
            replicas, so that summing the replicas' gradients (what optimizers do under
            ``tf.distribute``) gives the gradient of the global-batch mean.
        """
        hard = self._per_example_hard(y, student_logits)
        soft = tf.cast(self.soft_loss_fn(teacher_probs, student_logits, self.temperature),
                       tf.float32)
        sample_weight = self._flat_weights(sample_weight)
        lam = self.coefficient
        total = (1.0 - lam) * hard + lam * self._soft_scale() * soft
        loss = tf.nn.compute_average_loss(
            total, sample_weight=sample_weight, global_batch_size=global_batch_size(total))
        reg = self._regularization()
        loss += tf.nn.scale_regularization_loss(reg)
        return loss, hard, soft, total, reg

    def _regularization(self) -> tf.Tensor:
        # `model.losses` rebuilds the regularization ops on every access: read it once.
        losses = self.student.losses
        if not losses:
            return tf.constant(0.0, tf.float32)
        return tf.add_n([tf.cast(r, tf.float32) for r in losses])

    def _check_variables(self) -> List[tf.Operation]:
        # Callbacks or user code may assign the variables; fail loudly instead of training on NaN.
        return [
            tf.debugging.assert_greater(
                self.temperature, 0.0,
                message="distiller.temperature must be > 0 (set by a callback or user code)"),
            tf.debugging.assert_less_equal(
                tf.abs(self.coefficient - 0.5), 0.5,
                message="distiller.coefficient must be in [0, 1] (set by a callback or user code)"),
        ]

    @staticmethod
    def _flat_weights(sample_weight):
        # (B, 1) weights would broadcast against (B,) losses into (B, B).
        if sample_weight is None:
            return None
        sample_weight = tf.cast(sample_weight, tf.float32)
        if sample_weight.shape.rank == 2 and sample_weight.shape[-1] == 1:
            sample_weight = tf.squeeze(sample_weight, axis=-1)
        return sample_weight

    def _update_trackers(self, hard, soft, total, reg, sample_weight):
        sample_weight = self._flat_weights(sample_weight)
        self._hard_tracker.update_state(hard, sample_weight=sample_weight)
        if soft is not None:
            self._soft_tracker.update_state(soft, sample_weight=sample_weight)
        # Mean of (total_i + reg): the global mean of the per-example totals plus the
        # regularization, the same number as the minimised loss summed over replicas.
        self._loss_tracker.update_state(total + reg, sample_weight=sample_weight)

    # ---- steps -----------------------------------------------------------------------------
    def fit(self, x=None, y=None, *args, **kwargs):
        """``Model.fit``, after checking the data for a teacher source and one-hot labels."""
        _check_fit_data(self, x, y)
        self._refresh_teachers()
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """``Model.evaluate``, after checking the labels (see :meth:`fit`)."""
        _check_fit_data(self, x, y, training=False)
        self._refresh_teachers()
        return super().evaluate(x, y, *args, **kwargs)

    def train_step(self, data):
        x, y, sample_weight, teacher_logits = self.unpack_data(data)
        if not self._has_teacher_source(teacher_logits):
            self.teacher_probabilities(x)  # raises the explanatory error
        with tf.control_dependencies(self._check_variables()):
            teacher_probs = self._soft_targets(x, teacher_logits)
        with tf.GradientTape() as tape:
            student_logits = self._student_logits(x, training=True)
            self._check_classes(student_logits, teacher_probs)
            loss, hard, soft, total, reg = self.compute_distillation_loss(
                y, student_logits, teacher_probs, sample_weight)
        if self.check_finite:
            # minimize + the non-finite checks (inputs, loss, gradients, weights after the step).
            _finite.minimize_checked(self, loss, tape, self.student.trainable_variables, x)
        else:
            self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        self._update_trackers(hard, soft, total, tf.stop_gradient(reg), sample_weight)
        self._coefficient_tracker.update_state(self.coefficient)
        self._temperature_tracker.update_state(self.temperature)
        self.compiled_metrics.update_state(y, student_logits, sample_weight)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y, sample_weight, teacher_logits = self.unpack_data(data)
        student_logits = self._student_logits(x, training=False)
        hard = self._per_example_hard(y, student_logits)
        soft = None
        if self._has_teacher_source(teacher_logits):
            teacher_probs = self._soft_targets(x, teacher_logits)
            self._check_classes(student_logits, teacher_probs)
            soft = tf.cast(self.soft_loss_fn(teacher_probs, student_logits, self.temperature),
                           tf.float32)
        self._update_trackers(hard, soft, hard, self._regularization(), sample_weight)
        self.compiled_metrics.update_state(y, student_logits, sample_weight)
        results = {"loss": self._loss_tracker.result(), "hard_loss": self._hard_tracker.result()}
        if soft is not None:
            results["soft_loss"] = self._soft_tracker.result()
        results.update({m.name: m.result() for m in self.compiled_metrics.metrics})
        return results

    def call(self, inputs, training=None):
        """The student's logits (``predict`` on a Distiller predicts with the student; a
        softmax-ended student gives the logits before its softmax)."""
        return self._student_logits(inputs, training=training)

    # ---- config ----------------------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        """Hyper-parameters plus the serialized student and teacher(s).

        ``temperature`` and ``coefficient`` are the CURRENT values of the variables.
        """
        teacher = self._teacher_arg
        if isinstance(teacher, (list, tuple)):
            teacher_cfg = [keras.utils.serialize_keras_object(t) for t in teacher]
        elif teacher is None:
            teacher_cfg = None
        else:
            teacher_cfg = keras.utils.serialize_keras_object(teacher)
        soft = self._soft_loss_id if isinstance(self._soft_loss_id, str) else \
            _losses.serialize(self.soft_loss_fn)
        return {
            "name": self.name,
            "student": keras.utils.serialize_keras_object(self.student),
            "teacher": teacher_cfg,
            "temperature": float(self.temperature.numpy()),
            "coefficient": float(self.coefficient.numpy()),
            "soft_loss": soft,
            "temperature_squared": self.temperature_squared,
            "teacher_inference": self.teacher_inference,
            "teacher_dtype": self.teacher_dtype,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["student"] = keras.utils.deserialize_keras_object(
            config["student"], custom_objects=custom_objects)
        teacher = config.get("teacher")
        if isinstance(teacher, list):
            config["teacher"] = [keras.utils.deserialize_keras_object(t, custom_objects=custom_objects)
                                 for t in teacher]
        elif teacher is not None:
            config["teacher"] = keras.utils.deserialize_keras_object(
                teacher, custom_objects=custom_objects)
        return cls(**config)
