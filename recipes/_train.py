"""Training with resume: :func:`fit_with_resume` (``model.fit`` with ``BackupAndRestore``,
TensorBoard scalars, ``history.csv`` and a progress display), its callbacks and
:func:`evaluate_accuracy` (``tfqkd.training``'s, re-exported). Part of :mod:`recipes.common`.

Example:
    >>> import os, tempfile
    >>> logger = HistoryLogger(os.path.join(tempfile.mkdtemp(), "history.csv"))
    >>> logger.rows
    []
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from recipes._output import OutputDir
from recipes._util import log

from tfqkd._keras import keras, tf
from tfqkd.finite import StopOnNonFinite
from tfqkd.training import evaluate_accuracy, read_history, write_history

__all__ = ["fit_with_resume", "evaluate_accuracy", "HistoryLogger", "EpochLogger",
           "ScalarSummaries"]

# --------------------------------------------------------------------------------------------
# Training with resume
# --------------------------------------------------------------------------------------------

def _current_lr(model) -> Optional[float]:
    """The learning rate of the optimizer's next step; None only for a model without optimizer.

    A failure to read it raises (it used to be swallowed, silently dropping ``lr`` from history).
    """
    opt = getattr(model, "optimizer", None)
    if opt is None:
        return None
    # tf_keras' optimizer shows a schedule as the variable of its last step; the schedule itself
    # gives the rate of the next one (what the epoch-end row means).
    lr = getattr(opt, "_learning_rate", None)
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        return float(lr(opt.iterations))
    return float(keras.backend.get_value(opt.learning_rate))


def _extra_state(model) -> Dict[str, Any]:
    """Values read from the model at epoch end: lr, optimizer iterations, λ and τ."""
    out: Dict[str, Any] = {}
    opt = getattr(model, "optimizer", None)
    if opt is not None:
        out["iterations"] = int(keras.backend.get_value(opt.iterations))
    lr = _current_lr(model)
    if lr is not None:
        out["lr"] = lr
    for attr, key in (("coefficient", "end_coefficient"), ("temperature", "end_temperature")):
        v = getattr(model, attr, None)
        if isinstance(v, tf.Variable):
            out[key] = float(v.numpy())
    return out


class HistoryLogger(keras.callbacks.Callback):
    """Keeps ``history.csv``: one row per epoch, rewritten atomically after every epoch.

    On resume it drops rows of epochs that are being re-run (a kill after the checkpoint but
    before the row, or the reverse, never leaves a duplicate or a gap). Columns: ``epoch``
    (0-based), every Keras log, plus ``lr``, ``iterations`` (optimizer steps so far),
    ``end_coefficient`` / ``end_temperature`` (λ, τ at epoch end, when the model has them),
    ``epoch_time_s``.
    """

    def __init__(self, path: str, *, write: bool = True):
        super().__init__()
        self.path = path
        self.write = write
        self.rows: List[Dict[str, Any]] = []
        self._t0 = time.time()
        self._trimmed = False

    def on_train_begin(self, logs=None):
        self.rows = read_history(self.path)
        self._trimmed = False

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()
        if not self._trimmed:
            self.rows = [r for r in self.rows if int(float(r["epoch"])) < epoch]
            self._trimmed = True

    def on_epoch_end(self, epoch, logs=None):
        row: Dict[str, Any] = {"epoch": epoch}
        for k, v in (logs or {}).items():
            row[k] = float(v) if hasattr(v, "__float__") else v
        row.update(_extra_state(self.model))
        row["epoch_time_s"] = round(time.time() - self._t0, 3)
        self.rows.append(row)
        if self.write:
            write_history(self.path, self.rows)


class EpochLogger(keras.callbacks.Callback):
    """Prints one concise line per epoch (used when stdout is not a terminal)."""

    def __init__(self, epochs: int, name: str = ""):
        super().__init__()
        self.epochs = epochs
        self.name = name
        self._t0 = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        parts = [f"{self.name} epoch {epoch + 1}/{self.epochs}", f"{time.time() - self._t0:.1f}s"]
        for k, v in (logs or {}).items():
            parts.append(f"{k}={float(v):.4g}")
        st = _extra_state(self.model)
        if "lr" in st:
            parts.append(f"lr={st['lr']:.4g}")
        if "end_coefficient" in st and "coefficient" not in (logs or {}):
            parts.append(f"lambda={st['end_coefficient']:.4g}")
        log(" ".join(parts))


class ScalarSummaries(keras.callbacks.Callback):
    """Writes every epoch log (and lr, λ, τ) as TensorBoard scalars under ``log_dir``.

    TensorFlow 2.21 no longer ships the ``tensorboard`` package that Keras' ``TensorBoard``
    callback (``tf.summary.scalar``) needs, so this writes the same event records with the
    core op ``tf.summary.write`` and the ``scalars`` plugin tag: TensorBoard shows them as usual.
    ``train/`` holds training logs, ``validation/`` the ``val_*`` ones; the step is the epoch.
    """

    def __init__(self, log_dir: str, *, write: bool = True):
        super().__init__()
        self.log_dir = log_dir
        self.write = write
        self._writers: Dict[str, Any] = {}
        from tensorflow.core.framework import summary_pb2

        self._meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    def _writer(self, sub: str):
        if sub not in self._writers:
            self._writers[sub] = tf.summary.create_file_writer(os.path.join(self.log_dir, sub))
        return self._writers[sub]

    def on_epoch_end(self, epoch, logs=None):
        if not self.write:
            return
        values = dict(logs or {})
        values.update({k: v for k, v in _extra_state(self.model).items() if k != "iterations"})
        groups: Dict[str, Dict[str, float]] = {"train": {}, "validation": {}}
        for k, v in values.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if k.startswith("val_"):
                groups["validation"][k[4:]] = v
            else:
                groups["train"][k] = v
        for sub, vals in groups.items():
            if not vals:
                continue
            w = self._writer(sub)
            with w.as_default():
                for k, v in vals.items():
                    tf.summary.write("epoch_" + k, tf.constant(v, tf.float32), step=epoch,
                                     metadata=self._meta)
            w.flush()

    def on_train_end(self, logs=None):
        for w in self._writers.values():
            w.close()
        self._writers = {}


class _ResumeNotice(keras.callbacks.Callback):
    """Logs where a resumed run restarts (whatever the progress display)."""

    def __init__(self, epochs: int, name: str = ""):
        super().__init__()
        self.epochs = epochs
        self.name = name
        self._first = True

    def on_train_begin(self, logs=None):
        self._first = True
        state = getattr(self.model, "_training_state", None)  # set by BackupAndRestore
        if state is not None:
            try:
                e = int(keras.backend.get_value(state._ckpt_saved_epoch))
                b = int(keras.backend.get_value(state._ckpt_saved_batch))
            except Exception:  # private Keras state: only used for this message
                e = b = -1
            if e >= 0:
                log(f"{self.name}: restored checkpoint (epoch {e + 1}, step {b + 1}); resuming")

    def on_epoch_begin(self, epoch, logs=None):
        if self._first and epoch > 0:
            log(f"{self.name}: resuming at epoch {epoch + 1}/{self.epochs}")
        self._first = False


class _ProgressRecorder(keras.callbacks.Callback):
    def __init__(self, out: OutputDir):
        super().__init__()
        self.out = out

    def on_epoch_end(self, epoch, logs=None):
        self.out.record_progress()


def fit_with_resume(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: Optional[tf.data.Dataset],
    epochs: int,
    output_dir: OutputDir,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    *,
    save_freq: Any = "epoch",
    progress: str = "auto",
    validation_freq: int = 1,
    name: str = "",
) -> List[Dict[str, Any]]:
    """``model.fit`` wired for crash-safe, resumable training; returns the full history rows.

    Adds, in this order: ``BackupAndRestore(output_dir/checkpoints/backup)`` (resume state:
    weights, optimizer, epoch, step; kept after training), ``ScalarSummaries(output_dir/logs)`` (TensorBoard scalars), the
    caller's callbacks (e.g. a ``CoefficientScheduler``), :class:`HistoryLogger` (history.csv,
    chief only), and a progress display: the Keras bar if ``progress`` is ``bar`` (or ``auto``
    and stdout is a terminal), else one :class:`EpochLogger` line per epoch (chief only).

    Example (a second call after a kill continues where the first stopped)::

        fit_with_resume(model, data.train, data.test, 30, OutputDir("runs/x"), save_freq=50)
    """
    chief = output_dir.chief
    sf = save_freq if save_freq == "epoch" else int(save_freq)
    opt = getattr(model, "optimizer", None)
    # Build the optimizer before BackupAndRestore restores, so slot variables (momentum) restore
    # immediately instead of being silently re-initialised.
    if opt is not None and not getattr(opt, "_built", True) and model.trainable_variables:
        with model.distribute_strategy.scope():
            opt.build(model.trainable_variables)
    cbs: List[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(
            os.path.join(output_dir.checkpoint_dir, "backup"), save_freq=sf,
            delete_checkpoint=False),
        # Raises at the first NaN/inf step, before the epoch's checkpoint or any result is written.
        StopOnNonFinite(),
        ScalarSummaries(output_dir.log_dir, write=chief),
        *callbacks,
    ]
    history = HistoryLogger(output_dir.history_path, write=chief)
    cbs.append(history)
    cbs.append(_ProgressRecorder(output_dir))
    if progress == "auto":
        progress = "bar" if sys.stdout.isatty() else "line"
    verbose = 1 if (progress == "bar" and chief) else 0
    if chief:
        cbs.append(_ResumeNotice(epochs, name or model.name))
        if progress == "line":
            cbs.append(EpochLogger(epochs, name or model.name))
    fit_kw: Dict[str, Any] = {}
    if val_ds is not None and validation_freq and validation_freq > 0:
        fit_kw = dict(validation_data=val_ds, validation_freq=int(validation_freq))
    model.fit(train_ds, epochs=epochs, callbacks=cbs, verbose=verbose, **fit_kw)
    return history.rows
