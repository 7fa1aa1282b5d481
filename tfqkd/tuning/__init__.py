"""Hyper-parameter search for quantized distillation: a keras-tuner ``Tuner``, grid sweeps, plots.

One trial = one quantized student distilled from one teacher with one set of hyper-parameters.
A trial is described by a plain ``dict`` (a *config*) with the keys of :data:`HYPERPARAMETERS`::

    {"temperature": 4.0, "coefficient": 0.5, "schedule": "linear", "teacher": "2",
     "weight_bits": 2, "activation_bits": None}

``schedule="linear"`` is coefficient reducing (CR): λ goes linearly from ``coefficient`` to 0 over
training; ``"constant"`` keeps λ fixed. ``teacher`` is a key of a :class:`TeacherPool` (a width
such as ``"1.5"`` whose teacher is trained once and cached, a saved model path, or any name the
pool was given); ``"none"`` trains the quantized student on hard labels only (the baseline).

:func:`run_trial_config` trains and evaluates one config. Both search front-ends call it:

- :class:`DistillationTuner`, a ``keras_tuner.Tuner`` whose ``run_trial`` returns the metrics, so
  every keras-tuner oracle (random search, Bayesian optimisation, Hyperband) drives it, projects
  resume from their directory, and keras-tuner's chief/worker mode distributes it;
- :func:`run_grid`, an exhaustive sweep that appends one CSV row per finished trial and skips the
  configs already in the CSV, so an interrupted sweep continues where it stopped.

The plotting functions draw the paper's figures from those CSV rows (accuracy vs teacher width,
one line per τ, hard-label baseline; the same with and without CR; a τ × teacher heat map).

The package, one concept per module: :mod:`~tfqkd.tuning.config` (a trial's config: columns,
validation, key), :mod:`~tfqkd.tuning.trials` (trial data, the teacher pool, one trial),
:mod:`~tfqkd.tuning.results` (the CSV with its lock, the grid), :mod:`~tfqkd.tuning.tuner`
(the keras-tuner front-end), :mod:`~tfqkd.tuning.crash_safe` (keras-tuner's project files
written atomically), :mod:`~tfqkd.tuning.plots` (the figures). Every public name is
importable from ``tfqkd.tuning`` itself.

Example:
    >>> configs = grid_configs(temperatures=[1, 4], teachers=["1", "2"], schedules=["constant"])
    >>> len(configs), sorted({c["temperature"] for c in configs})
    (4, [1.0, 4.0])
"""

from __future__ import annotations

from tfqkd.tuning.config import _teacher_key  # noqa: F401  (tests and callers use it)
from tfqkd.tuning.config import (HYPERPARAMETERS, METRICS, NO_TEACHER, SCHEDULES, config_key,
                                 normalize_config)
from tfqkd.tuning.crash_safe import CrashSafeOracleSaves, CrashSafeTunerSaves, crash_safe_oracle
from tfqkd.tuning.plots import (plot_accuracy_vs_teacher, plot_cr_comparison, plot_heatmap,
                                plot_results, save_figure)
from tfqkd.tuning.results import append_result, grid_configs, read_results, run_grid
from tfqkd.tuning.trials import _default_builder, _load_model  # noqa: F401  (tests use them)
from tfqkd.tuning.trials import ModelBuilder, OptimizerArg  # noqa: F401  (type aliases it had)
from tfqkd.tuning.trials import (TeacherPool, TrialData, ensemble_members, evaluate_accuracy,
                                 make_trial_data, pretrain_student, run_trial_config,
                                 train_classifier)
from tfqkd.tuning.tuner import DistillationSearchSpace, DistillationTuner, make_oracle

__all__ = [
    "HYPERPARAMETERS",
    "METRICS",
    "SCHEDULES",
    "TrialData",
    "make_trial_data",
    "TeacherPool",
    "ensemble_members",
    "train_classifier",
    "pretrain_student",
    "NO_TEACHER",
    "normalize_config",
    "config_key",
    "run_trial_config",
    "evaluate_accuracy",
    "grid_configs",
    "run_grid",
    "read_results",
    "append_result",
    "DistillationSearchSpace",
    "DistillationTuner",
    "make_oracle",
    "crash_safe_oracle",
    "CrashSafeOracleSaves",
    "CrashSafeTunerSaves",
    "plot_accuracy_vs_teacher",
    "plot_cr_comparison",
    "plot_heatmap",
    "save_figure",
    "plot_results",
]
