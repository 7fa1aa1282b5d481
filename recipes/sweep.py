"""Hyper-parameter sweeps for quantized distillation: an exhaustive grid or a keras-tuner search.

Both modes train trials with :func:`tfqkd.tuning.run_trial_config`, write one CSV row per finished
trial (hyper-parameters, accuracies, wall time) and draw the paper's figures from the CSV.

Grid (the paper's Figures 1 and 2: student accuracy vs teacher width for several τ, with and
without coefficient reducing)::

    python recipes/sweep.py --mode=grid --temperatures=1,2,5,10 --teachers=1,1.5,2 \\
        --schedules=constant,linear --coefficient=0.5 --output_dir=runs/sweep
    python recipes/sweep.py --preset=smoke --dataset=digits --output_dir=/tmp/sweep   # < 1 min

``--teachers`` takes widths (a WRN20xN teacher is trained once per width and cached in
``output_dir/teachers/``) or saved teachers (``model.h5`` files or ``recipes/train_teacher.py``
output directories). Interrupt a grid and run the same command again: the configurations already
in ``trials.csv`` are skipped. ``--plot_only`` redraws the figures from the CSV.

Trials are compared on a validation split, ``--validation`` (default 10 %) of the training images
held out class by class; ``results.json``'s ``best`` is the trial with the highest
``val_accuracy``, and the test split (``test_accuracy``, what the figures plot) is reported only.

Search (keras-tuner; the objective is ``val_accuracy``)::

    python recipes/sweep.py --mode=search --oracle=bayesian --max_trials=20 --output_dir=runs/s

A search resumes from ``output_dir/tuner/`` like any keras-tuner project (finished trials are not
redone). Run the same command in several processes with keras-tuner's variables
(``KERASTUNER_TUNER_ID=chief|tuner0|..., KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT``) to
distribute the trials; ``tools/distributed_tuning_demo.py`` does that on localhost.

Outputs in ``output_dir``: ``trials.csv``, ``baseline.csv`` (hard-label quantized student),
``accuracy_vs_teacher.{png,svg}`` (Figure 1), ``cr_comparison.{png,svg}`` (Figure 2),
``heatmap.{png,svg}`` (τ × teacher), ``teachers/``, ``tuner/`` (search mode), ``results.json``,
``student_<mode>.h5`` (``--pretrain_student``).

Algorithm 1 (trials retrain a trained float student in the quantized domain): ``--student`` (a
saved float student) or ``--pretrain_student=hard|kd`` (trained once here, on hard labels or with
KD from the first ``--teachers`` entry: the paper's Figure 2(a) / 2(b)); without either, every
trial quantizes a freshly initialised model.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List

from recipes import common
from recipes.common import Option

from tfqkd import tuning

OPTIONS = common.COMMON_OPTIONS + [
    Option("mode", "grid", "grid: every combination of the lists below; search: a keras-tuner "
           "search over them.", "enum", ("grid", "search")),
    Option("oracle", "random", "Search algorithm (--mode=search).", "enum",
           ("random", "bayesian", "hyperband")),
    Option("max_trials", 10, "Trials of a random or Bayesian search (Hyperband decides its "
           "own from --epochs, the maximum epochs per trial).", "integer"),
    Option("temperatures", "1,2,5,10", "Comma-separated temperatures τ."),
    Option("teachers", "1,1.5,2", "Comma-separated teacher widths (trained once, cached in "
           "output_dir/teachers/) or saved teacher paths; an ensemble is its members joined by "
           "+ (1.5+2: the Distiller averages their softened probabilities)."),
    Option("schedules", "constant,linear", "Comma-separated λ schedules: constant, linear "
           "(coefficient reducing: λ linear to 0)."),
    Option("coefficient", "0.5", "λ (the start value of a linear schedule); a comma-separated "
           "list makes it a searched / gridded dimension."),
    Option("weight_bits", "2", "Comma-separated weight bit-widths of the student."),
    Option("activation_bits", None, "Activation bit-width of the student (default: float "
           "activations).", "integer"),
    Option("student", None, "A trained float student (train_student output_dir or model.h5): "
           "every trial and baseline quantizes a copy of it, as the paper's Algorithm 1 "
           "retrains the float student in the quantized domain. Absent: a fresh --arch model "
           "(quantization-aware training from scratch)."),
    Option("pretrain_student", "none", "Train the float student once before the trials and "
           "quantize it in every trial (Algorithm 1): hard (hard labels, the paper's Figure "
           "2(a)), kd (KD from the first --teachers entry, Figure 2(b)); saved as "
           "output_dir/student_<mode>.h5 and reused by reruns. none: --student, or fresh "
           "models.", "enum", ("none", "hard", "kd")),
    Option("student_epochs", None, "Epochs of --pretrain_student (default: --teacher_epochs, "
           "else --epochs).", "integer"),
    Option("teacher_epochs", None, "Epochs to train each teacher (default: --epochs).",
           "integer"),
    Option("baseline", True, "Also train the quantized student on hard labels (the figures' "
           "horizontal line).", "bool"),
    Option("validation", 0.1, "Fraction of the training images held out, class by class, as "
           "the validation split that trials are compared on (val_accuracy); the test split is "
           "only reported (test_accuracy). 0: no hold-out, trials compared on the test split, as "
           "sweeps recorded before this option ran.", "float", former_defaults=(0.0,)),
    Option("objective", "val_accuracy", "Search objective: val_accuracy, on the --validation "
           "images (test_accuracy is no longer accepted: never choose on the test split).",
           "enum", ("val_accuracy",)),
    Option("plot_only", False, "Only redraw the figures from output_dir/trials.csv.", "bool"),
]

#: Sweep presets on top of common.PRESETS. smoke: a 2x2x2 grid (2 τ x 2 teacher widths x
#: constant λ / CR) of tiny models on the built-in digits set (1,437 training images, 10 % of
#: them held out for validation: 25 steps per epoch), ~20 s; tracing dominates, so the extra
#: steps over common's 500-image subset cost little and give accuracies well above chance
#: (seeds 0-4: students 0.37-0.76, teachers 0.84-0.97 of the test digits).
PRESETS = {
    "smoke": dict(dataset="digits", temperatures="1,4", teachers="1,2",
                  schedules="constant,linear",
                  subset=None, test_subset=None, batch_size=50, epochs=3, learning_rate=0.1,
                  teacher_epochs=4, max_trials=3),
    "cpu": dict(epochs=15, temperatures="1,2,5,10", teachers="1,1.5,2"),
    # τ up to 50, where the paper's Figure 2 ends (the values between are our choice).
    "paper": dict(epochs=200, temperatures="1,2,5,10,20,50",
                  teachers="1,1.2,1.5,1.7,2,3,4,5,10"),
}

#: Options that do not change which trials a sweep holds.
RUNTIME_KEYS = frozenset(common.RUNTIME_KEYS | {"plot_only", "mode", "oracle", "max_trials"})


def make_config(preset: str = "paper", **overrides: Any) -> common.Config:
    """This recipe's configuration in Python (same resolution as the command line).

    Example:
        >>> cfg = make_config("smoke", output_dir="/tmp/sweep")
        >>> cfg.temperatures, cfg.teachers, cfg.dataset
        ('1,4', '1,2', 'digits')
    """
    return common.make_config(OPTIONS, PRESETS, preset, **overrides)


def parse_list(text: Any, cast: Callable[[str], Any] = str, what: str = "list") -> List[Any]:
    """``"1, 2,5"`` → ``[1.0, 2.0, 5.0]`` with ``cast=float`` (lists and numbers pass through).

    Example:
        >>> parse_list("1,1.5, 2", float)
        [1.0, 1.5, 2.0]
    """
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} needs at least one value, got {text!r}.")
    try:
        return [cast(t) for t in items]
    except ValueError as e:
        raise ValueError(f"--{what}: cannot read {text!r} ({e}).") from None


def output_root(cfg: common.Config) -> str:
    return os.path.abspath(cfg.output_dir or "runs/sweep")


def _paths(cfg: common.Config) -> Dict[str, str]:
    root = output_root(cfg)
    return {
        "root": root,
        "csv": os.path.join(root, "trials.csv"),
        "baseline_csv": os.path.join(root, "baseline.csv"),
        "teachers": os.path.join(root, "teachers"),
        "tuner": os.path.join(root, "tuner"),
        "results": os.path.join(root, "results.json"),
        "student": os.path.join(root, f"student_{cfg.pretrain_student}.h5"),
    }


def load_trial_data(cfg: common.Config) -> tuning.TrialData:
    """The sweep's data, loaded as every recipe loads it (``common.load_data``), with
    ``--validation`` of the training images held out as the split trials are compared on."""
    held_out = cfg.validation or None
    if held_out is None:
        common.log("--validation=0: trials are compared on the test split (no hold-out)")
    data = common.load_data(cfg, validation=held_out)
    info = data.info
    return tuning.TrialData(
        train=data.train, validation=data.validation if held_out else data.test, test=data.test,
        clean_train=common.clean_training_set(cfg, validation=held_out),
        num_classes=int(common._info_get(info, "num_classes")),
        input_shape=tuple(int(d) for d in common._info_get(info, "input_shape")),
        name=cfg.dataset,
    )


def _fresh_model_builder(cfg: common.Config):
    """``builder(num_classes, input_shape, width, seed)``: a fresh ``--arch`` model."""

    def build(num_classes, input_shape, width=1, seed=None):
        info = {"num_classes": num_classes, "input_shape": tuple(input_shape)}
        return common.build_model(cfg.arch, width, info, cfg, seed=seed)

    return build


def _saved_student_builder(path: str):
    """``builder(num_classes, input_shape, ...)``: a copy of the saved float student at
    ``path``, checked against the data set's classes and input shape."""

    def load(num_classes, input_shape, width=1, seed=None):
        return _check_student(common.load_model(path, what="--student"), path, num_classes,
                              input_shape)

    return load


