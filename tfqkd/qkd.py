"""QKD: quantization-aware knowledge distillation in three phases (Kim et al. 2019).

QKD coordinates quantization and distillation instead of simply adding a KD loss to quantization-
aware training:

1. **Self-studying (SS)** fine-tunes the quantized student on the labels alone, so that it starts
   distillation from a good low-precision initialisation rather than from a float checkpoint whose
   accuracy collapsed when it was quantized.
2. **Co-studying (CS)** trains the float teacher *together with* the quantized student
   (:class:`CoStudying`): each learns the labels and the other's softened outputs. The teacher
   thereby drifts towards functions the low-precision student can represent (it becomes
   "quantization-friendly") and typically ends stronger than a fixed teacher.
3. **Tutoring (TU)** freezes the co-studied teacher and distils it into the student with the
   ordinary :class:`tfqkd.Distiller`.

:func:`run_qkd` runs the three phases with their own epoch budgets; given an ``output_dir`` every
phase is resumable: a killed run restarted with the same arguments skips the phases it completed and
resumes *inside* the interrupted one.

Example:
    >>> import tfqkd
    >>> from tfqkd._keras import keras
    >>> student = tfqkd.models.tiny_resnet(10, seed=0)
    >>> teacher = tfqkd.models.tiny_resnet(10, width=2, seed=1)
    >>> cs = CoStudying(student, teacher, temperature=2.0, student_coefficient=0.5,
    ...                 teacher_coefficient=0.5)
    >>> cs.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    >>> float(cs.temperature.numpy()), float(cs.coefficient.numpy())
    (2.0, 0.5)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from tfqkd import finite as _finite
from tfqkd._io import atomic_write
from tfqkd._keras import keras, tf
from tfqkd.distiller import Distiller, _CurrentValue, check_coefficient, check_temperature
from tfqkd.training import (evaluate_accuracy, global_batch_size, make_optimizer, read_history,
                            write_history)

__all__ = ["CoStudying", "run_qkd", "PHASES", "read_phase_state"]

#: The three QKD phases, in the order :func:`run_qkd` runs them.
PHASES = ("ss", "cs", "tu")
_PHASE_NAMES = {"ss": "self-studying", "cs": "co-studying", "tu": "tutoring"}
_STATE_FILE = "qkd_state.json"
_STATE_VERSION = 1


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
        s_classes, t_classes = _num_classes(student, "student"), _num_classes(teacher, "teacher")
        if s_classes != t_classes:
            raise ValueError(
                f"class-count mismatch: the student outputs {s_classes} logits and the teacher "
                f"{t_classes}; build both for the same number of classes."
            )
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


# ---------------------------------------------------------------------------------------------
# The three-phase pipeline
# ---------------------------------------------------------------------------------------------
def _atomic_write_json(path: str, payload: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=True, default=_json_default))


def _json_default(value):
    if hasattr(value, "numpy"):
        value = value.numpy()
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_phase_state(output_dir: str) -> Optional[Dict[str, Any]]:
    """Returns the phase-state record :func:`run_qkd` keeps in ``output_dir``, or ``None``.

    The record (``output_dir/qkd_state.json``) holds ``current`` (the phase being run, or
    ``"done"``), per-phase ``status`` (``pending``/``running``/``done``), ``epochs`` (budget),
    ``epochs_done`` and ``result``, and an ``events`` list with one entry per phase start or
    resume (``{"phase": "cs", "event": "resume", "epoch": 3, ...}``).

    Example:
        >>> read_phase_state("/nonexistent") is None
        True
    """
    path = os.path.join(output_dir, _STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _default_optimizer(phase: str) -> keras.optimizers.Optimizer:
    return make_optimizer("sgd", 0.01)


def _check_epochs(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0 skips the phase), got {value!r}.")
    return int(value)


def _accuracy(model: keras.Model, dataset, steps: Optional[int]) -> Optional[float]:
    """Top-1 accuracy on ``dataset`` (inference mode), or ``None`` without a validation set."""
    return None if dataset is None else evaluate_accuracy(model, dataset, steps)


#: Per phase: the validation log keys of the student's and the teacher's accuracy.
_VAL_KEYS = {
    "ss": ("val_accuracy", None),
    "cs": ("val_student_accuracy", "val_teacher_accuracy"),
    "tu": ("val_accuracy", None),
}


class _PhaseTracker(keras.callbacks.Callback):
    """Records phase starts/resumes and finished epochs in the phase-state file and the history.

    Placed after ``BackupAndRestore`` in the callback list so that, with ``save_freq="epoch"``,
    ``epochs_done`` is written only once the backup of that epoch exists. (With an integer
    ``save_freq`` the backup is taken every N steps and may lag ``epochs_done``; a resume starts
    from the backup, whatever ``epochs_done`` says.)
    ``history_<phase>.csv`` is rewritten atomically after every epoch; on resume the rows of the
    epochs being re-run are dropped first, so the file never holds duplicates or gaps.
    """

    def __init__(self, run: "_QKDRun", phase: str):
        super().__init__()
        self._run, self._phase, self._seen_first = run, phase, False
        self._rows: List[Dict[str, Any]] = []

    def on_epoch_begin(self, epoch, logs=None):
        if not self._seen_first:
            self._seen_first = True
            self._run.event(self._phase, "resume" if epoch > 0 else "start", epoch=int(epoch))
            self._rows = [r for r in self._run.read_history(self._phase)
                          if int(float(r["epoch"])) < epoch]

    def on_epoch_end(self, epoch, logs=None):
        row: Dict[str, Any] = {"epoch": int(epoch)}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        self._rows.append(row)
        self._run.write_history(self._phase, self._rows)
        self._run.update_phase(self._phase, epochs_done=int(epoch) + 1)


class _QKDRun:
    """Phase state, per-phase weights and checkpoint directories of one :func:`run_qkd` call."""

    def __init__(self, output_dir: Optional[str], budgets: Mapping[str, int]):
        self.output_dir = output_dir
        self.budgets = dict(budgets)
        self.state: Dict[str, Any] = {
            "version": _STATE_VERSION,
            "current": PHASES[0],
            "phases": {
                p: {"name": _PHASE_NAMES[p], "status": "pending", "epochs": budgets[p],
                    "epochs_done": 0, "result": None}
                for p in PHASES
            },
            "events": [],
        }
        if output_dir is None:
            return
        os.makedirs(output_dir, exist_ok=True)
        previous = read_phase_state(output_dir)
        if previous is None:
            self.save()
            return
        if previous.get("version") != _STATE_VERSION:
            raise ValueError(
                f"{os.path.join(output_dir, _STATE_FILE)} has version {previous.get('version')!r}, "
                f"this tfqkd writes version {_STATE_VERSION}; use a new output_dir."
            )
        for p in PHASES:
            old = previous["phases"][p]
            if old["status"] == "done" and old["epochs"] != budgets[p]:
                raise ValueError(
                    f"output_dir {output_dir!r} holds a QKD run whose {_PHASE_NAMES[p]} phase "
                    f"finished with {p}_epochs={old['epochs']}, but {p}_epochs={budgets[p]} was "
                    f"asked for; rerun with {p}_epochs={old['epochs']} or use a new output_dir."
                )
            if old["status"] != "done":
                old["epochs"] = budgets[p]
        self.state = previous

    # -- state file ------------------------------------------------------------------------------
    def save(self) -> None:
        if self.output_dir is not None:
            _atomic_write_json(os.path.join(self.output_dir, _STATE_FILE), self.state)

    def event(self, phase: str, kind: str, **extra) -> None:
        self.state["events"].append(
            {"phase": phase, "event": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        )
        self.save()

    def update_phase(self, phase: str, **fields) -> None:
        self.state["phases"][phase].update(fields)
        self.save()

    def history_path(self, phase: str) -> str:
        return os.path.join(self.output_dir, f"history_{phase}.csv")

    def read_history(self, phase: str) -> List[Dict[str, str]]:
        return read_history(self.history_path(phase))

    def write_history(self, phase: str, rows: Sequence[Mapping[str, Any]]) -> None:
        write_history(self.history_path(phase), rows)

    def done(self, phase: str) -> bool:
        return self.state["phases"][phase]["status"] == "done"

    # -- directories -----------------------------------------------------------------------------
    def backup_dir(self, phase: str) -> Optional[str]:
        if self.output_dir is None:
            return None
        return os.path.join(self.output_dir, "checkpoints", phase)

    def weights_dir(self, phase: str) -> str:
        return os.path.join(self.output_dir, "phases", phase)

    # -- end-of-phase weights --------------------------------------------------------------------
    def save_weights(self, phase: str, student: keras.Model, teacher: keras.Model) -> None:
        """Writes both models' weights for ``phase`` and swaps the directory into place."""
        if self.output_dir is None:
            return
        final = self.weights_dir(phase)
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{phase}-", dir=parent)
        try:
            tf.train.Checkpoint(student=student, teacher=teacher).write(os.path.join(tmp, "ckpt"))
            if os.path.exists(final):  # left by a run killed between this point and the state
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def restore_weights(self, phase: str, student: keras.Model, teacher: keras.Model) -> None:
        path = os.path.join(self.weights_dir(phase), "ckpt")
        if not tf.io.gfile.exists(path + ".index"):
            raise FileNotFoundError(
                f"the phase-state file says {_PHASE_NAMES[phase]} finished, but its weights "
                f"{path}.* are missing; delete {self.output_dir!r} (or its {_STATE_FILE}) to start "
                "over."
            )
        status = tf.train.Checkpoint(student=student, teacher=teacher).read(path)
        status.assert_existing_objects_matched()


