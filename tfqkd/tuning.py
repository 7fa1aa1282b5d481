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

Example:
    >>> configs = grid_configs(temperatures=[1, 4], teachers=["1", "2"], schedules=["constant"])
    >>> len(configs), sorted({c["temperature"] for c in configs})
    (4, [1.0, 4.0])
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._io import atomic_path, atomic_write
from tfqkd._keras import keras, tf
from tfqkd.finite import StopOnNonFinite
from tfqkd.training import OptimizerArg, evaluate_accuracy
from tfqkd.training import load_model as _load_model
from tfqkd.training import make_optimizer as _make_optimizer

__all__ = [
    "HYPERPARAMETERS",
    "METRICS",
    "SCHEDULES",
    "TrialData",
    "make_trial_data",
    "TeacherPool",
    "train_classifier",
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
    "plot_accuracy_vs_teacher",
    "plot_cr_comparison",
    "plot_heatmap",
    "save_figure",
    "plot_results",
]

#: Columns that identify a trial (the hyper-parameters), in CSV order.
HYPERPARAMETERS: Tuple[str, ...] = (
    "temperature", "coefficient", "schedule", "teacher", "weight_bits", "activation_bits",
    "epochs",
)
#: Columns a finished trial reports.
METRICS: Tuple[str, ...] = ("val_accuracy", "test_accuracy", "teacher_accuracy", "wall_time")
#: Coefficient schedules: fixed λ, or coefficient reducing (λ linear from its value to 0).
SCHEDULES: Tuple[str, ...] = ("constant", "linear")
#: Teacher key of the hard-label baseline (no distillation).
NO_TEACHER = "none"

_DEFAULTS: Dict[str, Any] = {
    "temperature": 1.0, "coefficient": 0.5, "schedule": "constant", "teacher": NO_TEACHER,
    "weight_bits": 2, "activation_bits": None, "epochs": 1,
}


# --------------------------------------------------------------------------------------------
# Small utilities


def _teacher_key(value: Any) -> str:
    """Canonical teacher key: widths as ``f"{w:g}"`` (``2.0`` → ``"2"``), anything else as text."""
    if value is None:
        return NO_TEACHER
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{float(value):g}"
    text = str(value).strip()
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _teacher_width(key: str) -> Optional[float]:
    try:
        return float(key)
    except (TypeError, ValueError):
        return None


def _optional_int(value: Any) -> Optional[int]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return int(float(value))