def _check_student(model, path: str, num_classes: int, input_shape) -> Any:
    classes = int(model.output_shape[-1])
    shape = tuple(int(d) for d in model.input_shape[1:])
    if classes != int(num_classes) or shape != tuple(int(d) for d in input_shape):
        raise ValueError(
            f"--student={path} has {classes} classes and input {shape}, the data set "
            f"{num_classes} classes and input {tuple(input_shape)}: train the student on "
            "this data set (recipes/train_student.py with the same --dataset/--image_size).")
    return model


def trial_settings(cfg: common.Config) -> Dict[str, Any]:
    """Arguments of ``run_trial_config`` that come from the shared recipe options: the student
    of every trial is ``--student`` (the paper's Algorithm 1: quantize the trained float
    student) or, without it, a fresh ``--arch`` model."""
    student_builder = (_saved_student_builder(os.path.abspath(os.path.expanduser(cfg.student)))
                       if cfg.student else _fresh_model_builder(cfg))

    def optimizer(steps_per_epoch, epochs):
        return common.make_optimizer(cfg, steps_per_epoch, epochs)

    return dict(student_builder=student_builder, optimizer=optimizer, seed=cfg.seed)


def make_teacher_pool(cfg: common.Config) -> tuning.TeacherPool:
    """Teachers by width (trained once into output_dir/teachers/) or by saved path."""
    settings = trial_settings(cfg)
    return tuning.TeacherPool(
        builder=_fresh_model_builder(cfg), cache_dir=_paths(cfg)["teachers"],
        epochs=cfg.teacher_epochs or cfg.epochs, optimizer=settings["optimizer"], seed=cfg.seed,
        loader=common.load_model,
    )


