"""Resume-safe schedules for the distillation coefficient lambda and the temperature tau.

:class:`CoefficientScheduler` sets ``model.coefficient`` and :class:`TemperatureScheduler` sets
``model.temperature`` (any model with such a ``tf.Variable``: :class:`tfqkd.Distiller`, SPEQ, QKD's
co-studying model) before every step (``per="batch"``) or epoch (``per="epoch"``).

Progress is not counted by the callback: it is read from the optimizer's iteration counter, which
checkpoints and ``keras.callbacks.BackupAndRestore`` save and restore with the model, so a run
resumed after an interruption continues the schedule where it stopped instead of restarting it.
With ``T`` total steps (``params["steps"] * params["epochs"]`` of ``fit``, or ``total_steps=``)
the value at the step whose counter is ``i`` is ``schedule(progress)`` with
``progress = i / (T - 1)``: exactly ``start`` at the first step and exactly ``end`` at the last.

Schedules: ``"constant"`` (``start``), ``"linear"`` (the paper's coefficient reducing, CR / GSLR:
lambda 0.5 -> 0 over the whole training), ``"cosine"`` (half cosine from ``start`` to ``end``),
``"step"`` (equal jumps from ``start`` to ``end`` at the fractions ``boundaries``) or any callable
``f(progress in [0, 1]) -> value``.

With ``compile(steps_per_execution=k)`` Keras calls batch hooks once per k steps, so the value
changes every k steps (still resume-safe: it is computed from the counter).

The current value is added to the epoch and batch ``logs`` (so History, CSVLogger and TensorBoard
callbacks placed AFTER the scheduler record it; the Distiller also logs both values itself) and,
per step, written as a ``tf.summary`` scalar when a summary writer is active (e.g. inside
``keras.callbacks.TensorBoard(update_freq=...)`` training).

Example:
    >>> import numpy as np, tfqkd
    >>> from tfqkd import keras
    >>> d = tfqkd.Distiller(tfqkd.models.tiny_resnet(seed=1), tfqkd.models.tiny_resnet(seed=2))
    >>> d.compile(keras.optimizers.SGD(0.01))
    >>> x = np.random.rand(32, 8, 8, 1).astype("float32"); y = np.arange(32) % 10
    >>> cr = CoefficientScheduler("linear", start=0.5, end=0.0)
    >>> h = d.fit(x, y, batch_size=8, epochs=2, callbacks=[cr], verbose=0)
    >>> float(d.coefficient.numpy())
    0.0
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Union

from tensorflow.core.framework import summary_pb2

from tfqkd._keras import keras, tf
from tfqkd.distiller import check_coefficient, check_temperature

__all__ = ["CoefficientScheduler", "TemperatureScheduler", "schedule_value"]

Schedule = Union[str, Callable[[float], float]]
_NAMES = ("constant", "linear", "cosine", "step")


def schedule_value(schedule: Schedule, progress: float, start: float, end: float,
                   boundaries: Sequence[float] = (0.5,)) -> float:
    """The value of ``schedule`` at ``progress`` in [0, 1] (clipped).

    Example:
        >>> schedule_value("linear", 0.25, 0.5, 0.0)
        0.375
        >>> schedule_value("step", 0.6, 1.0, 0.0, boundaries=(0.5,))
        0.0
    """
    p = min(1.0, max(0.0, float(progress)))
    if callable(schedule):
        return float(schedule(p))
    if schedule == "constant":
        return float(start)
    # Exact end points (start + (end - start) * 1 is not always `end` in floating point).
    if p == 0.0 and schedule in ("linear", "cosine"):
        return float(start)
    if p == 1.0 and schedule in ("linear", "cosine", "step"):
        return float(end)
    if schedule == "linear":
        return float(start + (end - start) * p)
    if schedule == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p)))
    if schedule == "step":
        passed = sum(1 for b in boundaries if p >= b)
        return float(start + (end - start) * passed / len(boundaries))
    raise ValueError(f"Unknown schedule {schedule!r}: use one of {_NAMES} or a callable "
                     "f(progress in [0, 1]) -> value.")


def _write_scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar summary written with core TF ops.

    ``tf.summary.scalar`` lives in the ``tensorboard`` package, which TensorFlow 2.21 no longer
    installs; ``tf.summary.write`` with the scalar plugin's metadata writes the same record.
    """
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step,
                     metadata=metadata.SerializeToString())