def normalize_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Validates a trial config and fills in defaults, returning a new dict with canonical types.

    Raises:
        ValueError: naming the bad value and the accepted range (τ ≤ 0, λ outside [0, 1], an
            unknown schedule, a bit-width outside 1..8, epochs < 1).

    Example:
        >>> normalize_config({"temperature": "4", "teacher": 2.0})["teacher"]
        '2'
        >>> normalize_config({"temperature": 0})
        Traceback (most recent call last):
        ...
        ValueError: temperature must be > 0 (e.g. 1, 2, 4, 10), got 0.0.
    """
    unknown = set(config) - set(_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown trial config keys {sorted(unknown)}; accepted keys are {list(_DEFAULTS)}."
        )
    cfg = dict(_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if v is not None or k == "activation_bits"})
    cfg["temperature"] = float(cfg["temperature"])
    if not cfg["temperature"] > 0:
        raise ValueError(
            f"temperature must be > 0 (e.g. 1, 2, 4, 10), got {cfg['temperature']!r}."
        )
    cfg["coefficient"] = float(cfg["coefficient"])
    if not 0.0 <= cfg["coefficient"] <= 1.0:
        raise ValueError(
            f"coefficient λ must be in [0, 1] (0 = hard labels only, 1 = soft targets only), "
            f"got {cfg['coefficient']!r}."
        )
    cfg["schedule"] = str(cfg["schedule"]).strip().lower()
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(
            f"schedule must be one of {SCHEDULES} ('linear' = coefficient reducing), "
            f"got {cfg['schedule']!r}."
        )
    cfg["teacher"] = _teacher_key(cfg["teacher"])
    cfg["weight_bits"] = int(float(cfg["weight_bits"]))
    if not 1 <= cfg["weight_bits"] <= 8:
        raise ValueError(f"weight_bits must be in 1..8, got {cfg['weight_bits']!r}.")
    cfg["activation_bits"] = _optional_int(cfg["activation_bits"])
    if cfg["activation_bits"] is not None and not 1 <= cfg["activation_bits"] <= 8:
        raise ValueError(
            f"activation_bits must be None (float activations) or in 1..8, "
            f"got {cfg['activation_bits']!r}."
        )
    cfg["epochs"] = int(float(cfg["epochs"]))
    if cfg["epochs"] < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg['epochs']!r}.")
    return cfg


def config_key(config: Mapping[str, Any]) -> Tuple[str, ...]:
    """A hashable identity of a config (or of a CSV row): equal keys = the same trial.

    Example:
        >>> config_key({"temperature": 4, "teacher": "2.0"}) == config_key(
        ...     {"temperature": "4.0", "teacher": 2})
        True
    """
    cfg = normalize_config({k: config[k] for k in HYPERPARAMETERS if k in config})
    return tuple(
        "none" if cfg[k] is None else (f"{cfg[k]:g}" if isinstance(cfg[k], float) else str(cfg[k]))
        for k in HYPERPARAMETERS
    )


# --------------------------------------------------------------------------------------------
# Data and teachers


@dataclasses.dataclass
class TrialData:
    """The data every trial trains and evaluates on.

    Attributes:
        train: Batches of ``(images, labels)`` for training (augmented, shuffled).
        validation: Batches the tuner's objective (``val_accuracy``) is measured on.
        test: Batches ``test_accuracy`` is measured on (what the paper's figures plot).
        num_classes: Number of classes.
        input_shape: Shape of one image.
        name: Data set name, for reports.
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    num_classes: int
    input_shape: Tuple[int, ...]
    name: str = "custom"

    def steps_per_epoch(self) -> int:
        """Number of training batches per epoch (counted once if the pipeline does not know)."""
        n = int(self.train.cardinality())
        if n < 0:
            n = sum(1 for _ in self.train)
        return n


def make_trial_data(
    name: str = "digits",
    *,
    batch_size: int = 64,
    data_dir: Optional[str] = None,
    subset: Optional[int] = None,
    validation_split: str = "test",
    seed: int = 0,
) -> TrialData:
    """Loads a data set through :func:`tfqkd.data.load_dataset` for tuning.

    Args:
        name: ``digits``, ``cifar10`` or ``cifar100``.
        batch_size: Batch size of every split.
        data_dir: Offline data location (see :mod:`tfqkd.data`).
        subset: Use only this many training examples (quick sweeps).
        validation_split: Split the objective is measured on. The built-in sets have only
            ``train`` and ``test``, so by default validation accuracy is measured on the test
            split; pass another split name when your data has one.
        seed: Shuffling / augmentation seed.

    Example:
        >>> data = make_trial_data("digits", batch_size=32)  # doctest: +SKIP
        >>> data.num_classes, data.input_shape  # doctest: +SKIP
        (10, (8, 8, 1))
    """
    from tfqkd import data as data_lib

    info = data_lib.dataset_info(name)
    common = dict(data_dir=data_dir, batch_size=batch_size)
    train = data_lib.load_dataset(name, "train", subset=subset, seed=seed, **common)
    test = data_lib.load_dataset(name, "test", augment=False, shuffle=False, **common)
    if validation_split == "test":
        validation = test
    else:
        validation = data_lib.load_dataset(
            name, validation_split, augment=False, shuffle=False, **common
        )
    info_get = info.get if isinstance(info, Mapping) else (lambda k: getattr(info, k))
    return TrialData(
        train=train, validation=validation, test=test,
        num_classes=int(info_get("num_classes")),
        input_shape=tuple(int(d) for d in info_get("input_shape")), name=name,
    )


def _default_builder(num_classes: int, input_shape: Sequence[int], width: float = 1,
                     seed: Optional[int] = None) -> keras.Model:
    """ResNet20 family for CIFAR-sized inputs, the tiny family for small (digits) inputs."""
    from tfqkd import models

    if min(input_shape[:2]) < 16:
        return models.tiny_resnet(num_classes, input_shape, width=width, seed=seed)
    return models.wide_resnet20(width, num_classes, input_shape, seed=seed)


ModelBuilder = Callable[..., keras.Model]


def train_classifier(
    model: keras.Model, data: TrialData, *, epochs: int = 1, learning_rate: float = 1e-2,
    optimizer: OptimizerArg = "adam", verbose: int = 0,
) -> keras.Model:
    """Trains a float model on hard labels (how :class:`TeacherPool` trains teachers).

    Example:
        >>> teacher = train_classifier(_default_builder(10, (8, 8, 1), width=2, seed=0),
        ...                            make_trial_data("digits"), epochs=3)  # doctest: +SKIP
    """
    model.compile(
        optimizer=_make_optimizer(optimizer, learning_rate, data.steps_per_epoch(), epochs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(data.train, epochs=epochs, verbose=verbose, callbacks=[StopOnNonFinite()])
    return model


class TeacherPool:
    """Teachers by key: given models, saved model paths, builders, or widths trained on demand.

    ``get(key)`` resolves, in order: an entry of ``teachers`` (a model is used as is, a string is
    a saved-model path, a callable builds an untrained model that is then trained); an existing
    path; a number, read as a width and built with ``builder(num_classes, input_shape,
    width=w, seed=...)`` (by default WRN20xw, or the tiny family on small inputs), then trained.
    Trained teachers are saved atomically to ``cache_dir/teacher_<key>.keras`` and loaded from
    there next time, so a sweep trains each teacher once, across runs and across the processes of
    a distributed search.

    Example:
        >>> pool = TeacherPool(cache_dir="/tmp/teachers", epochs=1)  # doctest: +SKIP
        >>> teacher = pool.get("1.5", data)  # trains WRN20x1.5 once, then loads it  # doctest: +SKIP
    """

    def __init__(
        self,
        teachers: Optional[Mapping[Any, Union[keras.Model, str, os.PathLike, Callable]]] = None,
        *,
        builder: Optional[ModelBuilder] = None,
        cache_dir: Optional[str] = None,
        epochs: int = 1,
        learning_rate: float = 1e-2,
        optimizer: OptimizerArg = "adam",
        seed: int = 0,
        verbose: int = 0,
        loader: Optional[Callable[[str], keras.Model]] = None,
    ):
        self._given = {_teacher_key(k): v for k, v in (teachers or {}).items()}
        self.builder = builder or _default_builder
        self.cache_dir = cache_dir
        self.epochs = int(epochs)
        self.learning_rate = float(learning_rate)
        self.optimizer = optimizer
        self.seed = seed
        self.verbose = verbose
        self.loader = loader or _load_model
        self._models: Dict[str, keras.Model] = {}
        self._accuracy: Dict[str, float] = {}
        #: Keys whose teacher this pool trained (not loaded); tests read it to check caching.
        self.trained: List[str] = []

    def keys(self) -> List[str]:
        """Keys given explicitly (width keys are resolved on demand and not listed)."""
        return list(self._given)

    def _cache_path(self, key: str) -> Optional[str]:
        if not self.cache_dir:
            return None
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        return os.path.join(self.cache_dir, f"teacher_{safe}.h5")

    def _train_and_cache(self, key: str, model: keras.Model, data: TrialData) -> keras.Model:
        train_classifier(model, data, epochs=self.epochs, learning_rate=self.learning_rate,
                         optimizer=self.optimizer, verbose=self.verbose)
        self.trained.append(key)
        path = self._cache_path(key)
        if path:
            with atomic_path(path) as tmp:
                # HDF5: saves in about a second where a SavedModel takes 10+ s for ResNet20.
                model.save(tmp, save_format="h5", include_optimizer=False)
        return model

    def get(self, key: Any, data: Optional[TrialData] = None) -> keras.Model:
        """Returns the teacher for ``key`` (training it on ``data`` the first time if needed)."""
        key = _teacher_key(key)
        if key == NO_TEACHER:
            raise ValueError("teacher 'none' is the hard-label baseline: it has no teacher model.")
        if key in self._models:
            return self._models[key]
        cached = self._cache_path(key)
        given = self._given.get(key)
        if isinstance(given, keras.Model):
            model = given
        elif isinstance(given, (str, os.PathLike)):
            model = self.loader(os.fspath(given))
        elif cached and os.path.exists(cached):
            model = self.loader(cached)
            if data is not None:
                self._check_fits(key, model, data, cached)
        elif given is not None and callable(given):
            model = self._train_and_cache(key, given(), self._need(data, key))
        elif os.path.exists(key):
            model = self.loader(key)
        elif _teacher_width(key) is not None:
            data = self._need(data, key)
            width = _teacher_width(key)
            if width <= 0:
                raise ValueError(f"teacher width must be > 0, got {key!r}.")
            model = self.builder(data.num_classes, data.input_shape, width=width, seed=self.seed)
            model = self._train_and_cache(key, model, data)
        else:
            raise ValueError(
                f"unknown teacher {key!r}: give a width (e.g. 1, 1.5, 2), a saved model path that "
                f"exists, or one of the pool's keys {self.keys()}."
            )
        self._models[key] = model
        return model

    @staticmethod
    def _check_fits(key: str, model: keras.Model, data: TrialData, path: str) -> None:
        # The cache is keyed by width only: a teacher cached for another data set must not be
        # used silently.
        expected_in = tuple(data.input_shape)
        got_in = tuple(model.input_shape[1:])
        got_out = model.output_shape[-1]
        if got_in != expected_in or got_out != data.num_classes:
            raise ValueError(
                f"the cached teacher {key!r} ({path}) takes {got_in} inputs and predicts {got_out} "
                f"classes, but the data has {expected_in} inputs and {data.num_classes} classes: "
                f"delete {path} (or use another cache_dir / output_dir) to train it afresh."
            )

    def accuracy(self, key: Any, data: TrialData) -> float:
        """Test accuracy of a teacher (computed once per key)."""
        key = _teacher_key(key)
        if key not in self._accuracy:
            self._accuracy[key] = evaluate_accuracy(self.get(key, data), data.test)
        return self._accuracy[key]

    @staticmethod
    def _need(data: Optional[TrialData], key: str) -> TrialData:
        if data is None:
            raise ValueError(f"teacher {key!r} must be trained first: pass the TrialData to get().")
        return data


# --------------------------------------------------------------------------------------------
# One trial


def _coefficient_scheduler(start: float, total_epochs: int, steps_per_epoch: int):
    """λ linear from ``start`` to 0 over ``total_epochs`` (coefficient reducing)."""
    from tfqkd.callbacks import CoefficientScheduler

    return CoefficientScheduler(
        "linear", start=start, end=0.0, total_steps=max(1, total_epochs * steps_per_epoch)
    )


# Quantizing a model (cloning it into tfmot wrappers) costs seconds, more than a short trial
# trains: trials whose float student is the same (same architecture and initial weights: its
# config, seeds included, and its weights) reuse one quantized model, reset to its initial weights
# (quantizer state included), which is exactly what quantizing it again would produce.
_STUDENTS: Dict[Tuple[Any, ...], Tuple[keras.Model, List[np.ndarray]]] = {}
_STUDENT_CACHE_SIZE = 4


def _quantized_student(builder, data: TrialData, cfg: Mapping[str, Any], seed: int,
                       reuse: bool) -> keras.Model:
    from tfqkd.quantize import quantize_model

    float_student = builder(data.num_classes, data.input_shape, seed=seed)
    key = None
    if reuse:
        import hashlib

        digest = hashlib.sha256()
        for w in float_student.get_weights():
            digest.update(np.ascontiguousarray(w).tobytes())
        key = (json.dumps(float_student.get_config(), sort_keys=True, default=str),
               digest.hexdigest(), cfg["weight_bits"], cfg["activation_bits"])
        if key in _STUDENTS:
            student, initial = _STUDENTS[key]
            student.set_weights(initial)
            return student
    student = quantize_model(
        float_student, weight_bits=cfg["weight_bits"], activation_bits=cfg["activation_bits"]
    )
    if reuse:
        while len(_STUDENTS) >= _STUDENT_CACHE_SIZE:
            _STUDENTS.pop(next(iter(_STUDENTS)))
        _STUDENTS[key] = (student, student.get_weights())
    return student


# Tracing the training step of a new model costs seconds, again more than a short trial trains:
# trials with the same quantized student, teacher and optimizer recipe reuse one compiled model
# (its traced step), with τ and λ assigned and the optimizer reset to its initial state.
_MODELS: Dict[Tuple[Any, ...], Tuple[keras.Model, Any, List[np.ndarray], Tuple[Any, ...]]] = {}
_MODEL_CACHE_SIZE = 8


def _compiled_model(student, teacher, cfg, optimizer, learning_rate, steps, schedule_epochs,
                    reuse: bool) -> keras.Model:
    key = (id(student), id(teacher), id(optimizer) if callable(optimizer) else optimizer,
           float(learning_rate), int(steps), int(schedule_epochs))
    # The value keeps the keyed objects alive, so their ids cannot be reused by other objects.
    cached = _MODELS.get(key) if reuse else None
    if cached is not None and all(a is b or (isinstance(a, str) and a == b)
                                  for a, b in zip(cached[3], (student, teacher, optimizer))):
        model, opt, initial, _ = cached
        for variable, value in zip(opt.variables, initial):
            variable.assign(value)
    else:
        opt = _make_optimizer(optimizer, learning_rate, steps, schedule_epochs)
        if teacher is None:
            model = student
            model.compile(optimizer=opt,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        else:
            from tfqkd.distiller import Distiller

            model = Distiller(student, teacher, temperature=cfg["temperature"],
                              coefficient=cfg["coefficient"])
            model.compile(optimizer=opt)
        # Build the optimizer's slots now, to record the state a fresh optimizer starts from.
        opt.build(model.trainable_variables)
        if reuse:
            while len(_MODELS) >= _MODEL_CACHE_SIZE:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = (model, opt, [v.numpy() for v in opt.variables],
                            (student, teacher, optimizer))
    if teacher is not None:
        model.temperature.assign(cfg["temperature"])
        model.coefficient.assign(cfg["coefficient"])
    return model


def run_trial_config(
    config: Mapping[str, Any],
    data: TrialData,
    *,
    teachers: Optional[TeacherPool] = None,
    student_builder: Optional[ModelBuilder] = None,
    epochs: Optional[int] = None,
    initial_epoch: int = 0,
    schedule_epochs: Optional[int] = None,
    optimizer: OptimizerArg = "adam",
    learning_rate: float = 1e-2,
    seed: int = 0,
    initial_weights: Optional[str] = None,
    save_student: Optional[str] = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
    reuse_student: bool = True,
) -> Dict[str, float]:
    """Trains one quantized student as ``config`` says and returns its metrics.

    The student (``student_builder(num_classes, input_shape, seed=seed)``; by default ResNet20 or
    the tiny ResNet on small inputs) is quantized with ``config["weight_bits"]`` /
    ``config["activation_bits"]`` and distilled from ``teachers.get(config["teacher"])`` with
    temperature τ and coefficient λ (constant, or linear to 0 with ``schedule="linear"``).
    ``teacher="none"`` trains the quantized student on hard labels only (the baseline).

    Args:
        config: A trial config (see :func:`normalize_config`).
        data: Train / validation / test batches.
        teachers: Where teachers come from (a default :class:`TeacherPool` if None).
        student_builder: Builds the float student.
        epochs: Train until this epoch (default ``config["epochs"]``).
        initial_epoch: Epoch to start from (Hyperband continues a trial's student from here;
            pass its weights in ``initial_weights``).
        schedule_epochs: Length of the linear λ schedule in epochs (default ``epochs``).
        optimizer: ``adam`` or ``sgd`` (Nesterov momentum 0.9) at a constant ``learning_rate``,
            or a factory ``f(steps_per_epoch, epochs) -> optimizer`` (e.g. SGD with a cosine
            schedule, as the recipes use).
        learning_rate: Learning rate of a named optimizer.
        seed: Seeds weights and TensorFlow's random ops.
        initial_weights: Student weights file to start from.
        save_student: Save the trained student's weights here (``.h5``), atomically.
        callbacks: Extra Keras callbacks.
        verbose: Keras ``fit`` verbosity.
        reuse_student: Reuse the quantized student of an earlier trial with the same
            float model (config and initial weights) and bit-widths, reset to its initial
            weights, instead of quantizing a new one, and the compiled training model (traced
            step) of an earlier trial with the same student, teacher and optimizer recipe,
            with its optimizer reset (saves seconds per trial; same starting point).

    Returns:
        ``{"val_accuracy", "test_accuracy", "teacher_accuracy" (NaN for the baseline),
        "wall_time" (seconds), "epochs"}``.

    Example:
        >>> data = make_trial_data("digits")  # doctest: +SKIP
        >>> run_trial_config({"temperature": 4, "teacher": "1", "epochs": 1}, data,
        ...                  teachers=TeacherPool(cache_dir="/tmp/t"))  # doctest: +SKIP
        {'val_accuracy': 0.6..., 'test_accuracy': 0.6..., ...}
    """
    start = time.perf_counter()
    cfg = normalize_config(config)
    epochs = int(epochs if epochs is not None else cfg["epochs"])
    if not 0 <= initial_epoch < epochs:
        raise ValueError(
            f"initial_epoch must be in [0, epochs={epochs}), got {initial_epoch!r}."
        )
    teachers = teachers if teachers is not None else TeacherPool()
    builder = student_builder or _default_builder
    keras.utils.set_random_seed(seed)

    student = _quantized_student(builder, data, cfg, seed, reuse_student)
    if initial_weights:
        student.load_weights(initial_weights)

    callbacks = list(callbacks)
    steps = data.steps_per_epoch()
    if cfg["teacher"] == NO_TEACHER:
        teacher = None
        teacher_accuracy = float("nan")
    else:
        teacher = teachers.get(cfg["teacher"], data)
        teacher_accuracy = teachers.accuracy(cfg["teacher"], data)
    model = _compiled_model(student, teacher, cfg, optimizer, learning_rate, steps,
                            int(schedule_epochs or epochs), reuse_student)
    if teacher is not None:
        if cfg["schedule"] == "linear":
            callbacks.append(_coefficient_scheduler(
                cfg["coefficient"], int(schedule_epochs or epochs), steps
            ))
    if initial_epoch:
        # Schedules read progress from the optimizer's step counter: a continued trial (Hyperband)
        # starts it where the earlier rounds left it, not at zero.
        model.optimizer.iterations.assign(initial_epoch * steps)
    # A diverged trial raises NonFiniteError: keras-tuner records the trial as failed instead of
    # scoring a NaN model.
    model.fit(data.train, epochs=epochs, initial_epoch=initial_epoch, verbose=verbose,
              callbacks=[StopOnNonFinite(), *callbacks])

    metrics = {
        "val_accuracy": evaluate_accuracy(student, data.validation),
        "test_accuracy": (
            evaluate_accuracy(student, data.test) if data.test is not data.validation else None
        ),
        "teacher_accuracy": teacher_accuracy,
    }
    if metrics["test_accuracy"] is None:
        metrics["test_accuracy"] = metrics["val_accuracy"]
    if save_student:
        with atomic_path(save_student) as tmp:
            student.save_weights(tmp)
    metrics["wall_time"] = time.perf_counter() - start
    metrics["epochs"] = float(epochs)
    return {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# CSV results and the exhaustive grid


def _csv_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value) if not math.isnan(value) else "nan"
    return str(value)


#: Result columns that stay text (ids like "00" are not numbers).
_TEXT_COLUMNS = frozenset({"trial_id", "tuner_id", "status"})


def read_results(path: str) -> List[Dict[str, Any]]:
    """Reads a results CSV; hyper-parameters are normalised, metrics become floats.

    A missing file reads as no rows (a sweep that has not finished a trial yet).

    Example:
        >>> read_results("/no/such/trials.csv")
        []
    """
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed: Dict[str, Any] = {}
        for k, v in row.items():
            if k in HYPERPARAMETERS:
                continue
            if k in _TEXT_COLUMNS:
                parsed[k] = v
                continue
            try:
                parsed[k] = float(v)
            except (TypeError, ValueError):
                parsed[k] = v
        parsed.update(normalize_config({k: row[k] for k in HYPERPARAMETERS if k in row}))
        out.append(parsed)
    return out


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive advisory lock (POSIX ``flock``) serialising writers of ``path``.

    The workers of a distributed search append to one CSV; without the lock two read-modify-write
    cycles could interleave and drop a row.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: single writer assumed
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_result(path: str, row: Mapping[str, Any], *, unique: Optional[str] = None) -> None:
    """Adds one row to a results CSV by rewriting it atomically (an interrupt loses no row).

    With ``unique="trial_id"``, an earlier row with the same ``trial_id`` is replaced (a trial
    retried after an interrupt keeps one row).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "trials.csv")
        >>> append_result(path, {**normalize_config({"teacher": 2}), "test_accuracy": 0.5})
        >>> [r["teacher"] for r in read_results(path)]
        ['2']
    """
    with _file_lock(path):
        _append_unlocked(path, row, unique)


def _append_unlocked(path: str, row: Mapping[str, Any], unique: Optional[str]) -> None:
    existing: List[Dict[str, str]] = []
    columns: List[str] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            existing = list(reader)
    if unique is not None:
        existing = [r for r in existing if r.get(unique) != _csv_value(row.get(unique))]
    for k in list(HYPERPARAMETERS) + list(METRICS) + list(row):
        if k not in columns:
            columns.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(existing)
    writer.writerow({k: _csv_value(v) for k, v in row.items()})
    atomic_write(path, buf.getvalue())


def grid_configs(
    temperatures: Iterable[float] = (1, 2, 5, 10),
    teachers: Iterable[Any] = (1, 1.5, 2),
    schedules: Iterable[str] = ("constant", "linear"),
    coefficient: float = 0.5,
    weight_bits: Iterable[int] = (2,),
    activation_bits: Optional[int] = None,
    epochs: int = 1,
) -> List[Dict[str, Any]]:
    """Every combination of the given values, as normalised configs (teacher-major order).

    Example:
        >>> [c["schedule"] for c in grid_configs([1], [1], ["constant", "linear"])]
        ['constant', 'linear']
    """
    configs = []
    for teacher, temperature, schedule, bits in itertools.product(
        teachers, temperatures, schedules, weight_bits
    ):
        configs.append(normalize_config({
            "temperature": temperature, "coefficient": coefficient, "schedule": schedule,
            "teacher": teacher, "weight_bits": bits, "activation_bits": activation_bits,
            "epochs": epochs,
        }))
    keys = [config_key(c) for c in configs]
    if len(set(keys)) != len(keys):
        raise ValueError("the grid repeats a configuration: remove duplicate values from the lists.")
    return configs


def _describe(cfg: Mapping[str, Any]) -> str:
    if cfg["teacher"] == NO_TEACHER:
        return f"hard labels, w{cfg['weight_bits']}"
    return (f"τ={cfg['temperature']:g} teacher={cfg['teacher']} λ={cfg['coefficient']:g} "
            f"{cfg['schedule']} w{cfg['weight_bits']}")


def run_grid(
    configs: Sequence[Mapping[str, Any]],
    data: TrialData,
    csv_path: str,
    *,
    teachers: Optional[TeacherPool] = None,
    objective: str = "test_accuracy",
    log: Optional[Callable[[str], None]] = None,
    **trial_kwargs: Any,
) -> List[Dict[str, Any]]:
    """Runs every config not yet in ``csv_path``, appending one row per finished trial.

    Rerunning after an interrupt continues with the missing configs only. Each row holds the
    hyper-parameters, the metrics of :func:`run_trial_config` and the wall time.

    Args:
        configs: Trial configs (e.g. from :func:`grid_configs`).
        data: Train / validation / test batches.
        csv_path: The results file (created if missing).
        teachers: Where teachers come from.
        objective: Metric the progress line ranks trials by.
        log: Receives one progress line per trial (default: print to stdout).
        **trial_kwargs: Passed to :func:`run_trial_config` (optimizer, learning rate, ...).

    Returns:
        All rows of the CSV after the sweep.

    Example:
        >>> rows = run_grid(grid_configs([1, 4], [1, 2], ["constant"]), make_trial_data("digits"),
        ...                 "runs/sweep/trials.csv",
        ...                 teachers=TeacherPool(cache_dir="runs/sweep/teachers"))  # doctest: +SKIP
    """
    log = log or (lambda msg: print(msg, flush=True))
    configs = [normalize_config(c) for c in configs]
    done = {config_key(r) for r in read_results(csv_path)}
    todo = [c for c in configs if config_key(c) not in done]
    skipped = len(configs) - len(todo)
    if skipped:
        log(f"[sweep] {skipped} of {len(configs)} trials already in {csv_path}: skipped")
    best: Optional[Tuple[float, str]] = None
    for r in read_results(csv_path):
        if objective in r and not math.isnan(r[objective]):
            if best is None or r[objective] > best[0]:
                best = (r[objective], _describe(r))
    for i, cfg in enumerate(todo, start=skipped + 1):
        log(f"[sweep] trial {i}/{len(configs)}: {_describe(cfg)} ...")
        metrics = run_trial_config(cfg, data, teachers=teachers, **trial_kwargs)
        append_result(csv_path, {**cfg, **metrics})
        if best is None or metrics[objective] > best[0]:
            best = (metrics[objective], _describe(cfg))
        log(f"[sweep] trial {i}/{len(configs)} done in {metrics['wall_time']:.1f} s: "
            f"{objective}={metrics[objective]:.4f} | best {best[0]:.4f} ({best[1]})")
    return read_results(csv_path)


# --------------------------------------------------------------------------------------------
# keras-tuner


def _keras_tuner():
    import keras_tuner

    return keras_tuner


def _as_values(values: Any, cast: Callable[[Any], Any]) -> List[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = [values]
    out = []
    for v in values:
        v = cast(v)
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError("a search-space dimension needs at least one value.")
    return out


def _search_space_base():
    try:
        return _keras_tuner().HyperModel
    except ImportError:  # pragma: no cover - keras-tuner is a dependency
        return object


class DistillationSearchSpace(_search_space_base()):
    """The hyper-parameters a :class:`DistillationTuner` searches, as a keras-tuner ``HyperModel``.

    ``build(hp)`` declares the dimensions on ``hp`` and returns the trial config (a dict for
    :func:`run_trial_config`); one value makes a dimension fixed, several a choice.
    ``temperature_range`` / ``coefficient_range`` ``(low, high)`` make τ (log-sampled) or λ
    continuous instead, which suits Bayesian optimisation.

    Example:
        >>> import keras_tuner
        >>> space = DistillationSearchSpace(temperatures=[1, 4], teachers=[1, 2])
        >>> space.build(keras_tuner.HyperParameters())["teacher"]
        '1'
    """

    def __init__(
        self,
        temperatures: Union[float, Sequence[float]] = (1, 2, 4, 8),
        teachers: Union[Any, Sequence[Any]] = ("1",),
        schedules: Union[str, Sequence[str]] = SCHEDULES,
        coefficients: Union[float, Sequence[float]] = 0.5,
        weight_bits: Union[int, Sequence[int]] = 2,
        activation_bits: Optional[int] = None,
        temperature_range: Optional[Tuple[float, float]] = None,
        coefficient_range: Optional[Tuple[float, float]] = None,
        epochs: int = 1,
    ):
        super().__init__(name="tfqkd_distillation")
        self.temperatures = _as_values(temperatures, float)
        self.teachers = _as_values(teachers, _teacher_key)
        self.schedules = _as_values(schedules, lambda s: str(s).strip().lower())
        self.coefficients = _as_values(coefficients, float)
        self.weight_bits = _as_values(weight_bits, int)
        self.activation_bits = activation_bits
        self.temperature_range = temperature_range
        self.coefficient_range = coefficient_range
        self.epochs = int(epochs)
        # Validate every value now rather than in the middle of a search.
        for t, c, s, b in itertools.product(
            self.temperatures, self.coefficients, self.schedules, self.weight_bits
        ):
            normalize_config({"temperature": t, "coefficient": c, "schedule": s,
                              "weight_bits": b, "activation_bits": activation_bits})
        for lo_hi, lo_ok in ((temperature_range, 0.0), (coefficient_range, None)):
            if lo_hi is not None and not (len(lo_hi) == 2 and lo_hi[0] < lo_hi[1]):
                raise ValueError(f"a range must be (low, high) with low < high, got {lo_hi!r}.")
        if temperature_range is not None and temperature_range[0] <= 0:
            raise ValueError(f"temperature_range must be > 0, got {temperature_range!r}.")
        if coefficient_range is not None and not (
            0 <= coefficient_range[0] and coefficient_range[1] <= 1
        ):
            raise ValueError(f"coefficient_range must lie in [0, 1], got {coefficient_range!r}.")

    @staticmethod
    def _dimension(hp, name: str, values: List[Any]):
        if len(values) == 1:
            return hp.Fixed(name, values[0])
        return hp.Choice(name, values)

    def build(self, hp) -> Dict[str, Any]:
        """Declares the search space on ``hp`` and returns this trial's config."""
        if self.temperature_range:
            temperature = hp.Float("temperature", *self.temperature_range, sampling="log")
        else:
            temperature = self._dimension(hp, "temperature", self.temperatures)
        if self.coefficient_range:
            coefficient = hp.Float("coefficient", *self.coefficient_range)
        else:
            coefficient = self._dimension(hp, "coefficient", self.coefficients)
        return normalize_config({
            "temperature": temperature,
            "coefficient": coefficient,
            "schedule": self._dimension(hp, "schedule", self.schedules),
            "teacher": self._dimension(hp, "teacher", self.teachers),
            "weight_bits": self._dimension(hp, "weight_bits", self.weight_bits),
            "activation_bits": self.activation_bits,
            "epochs": self.epochs,
        })


def make_oracle(
    kind: str,
    *,
    objective: str = "val_accuracy",
    max_trials: int = 10,
    max_epochs: int = 3,
    hyperband_factor: int = 3,
    seed: Optional[int] = None,
):
    """A keras-tuner oracle: ``random``, ``bayesian`` or ``hyperband``, maximising ``objective``.

    Hyperband decides the number of trials itself from ``max_epochs`` and ``hyperband_factor``.

    Example:
        >>> make_oracle("random", max_trials=3).max_trials
        3
    """
    kt = _keras_tuner()
    goal = kt.Objective(objective, "min" if "loss" in objective or objective == "wall_time"
                        else "max")
    kind = kind.lower()
    if kind == "random":
        return kt.oracles.RandomSearchOracle(objective=goal, max_trials=max_trials, seed=seed)
    if kind == "bayesian":
        return kt.oracles.BayesianOptimizationOracle(
            objective=goal, max_trials=max_trials, seed=seed,
            num_initial_points=max(1, min(max_trials - 1, 2)),
        )
    if kind == "hyperband":
        return kt.oracles.HyperbandOracle(
            objective=goal, max_epochs=max_epochs, factor=hyperband_factor, seed=seed
        )
    raise ValueError(f"oracle must be 'random', 'bayesian' or 'hyperband', got {kind!r}.")


def _serve_as_chief(oracle, poll_seconds: float = 0.5) -> None:
    """keras-tuner's chief gRPC server, with a short poll instead of its 20 s wait at the end.

    Same servicer and protocol as ``keras_tuner``'s own ``oracle_chief.start_server``; only the
    exit loop differs, so a search whose last worker finishes a moment after the first one
    stopped does not idle for 20 s.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"the chief could not listen on {address}: pick a free port.")
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=1.0)


def _tuner_base():
    try:
        return _keras_tuner().Tuner
    except ImportError:  # pragma: no cover
        return object


class DistillationTuner(_tuner_base()):
    """A keras-tuner ``Tuner`` whose trials distill quantized students.

    keras-tuner 1.4's build-and-fit path expects Keras 3 models, so this tuner overrides
    ``run_trial`` and returns the metrics of :func:`run_trial_config`: every oracle works, a
    project resumes from its directory (``overwrite=False`` → finished trials are not redone) and
    keras-tuner's chief/worker mode (``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP``,
    ``KERASTUNER_ORACLE_PORT``) distributes the trials. Hyperband's ``tuner/epochs`` and
    ``tuner/initial_epoch`` are honoured, and a continued trial starts from the student of the
    trial it continues (``tuner/trial_id``). Each trial directory keeps the student's weights
    (``student.weights.h5``) and ``metrics.json``.

    Args:
        oracle: A keras-tuner oracle (see :func:`make_oracle`); its objective is one of
            ``val_accuracy`` (default), ``test_accuracy``, ``wall_time``.
        search_space: The hyper-parameters (default: τ in {1, 2, 4, 8}, teacher width 1,
            constant or linear λ=0.5).
        teachers: Where teachers come from (a :class:`TeacherPool` or a mapping for one).
        student_builder: Builds the float student (see :func:`run_trial_config`).
        epochs: Epochs per trial unless the oracle says otherwise (Hyperband).
        save_students: Keep each trial's trained student weights.
        log: Receives a progress line per trial (default: print).
        csv_path: Also append one row per finished trial (hyper-parameters, metrics,
            ``trial_id``, ``tuner_id``) to this CSV, which the plotting functions read.
        trial_kwargs: Passed to :func:`run_trial_config` (optimizer, learning_rate, seed).
        **kwargs: ``keras_tuner.Tuner`` arguments: ``directory``, ``project_name``,
            ``overwrite``, ...

    Example:
        >>> tuner = DistillationTuner(make_oracle("random", max_trials=3),
        ...     search_space=DistillationSearchSpace(temperatures=[1, 4], teachers=[1, 2]),
        ...     teachers=TeacherPool(cache_dir="out/teachers"), directory="out",
        ...     project_name="search")  # doctest: +SKIP
        >>> tuner.search(make_trial_data("digits"))  # doctest: +SKIP
        >>> tuner.get_best_hyperparameters()[0].values  # doctest: +SKIP
    """

    def __init__(
        self,
        oracle,
        *,
        search_space: Optional[DistillationSearchSpace] = None,
        teachers: Union[TeacherPool, Mapping[Any, Any], None] = None,
        student_builder: Optional[ModelBuilder] = None,
        epochs: Optional[int] = None,
        save_students: bool = True,
        log: Optional[Callable[[str], None]] = None,
        csv_path: Optional[str] = None,
        trial_kwargs: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ):
        search_space = search_space or DistillationSearchSpace()
        # Read before keras-tuner replaces the oracle of a distributed worker by a gRPC client.
        self._max_epochs = getattr(oracle, "max_epochs", None)
        super().__init__(oracle, hypermodel=search_space, **kwargs)
        self.teachers = teachers if isinstance(teachers, TeacherPool) else TeacherPool(teachers)
        self.student_builder = student_builder
        self.epochs = int(epochs or search_space.epochs)
        self.save_students = save_students
        self.log = log or (lambda msg: print(msg, flush=True))
        self.trial_kwargs = dict(trial_kwargs or {})
        self.csv_path = csv_path
        #: Number of trials this tuner object has trained (resumed projects skip finished ones).
        self.run_trial_calls = 0
        self._trial_start: Dict[str, float] = {}

    # -- trials -------------------------------------------------------------------------------

    def student_path(self, trial_id: str) -> str:
        """Where the trained student of ``trial_id`` is saved."""
        return os.path.join(self.get_trial_dir(trial_id), "student.weights.h5")

    def trial_config(self, hp) -> Dict[str, Any]:
        """The config (for :func:`run_trial_config`) of a trial's hyper-parameters."""
        config = self.hypermodel.build(hp)
        if "tuner/epochs" in hp.values:
            config["epochs"] = int(hp.values["tuner/epochs"])
        return config

    def run_trial(self, trial, data: Optional[TrialData] = None, *args, **kwargs) -> Dict[str, float]:
        """Trains the trial's student and returns its metrics (the oracle's objective among them)."""
        if data is None:
            raise ValueError("DistillationTuner.search needs the data: tuner.search(trial_data).")
        hp = trial.hyperparameters
        config = self.trial_config(hp)
        initial_epoch = int(hp.values.get("tuner/initial_epoch", 0))
        initial_weights = None
        if hp.values.get("tuner/trial_id"):
            initial_weights = self.student_path(hp.values["tuner/trial_id"])
            if not os.path.exists(initial_weights):
                raise FileNotFoundError(
                    f"Hyperband continues trial {hp.values['tuner/trial_id']!r} but its student "
                    f"{initial_weights} is missing: keep save_students=True with Hyperband."
                )
        elif initial_epoch:
            initial_epoch = 0  # nothing to continue from: train the whole budget
        max_epochs = self._max_epochs
        metrics = run_trial_config(
            config, data, teachers=self.teachers, student_builder=self.student_builder,
            epochs=config["epochs"], initial_epoch=initial_epoch,
            schedule_epochs=max_epochs if "tuner/epochs" in hp.values else None,
            initial_weights=initial_weights,
            save_student=self.student_path(trial.trial_id) if self.save_students else None,
            **self.trial_kwargs,
        )
        self.run_trial_calls += 1
        record = {"trial_id": trial.trial_id, "tuner_id": self.tuner_id, "config": config,
                  "metrics": metrics, "initial_epoch": initial_epoch,
                  "data": {"num_classes": data.num_classes, "input_shape": list(data.input_shape)}}
        atomic_write(os.path.join(self.get_trial_dir(trial.trial_id), "metrics.json"),
                           json.dumps(record, indent=2, sort_keys=True))
        if self.csv_path:
            append_result(self.csv_path, {**config, **metrics, "trial_id": trial.trial_id,
                                          "tuner_id": self.tuner_id}, unique="trial_id")
        return metrics

    def load_model(self, trial) -> keras.Model:
        """The trained quantized student of a finished trial."""
        from tfqkd.quantize import quantize_model

        config = self.trial_config(trial.hyperparameters)
        path = self.student_path(trial.trial_id)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no saved student for trial {trial.trial_id} at {path}.")
        record_path = os.path.join(self.get_trial_dir(trial.trial_id), "metrics.json")
        with open(record_path) as f:
            shape = json.load(f).get("data")
        builder = self.student_builder or _default_builder
        if shape is None:
            raise FileNotFoundError(f"{record_path} lacks the data shape needed to rebuild the student.")
        student = builder(shape["num_classes"], tuple(shape["input_shape"]), seed=0)
        student = quantize_model(student, weight_bits=config["weight_bits"],
                                 activation_bits=config["activation_bits"])
        student.load_weights(path)
        return student

    def save_model(self, trial_id, model, step=0):
        """Students are saved by :meth:`run_trial` (``student.weights.h5`` in the trial dir)."""

    # -- progress -----------------------------------------------------------------------------

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        self._trial_start[trial.trial_id] = time.perf_counter()
        total = getattr(self.oracle, "max_trials", None)
        config = self.trial_config(trial.hyperparameters)
        of = f"/{total}" if total else ""
        self.log(f"[{self.tuner_id}] trial {int(trial.trial_id) + 1}{of}: {_describe(config)} "
                 f"epochs={config['epochs']}")

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        elapsed = time.perf_counter() - self._trial_start.pop(trial.trial_id, time.perf_counter())
        objective = self.oracle.objective.name
        best = self.oracle.get_best_trials(1)
        best_text = ""
        if best and best[0].score is not None:
            best_text = f" | best {objective}={best[0].score:.4f} (trial {best[0].trial_id})"
        self.log(f"[{self.tuner_id}] trial {int(trial.trial_id) + 1} {trial.status.lower()} "
                 f"in {elapsed:.1f} s{best_text}")

    def search(self, *args, **kwargs):
        """Runs the search (the chief of a distributed search serves the oracle until done)."""
        from keras_tuner.src.distribute import utils as dist_utils

        if dist_utils.is_chief_oracle():
            self.save()
            _serve_as_chief(self.oracle)
            return
        super().search(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Plots


def _figure(nrows: int = 1, ncols: int = 1, size: Tuple[float, float] = (6.0, 4.0)):
    # A bare Figure (no pyplot): no global state, no GUI backend, works under Agg everywhere.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _x_positions(keys: Sequence[str]) -> Tuple[Dict[str, float], Optional[List[str]]]:
    """Teacher keys → x: widths where every key is a width, else categorical positions."""
    widths = [_teacher_width(k) for k in keys]
    if all(w is not None for w in widths):
        return {k: w for k, w in zip(keys, widths)}, None
    labels = [os.path.basename(k.rstrip("/")) or k for k in keys]
    return {k: float(i) for i, k in enumerate(keys)}, labels


def _sorted_teachers(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    keys = sorted({r["teacher"] for r in rows if r["teacher"] != NO_TEACHER})
    return sorted(keys, key=lambda k: (_teacher_width(k) is None, _teacher_width(k) or 0.0, k))


def _draw_lines(ax, rows, *, metric, baseline, linestyle="-", label_suffix="", teachers=None,
                colors=None):
    teachers = teachers or _sorted_teachers(rows)
    xs, labels = _x_positions(teachers)
    temperatures = sorted({r["temperature"] for r in rows if r["teacher"] != NO_TEACHER})
    # One colour per τ across panels, so the two halves of Figure 2 read against each other.
    colors = colors or {t: f"C{i}" for i, t in enumerate(temperatures)}
    for t in temperatures:
        points = {}
        for r in rows:
            if r["teacher"] != NO_TEACHER and r["temperature"] == t and r["teacher"] in xs:
                points.setdefault(r["teacher"], []).append(r[metric])
        keys = [k for k in teachers if k in points]
        ax.plot([xs[k] for k in keys], [float(np.mean(points[k])) for k in keys],
                linestyle=linestyle, marker="o", color=colors[t], label=f"τ={t:g}{label_suffix}")
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle=":", linewidth=1.2, label="hard labels")
    if labels is not None:
        ax.set_xticks(list(xs.values()), labels, rotation=20)
        ax.set_xlabel("teacher")
    else:
        ax.set_xlabel("teacher width (WRN20×N)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(True, alpha=0.3)


def _baseline_value(rows: Sequence[Mapping[str, Any]], baseline, metric: str) -> Optional[float]:
    if baseline is not None:
        return float(baseline)
    values = [r[metric] for r in rows if r["teacher"] == NO_TEACHER]
    return float(np.mean(values)) if values else None


def plot_accuracy_vs_teacher(
    rows: Sequence[Mapping[str, Any]],
    *,
    baseline: Optional[float] = None,
    schedule: Optional[str] = "constant",
    metric: str = "test_accuracy",
    title: Optional[str] = None,
):
    """Figure 1: accuracy vs teacher width, one line per τ, hard-label baseline as a flat line.

    Args:
        rows: Result rows (:func:`read_results`). Rows with ``teacher="none"`` are baselines.
        baseline: Hard-label accuracy (default: mean of the baseline rows, if any).
        schedule: Only rows with this schedule (None: all; falls back to all if none match).
        metric: Column on the y axis.
        title: Figure title.

    Returns:
        The ``matplotlib.figure.Figure`` (one ``Line2D`` per τ, plus one for the baseline).

    Example:
        >>> rows = [dict(normalize_config({"temperature": t, "teacher": w}), test_accuracy=0.5)
        ...         for t in (1, 4) for w in (1, 2)]
        >>> len(plot_accuracy_vs_teacher(rows, baseline=0.4).axes[0].get_lines())
        3
    """
    base = _baseline_value(rows, baseline, metric)
    selected = [r for r in rows if schedule is None or r["schedule"] == schedule]
    if not [r for r in selected if r["teacher"] != NO_TEACHER]:
        selected = list(rows)
    fig, axes = _figure()
    ax = axes[0, 0]
    _draw_lines(ax, selected, metric=metric, baseline=base)
    ax.legend(fontsize="small")
    ax.set_title(title or f"quantized student vs teacher ({schedule or 'all'} λ)")
    return fig


def plot_cr_comparison(
    rows: Sequence[Mapping[str, Any]],
    *,
    baseline: Optional[float] = None,
    metric: str = "test_accuracy",
    title: Optional[str] = None,
):
    """Figure 2: the same curves without CR (constant λ) and with CR (linear λ), side by side.

    Two panels with a shared y axis: left constant λ, right coefficient reducing; each has one line
    per τ and the hard-label baseline.

    Example:
        >>> rows = [dict(normalize_config({"temperature": 2, "teacher": w, "schedule": s}),
        ...              test_accuracy=0.5) for w in (1, 2) for s in ("constant", "linear")]
        >>> [len(ax.get_lines()) for ax in plot_cr_comparison(rows).axes]
        [1, 1]
    """
    base = _baseline_value(rows, baseline, metric)
    fig, axes = _figure(1, 2, size=(10.0, 4.0))
    teachers = _sorted_teachers(rows)
    temperatures = sorted({r["temperature"] for r in rows if r["teacher"] != NO_TEACHER})
    colors = {t: f"C{i}" for i, t in enumerate(temperatures)}
    for ax, schedule, name in zip(axes[0], SCHEDULES, ("without CR (constant λ)",
                                                       "with CR (λ linear → 0)")):
        selected = [r for r in rows if r["schedule"] == schedule]
        if [r for r in selected if r["teacher"] != NO_TEACHER]:
            _draw_lines(ax, selected, metric=metric, baseline=base, teachers=teachers,
                        colors=colors)
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {schedule} runs", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(name)
    axes[0, 1].sharey(axes[0, 0])
    if title:
        fig.suptitle(title)
    return fig


def plot_heatmap(
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str = "test_accuracy",
    title: Optional[str] = None,
):
    """τ × teacher heat map of ``metric``, one panel per schedule present (cells annotated).

    Example:
        >>> rows = [dict(normalize_config({"temperature": t, "teacher": w}), test_accuracy=0.5)
        ...         for t in (1, 4) for w in (1, 2)]
        >>> plot_heatmap(rows).axes[0].images[0].get_array().shape
        (2, 2)
    """
    rows = [r for r in rows if r["teacher"] != NO_TEACHER]
    schedules = [s for s in SCHEDULES if any(r["schedule"] == s for r in rows)] or ["constant"]
    teachers = _sorted_teachers(rows)
    temperatures = sorted({r["temperature"] for r in rows})
    fig, axes = _figure(1, len(schedules), size=(4.5 * len(schedules) + 1, 4.0))
    values = [r[metric] for r in rows] or [0.0, 1.0]
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    image = None
    for ax, schedule in zip(axes[0], schedules):
        grid = np.full((len(temperatures), len(teachers)), np.nan)
        for i, t in enumerate(temperatures):
            for j, k in enumerate(teachers):
                cell = [r[metric] for r in rows
                        if r["schedule"] == schedule and r["temperature"] == t and r["teacher"] == k]
                if cell:
                    grid[i, j] = float(np.mean(cell))
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i, j] < (vmin + vmax) / 2 else "black")
        _, labels = _x_positions(teachers)
        ax.set_xticks(range(len(teachers)), labels or teachers)
        ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
        ax.set_xlabel("teacher width" if labels is None else "teacher")
        ax.set_ylabel("temperature τ")
        ax.set_title(f"{schedule} λ")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label=metric.replace("_", " "))
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig, stem: str, formats: Sequence[str] = ("png", "svg"), dpi: int = 120) -> List[str]:
    """Saves ``fig`` as ``stem.png`` and ``stem.svg`` (atomically) and returns the paths.

    Example:
        >>> import tempfile
        >>> rows = [dict(normalize_config({"temperature": 2, "teacher": w}), test_accuracy=0.5)
        ...         for w in (1, 2)]
        >>> paths = save_figure(plot_accuracy_vs_teacher(rows), os.path.join(tempfile.mkdtemp(), "f"))
        >>> [os.path.basename(p) for p in paths]
        ['f.png', 'f.svg']
    """
    paths = []
    for fmt in formats:
        path = f"{stem}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
        paths.append(path)
    return paths


def plot_results(
    csv_path: str,
    output_dir: str,
    *,
    baseline_csv: Optional[str] = None,
    metric: str = "test_accuracy",
) -> Dict[str, List[str]]:
    """Draws every figure from a results CSV into ``output_dir`` (PNG + SVG each).

    Returns ``{"accuracy_vs_teacher": [...], "cr_comparison": [...], "heatmap": [...]}`` paths.

    Example:
        >>> plot_results("runs/sweep/trials.csv", "runs/sweep",
        ...              baseline_csv="runs/sweep/baseline.csv")  # doctest: +SKIP
    """
    rows = read_results(csv_path)
    if not rows:
        raise ValueError(f"no results to plot in {csv_path}: run the sweep first.")
    baseline_rows = read_results(baseline_csv) if baseline_csv else []
    baseline = _baseline_value(rows + baseline_rows, None, metric)
    figures = {
        "accuracy_vs_teacher": plot_accuracy_vs_teacher(
            rows, baseline=baseline,
            schedule="constant" if any(r["schedule"] == "constant" for r in rows) else "linear",
            metric=metric),
        "cr_comparison": plot_cr_comparison(rows, baseline=baseline, metric=metric),
        "heatmap": plot_heatmap(rows, metric=metric),
    }
    return {name: save_figure(fig, os.path.join(output_dir, name)) for name, fig in figures.items()}