def _teacher_keys(cfg: common.Config) -> List[str]:
    """``--teachers`` entries: widths as given, saved teachers as absolute paths (checked now),
    ensembles ``a+b`` as their members' keys joined by ``+``."""
    keys = []
    for t in parse_list(cfg.teachers, str, "teachers"):
        path = os.path.expanduser(t)
        if os.path.exists(path):
            keys.append(os.path.abspath(path))
            continue
        members = tuning.ensemble_members(t)
        if len(members) > 1:
            keys.append("+".join(_teacher_keys(cfg.replace(teachers=",".join(members)))))
            continue
        try:
            width = float(t)
        except ValueError:
            raise ValueError(
                f"--teachers: {t!r} is neither a width (e.g. 1, 1.5, 2) nor an existing saved "
                f"teacher (a model.h5 file or a recipes/train_teacher.py output directory)."
            ) from None
        if width <= 0:
            raise ValueError(f"--teachers: widths must be > 0, got {t!r}.")
        keys.append(t)
    return keys


def grid(cfg: common.Config) -> List[Dict[str, Any]]:
    """The grid's trial configs."""
    coefficients = parse_list(cfg.coefficient, float, "coefficient")
    configs = []
    for coefficient in coefficients:
        configs += tuning.grid_configs(
            temperatures=parse_list(cfg.temperatures, float, "temperatures"),
            teachers=_teacher_keys(cfg),
            schedules=parse_list(cfg.schedules, str, "schedules"),
            coefficient=coefficient,
            weight_bits=parse_list(cfg.weight_bits, int, "weight_bits"),
            activation_bits=cfg.activation_bits,
            epochs=cfg.epochs,
        )
    return configs


