"""Crash-safe keras-tuner projects: every project file is replaced whole or not at all.

keras-tuner writes ``oracle.json``, each ``trial_<id>/trial.json`` and ``<tuner_id>.json`` by
truncating the file and then writing it. A process killed (or a disk filling up) between the
two leaves an empty or partial file, and the next run's reload of the project fails with a JSON
error: the finished trials are lost with it. The search recipes resume killed projects, so
both tuners (:class:`tfqkd.tuning.DistillationTuner`, :class:`tfqkd.search.BitWidthTuner`)
write these files through :func:`tfqkd._io.atomic_write` instead: a temporary file in the same
directory, flushed, then renamed over the old one. The file contents are keras-tuner's own
(``get_state()`` as JSON), so keras-tuner reloads them unchanged.

The same ordering leaves one more hole: ``create_trial`` writes the new ``trial.json`` before
``oracle.json``, and a kill between the two leaves a trial that never runs but takes its id;
``end_trial`` writes ``oracle.json`` while the finished trial is still listed as running, and a
kill right after it trains that trial again. The crash-safe oracle's ``reload`` mends both
(:meth:`CrashSafeOracleSaves.reload`).

The oracle is extended the way keras-tuner's own oracles extend ``Oracle``: a subclass
overriding ``save`` and ``_save_trial``. :func:`crash_safe_oracle` gives a caller's oracle that
subclass of its own class, so any oracle (random, Bayesian, Hyperband, a user's) keeps its
search logic.

Example:
    >>> import keras_tuner, os, tempfile
    >>> oracle = crash_safe_oracle(keras_tuner.oracles.RandomSearchOracle(
    ...     objective="val_accuracy", max_trials=2))
    >>> type(oracle).__name__, isinstance(oracle, keras_tuner.oracles.RandomSearchOracle)
    ('CrashSafeRandomSearchOracle', True)
    >>> oracle._set_project_dir(tempfile.mkdtemp(), "demo")
    >>> oracle.save(); sorted(os.listdir(oracle._project_dir))
    ['oracle.json']
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Type

from tfqkd._io import atomic_write

__all__ = ["CrashSafeOracleSaves", "CrashSafeTunerSaves", "crash_safe_oracle"]


class CrashSafeOracleSaves:
    """Oracle mixin: ``oracle.json`` and each ``trial.json`` written atomically, and a reload
    that neither loses a trial nor trains a finished one again (see :meth:`reload`)."""

    def save(self) -> None:
        atomic_write(self._get_oracle_fname(), json.dumps(self.get_state()))

    def _save_trial(self, trial) -> None:
        path = os.path.join(self._get_trial_dir(trial.trial_id), "trial.json")
        atomic_write(path, json.dumps(trial.get_state()))

    def reload(self) -> None:
        # keras-tuner's create_trial writes the new trial's trial.json, then oracle.json. A
        # kill between the two leaves a RUNNING trial that oracle.json does not list: it is in
        # neither the ongoing trials (which reload sends for retry) nor the start order, so it
        # never runs, and its id is taken, so the next trial gets the id after it (CI saw a
        # resumed search with trials 0, 1 and 3). Dropping it rolls the project back to
        # oracle.json, whose seed state then draws the same trial again under the same id;
        # its trial.json is overwritten then. Such a trial never reached run_trial, which
        # starts only after oracle.json is written.
        super().reload()
        started = set(self.start_order)
        for trial_id in [t for t in self.trials if t not in started]:
            del self.trials[trial_id]
        # end_trial writes oracle.json before it takes the trial off the ongoing ones (the
        # tuner's save right after writes it again). A kill in between leaves a finished trial,
        # already in the end order, that reload sends for retry: it would train again.
        ended = set(self.end_order)
        self._retry_queue = [t for t in self._retry_queue
                             if not (t in ended and self.trials[t].status == "COMPLETED")]


_SUBCLASSES: Dict[type, Type[Any]] = {}


def crash_safe_oracle(oracle: Any) -> Any:
    """``oracle``, now an instance of a subclass of its class with atomic saves.

    The subclass adds no state (only the two save methods and the reload), so the object and
    its search are unchanged. An oracle already crash-safe is returned as it is, and so is one
    whose class writes its files itself (it overrides ``save`` or ``_save_trial``): its own
    writing is kept.
    """
    from keras_tuner import Oracle

    cls = type(oracle)
    if isinstance(oracle, CrashSafeOracleSaves) or not isinstance(oracle, Oracle) or \
            cls.save is not Oracle.save or cls._save_trial is not Oracle._save_trial:
        return oracle
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"CrashSafe{cls.__name__}", (CrashSafeOracleSaves, cls),
                                {"__module__": __name__})
    oracle.__class__ = _SUBCLASSES[cls]
    return oracle


class CrashSafeTunerSaves:
    """Tuner mixin: the oracle (see :func:`crash_safe_oracle`) and ``<tuner_id>.json`` written
    atomically. List it before ``keras_tuner.Tuner`` among the bases and pass the oracle through
    :func:`crash_safe_oracle` before ``Tuner.__init__`` sees it."""

    def save(self) -> None:
        # keras-tuner's BaseTuner.save, with atomic writes: a distributed worker's oracle is a
        # gRPC client of the chief, which saves the project itself.
        if not self._is_worker():
            self.oracle.save()
        atomic_write(self._get_tuner_fname(), json.dumps(self.get_state()))
