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
from tfqkd.costudying import CoStudying, _check_same_classes
from tfqkd.distiller import Distiller, check_coefficient, check_temperature
from tfqkd.training import evaluate_accuracy, make_optimizer, read_history, write_history

__all__ = ["CoStudying", "run_qkd", "PHASES", "read_phase_state"]

#: The three QKD phases, in the order :func:`run_qkd` runs them.
PHASES = ("ss", "cs", "tu")
_PHASE_NAMES = {"ss": "self-studying", "cs": "co-studying", "tu": "tutoring"}
_STATE_FILE = "qkd_state.json"
_STATE_VERSION = 1


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
    _check_same_classes(student, teacher)
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