def search_space(cfg: common.Config) -> tuning.DistillationSearchSpace:
    """The search space of ``--mode=search`` (the same lists as the grid)."""
    return tuning.DistillationSearchSpace(
        temperatures=parse_list(cfg.temperatures, float, "temperatures"),
        teachers=_teacher_keys(cfg),
        schedules=parse_list(cfg.schedules, str, "schedules"),
        coefficients=parse_list(cfg.coefficient, float, "coefficient"),
        weight_bits=parse_list(cfg.weight_bits, int, "weight_bits"),
        activation_bits=cfg.activation_bits,
        epochs=cfg.epochs,
    )


def build_tuner(cfg: common.Config) -> tuning.DistillationTuner:
    """The keras-tuner project of ``--mode=search`` (resumes from ``output_dir/tuner``)."""
    paths = _paths(cfg)
    settings = trial_settings(cfg)
    oracle = tuning.make_oracle(cfg.oracle, objective=cfg.objective, max_trials=cfg.max_trials,
                                max_epochs=cfg.epochs, seed=cfg.seed + 1)
    return tuning.DistillationTuner(
        oracle, search_space=search_space(cfg), teachers=make_teacher_pool(cfg),
        student_builder=settings["student_builder"], epochs=cfg.epochs,
        csv_path=paths["csv"], log=common.log,
        trial_kwargs={"optimizer": settings["optimizer"], "seed": cfg.seed},
        directory=paths["tuner"], project_name=f"search_{cfg.oracle}",
        overwrite=bool(cfg.overwrite),
    )


def _pretrained_student(cfg: common.Config, data: tuning.TrialData,
                        paths: Dict[str, str]) -> common.Config:
    """Trains the float student once (hard labels, or KD from the first --teachers entry) into
    ``output_dir/student_<mode>.h5``; returns ``cfg`` with ``--student`` pointing at it."""
    path = paths["student"]
    if os.path.exists(path):
        common.log(f"float student: {path} (trained before)")
    elif cfg.mode == "search" and _distributed():
        # Each worker would train its own copy: the trials must share one student.
        raise ValueError(f"--pretrain_student in a distributed search: train the student first "
                         f"(the same command without KERASTUNER_* variables writes {path}), or "
                         "pass --student.")
    else:
        teacher = None
        if cfg.pretrain_student == "kd":
            first = _teacher_keys(cfg)[0]
            teacher = make_teacher_pool(cfg).get(first, data)
        common.log(f"float student: training it once ({cfg.pretrain_student}"
                   + (f" from teacher {_teacher_keys(cfg)[0]}" if teacher is not None else "")
                   + f") -> {path}")
        epochs = cfg.student_epochs or cfg.teacher_epochs or cfg.epochs
        settings = trial_settings(cfg)
        tuning.pretrain_student(_fresh_model_builder(cfg), data, path, teacher=teacher,
                                temperature=common.KD_DEFAULTS["temperature"], epochs=epochs,
                                optimizer=settings["optimizer"], seed=cfg.seed)
    return cfg.replace(student=path)