def _phase_callbacks(callbacks, phase: str) -> List[keras.callbacks.Callback]:
    if callbacks is None:
        return []
    if callable(callbacks) and not isinstance(callbacks, keras.callbacks.Callback):
        return list(callbacks(phase) or [])
    if isinstance(callbacks, Mapping):
        return list(callbacks.get(phase, []))
    return list(callbacks)


def run_qkd(
    student: keras.Model,
    teacher: keras.Model,
    train_ds: "tf.data.Dataset",
    val_ds: Optional["tf.data.Dataset"] = None,
    *,
    ss_epochs: int,
    cs_epochs: int,
    tu_epochs: int,
    output_dir: Optional[str] = None,
    temperature: float = 2.0,
    student_coefficient: float = 0.5,
    teacher_coefficient: float = 0.5,
    tu_coefficient: float = 0.5,
    tu_coefficient_schedule: str = "constant",
    tu_coefficient_end: float = 0.0,
    soft_loss: Union[str, Callable] = "kl",
    temperature_squared: bool = False,
    optimizer: Optional[Callable[[str], Any]] = None,
    teacher_optimizer: Optional[Callable[[], Any]] = None,
    steps_per_epoch: Optional[int] = None,
    validation_steps: Optional[int] = None,
    save_freq: Union[str, int] = "epoch",
    validation_freq: int = 1,
    callbacks: Union[None, Sequence[keras.callbacks.Callback],
                     Mapping[str, Sequence[keras.callbacks.Callback]],
                     Callable[[str], Sequence[keras.callbacks.Callback]]] = None,
    strategy: Optional[tf.distribute.Strategy] = None,
    verbose: int = 0,
) -> Dict[str, Dict[str, Any]]:
    """Runs QKD's self-studying, co-studying and tutoring phases on ``student`` and ``teacher``.

    * **SS** (``ss_epochs``): the student alone, cross-entropy on the labels.
    * **CS** (``cs_epochs``): :class:`CoStudying` with ``temperature``, ``student_coefficient``
      and ``teacher_coefficient``; the teacher is trained too.
    * **TU** (``tu_epochs``): :class:`tfqkd.Distiller` from the now fixed teacher with λ =
      ``tu_coefficient``, or, with ``tu_coefficient_schedule="linear"`` (the toolkit's coefficient
      reducing, CR), λ moved from ``tu_coefficient`` to ``tu_coefficient_end`` over the phase by
      :class:`tfqkd.callbacks.CoefficientScheduler` (also ``"cosine"``, ``"step"``).

    A budget of 0 skips that phase. The models are trained in place: afterwards ``student`` is the
    QKD student (export it) and ``teacher`` the co-studied teacher.

    **Resuming.** With ``output_dir`` each phase backs up to ``output_dir/checkpoints/<phase>``
    every epoch (``keras.callbacks.BackupAndRestore``); a finished phase writes both models'
    weights to ``output_dir/phases/<phase>`` (atomically: written aside, then renamed) and then
    marks itself ``done`` in ``output_dir/qkd_state.json`` (written atomically, see
    :func:`read_phase_state`). Calling ``run_qkd`` again with freshly built models and the same
    arguments loads the last finished phase's weights, skips the finished phases and resumes the
    interrupted phase from its last epoch. Each phase's epoch logs go to
    ``output_dir/history_<phase>.csv``.

    Args:
        student: The student, normally quantized (``tfqkd.quantize_model``), producing logits.
        teacher: The float teacher (ideally trained), producing logits for the same classes.
        train_ds: ``(images, labels)`` batches. ``val_ds``: optional validation batches; each
            phase's result then holds the student's (and teacher's) validation accuracy.
        ss_epochs, cs_epochs, tu_epochs: Epoch budgets of the three phases (>= 0).
        output_dir: Where the phase state, backups, weights and histories go (``None``: no
            resuming).
        optimizer: ``fn(phase) -> optimizer`` giving each phase a fresh optimizer (in CS it updates
            both models unless ``teacher_optimizer`` is given). Default: SGD, learning rate 0.01,
            Nesterov momentum 0.9.
        teacher_optimizer: Optional ``fn() -> optimizer`` for the teacher in CS.
        steps_per_epoch, validation_steps: Passed to ``fit`` (and bound the evaluation).
        validation_freq: Validate on ``val_ds`` every this many epochs during ``fit``; 0: only
            evaluate the student (and, after co-studying, the teacher) at the end of each phase.
        save_freq: ``BackupAndRestore`` frequency: ``"epoch"`` or every N training steps (then a
            kill mid-epoch resumes at that step).
        callbacks: Extra callbacks: one list for all phases, a ``{phase: list}`` mapping, or
            ``fn(phase) -> list`` (called once per phase, so stateful callbacks are fresh).
        strategy: Optional ``tf.distribute`` strategy; the models must have been built inside its
            scope.
        verbose: ``fit`` verbosity.

    Returns:
        ``{"ss": {...}, "cs": {...}, "tu": {...}}``: per phase ``epochs`` (budget),
        ``epochs_done``, ``seconds`` spent in this call, ``student_accuracy`` and (when
        ``val_ds`` is given) ``teacher_accuracy`` after the phase, and the last epoch's logs
        (``logs``).

    Example:
        >>> import numpy as np, tensorflow as tf
        >>> import tfqkd
        >>> s = tfqkd.models.tiny_resnet(10, seed=0); t = tfqkd.models.tiny_resnet(10, seed=1)
        >>> x = np.random.rand(32, 8, 8, 1).astype("float32"); y = np.arange(32) % 10
        >>> ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        >>> r = run_qkd(s, t, ds, ds, ss_epochs=1, cs_epochs=1, tu_epochs=1)
        >>> sorted(r)
        ['cs', 'ss', 'tu']
    """
    budgets = {p: _check_epochs(f"{p}_epochs", e)
               for p, e in zip(PHASES, (ss_epochs, cs_epochs, tu_epochs))}
    check_temperature(temperature)
    for name, value in (("student_coefficient", student_coefficient),
                        ("teacher_coefficient", teacher_coefficient),
                        ("tu_coefficient", tu_coefficient),
                        ("tu_coefficient_end", tu_coefficient_end)):
        check_coefficient(value, name)
    if tu_coefficient_schedule not in ("constant", "linear", "cosine", "step"):
        raise ValueError(
            f"tu_coefficient_schedule must be constant, linear (coefficient reducing), cosine or "
            f"step, got {tu_coefficient_schedule!r}."
        )
    if train_ds is None:
        raise ValueError("train_ds is missing: pass a tf.data.Dataset of (images, labels) batches.")
    s_classes, t_classes = _num_classes(student, "student"), _num_classes(teacher, "teacher")
    if s_classes != t_classes:
        raise ValueError(
            f"class-count mismatch: the student outputs {s_classes} logits and the teacher "
            f"{t_classes}; build both for the same number of classes."
        )
    if isinstance(validation_freq, bool) or int(validation_freq) != validation_freq \
            or validation_freq < 0:
        raise ValueError(
            f"validation_freq must be an integer >= 0 (0: evaluate only at the end of each "
            f"phase), got {validation_freq!r}."
        )
    make_optimizer = optimizer or _default_optimizer
    scope = strategy.scope if strategy is not None else contextlib.nullcontext
    run = _QKDRun(output_dir, budgets)

    finished = [p for p in PHASES if run.done(p)]
    if finished:
        # Later phases start from the last finished phase's student *and* teacher.
        run.restore_weights(finished[-1], student, teacher)

    results: Dict[str, Dict[str, Any]] = {}
    teacher_accuracy: Optional[float] = None  # the teacher's, as of the last finished phase
    for phase in PHASES:
        if run.done(phase):
            results[phase] = dict(run.state["phases"][phase]["result"] or {}, skipped_now=True)
            teacher_accuracy = results[phase].get("teacher_accuracy")
            continue
        run.state["current"] = phase
        run.update_phase(phase, status="running")
        started = time.time()
        logs: Dict[str, Any] = {}
        if budgets[phase] > 0:
            with scope():
                model, extra = _build_phase(
                    phase, student, teacher, make_optimizer, teacher_optimizer,
                    temperature=temperature, student_coefficient=student_coefficient,
                    teacher_coefficient=teacher_coefficient, tu_coefficient=tu_coefficient,
                    tu_coefficient_schedule=tu_coefficient_schedule,
                    tu_coefficient_end=tu_coefficient_end, soft_loss=soft_loss,
                    temperature_squared=temperature_squared,
                )
            phase_callbacks = [_finite.StopOnNonFinite(), *extra, *_phase_callbacks(callbacks, phase)]
            if output_dir is not None:
                # First in the list: the restore happens before any other callback starts, and
                # the backup of an epoch is written before the tracker records that epoch.
                # The backup is kept when fit returns (a kill before the phase is marked done
                # then resumes with zero epochs left); it is deleted once the phase is done.
                phase_callbacks = [
                    keras.callbacks.BackupAndRestore(
                        run.backup_dir(phase), save_freq=save_freq, delete_checkpoint=False
                    ),
                    _PhaseTracker(run, phase),
                ] + phase_callbacks
            history = model.fit(
                train_ds, validation_data=val_ds if validation_freq else None,
                validation_freq=validation_freq or 1,
                epochs=budgets[phase],
                steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                callbacks=phase_callbacks, verbose=verbose,
            )
            logs = {k: float(v[-1]) for k, v in history.history.items() if v}
        # The last epoch's validation logs already hold the accuracies after the phase; only
        # what fit did not measure is evaluated (the teacher is unchanged outside co-studying).
        student_acc = logs.get(_VAL_KEYS[phase][0])
        if student_acc is None:
            student_acc = _accuracy(student, val_ds, validation_steps)
        teacher_acc = logs.get(_VAL_KEYS[phase][1]) if _VAL_KEYS[phase][1] else None
        if teacher_acc is None:
            # Co-studying trains the teacher: without validation logs it is measured again (the
            # figure carried from before the phase would be the untrained teacher's).
            carried = teacher_accuracy if phase != "cs" else None
            teacher_acc = carried if carried is not None else _accuracy(
                teacher, val_ds, validation_steps)
        teacher_accuracy = teacher_acc
        result = {
            "phase": _PHASE_NAMES[phase],
            "epochs": budgets[phase],
            "epochs_done": budgets[phase],
            "seconds": round(time.time() - started, 3),
            "student_accuracy": student_acc,
            "teacher_accuracy": teacher_acc,
            "logs": logs,
        }
        run.save_weights(phase, student, teacher)
        run.update_phase(phase, status="done", epochs_done=budgets[phase], result=result)
        run.event(phase, "done")
        if output_dir is not None:
            shutil.rmtree(run.backup_dir(phase), ignore_errors=True)
        results[phase] = result
    run.state["current"] = "done"
    run.save()
    return results