class _VariableScheduler(keras.callbacks.Callback):
    """Sets ``model.<attribute>`` from a schedule of the training progress (see module docs)."""

    attribute = ""  # "coefficient" or "temperature"

    def __init__(
        self,
        schedule: Schedule = "linear",
        start: float = 0.5,
        end: float = 0.0,
        *,
        per: str = "batch",
        total_steps: Optional[int] = None,
        start_step: int = 0,
        boundaries: Sequence[float] = (0.5,),
        log_name: Optional[str] = None,
        verbose: int = 0,
    ):
        super().__init__()
        if not (callable(schedule) or schedule in _NAMES):
            raise ValueError(f"Unknown schedule {schedule!r}: use one of {_NAMES} or a callable "
                             "f(progress in [0, 1]) -> value.")
        if per not in ("batch", "epoch"):
            raise ValueError(f"per must be 'batch' or 'epoch', got {per!r}.")
        if total_steps is not None and (int(total_steps) != total_steps or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}.")
        if int(start_step) != start_step or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}.")
        boundaries = tuple(float(b) for b in boundaries)
        if schedule == "step" and (not boundaries or any(not 0.0 < b <= 1.0 for b in boundaries)
                                   or list(boundaries) != sorted(boundaries)):
            raise ValueError(
                f"boundaries must be increasing progress fractions in (0, 1], got {boundaries!r}.")
        self.schedule = schedule
        self.start = self._check(start, "start")
        self.end = self._check(end, "end")
        self.per = per
        self.total_steps = None if total_steps is None else int(total_steps)
        self.start_step = int(start_step)
        self.boundaries = boundaries
        self.log_name = log_name or self.attribute
        self.verbose = verbose
        self.current: Optional[float] = None

    # subclasses validate the values they may set
    def _check(self, value, what):  # pragma: no cover - overridden
        raise NotImplementedError

    # ---- progress ------------------------------------------------------------------------
    def _variable(self) -> tf.Variable:
        var = getattr(self.model, self.attribute, None)
        if not isinstance(var, tf.Variable):
            raise ValueError(
                f"{type(self).__name__} sets `model.{self.attribute}`, but the model "
                f"{self.model.name!r} has no such tf.Variable. Use it with tfqkd.Distiller (or a "
                f"model that defines a non-trainable `{self.attribute}` variable)."
            )
        return var

    def _steps_per_epoch(self) -> Optional[int]:
        steps = (self.params or {}).get("steps")
        return int(steps) if steps else None

    def _total(self) -> int:
        if self.total_steps is not None:
            return self.total_steps
        steps = self._steps_per_epoch()
        epochs = (self.params or {}).get("epochs")
        if not steps or not epochs:
            raise ValueError(
                f"{type(self).__name__} cannot tell the number of training steps (fit's steps per "
                "epoch is unknown, e.g. a dataset of unknown cardinality): pass "
                "total_steps=steps_per_epoch * epochs, or give fit(steps_per_epoch=...)."
            )
        return int(steps) * int(epochs)

    def _iterations(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError(f"{type(self).__name__} needs a compiled model (its optimizer's "
                             "iteration counter is the schedule's clock).")
        return int(optimizer.iterations.numpy())

    def progress(self, step: Optional[int] = None) -> float:
        """Training progress in [0, 1] at optimizer step ``step`` (default: the current one)."""
        step = (self._iterations() if step is None else int(step)) - self.start_step
        step = max(0, step)
        total = self._total()
        if self.per == "epoch":
            epochs_given = (self.params or {}).get("epochs") or 1
            spe = self._steps_per_epoch() or max(1, total // max(1, epochs_given))
            epochs = max(1, total // spe)
            return min(1.0, (step // spe) / max(1, epochs - 1))
        return min(1.0, step / max(1, total - 1))

    def value_at(self, progress: float) -> float:
        """The scheduled value at ``progress`` (validated)."""
        value = schedule_value(self.schedule, progress, self.start, self.end, self.boundaries)
        return self._check(value, f"{self.log_name} scheduled at progress {progress:.4f}")

    # ---- hooks ---------------------------------------------------------------------------
    def _apply(self) -> None:
        step = self._iterations()
        value = self.value_at(self.progress(step))
        self._variable().assign(value)
        self.current = value

    def on_train_begin(self, logs=None):
        self._variable()  # fail before the first step if the model has no such variable
        self._total()
        self._apply()

    def on_epoch_begin(self, epoch, logs=None):
        if self.per == "epoch":
            self._apply()
            if self.verbose:
                print(f"\nEpoch {epoch + 1}: {type(self).__name__} sets {self.attribute} to "
                      f"{self.current:.6g}.")

    def on_train_batch_begin(self, batch, logs=None):
        if self.per == "batch":
            self._apply()

    def on_train_batch_end(self, batch, logs=None):
        if self.current is None:
            return
        if logs is not None:
            logs[self.log_name] = self.current
        # The Keras TensorBoard callback keeps its train writer as the default during fit and
        # decides (record_if) which steps to record; write where and when it would.
        if tf.summary.should_record_summaries():
            # Logged at the step that used the value: the counter has moved past it by now.
            _write_scalar(f"batch_{self.log_name}", self.current, max(0, self._iterations() - 1))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.current is not None:
            logs[self.log_name] = self.current

    def get_config(self) -> Dict[str, Any]:
        return {
            "schedule": self.schedule, "start": self.start, "end": self.end, "per": self.per,
            "total_steps": self.total_steps, "start_step": self.start_step,
            "boundaries": list(self.boundaries),
            "log_name": self.log_name, "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.utils.register_keras_serializable(package="tfqkd")
class CoefficientScheduler(_VariableScheduler):
    """Schedules the distillation coefficient lambda (``model.coefficient``).

    Args:
        schedule: ``"constant"``, ``"linear"`` (default: the paper's CR), ``"cosine"``, ``"step"``
            or a callable ``f(progress) -> lambda``.
        start: lambda at the first step, in [0, 1] (default 0.5).
        end: lambda at the last step, in [0, 1] (default 0.0).
        per: ``"batch"`` (update before every step) or ``"epoch"`` (constant within an epoch:
            progress ``epoch / (epochs - 1)``).
        total_steps: Training length in optimizer steps; default ``steps * epochs`` from ``fit``.
            Give it when you call ``fit`` several times for one schedule, or for datasets of
            unknown length.
        start_step: The optimizer step at which the schedule starts (progress 0), for an
            optimizer that has already taken steps in an earlier phase. Default 0.
        boundaries: For ``"step"``: progress fractions where lambda jumps one equal step.
        log_name: Key in ``logs`` (default ``"coefficient"``).
        verbose: With ``per="epoch"``, print the value set at each epoch.

    Example:
        >>> cr = CoefficientScheduler("linear", start=0.5, end=0.0)
        >>> cr.value_at(0.0), cr.value_at(0.5), cr.value_at(1.0)
        (0.5, 0.25, 0.0)
    """

    attribute = "coefficient"

    def _check(self, value, what):
        return check_coefficient(value, f"CoefficientScheduler {what}")


@keras.utils.register_keras_serializable(package="tfqkd")
class TemperatureScheduler(_VariableScheduler):
    """Schedules the temperature tau (``model.temperature``); same arguments as
    :class:`CoefficientScheduler`, with values > 0 (defaults: linear from 4.0 to 1.0).

    Example:
        >>> ts = TemperatureScheduler("cosine", start=4.0, end=1.0)
        >>> ts.value_at(0.0), ts.value_at(1.0)
        (4.0, 1.0)
    """

    attribute = "temperature"

    def __init__(self, schedule: Schedule = "linear", start: float = 4.0, end: float = 1.0,
                 **kwargs):
        super().__init__(schedule, start, end, **kwargs)

    def _check(self, value, what):
        return check_temperature(value, f"TemperatureScheduler {what}")