def _distributed() -> bool:
    from keras_tuner.src.distribute import utils as dist_utils

    return dist_utils.has_chief_oracle()


def _baselines(cfg, data, paths) -> None:
    """Trains the hard-label quantized student once per weight bit-width (skipped if done)."""
    configs = [tuning.normalize_config({"teacher": "none", "weight_bits": b,
                                        "activation_bits": cfg.activation_bits,
                                        "epochs": cfg.epochs, "coefficient": 0.0})
               for b in parse_list(cfg.weight_bits, int, "weight_bits")]
    settings = trial_settings(cfg)
    tuning.run_grid(configs, data, paths["baseline_csv"], log=common.log, **settings)


def draw(cfg: common.Config) -> Dict[str, List[str]]:
    """Redraws every figure from ``trials.csv`` (and ``baseline.csv``)."""
    paths = _paths(cfg)
    baseline_csv = paths["baseline_csv"] if os.path.exists(paths["baseline_csv"]) else None
    figures = tuning.plot_results(paths["csv"], paths["root"], baseline_csv=baseline_csv)
    for name, files in figures.items():
        common.log(f"figure {name}: {', '.join(os.path.basename(f) for f in files)}")
    return figures


def _summary(cfg, paths, figures, elapsed) -> Dict[str, Any]:
    rows = tuning.read_results(paths["csv"])
    # Chosen on validation; its test accuracy is reported, never compared.
    metric = "val_accuracy"
    best = max(rows, key=lambda r: r[metric]) if rows else None
    baseline = tuning.read_results(paths["baseline_csv"])
    result = {
        "mode": cfg.mode, "trials": len(rows), "best_metric": metric,
        "best": {k: best[k] for k in tuning.HYPERPARAMETERS + tuning.METRICS if k in best}
        if best else None,
        "baseline_test_accuracy": baseline[0]["test_accuracy"] if baseline else None,
        "figures": figures, "csv": paths["csv"], "wall_time_s": elapsed,
    }
    common.atomic_write_json(paths["results"], result)
    return result


def _check_list(cfg: common.Config, name: str, cast, ok, accepted: str) -> None:
    for value in parse_list(getattr(cfg, name), cast, name):
        if not ok(value):
            raise ValueError(f"--{name}={getattr(cfg, name)!r}: {value!r} is out of range; "
                             f"pass {accepted}.")


def check_inputs(cfg: common.Config) -> List[Dict[str, Any]]:
    """Parses and checks every list and saved teacher before anything is trained or deleted.

    Returns the grid's trial configs (``--mode=grid``) or ``[]`` (search). A saved teacher given
    by path is loaded once here, so a corrupt file fails now rather than after the baseline.

    Example:
        >>> check_inputs(make_config("smoke", temperatures="abc,0"))
        Traceback (most recent call last):
        ...
        ValueError: --temperatures: cannot read 'abc,0' (could not convert string to float: 'abc').
    """
    _check_list(cfg, "temperatures", float, lambda v: v > 0, "numbers > 0 (e.g. 1,2,4)")
    _check_list(cfg, "coefficient", float, lambda v: 0 <= v <= 1, "numbers in [0, 1]")
    _check_list(cfg, "weight_bits", int, lambda v: 1 <= v <= 8, "bit-widths in 1..8")
    _check_list(cfg, "schedules", str, lambda v: v.strip().lower() in tuning.SCHEDULES,
                f"schedules among {', '.join(tuning.SCHEDULES)}")
    if cfg.activation_bits is not None and not 1 <= cfg.activation_bits <= 8:
        raise ValueError(f"--activation_bits must be in 1..8 (or absent: float activations), "
                         f"got {cfg.activation_bits!r}.")
    if cfg.teacher_epochs is not None and cfg.teacher_epochs < 1:
        raise ValueError(f"--teacher_epochs must be >= 1 (or absent: --epochs), got "
                         f"{cfg.teacher_epochs!r}.")
    if not 0.0 <= cfg.validation < 1.0:
        raise ValueError(f"--validation must be a fraction in [0, 1) of the training images "
                         f"(e.g. 0.1; 0: compare trials on the test split), got "
                         f"{cfg.validation!r}.")
    configs = grid(cfg) if cfg.mode == "grid" else []
    if cfg.mode == "search":
        search_space(cfg)
    for key in _teacher_keys(cfg):
        if os.path.isabs(key):
            common.load_model(key, what="--teachers entry")
    if cfg.student and cfg.pretrain_student != "none":
        raise ValueError(f"--student and --pretrain_student={cfg.pretrain_student} both give the "
                         "float student: pass one (--pretrain_student=none keeps --student).")
    if cfg.student:
        from tfqkd import data as tdata

        info = tdata.dataset_info(cfg.dataset, **common.data_source_kwargs(cfg))
        _check_student(common.load_model(cfg.student, what="--student"), cfg.student,
                       common._info_get(info, "num_classes"),
                       common._info_get(info, "input_shape"))
    return configs


