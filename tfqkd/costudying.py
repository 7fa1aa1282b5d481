"""Co-studying (QKD's second phase): a float teacher and a quantized student trained together.

:class:`CoStudying` trains both models on every batch: each learns the labels and the other's
softened outputs (Kim et al. 2019), so the teacher drifts towards functions the low-precision
student can represent. :func:`tfqkd.qkd.run_qkd` runs it between self-studying and tutoring.

Example:
    >>> import tfqkd
    >>> student = tfqkd.models.tiny_resnet(10, seed=0)
    >>> teacher = tfqkd.models.tiny_resnet(10, width=2, seed=1)
    >>> cs = CoStudying(student, teacher, temperature=2.0, student_coefficient=0.5,
    ...                 teacher_coefficient=0.25)
    >>> float(cs.coefficient.numpy()), float(cs.teacher_coefficient.numpy())
    (0.5, 0.25)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Union

from tfqkd import finite as _finite
from tfqkd._keras import keras, tf
from tfqkd.distiller import _CurrentValue, check_coefficient, check_temperature
from tfqkd.training import global_batch_size

__all__ = ["CoStudying"]


def _resolve_soft_loss(soft_loss: Union[str, Callable]) -> Callable:
    from tfqkd import losses  # imported lazily: losses is a sibling module with no Keras state

    return losses.get(soft_loss)


def _num_classes(model: keras.Model, role: str) -> int:
    shape = model.output_shape
    if isinstance(shape, list) or len(shape) != 2 or shape[-1] is None:
        raise ValueError(
            f"the {role} must output one logits tensor of shape (batch, classes); its output shape "
            f"is {shape!r}."
        )
    return int(shape[-1])


def _check_same_classes(student: keras.Model, teacher: keras.Model) -> int:
    """The class count, which student and teacher must share (co-studying and tutoring compare
    their outputs)."""
    s_classes, t_classes = _num_classes(student, "student"), _num_classes(teacher, "teacher")
    if s_classes != t_classes:
        raise ValueError(
            f"class-count mismatch: the student outputs {s_classes} logits and the teacher "
            f"{t_classes}; build both for the same number of classes."
        )
    return s_classes


@keras.utils.register_keras_serializable(package="tfqkd")
class CoStudying(keras.Model):
    """QKD's co-studying phase: a quantized student and a float teacher that teach each other.

    Both models see the same batch. With ``p = softmax(z / τ)`` and the soft loss ``D`` chosen by
    ``soft_loss`` (see :func:`tfqkd.losses.get`)::

        student loss = (1 - λs) · CE(y, zS) + λs · s · D(sg(pT), zS, τ)
        teacher loss = (1 - λt) · CE(y, zT) + λt · s · D(sg(pS), zT, τt)

    where ``sg`` is a stop-gradient (neither model is pushed through the other's targets),
    ``s = τ²`` when ``temperature_squared`` (Hinton's scaling, which keeps the soft gradients'
    magnitude independent of τ) and 1 otherwise, and each model's regularization losses are added
    to its own loss. ``τt`` is ``teacher_temperature`` (defaults to ``temperature``).

    **Optimizers.** By default the one optimizer passed to :meth:`compile` updates the union of the
    student's and the teacher's trainable variables in a single ``apply_gradients`` call: because
    of the stop-gradients, the gradient of ``student loss + teacher loss`` with respect to the
    student's variables is exactly that of the student loss, and likewise for the teacher, so one
    step equals two independent steps with the same hyper-parameters and the optimizer's
    ``iterations`` counts training steps (what the schedulers read). Pass
    ``compile(..., teacher_optimizer=...)`` to give the teacher its own optimizer (e.g. a smaller
    learning rate); it is an attribute of the model, so checkpoints and ``BackupAndRestore``
    save and restore its state too.

    **Distribution.** Per-example losses are averaged with :func:`tf.nn.compute_average_loss` over
    the *global* batch (its size summed over the replicas, exact for a short last batch) and
    regularization losses are scaled with
    :func:`tf.nn.scale_regularization_loss`, so summing gradients over replicas gives the same
    update as one device with the whole batch.

    **Schedulers.** ``coefficient`` (λs, the student's KD weight), ``teacher_coefficient`` (λt)
    and ``temperature`` are non-trainable ``tf.Variable`` s, so
    :class:`tfqkd.callbacks.CoefficientScheduler` / ``TemperatureScheduler`` drive them as they
    drive a :class:`tfqkd.Distiller`. ``teacher_temperature`` is ``None`` (follow ``temperature``)
    or a variable of its own.

    **Metrics.** ``loss`` (student + teacher loss, what is minimised), ``student_loss``,
    ``teacher_loss``, ``student_accuracy``, ``teacher_accuracy``, ``coefficient``,
    ``teacher_coefficient``, ``temperature``. Calling the model returns the *student's* logits, so
    ``predict`` and exports use the student.

    Args:
        student: The (usually quantized) student, a Keras model producing logits.
        teacher: The float teacher, a Keras model producing logits for the same classes.
        temperature: τ > 0 used to soften both models' logits.
        student_coefficient: λs in [0, 1], the weight of the teacher's soft targets in the
            student's loss.
        teacher_coefficient: λt in [0, 1], the weight of the student's soft targets in the
            teacher's loss.
        soft_loss: ``"kl"``, ``"ce"``, ``"cosine"`` or a callable
            ``fn(target_probs, logits, temperature) -> (batch,)`` (see :func:`tfqkd.losses.get`).
        temperature_squared: Multiply the soft losses by τ². Default ``False``, the convention of
            :class:`tfqkd.Distiller` (the paper's Eq. 3 has no τ²; λ, τ are tuned against it),
            so that λ and τ mean the same thing in co-studying and tutoring.
        teacher_temperature: Optional separate τt for the teacher's soft loss.

    Example:
        >>> import numpy as np
        >>> import tfqkd
        >>> from tfqkd._keras import keras
        >>> s = tfqkd.models.tiny_resnet(10, seed=0)
        >>> t = tfqkd.models.tiny_resnet(10, width=2, seed=1)
        >>> cs = CoStudying(s, t, temperature=2.0, student_coefficient=0.5, teacher_coefficient=0.5)
        >>> cs.compile(optimizer=keras.optimizers.SGD(0.01))
        >>> x = np.random.rand(16, 8, 8, 1).astype("float32"); y = np.arange(16) % 10
        >>> logs = cs.fit(x, y, batch_size=8, epochs=1, verbose=0).history
        >>> sorted(k for k in logs if k.endswith("accuracy"))
        ['student_accuracy', 'teacher_accuracy']
    """

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model,
        *,
        temperature: float = 2.0,
        student_coefficient: float = 0.5,
        teacher_coefficient: float = 0.5,
        soft_loss: Union[str, Callable] = "kl",
        temperature_squared: bool = False,
        teacher_temperature: Optional[float] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(student, keras.Model) or not isinstance(teacher, keras.Model):
            raise TypeError(
                "CoStudying needs two tf_keras models (build them with `from tfqkd._keras import "
                f"keras`); got student={type(student).__name__}, teacher={type(teacher).__name__}."
            )
        if student is teacher:
            raise ValueError("student and teacher must be two different models (got the same one).")
        s_classes = _check_same_classes(student, teacher)
        from tfqkd.models import softmax_layer

        for role, model in (("student", student), ("teacher", teacher)):
            head = softmax_layer(model)
            if head is not None:
                # Co-studying trains both models on their logits; a softmax output would be
                # softened a second time. (tfqkd.Distiller, used for tutoring, handles it.)
                raise ValueError(
                    f"the {role} {model.name!r} ends in a softmax (layer {head!r}); co-studying "
                    f"needs logits: pass tfqkd.models.logits_model({role}) (the same variables "
                    "without the softmax) and keep the original model for saving.")
        self.student = student
        self.teacher = teacher
        self.num_classes = s_classes
        self.soft_loss = soft_loss
        self._soft_loss_fn = _resolve_soft_loss(soft_loss)
        self.temperature_squared = bool(temperature_squared)
        # add_weight (not tf.Variable) so that, under tf.distribute, a scheduler's assignment from
        # a callback is taken from the first replica instead of being summed over replicas.
        self.temperature = self._scalar("temperature", check_temperature(temperature))
        self.coefficient = self._scalar(
            "coefficient", check_coefficient(student_coefficient, "student_coefficient")
        )
        self.teacher_coefficient = self._scalar(
            "teacher_coefficient", check_coefficient(teacher_coefficient, "teacher_coefficient")
        )
        self.teacher_temperature = (
            None if teacher_temperature is None else self._scalar(
                "teacher_temperature",
                check_temperature(teacher_temperature, "teacher_temperature"),
            )
        )
        self.teacher_optimizer = None
        # What the last train step found non-finite (tfqkd.finite.CHECKS), for StopOnNonFinite.
        object.__setattr__(self, "non_finite_flags", _finite.new_flags_variable())
        mean = keras.metrics.Mean
        self._trackers = {
            name: mean(name=name)
            for name in ("loss", "student_loss", "teacher_loss", "student_accuracy",
                         "teacher_accuracy")
        }
        for name in ("coefficient", "teacher_coefficient", "temperature"):
            self._trackers[name] = _CurrentValue(name)
        # Both models exist, so all variables do: BackupAndRestore (which builds the optimizer of
        # a built model before restoring) and save_weights work before the first fit().
        self.built = True

    def _scalar(self, name: str, value: float) -> tf.Variable:
        return self.add_weight(
            name=name, shape=(), dtype=tf.float32, trainable=False,
            initializer=keras.initializers.Constant(value),
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    # -- Keras plumbing --------------------------------------------------------------------------
    @property
    def student_coefficient(self) -> tf.Variable:
        """Alias of :attr:`coefficient` (λs, what the shared CoefficientScheduler drives)."""
        return self.coefficient

    @property
    def metrics(self) -> List[keras.metrics.Metric]:
        return list(self._trackers.values())

    def compile(self, optimizer="sgd", teacher_optimizer=None, **kwargs):
        """Configures training: ``optimizer`` for both models, or also ``teacher_optimizer``.

        Losses and metrics are fixed by the co-studying objective, so ``loss`` and ``metrics``
        arguments are rejected rather than silently ignored.
        """
        for bad in ("loss", "metrics", "loss_weights", "weighted_metrics"):
            if kwargs.get(bad) is not None:
                raise ValueError(
                    f"CoStudying defines its own losses and metrics; remove `{bad}=` from "
                    "compile() (configure the objective with the constructor arguments)."
                )
        super().compile(optimizer=optimizer, **kwargs)
        if teacher_optimizer is not None:
            teacher_optimizer = keras.optimizers.get(teacher_optimizer)
            if teacher_optimizer is self.optimizer:
                raise ValueError(
                    "teacher_optimizer must be a different optimizer instance from `optimizer` "
                    "(omit it to update both models with one optimizer)."
                )
        self.teacher_optimizer = teacher_optimizer
        if teacher_optimizer is not None and callable(getattr(teacher_optimizer, "build", None)):
            # Built now over their own variable sets: BackupAndRestore builds an unbuilt main
            # optimizer over ALL trainable variables (student and teacher), which would give it
            # unused slots for the teacher. (The teacher optimizer is tracked as an attribute,
            # so checkpoints save and restore its slots either way.)
            teacher_optimizer.build(self.teacher.trainable_variables)
            if callable(getattr(self.optimizer, "build", None)):
                self.optimizer.build(self.student.trainable_variables)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    # -- the objective ---------------------------------------------------------------------------
    @staticmethod
    def _unpack(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError(
                "CoStudying trains on (images, labels) batches; the labels are missing."
            )
        return x, y, sample_weight

    @staticmethod
    def _hard_loss(y, logits):
        if y.shape.rank is not None and y.shape.rank == logits.shape.rank:
            return keras.losses.categorical_crossentropy(y, logits, from_logits=True)
        return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    @staticmethod
    def _correct(y, logits):
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        if y.shape.rank is not None and y.shape.rank == logits.shape.rank:
            labels = tf.argmax(y, axis=-1, output_type=tf.int32)
        else:
            labels = tf.cast(tf.reshape(y, [-1]), tf.int32)
        return tf.cast(tf.equal(predicted, labels), tf.float32)

    def _one_side(self, y, logits, other_logits, coefficient, temperature):
        """Per-example loss of one model given the other's (stopped) logits."""
        targets = tf.stop_gradient(tf.nn.softmax(tf.cast(other_logits, tf.float32) / temperature))
        soft = self._soft_loss_fn(targets, logits, temperature)
        if self.temperature_squared:
            soft = soft * tf.square(temperature)
        hard = self._hard_loss(y, logits)
        return (1.0 - coefficient) * hard + coefficient * soft

    def _compute(self, x, y, sample_weight, training):
        s_logits = tf.cast(self.student(x, training=training), tf.float32)
        t_logits = tf.cast(self.teacher(x, training=training), tf.float32)
        t_temp = self.temperature if self.teacher_temperature is None else self.teacher_temperature
        s_example = self._one_side(y, s_logits, t_logits, self.coefficient, self.temperature)
        t_example = self._one_side(y, t_logits, s_logits, self.teacher_coefficient, t_temp)
        s_reg = tf.add_n(self.student.losses) if self.student.losses else tf.constant(0.0)
        t_reg = tf.add_n(self.teacher.losses) if self.teacher.losses else tf.constant(0.0)
        return s_logits, t_logits, s_example, t_example, s_reg, t_reg

    def _update_metrics(self, y, sample_weight, s_logits, t_logits, s_example, t_example,
                        s_reg, t_reg):
        t = self._trackers
        s_total = s_example + s_reg
        t_total = t_example + t_reg
        t["student_loss"].update_state(s_total, sample_weight)
        t["teacher_loss"].update_state(t_total, sample_weight)
        t["loss"].update_state(s_total + t_total, sample_weight)
        t["student_accuracy"].update_state(self._correct(y, s_logits), sample_weight)
        t["teacher_accuracy"].update_state(self._correct(y, t_logits), sample_weight)
        t["coefficient"].update_state(self.coefficient)
        t["teacher_coefficient"].update_state(self.teacher_coefficient)
        t["temperature"].update_state(self.temperature)
        return {name: m.result() for name, m in t.items()}

    def train_step(self, data):
        x, y, sample_weight = self._unpack(data)
        student_vars = self.student.trainable_variables
        teacher_vars = self.teacher.trainable_variables
        with tf.GradientTape() as tape:
            s_logits, t_logits, s_ex, t_ex, s_reg, t_reg = self._compute(
                x, y, sample_weight, training=True
            )
            # Global-batch averages: correct under tf.distribute (gradients are summed over
            # replicas, so each replica divides by the global batch size).
            global_batch = global_batch_size(s_ex)
            s_loss = tf.nn.compute_average_loss(
                s_ex, sample_weight=sample_weight, global_batch_size=global_batch)
            t_loss = tf.nn.compute_average_loss(
                t_ex, sample_weight=sample_weight, global_batch_size=global_batch)
            s_loss += tf.nn.scale_regularization_loss(s_reg)
            t_loss += tf.nn.scale_regularization_loss(t_reg)
            # The stop-gradients make the two objectives independent: d(total)/d(student vars)
            # is d(student loss)/d(student vars), and the same for the teacher.
            total = s_loss + t_loss
        grads = tape.gradient(total, student_vars + teacher_vars)
        s_grads, t_grads = grads[: len(student_vars)], grads[len(student_vars):]

        def apply():
            if self.teacher_optimizer is None:
                self.optimizer.apply_gradients(zip(grads, student_vars + teacher_vars))
            else:
                self.optimizer.apply_gradients(zip(s_grads, student_vars))
                self.teacher_optimizer.apply_gradients(zip(t_grads, teacher_vars))

        # The update, unless the inputs, loss or gradients are not finite (checks recorded for
        # tfqkd.finite.StopOnNonFinite, with the weights after the update).
        _finite.guarded_update(self.non_finite_flags, x, total, grads,
                               student_vars + teacher_vars, apply)
        return self._update_metrics(y, sample_weight, s_logits, t_logits, s_ex, t_ex, s_reg, t_reg)

    def test_step(self, data):
        x, y, sample_weight = self._unpack(data)
        s_logits, t_logits, s_ex, t_ex, s_reg, t_reg = self._compute(
            x, y, sample_weight, training=False
        )
        return self._update_metrics(y, sample_weight, s_logits, t_logits, s_ex, t_ex, s_reg, t_reg)

    # -- serialization ---------------------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        if not isinstance(self.soft_loss, str):
            soft_loss = keras.saving.get_registered_name(self.soft_loss)
        else:
            soft_loss = self.soft_loss
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "temperature": float(self.temperature.numpy()),
            "student_coefficient": float(self.coefficient.numpy()),
            "teacher_coefficient": float(self.teacher_coefficient.numpy()),
            "soft_loss": soft_loss,
            "temperature_squared": self.temperature_squared,
            "teacher_temperature": (
                None if self.teacher_temperature is None
                else float(self.teacher_temperature.numpy())
            ),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        with _quantize_scope():
            student = keras.saving.deserialize_keras_object(
                config.pop("student"), custom_objects=custom_objects
            )
            teacher = keras.saving.deserialize_keras_object(
                config.pop("teacher"), custom_objects=custom_objects
            )
            soft_loss = config.pop("soft_loss", "kl")
            if isinstance(soft_loss, str) and soft_loss not in ("kl", "ce", "cosine"):
                registered = keras.saving.get_registered_object(soft_loss, custom_objects)
                soft_loss = registered or soft_loss
        return cls(student, teacher, soft_loss=soft_loss, **config)


def _quantize_scope():
    """tfqkd's quantize scope when available (deserialising quantized students needs it)."""
    try:
        from tfqkd.quantize import quantize_scope
    except ImportError:  # pragma: no cover - only before the quantize module exists
        return contextlib.nullcontext()
    return quantize_scope()
