"""keras-tuner front-end: the search space, the oracles, and :class:`DistillationTuner`.

``DistillationTuner.run_trial`` returns the metrics of :func:`tfqkd.tuning.run_trial_config`, so
every keras-tuner oracle (random search, Bayesian optimisation, Hyperband) drives it, projects
resume from their directory, and keras-tuner's chief/worker mode distributes it.

Example:
    >>> import keras_tuner
    >>> space = DistillationSearchSpace(temperatures=[1, 4], schedules=["linear"])
    >>> space.build(keras_tuner.HyperParameters())["schedule"]
    'linear'
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from tfqkd._io import atomic_write
from tfqkd._keras import keras
from tfqkd.tuning.config import SCHEDULES, _teacher_key, normalize_config
from tfqkd.tuning.crash_safe import CrashSafeTunerSaves, crash_safe_oracle
from tfqkd.tuning.results import _describe, append_result
from tfqkd.tuning.trials import (ModelBuilder, TeacherPool, TrialData, _default_builder,
                                 run_trial_config)

__all__ = ["DistillationSearchSpace", "DistillationTuner", "make_oracle"]


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


class DistillationTuner(CrashSafeTunerSaves, _tuner_base()):
    """A keras-tuner ``Tuner`` whose trials distill quantized students.

    keras-tuner 1.4's build-and-fit path expects Keras 3 models, so this tuner overrides
    ``run_trial`` and returns the metrics of :func:`run_trial_config`: every oracle works, a
    project resumes from its directory (``overwrite=False`` → finished trials are not redone; the
    project files are written atomically, :mod:`tfqkd.tuning.crash_safe`) and
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
        super().__init__(crash_safe_oracle(oracle), hypermodel=search_space, **kwargs)
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