def run(cfg: common.Config) -> Dict[str, Any]:
    """Runs (or continues) the sweep described by ``cfg``; returns the content of results.json."""
    start = time.time()
    paths = _paths(cfg)
    if cfg.overwrite and not cfg.plot_only:
        common.check_deletable(paths["root"])  # before anything is loaded
    if cfg.plot_only:
        os.makedirs(paths["root"], exist_ok=True)
        figures = draw(cfg)
        return _summary(cfg, paths, figures, time.time() - start)
    # Every list, teacher and the data set are checked before training or deleting anything.
    configs = check_inputs(cfg)
    chief_oracle = False
    if cfg.mode == "search":
        from keras_tuner.src.distribute import utils as dist_utils

        chief_oracle = dist_utils.is_chief_oracle()
    data = None if chief_oracle else load_trial_data(cfg)
    if cfg.overwrite and os.path.isdir(paths["root"]) and os.listdir(paths["root"]):
        import shutil

        common.check_deletable(paths["root"])
        common.log(f"--overwrite: deleting the previous sweep in {paths['root']}")
        shutil.rmtree(paths["root"])
        cfg = cfg.replace(overwrite=False)
    os.makedirs(paths["root"], exist_ok=True)
    common.atomic_write_json(os.path.join(paths["root"], f"run_config_{cfg.mode}.json"),
                             cfg.to_dict())
    common.set_seed(cfg.seed)
    if cfg.pretrain_student != "none" and not chief_oracle:
        cfg = _pretrained_student(cfg, data, paths)
    if cfg.mode == "grid":
        if cfg.baseline:
            _baselines(cfg, data, paths)
        common.log(f"grid of {len(configs)} trials -> {paths['csv']}")
        tuning.run_grid(configs, data, paths["csv"], teachers=make_teacher_pool(cfg),
                        log=common.log, **trial_settings(cfg))
    else:
        tuner = build_tuner(cfg)
        if chief_oracle:
            # The chief only serves the oracle; workers train.
            tuner.search()
            return {"mode": "search", "role": "chief"}
        if cfg.baseline and not dist_utils.has_chief_oracle():
            _baselines(cfg, data, paths)
        remaining = tuner.remaining_trials
        common.log(f"{cfg.oracle} search, {remaining if remaining is not None else 'Hyperband'} "
                   f"trial(s) to run -> {tuner.project_dir}")
        tuner.search(data, verbose=0)
        if dist_utils.has_chief_oracle():
            return {"mode": "search", "role": "worker", "trials_run": tuner.run_trial_calls}
        best = tuner.get_best_hyperparameters(1)
        if best:
            common.log(f"best hyper-parameters: {best[0].values}")
    figures = draw(cfg) if os.path.exists(paths["csv"]) else {}
    result = _summary(cfg, paths, figures, time.time() - start)
    common.log(f"sweep done: {result['trials']} trials, best {result['best_metric']} "
               f"{result['best'] and result['best'].get(result['best_metric'])}")
    return result


def _main(argv):
    del argv
    run(common.config_from_flags(OPTIONS, PRESETS))


def main() -> None:
    """The command line (console script ``tfqkd-sweep``): absl flags from ``OPTIONS``."""
    common.run_main(_main, OPTIONS)


if __name__ == "__main__":
    main()