def _build_phase(phase, student, teacher, make_optimizer, teacher_optimizer, *, temperature,
                 student_coefficient, teacher_coefficient, tu_coefficient,
                 tu_coefficient_schedule, tu_coefficient_end, soft_loss, temperature_squared):
    """The model ``fit`` trains in ``phase``, compiled, plus the phase's own callbacks."""
    extra: List[keras.callbacks.Callback] = []
    if phase == "ss":
        student.trainable = True
        # A functional view of the student shares its layers but owns the SS optimizer, so the
        # optimizer does not stay attached to (and in every later checkpoint of) the student.
        if getattr(student, "_is_graph_network", False):
            model = keras.Model(student.inputs, student.outputs, name="self_studying")
        else:
            model = student
        model.compile(
            optimizer=make_optimizer("ss"),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        return model, extra
    if phase == "cs":
        student.trainable = True
        teacher.trainable = True  # a teacher frozen for plain KD must learn again here
        model = CoStudying(
            student, teacher, temperature=temperature, student_coefficient=student_coefficient,
            teacher_coefficient=teacher_coefficient, soft_loss=soft_loss,
            temperature_squared=temperature_squared, name="co_studying",
        )
        model.compile(
            optimizer=make_optimizer("cs"),
            teacher_optimizer=teacher_optimizer() if teacher_optimizer is not None else None,
        )
        return model, extra
    # Tutoring: the co-studied teacher is fixed; the ordinary Distiller does the rest.

    student.trainable = True
    teacher.trainable = False
    model = Distiller(
        student, teacher, temperature=temperature, coefficient=tu_coefficient,
        soft_loss=soft_loss, temperature_squared=temperature_squared,
    )
    model.compile(
        optimizer=make_optimizer("tu"),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    if tu_coefficient_schedule != "constant":
        from tfqkd.callbacks import CoefficientScheduler

        extra.append(CoefficientScheduler(
            tu_coefficient_schedule, start=tu_coefficient, end=tu_coefficient_end
        ))
    return model, extra
