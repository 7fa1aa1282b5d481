"""Crash-safe keras-tuner projects: every project file is replaced whole or not at all.

keras-tuner writes ``oracle.json``, each ``trial_<id>/trial.json`` and ``<tuner_id>.json`` by
truncating the file and then writing it. A process killed (or a disk filling up) between the
two leaves an empty or partial file, and the next run's reload of the project fails with a JSON
error: the finished trials are lost with it. The search recipes resume killed projects, so
both tuners (:class:`tfqkd.tuning.DistillationTuner`, :class:`tfqkd.search.BitWidthTuner`)
write these files through :func:`tfqkd._io.atomic_write` instead: a temporary file in the same
directory, flushed, then renamed over the old one. The file contents are keras-tuner's own
(``get_state()`` as JSON), so keras-tuner reloads them unchanged.

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
    """Oracle mixin: ``oracle.json`` and each ``trial.json`` written atomically."""

    def save(self) -> None:
        atomic_write(self._get_oracle_fname(), json.dumps(self.get_state()))

    def _save_trial(self, trial) -> None:
        path = os.path.join(self._get_trial_dir(trial.trial_id), "trial.json")
        atomic_write(path, json.dumps(trial.get_state()))


_SUBCLASSES: Dict[type, Type[Any]] = {}


def crash_safe_oracle(oracle: Any) -> Any:
    """``oracle``, now an instance of a subclass of its class with atomic saves.

    The subclass adds no state (only the two save methods), so the object and its search are
    unchanged. An oracle already crash-safe is returned as it is, and so is one whose class
    writes its files itself (it overrides ``save`` or ``_save_trial``): its own writing is kept.
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
