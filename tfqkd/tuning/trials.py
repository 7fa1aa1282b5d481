"""One trial: the data it runs on, the teachers it distills from, and the run itself.

:func:`run_trial_config` trains one quantized student as a config says (see
:mod:`tfqkd.tuning.config`) and returns its metrics; both search front-ends (the grid of
:mod:`tfqkd.tuning.results` and :class:`tfqkd.tuning.DistillationTuner`) call it.
:class:`TeacherPool` gives teachers by key (a width trained once and cached, a saved model, a
given model or builder).

Example:
    >>> x, y = tf.zeros([6, 8, 8, 1]), tf.zeros([6], tf.int32)
    >>> batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    >>> data = TrialData(batches, batches, batches, num_classes=10, input_shape=(8, 8, 1))
    >>> data.steps_per_epoch()
    2
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._io import atomic_path
from tfqkd._keras import keras, tf
from tfqkd.finite import StopOnNonFinite
from tfqkd.training import OptimizerArg, evaluate_accuracy
from tfqkd.training import load_model as _load_model
from tfqkd.training import make_optimizer as _make_optimizer
from tfqkd.tuning.config import NO_TEACHER, _teacher_key, _teacher_width, normalize_config

__all__ = ["TrialData", "make_trial_data", "TeacherPool", "ensemble_members", "train_classifier",
           "pretrain_student", "run_trial_config", "ModelBuilder"]


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
        clean_train: The training images without augmentation or shuffling, where
            ``train_accuracy`` is measured (the paper's over-fitting analysis); ``None``: not
            measured (NaN).
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    num_classes: int
    input_shape: Tuple[int, ...]
    name: str = "custom"
    clean_train: Optional[tf.data.Dataset] = None

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
    validation: Optional[float] = 0.1,
    validation_split: str = "validation",
    seed: int = 0,
) -> TrialData:
    """Loads a data set through :func:`tfqkd.data.load_dataset` for tuning.

    Trials are compared on ``validation``, never on ``test``: by default 10 % of the training
    images, held out class by class and left out of ``train``.

    Args:
        name: A :mod:`tfqkd.data` name: ``digits``, ``cifar10``, ``cifar100``, ``folder:PATH``,
            ``npz:PATH``, ``tfds:NAME``.
        batch_size: Batch size of every split.
        data_dir: Offline data location (see :mod:`tfqkd.data`).
        subset: Use only this many of the training images left after the hold-out (quick
            sweeps); the validation split keeps every held-out image.
        validation: Fraction of the training images held out as the validation split; ``None``
            uses the source's own ``validation_split``.
        validation_split: With ``validation=None``, the source's split the objective is
            measured on.
        seed: Shuffling / augmentation seed.

    Example:
        >>> data = make_trial_data("digits", batch_size=32)  # doctest: +SKIP
        >>> data.num_classes, data.input_shape  # doctest: +SKIP
        (10, (8, 8, 1))
    """
    from tfqkd import data as data_lib

    info = data_lib.dataset_info(name)
    common = dict(data_dir=data_dir, batch_size=batch_size)
    train = data_lib.load_dataset(name, "train", subset=subset, seed=seed,
                                  validation=validation, **common)
    test = data_lib.load_dataset(name, "test", augment=False, shuffle=False, **common)
    held_out = data_lib.load_dataset(name, "validation" if validation else validation_split,
                                     validation=validation, augment=False, shuffle=False, **common)
    clean_train = data_lib.load_dataset(name, "train", subset=subset, seed=seed, augment=False,
                                        shuffle=False, validation=validation, **common)
    info_get = info.get if isinstance(info, Mapping) else (lambda k: getattr(info, k))
    return TrialData(
        train=train, validation=held_out, test=test,
        num_classes=int(info_get("num_classes")),
        input_shape=tuple(int(d) for d in info_get("input_shape")), name=name,
        clean_train=clean_train,
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


def pretrain_student(
    builder: "ModelBuilder", data: TrialData, path: str, *, teacher: Any = None,
    temperature: float = 4.0, epochs: int = 1, learning_rate: float = 1e-2,
    optimizer: OptimizerArg = "adam", seed: int = 0, verbose: int = 0,
) -> str:
    """The float student of the paper's Algorithm 1, trained once and saved at ``path``.

    ``builder(num_classes, input_shape, seed=seed)`` builds it; it is trained on hard labels, or
    with KD from ``teacher`` (a model or a list; λ 0.5, ``temperature``) when one is given: the
    students of the paper's Figure 2(a) and 2(b). A ``path`` that exists is used as it is (a rerun
    trains nothing); the file is written atomically (HDF5).

    Example:
        >>> path = pretrain_student(_default_builder, make_trial_data("digits"),
        ...                         "/tmp/student_hard.h5", epochs=3)  # doctest: +SKIP
    """
    if os.path.exists(path):
        return path
    model = builder(data.num_classes, data.input_shape, seed=seed)
    if teacher is None:
        train_classifier(model, data, epochs=epochs, learning_rate=learning_rate,
                         optimizer=optimizer, verbose=verbose)
    else:
        from tfqkd.distiller import Distiller

        distiller = Distiller(model, teacher, temperature=temperature, coefficient=0.5)
        distiller.compile(optimizer=_make_optimizer(optimizer, learning_rate,
                                                    data.steps_per_epoch(), epochs))
        distiller.fit(data.train, epochs=epochs, verbose=verbose, callbacks=[StopOnNonFinite()])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        model.save(tmp, save_format="h5", include_optimizer=False)
    return path


class TeacherPool:
    """Teachers by key: given models, saved model paths, builders, or widths trained on demand.

    ``get(key)`` resolves, in order: an ensemble ``"a+b[+...]"`` (a list of the members'
    teachers, each resolved as below; the Distiller averages their softened probabilities); an
    entry of ``teachers`` (a model is used as is, a string is
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
        members = ensemble_members(key)
        if len(members) > 1 and key not in self._given and not os.path.exists(key):
            # An ensemble: the Distiller averages its members' softened probabilities.
            ensemble = [self.get(member, data) for member in members]
            self._models[key] = ensemble
            return ensemble
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
            teacher = self.get(key, data)
            if isinstance(teacher, list):  # an ensemble: its mean probabilities' top-1
                inputs = keras.Input(teacher[0].input_shape[1:])
                probs = [keras.layers.Softmax()(m(inputs, training=False)) for m in teacher]
                teacher = keras.Model(inputs, keras.layers.Average()(probs))
            self._accuracy[key] = evaluate_accuracy(teacher, data.test)
        return self._accuracy[key]

    @staticmethod
    def _need(data: Optional[TrialData], key: str) -> TrialData:
        if data is None:
            raise ValueError(f"teacher {key!r} must be trained first: pass the TrialData to get().")
        return data


def ensemble_members(key: Any) -> List[str]:
    """The member keys of a teacher key: ``"1+2"`` → ``["1", "2"]``; a single teacher → itself.

    Example:
        >>> ensemble_members("1 + 1.5"), ensemble_members(2.0)
        (['1', '1.5'], ['2'])
    """
    return [_teacher_key(k) for k in str(_teacher_key(key)).split("+") if k.strip()]


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
        ``{"val_accuracy", "test_accuracy", "train_accuracy" (on ``data.clean_train``, NaN
        without it), "teacher_accuracy" (NaN for the baseline), "wall_time" (seconds),
        "epochs"}``.

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
        "train_accuracy": (evaluate_accuracy(student, data.clean_train)
                           if data.clean_train is not None else float("nan")),
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
