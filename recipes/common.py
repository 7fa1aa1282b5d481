"""Shared machinery of the command-line recipes: options, presets, output directory, resume.

Every recipe is thin: *options → library calls → results*. This module owns everything recipes
have in common so that each recipe file only says what it trains.

Options and presets
    A recipe declares its options as a list of :class:`Option` (``COMMON_OPTIONS`` + its own).
    The same list serves two front ends:

    * the command line: ``define_flags(options)`` creates the absl flags, and
      ``config_from_flags(options, presets)`` reads them back after parsing;
    * Python (quick start, benchmarks, tests): ``make_config(options, presets, preset="smoke",
      epochs=3)`` builds the same :class:`Config` without absl.

    Resolution order, lowest to highest: the option's default → ``PRESETS[preset]`` (shared) →
    the recipe's own ``presets[preset]`` → values given explicitly (flags present on the command
    line, or keyword overrides). An explicit flag therefore always wins over a preset, e.g.
    ``--preset=cpu --epochs=3``. ``--preset`` defaults to ``paper`` (the paper's full schedule);
    ``smoke`` runs in seconds on tiny models and little data; ``cpu`` is the reduced budget for a
    2-core machine with the offline CIFAR-10 archive.

Output directory (``OutputDir``)
    ``output_dir/model/model.h5``   the trained model; load with :func:`load_model` (it enters
                                    ``tfqkd.quantize_scope()`` so quantized models reload).
    ``output_dir/checkpoints/``     ``BackupAndRestore`` state (weights, optimizer, epoch, step);
                                    kept after training so a crashed finish can be resumed.
    ``output_dir/logs/``            TensorBoard event files.
    ``output_dir/history.csv``      one row per epoch (rewritten atomically after every epoch).
    ``output_dir/run_config.json``  the resolved configuration of the run (written at start).
    ``output_dir/results.json``     written LAST: its presence marks a completed run.

    Every file is written to a temporary name and moved into place with ``os.replace``, so a kill
    at any instant leaves either the old or the new complete file, never half of one.

Resume and re-run policy
    Running the same command again after a crash (even SIGKILL mid-epoch) resumes from the last
    ``BackupAndRestore`` checkpoint: weights, optimizer state (hence the learning-rate and λ
    schedules, which are functions of the optimizer's iteration counter), epoch and, with an
    integer ``--save_freq``, the step inside the epoch. The run ends with the same total number of
    epochs as an uninterrupted one; ``history.csv`` keeps one row per epoch.
    Re-running a *completed* run (``results.json`` present) with the same options trains
    nothing: it prints the stored result and returns it; a runtime-only addition is carried out on
    the finished model (``--export=int8`` exports, verifies and records it in results.json).
    Resuming or re-running with different training options is refused, for a partial and a
    finished run alike (the error lists the differing options); runtime-only options
    (``RUNTIME_KEYS``: ``--distribute``, ``--progress``, ``--export``, ...) may change.
    ``--overwrite`` deletes the directory and trains afresh, but only a directory that holds a
    tfqkd run (its ``run_config.json``; never the working directory or one of its parents), and
    only once every input has been checked: the recipe calls :meth:`Run.begin` after loading the
    data and building its models, so a typo in ``--teacher`` never costs a finished run.

Distribution
    ``make_strategy("none" | "mirrored" | "multi_worker", cpu_devices=N)``.
    ``multi_worker`` builds a ``MultiWorkerMirroredStrategy`` that reads ``TF_CONFIG``; every
    worker runs the same command, only the chief writes ``model/``, ``history.csv`` and
    ``results.json`` — other workers write to temporary directories that are deleted afterwards,
    as the TensorFlow multi-worker guide recommends. Create the strategy before anything else
    touches TensorFlow (the recipes' ``run`` functions do).

Typical recipe body::

    cfg = common.config_from_flags(OPTIONS, PRESETS)              # or make_config(...)
    run = common.start_run(cfg, "runs/my_recipe")                 # dir, strategy, seed, data
    if run.finished is not None:                                  # results.json already there
        return run.finished
    with run.strategy.scope():
        model = common.build_model(cfg.arch, cfg.width, run.data.info, cfg)
        model.compile(optimizer=common.make_optimizer(cfg, run.data.steps_per_epoch), ...)
    run.begin()                                                   # inputs OK: --overwrite, config
    common.fit_with_resume(model, run.data.train, run.data.test, cfg.epochs, run.out,
                           save_freq=cfg.save_freq)
    return common.finish_run(run, model, "my model")              # evaluate, save, results.json

Public names: ``Option``, ``Config``, ``COMMON_OPTIONS``, ``PRESETS``, ``RUNTIME_KEYS``,
``define_flags``, ``define_common_flags``, ``config_from_flags``, ``make_config``,
``merge_presets``, ``make_strategy``, ``is_chief``, ``set_seed``, ``OutputDir``, ``Data``,
``load_data``, ``build_model``, ``make_lr_schedule``, ``make_optimizer``, ``fit_with_resume``,
``evaluate_accuracy``, ``write_results``, ``Run``, ``start_run``, ``load_or_build_student``,
``export_and_verify``, ``finish_run``, ``versions``, ``load_model``, ``check_deletable``,
``RUN_MARKERS``, ``run_main``, ``log``,
``atomic_write_text``, ``atomic_write_json``, ``HistoryLogger``, ``EpochLogger``,
``ScalarSummaries``, ``quiet_logs``, ``data_source_kwargs``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import types
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Recipes are run as scripts (`python recipes/x.py`): make the repository importable without an
# install, and make sibling recipes importable as `recipes.x` or plain `x`.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tfqkd._keras import keras, tf  # noqa: E402  (selects Keras 2 before anything else)
from tfqkd._io import atomic_path, atomic_write  # noqa: E402
from tfqkd.finite import NonFiniteError, StopOnNonFinite  # noqa: E402

__all__ = [
    "data_kwargs_for_model", "Option", "Config", "COMMON_OPTIONS", "PRESETS", "RUNTIME_KEYS", "define_flags",
    "define_common_flags", "config_from_flags", "make_config", "merge_presets", "make_strategy",
    "is_chief", "set_seed", "OutputDir", "Data", "load_data", "build_model", "make_lr_schedule",
    "make_optimizer", "fit_with_resume", "evaluate_accuracy", "write_results", "versions",
    "load_model", "log", "run_main", "check_deletable", "RUN_MARKERS", "Run", "start_run",
    "finish_run",
    "atomic_write_text", "atomic_write_json", "HistoryLogger", "EpochLogger",
    "ScalarSummaries", "quiet_logs", "BENCHMARK_KD",
    "data_source_kwargs",
]

#: KD settings of the CIFAR-10 reproduction benchmark (``tools/reproduce_cpu.py``), chosen there
#: on a holdout (docs/recipes.md); the quick start uses them too, so demo and benchmark agree.
BENCHMARK_KD = types.MappingProxyType({"temperature": 4.0, "temperature_squared": True})


# --------------------------------------------------------------------------------------------
# Options, presets, configs
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    """One recipe option: becomes an absl flag and a :class:`Config` attribute.

    ``kind`` is one of ``string``, ``integer``, ``float``, ``bool``, ``enum``, ``multi_string``.

    Example:
        >>> Option("epochs", 200, "Training epochs.", "integer").name
        'epochs'
    """

    name: str
    default: Any
    help: str
    kind: str = "string"
    choices: Optional[Sequence[str]] = None
    #: Defaults the option had before: a run recorded with one of them resumes with it when the
    #: option is not given explicitly (see :meth:`OutputDir.check_options`).
    former_defaults: Sequence[Any] = ()


class Config(types.SimpleNamespace):
    """The resolved options of one run (attribute access; ``to_dict``; ``replace``).

    Example:
        >>> Config(epochs=3).replace(epochs=5).to_dict()
        {'epochs': 5}
    """

    def to_dict(self) -> Dict[str, Any]:
        # ``_explicit`` (names given explicitly, set by make_config / the flags) is not an option
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()
                if not k.startswith("_")}

    def replace(self, **changes: Any) -> "Config":
        d = dict(vars(self))
        d.update(changes)
        if "_explicit" in d:
            d["_explicit"] = frozenset(d["_explicit"]) | set(changes)
        return Config(**d)


#: Options every recipe has. Defaults are the paper preset (common CIFAR practice):
#: SGD momentum 0.9, lr 0.1 at batch 128 (the usual linear-scaling reference point of He et al.),
#: weight decay 1e-4 (ResNet paper), cosine decay to 0 over the run, 200 epochs.

def _model_names() -> Tuple[str, ...]:
    from tfqkd.models import applications

    return tuple(n for n in applications.names() if n not in ("resnet20", "wide_resnet20",
                                                               "tiny_resnet"))

COMMON_OPTIONS: List[Option] = [
    Option("output_dir", None, "Directory for model/, checkpoints/, logs/, history.csv, "
           "results.json. Default: runs/<recipe>."),
    Option("preset", "paper", "Budget preset: smoke (seconds, tiny model, little data), cpu "
           "(reduced offline budget on 2 cores), paper (the paper's full schedule). Explicit "
           "flags override the preset.", "enum", ("smoke", "cpu", "paper")),
    Option("dataset", "cifar10", "Data set: cifar10, cifar100, digits, or your own data: "
           "folder:PATH (PATH/train/<class>/*.jpg|png, PATH/test/<class>/...), npz:PATH "
           "(x_train, y_train, x_test, y_test) or tfds:NAME (prepared offline; see docs/data.md)."),
    Option("data_dir", None, "Offline data source (archive, folder or npz; see tfqkd.data); "
           "tfds:NAME's data folder; the base of a relative folder:/npz: path. Default: "
           "$TFQKD_DATA_DIR, then tfds."),
    Option("image_size", None, "Resize every image to N x N pixels (absent: the data's own "
           "size; needed when a folder's images differ in size).", "integer"),
    Option("alpha", 1.0, "Width multiplier of a --student / --teacher / --arch given as a "
           "tf_keras.applications name (mobilenet, mobilenet_v2, mobilenet_v3_*: e.g. 0.35; "
           "other families have none).", "float"),
    Option("skip_corrupt_images", False, "Leave image files that do not decode out of the data "
           "set, with one warning naming how many and the first few (default: such a file is an "
           "error naming it).", "bool"),
    Option("subset", None, "Use a fixed class-balanced subset of this many training images "
           "(a multiple of the class count; absent or 0: all).", "integer"),
    Option("test_subset", None, "Evaluate on this many test images (class-balanced; absent or "
           "0: all).", "integer"),
    Option("subset_seed", None, "Seed of the --subset / --test_subset choice alone (default: "
           "--seed): keeps the images fixed across runs with different seeds.", "integer"),
    Option("batch_size", 128, "Global batch size (split across replicas).", "integer"),
    Option("epochs", 200, "Training epochs.", "integer"),
    Option("learning_rate", 0.1, "Peak SGD learning rate (0.1 for batch 128; scale linearly "
           "with the batch size).", "float"),
    Option("lr_schedule", "cosine", "Learning-rate schedule: cosine (to 0), step (x0.1 at 50% "
           "and 75% of the run) or constant.", "enum", ("cosine", "step", "constant")),
    Option("warmup_epochs", 0, "Linear learning-rate warm-up epochs (cosine only).", "integer"),
    Option("momentum", 0.9, "SGD momentum.", "float"),
    Option("weight_decay", 1e-4, "Weight decay, applied by tfqkd.models as an L2 regularizer "
           "with gradient weight_decay*w.", "float"),
    Option("arch", "resnet", "Architecture family: resnet (ResNet20 / WideResNet20xN), tiny "
           "(tfqkd.models.tiny_resnet, for smoke tests) or a tf_keras.applications name of "
           "tfqkd.models.get (mobilenet_v2, efficientnet_b0, ...; with --alpha).", "enum",
           ("resnet", "tiny", *_model_names())),
    Option("seed", 0, "Random seed (weights, data order, augmentation).", "integer"),
    Option("distribute", "none", "tf.distribute strategy: none, mirrored (all local GPUs, else "
           "the logical CPUs) or multi_worker (MultiWorkerMirroredStrategy from TF_CONFIG).",
           "enum", ("none", "mirrored", "multi_worker")),
    Option("cpu_devices", 1, "Split the CPU into this many logical devices (lets "
           "--distribute=mirrored run replicas on a CPU-only machine).", "integer"),
    Option("save_freq", "epoch", "Checkpoint every epoch ('epoch') or every N training steps "
           "(an integer), for resume after a crash."),
    Option("validation_freq", 1, "Evaluate on the test split every N epochs during training "
           "(0: only at the end).", "integer"),
    Option("progress", "auto", "auto (Keras progress bar on a terminal, one line per epoch "
           "otherwise), bar, line or none.", "enum", ("auto", "bar", "line", "none")),
    Option("overwrite", False, "Delete an existing (complete or partial) run in output_dir and "
           "train afresh.", "bool"),
]

#: Shared preset values for COMMON_OPTIONS; recipes add their own per-preset values on top.
PRESETS: Dict[str, Dict[str, Any]] = {
    "smoke": dict(arch="tiny", subset=500, test_subset=250, batch_size=50, epochs=2,
                  learning_rate=0.05, save_freq="4", validation_freq=1),
    "cpu": dict(arch="resnet", subset=10_000, test_subset=None, batch_size=128, epochs=15,
                learning_rate=0.1),
    "paper": dict(arch="resnet", subset=None, test_subset=None, batch_size=128, epochs=200,
                  learning_rate=0.1),
}

#: Options that may differ between the attempts of one run without invalidating the checkpoint.
RUNTIME_KEYS = frozenset({
    "output_dir", "distribute", "cpu_devices", "progress", "overwrite", "validation_freq",
    "export", "data_dir",
})


def merge_presets(*preset_dicts: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Merges preset tables; later tables win per preset and per key.

    Example:
        >>> merge_presets({"smoke": {"a": 1}}, {"smoke": {"b": 2}})["smoke"]
        {'a': 1, 'b': 2}
    """
    out: Dict[str, Dict[str, Any]] = {}
    for table in preset_dicts:
        for name, values in (table or {}).items():
            out.setdefault(name, {}).update(values)
    return out


def define_flags(options: Iterable[Option], flag_values=None) -> None:
    """Creates one absl flag per option (call once, in the script's ``__main__`` block).

    Example:
        >>> from absl import flags
        >>> fv = flags.FlagValues()
        >>> define_flags([Option("epochs", 3, "Epochs.", "integer")], fv)
        >>> fv(["prog", "--epochs=5"]) and fv.epochs
        5
    """
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    for o in options:
        if o.name in fv:
            continue
        kw = dict(flag_values=fv)
        if o.kind == "string":
            flags.DEFINE_string(o.name, o.default, o.help, **kw)
        elif o.kind == "integer":
            flags.DEFINE_integer(o.name, o.default, o.help, **kw)
        elif o.kind == "float":
            flags.DEFINE_float(o.name, o.default, o.help, **kw)
        elif o.kind == "bool":
            flags.DEFINE_bool(o.name, o.default, o.help, **kw)
        elif o.kind == "enum":
            flags.DEFINE_enum(o.name, o.default, list(o.choices), o.help, **kw)
        elif o.kind == "multi_string":
            flags.DEFINE_multi_string(o.name, o.default, o.help, **kw)
        else:
            raise ValueError(f"Option {o.name!r} has unknown kind {o.kind!r}.")


def define_common_flags(flag_values=None) -> None:
    """Defines the flags of ``COMMON_OPTIONS`` (shorthand for ``define_flags(COMMON_OPTIONS)``)."""
    define_flags(COMMON_OPTIONS, flag_values)


#: Every option's default, by name, as resolved so far: a run saved before an option existed
#: ran with its default, so resuming it with the default is not a change of options.
_OPTION_DEFAULTS: Dict[str, Any] = {}
#: Former defaults by option name (``Option.former_defaults``), as resolved so far.
_FORMER_DEFAULTS: Dict[str, List[Any]] = {}


def _resolve(options, presets, preset, explicit: Mapping[str, Any]) -> Config:
    options = list(options)
    names = {o.name for o in options}
    unknown = set(explicit) - names
    if unknown:
        raise ValueError(f"Unknown option(s) {sorted(unknown)}; known: {sorted(names)}.")
    table = merge_presets(PRESETS, presets or {})
    if preset not in table:
        raise ValueError(f"Unknown preset {preset!r}; use one of {sorted(table)}.")
    values = {o.name: o.default for o in options}
    _OPTION_DEFAULTS.update(_jsonable(values))
    _FORMER_DEFAULTS.update({o.name: _jsonable(list(o.former_defaults))
                             for o in options if o.former_defaults})
    values.update({k: v for k, v in table[preset].items() if k in names})
    values.update(explicit)
    values["preset"] = preset
    for key in ("subset", "test_subset"):  # 0 on the command line means "all" (None)
        if key in values and values[key] == 0:
            values[key] = None
    cfg = Config(**values, _explicit=frozenset(explicit))
    _validate(cfg)
    return cfg


def _adopt_former_defaults(cfg: Config, old: Mapping[str, Any]) -> Dict[str, Any]:
    """Options of a recorded run that had a former default: taken into ``cfg`` (in place) when
    ``cfg`` has today's default and the option was not given explicitly. Returns them."""
    explicit = getattr(cfg, "_explicit", None)
    if explicit is None:  # a Config not built by make_config / the flags: nothing is implicit
        return {}
    adopted = {}
    for name, formers in _FORMER_DEFAULTS.items():
        if name in explicit or name not in old or not hasattr(cfg, name):
            continue
        now = _jsonable(getattr(cfg, name))
        if old[name] != now and old[name] in formers and now == _OPTION_DEFAULTS.get(name):
            setattr(cfg, name, old[name])
            adopted[name] = old[name]
    return adopted


def _validate(cfg: Config) -> None:
    sf = getattr(cfg, "save_freq", "epoch")
    if sf != "epoch":
        try:
            ok = int(sf) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"--save_freq must be 'epoch' or a positive integer, got {sf!r}.")
    for name in ("epochs", "batch_size"):
        if hasattr(cfg, name) and (getattr(cfg, name) is None or getattr(cfg, name) < 1):
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)!r}.")
    if getattr(cfg, "cpu_devices", 1) < 1:
        raise ValueError(f"--cpu_devices must be >= 1, got {cfg.cpu_devices!r}.")
    if getattr(cfg, "precise_bn_batches", 0) < 0:  # the quantized recipes' option
        raise ValueError(f"--precise_bn_batches={cfg.precise_bn_batches}: pass a number of "
                         "training batches >= 1, or 0 to skip the re-estimation.")
    _check_numbers(cfg)


#: Numeric option ranges checked for every recipe that has the option: name -> (test, accepted).
#: Sweep options that hold comma-separated lists are strings and are checked by the sweep itself.
_RANGES = {
    "learning_rate": (lambda v: v > 0, "a number > 0 (e.g. 0.1 for batch 128)"),
    "teacher_learning_rate": (lambda v: v > 0, "a number > 0 (or absent)"),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "warmup_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "validation_freq": (lambda v: v >= 0, "an integer >= 0 (0: evaluate only at the end)"),
    "subset": (lambda v: v > 0, "a positive number of images (absent or 0: all)"),
    "test_subset": (lambda v: v > 0, "a positive number of images (absent or 0: all)"),
    "temperature": (lambda v: v > 0, "a number > 0 (e.g. 1, 2, 4)"),
    "coefficient": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "coefficient_end": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "teacher_coefficient": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "width": (lambda v: v > 0, "a number > 0 (1 = ResNet20)"),
    "teacher_width": (lambda v: v > 0, "a number > 0"),
}


def _check_numbers(cfg: Config) -> None:
    for name, (ok, accepted) in _RANGES.items():
        value = getattr(cfg, name, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # absent, None, or a sweep's comma-separated list
        if not (math.isfinite(value) and ok(value)):
            raise ValueError(f"--{name}={value!r} is out of range: pass {accepted}.")


def config_from_flags(options: Iterable[Option], presets=None, flag_values=None) -> Config:
    """Builds the run's :class:`Config` from parsed absl flags (presets under explicit flags).

    A flag counts as explicit when it appears on the command line (or in a flagfile).
    """
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    options = list(options)
    explicit = {o.name: fv[o.name].value for o in options
                if o.name != "preset" and fv[o.name].present}
    return _resolve(options, presets, fv["preset"].value, explicit)


def make_config(options: Iterable[Option], presets=None, preset: str = "paper",
                **overrides: Any) -> Config:
    """Builds a :class:`Config` in Python, exactly as the command line would.

    Example:
        >>> cfg = make_config(COMMON_OPTIONS, preset="smoke", epochs=3)
        >>> (cfg.arch, cfg.epochs, cfg.batch_size)
        ('tiny', 3, 50)
    """
    return _resolve(options, presets, preset, overrides)


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------

def run_main(main: Any, options: Iterable[Option] = ()) -> None:
    """The ``__main__`` block of a recipe: defines the flags and runs ``main`` with absl.

    Ctrl-C prints one line saying the checkpoints are kept and exits with status 130 (the shell's
    code for SIGINT) instead of a long trace. A diverged run (``NonFiniteError``) and a bad input
    (``ValueError``, a missing or misplaced file) print their message alone, ``error: ...``, and
    exit with status 1; ``TFQKD_TRACEBACK=1`` shows the full trace instead.
    """
    from absl import app

    define_flags(options)
    interrupted = ("\ninterrupted (Ctrl-C). The last checkpoint is kept: run the same command to "
                   "resume.")

    def on_sigint(signum, frame):
        # Raising KeyboardInterrupt into TensorFlow (e.g. while Keras creates the next epoch's
        # iterator) sometimes corrupted the heap and the process died of SIGABRT (1 run in 5).
        # Exit at once instead; only an atomic file write is interrupted by raising, so that
        # its temporary file is removed (tfqkd._io), and the handler below then exits.
        from tfqkd import _io

        if _io.writes_in_progress():
            raise KeyboardInterrupt
        print(interrupted, file=sys.stderr, flush=True)
        os._exit(130)

    def wrapped(argv):
        signal.signal(signal.SIGINT, on_sigint)
        try:
            return main(argv)
        except KeyboardInterrupt:
            print(interrupted, file=sys.stderr, flush=True)
            os._exit(130)  # skip TensorFlow's teardown, which can hang or trace after SIGINT
        except (NonFiniteError, ValueError, FileNotFoundError, NotADirectoryError,
                FileExistsError) as e:
            if os.environ.get("TFQKD_TRACEBACK"):
                raise
            # The messages name the flag or file and the fix; a trace would bury them.
            print(f"error: {e}\n(set TFQKD_TRACEBACK=1 to see the full trace)", file=sys.stderr,
                  flush=True)
            sys.exit(1)

    app.run(wrapped)


def log(msg: str) -> None:
    """Prints one timestamped line (flushed, so logs of killed runs are complete)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)




def quiet_logs() -> None:
    """Silences TensorFlow/absl INFO chatter and Keras' HDF5 'legacy format' warning.

    Recipes print their own concise lines; absl's ``app.run`` would otherwise route TensorFlow's
    per-checkpoint INFO messages to stderr.
    """
    import logging
    import warnings

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    tf.get_logger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*HDF5 file via `model.save\\(\\)`.*")
    warnings.filterwarnings("ignore", message=".*saving your model as an HDF5 file.*")


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` via a temporary file in the same directory + ``os.replace``."""
    atomic_write(path, text)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # NumPy / TF scalars
        try:
            return x.item()
        except (TypeError, ValueError):
            pass
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def atomic_write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def versions() -> Dict[str, str]:
    """Versions of python, tensorflow, tf_keras, tfmot and tfqkd (for results.json)."""
    import tfqkd

    out = {"python": platform.python_version(), "tensorflow": tf.__version__,
           "tf_keras": getattr(keras, "__version__", "?"), "tfqkd": tfqkd.__version__}
    try:
        import tensorflow_model_optimization as tfmot

        out["tfmot"] = tfmot.__version__
    except Exception as e:  # pragma: no cover - tfmot is a hard dependency
        out["tfmot"] = f"unavailable ({type(e).__name__})"
    return out


def set_seed(seed: Optional[int]) -> None:
    """Seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``); None: no-op."""
    if seed is not None:
        keras.utils.set_random_seed(int(seed))


# --------------------------------------------------------------------------------------------
# Distribution
# --------------------------------------------------------------------------------------------

def make_strategy(name: str = "none", cpu_devices: int = 1) -> tf.distribute.Strategy:
    """Returns the ``tf.distribute`` strategy for ``--distribute``.

    ``none``: the default (no-op) strategy. ``mirrored``: ``MirroredStrategy`` over all GPUs, or
    over all logical CPU devices when there is no GPU. ``multi_worker``:
    ``MultiWorkerMirroredStrategy``, which reads the cluster from ``TF_CONFIG``.
    ``cpu_devices > 1`` splits the CPU into logical devices first; that, and creating a
    multi-worker strategy, must happen before TensorFlow initialises its runtime, so call this
    before building models or datasets.

    Example:
        >>> make_strategy("none").num_replicas_in_sync
        1
    """
    if cpu_devices and cpu_devices > 1:
        cpus = tf.config.list_physical_devices("CPU")
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * int(cpu_devices))
        except RuntimeError as e:
            existing = len(tf.config.list_logical_devices("CPU"))
            if existing != cpu_devices:
                raise RuntimeError(
                    f"cpu_devices={cpu_devices} must be set before TensorFlow initialises its "
                    f"runtime (it already has {existing} logical CPU device(s)); call "
                    f"make_strategy first thing in the process.") from e
    if name in (None, "none"):
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            log("warning: --distribute=multi_worker without TF_CONFIG runs as a single worker.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--distribute must be none, mirrored or multi_worker, got {name!r}.")


def is_chief(strategy: Optional[tf.distribute.Strategy] = None) -> bool:
    """True unless this process is a non-chief worker of a multi-worker strategy.

    The chief is the ``chief`` task, or worker 0 when the cluster has no ``chief`` task.

    Example:
        >>> is_chief()
        True
    """
    if strategy is None and os.environ.get("TF_CONFIG"):
        # Before the strategy exists (e.g. --overwrite handling), ask TF_CONFIG directly.
        try:
            tfc = json.loads(os.environ["TF_CONFIG"])
            task = tfc.get("task", {})
            if "chief" in tfc.get("cluster", {}):
                return task.get("type") == "chief"
            return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0
        except (ValueError, TypeError, AttributeError):
            return True
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(strategy.extended, "_in_multi_worker_mode",
                                       lambda: False)():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    return task_type in (None, "worker") and task_id in (None, 0) and not has_chief


# --------------------------------------------------------------------------------------------
# Output directory
# --------------------------------------------------------------------------------------------

class OutputDir:
    """The layout and atomic writers of one run's output directory (see module docstring).

    Non-chief workers of a multi-worker run write to a temporary directory instead (deleted
    afterwards), so the shared directory only ever holds the chief's files.

    Example:
        >>> import tempfile, os
        >>> out = OutputDir(os.path.join(tempfile.mkdtemp(), "run"))
        >>> out.is_complete()
        False
        >>> _ = out.write_json("results.json", {"test_accuracy": 0.5})
        >>> out.is_complete()
        True
    """

    def __init__(self, path: str, *, overwrite: bool = False,
                 strategy: Optional[tf.distribute.Strategy] = None):
        if not path:
            raise ValueError("output_dir must be a non-empty path (pass --output_dir=DIR).")
        self.root = os.path.abspath(os.path.expanduser(path))
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise NotADirectoryError(
                f"--output_dir {path!r} is a file, not a directory; pass a directory for the "
                f"run's outputs (e.g. --output_dir={path}_run).")
        self.strategy = strategy
        self._started = time.time()
        self._previous_elapsed = 0.0
        self._attempt = 1
        self.overwrite = bool(overwrite)
        self.begun = False
        if self.overwrite:
            check_deletable(self.root)  # fail now, before anything is loaded or trained

    # Layout --------------------------------------------------------------------------------
    model_dir = property(lambda self: os.path.join(self.root, "model"))
    model_path = property(lambda self: os.path.join(self.root, "model", "model.h5"))
    checkpoint_dir = property(lambda self: os.path.join(self.root, "checkpoints"))
    log_dir = property(lambda self: os.path.join(self.root, "logs"))
    history_path = property(lambda self: os.path.join(self.root, "history.csv"))
    results_path = property(lambda self: os.path.join(self.root, "results.json"))
    config_path = property(lambda self: os.path.join(self.root, "run_config.json"))
    _state_path = property(lambda self: os.path.join(self.root, "checkpoints", "attempts.json"))

    @property
    def chief(self) -> bool:
        return is_chief(self.strategy)

    def attach(self, strategy: tf.distribute.Strategy) -> "OutputDir":
        """Tells the directory which strategy (hence which worker role) is writing."""
        self.strategy = strategy
        return self

    # Completion -----------------------------------------------------------------------------
    def is_complete(self) -> bool:
        """True when ``results.json`` exists (it is written last)."""
        return os.path.isfile(self.results_path)

    def read_results(self) -> Dict[str, Any]:
        with open(self.results_path) as f:
            return json.load(f)

    def report_complete(self) -> Dict[str, Any]:
        """Logs that the run is already complete and returns its stored results."""
        res = self.read_results()
        acc = res.get("test_accuracy")
        log(f"{self.root} is already complete (test_accuracy={acc}); nothing to do. "
            f"Pass --overwrite to train again.")
        return res

    # Start / resume checks ----------------------------------------------------------------------
    def has_state(self) -> bool:
        """True when a previous attempt saved training state (a checkpoint) or finished."""
        if self.is_complete():
            return True
        if not os.path.isdir(self.checkpoint_dir):
            return False
        return any(name != os.path.basename(self._state_path)
                   for name in os.listdir(self.checkpoint_dir))

    def check_options(self, cfg: Config, runtime_keys: Iterable[str] = ()) -> None:
        """Refuses to resume (or re-report) a run trained with other training options.

        Only a run that has saved training state (or finished) is protected: one that failed
        before its first checkpoint (bad flag, missing data) may be re-run with corrected options.
        """
        if not self.has_state():
            return
        old = None
        if os.path.isfile(self.config_path):
            with open(self.config_path) as f:
                old = json.load(f)
        elif self.is_complete():
            old = self.read_results().get("flags")
        if not isinstance(old, dict):
            return
        ignore = set(RUNTIME_KEYS) | set(runtime_keys)
        # An option missing from the old run's record did not exist then: it ran with the default
        # of that time (its first default, when the default changed since).
        first = {k: (_FORMER_DEFAULTS.get(k) or [_OPTION_DEFAULTS.get(k)])[0]
                 for k in cfg.to_dict() if k in _OPTION_DEFAULTS}
        old = {**{k: v for k, v in first.items() if k not in old}, **old}
        adopted = _adopt_former_defaults(cfg, old)
        if adopted:
            log(f"{self.root} was recorded with former defaults, kept for this run: "
                + ", ".join(f"--{k}={v!r}" for k, v in sorted(adopted.items()))
                + " (pass them explicitly to change them)")
        new = _jsonable(cfg.to_dict())
        diff = sorted(k for k in set(old) | set(new)
                      if k not in ignore and old.get(k) != new.get(k))
        if diff:
            details = ", ".join(f"--{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            if self.is_complete():
                raise ValueError(
                    f"{self.root} holds a finished run with different options ({details}). "
                    f"Re-run with the original options to see its result, pass --overwrite to "
                    f"delete it and train afresh, or choose another --output_dir.")
            raise ValueError(
                f"{self.root} holds a partial run with different options ({details}). "
                f"Re-run with the original options to resume, pass --overwrite to discard "
                f"it, or choose another --output_dir.")

    def begin(self, cfg: Config, runtime_keys: Iterable[str] = ()) -> None:
        """Starts writing: ``--overwrite`` deletes the old run now, then :meth:`start`.

        Call it once every input has been validated (data loaded, models built or loaded), so
        that a bad flag never deletes a finished run (:meth:`Run.begin` does this for recipes).
        """
        if self.begun:
            return
        if self.overwrite and self.chief and os.path.isdir(self.root) and os.listdir(self.root):
            check_deletable(self.root)  # again: the folder may have changed since the start
            log(f"--overwrite: deleting the previous run in {self.root}")
            shutil.rmtree(self.root)
        self.overwrite = False
        self.start(cfg, runtime_keys)
        self.begun = True

    def start(self, cfg: Config, runtime_keys: Iterable[str] = ()) -> None:
        """Records the configuration; refuses to resume a run trained with other options."""
        self.check_options(cfg, runtime_keys)
        new = _jsonable(cfg.to_dict())
        has_state = self.has_state()
        os.makedirs(self.root, exist_ok=True)
        if os.path.isfile(self._state_path):
            with open(self._state_path) as f:
                state = json.load(f)
            self._previous_elapsed = float(state.get("elapsed_s", 0.0))
            self._attempt = int(state.get("attempt", 0)) + 1
            if has_state and not self.is_complete() and self.chief:
                log(f"resuming the partial run in {self.root} (attempt {self._attempt})")
        if self.chief:
            atomic_write_json(self.config_path, new)
            self.record_progress()

    def record_progress(self) -> None:
        """Persists wall time spent so far (so results.json reports the total over attempts)."""
        if self.chief:
            atomic_write_json(self._state_path, {"attempt": self._attempt,
                                                 "elapsed_s": self.total_elapsed()})

    def elapsed(self) -> float:
        """Seconds since this attempt started."""
        return time.time() - self._started

    def total_elapsed(self) -> float:
        """Seconds over all attempts (previous attempts counted up to their last epoch end)."""
        return self._previous_elapsed + self.elapsed()

    # Writers -------------------------------------------------------------------------------------
    def _writable_root(self) -> str:
        if self.chief:
            return self.root
        d = tempfile.mkdtemp(prefix="tfqkd-worker-")
        return d

    def write_json(self, name: str, obj: Any) -> str:
        """Atomically writes ``root/name`` (a worker writes to a temp dir and deletes it)."""
        root = self._writable_root()
        path = os.path.join(root, name)
        atomic_write_json(path, obj)
        if root != self.root:
            shutil.rmtree(root, ignore_errors=True)
        return os.path.join(self.root, name)

    def write_text(self, name: str, text: str) -> str:
        """Atomically writes text to ``root/name`` (see :meth:`write_json`)."""
        root = self._writable_root()
        atomic_write_text(os.path.join(root, name), text)
        if root != self.root:
            shutil.rmtree(root, ignore_errors=True)
        return os.path.join(self.root, name)

    def save_model(self, model: keras.Model, subdir: str = "model") -> str:
        """Saves ``model`` to ``root/subdir/model.h5`` atomically; returns the path.

        HDF5 round-trips tfmot-quantized models (``load_model`` enters ``quantize_scope``) and
        saves in about a second, where a SavedModel takes 10+ s for ResNet20.
        """
        root = self._writable_root()
        d = os.path.join(root, subdir)
        os.makedirs(d, exist_ok=True)
        final = os.path.join(d, "model.h5")
        with atomic_path(final) as tmp:
            model.save(tmp, save_format="h5", include_optimizer=False)
        if root != self.root:
            shutil.rmtree(root, ignore_errors=True)
        return os.path.join(self.root, subdir, "model.h5")


#: Files and folders a recipe or sweep writes at the top of its output directory; one of the
#: first group must be present for ``--overwrite`` to delete the directory.
RUN_MARKERS = ("run_config.json", "run_config_grid.json", "run_config_search.json")


def check_deletable(path: str, markers: Sequence[str] = RUN_MARKERS) -> None:
    """Raises unless ``--overwrite`` may delete ``path``: a tfqkd run directory (or empty/absent).

    Refused: a file; the working directory or one of its parents; the home directory; a folder
    with a ``.git`` entry; a non-empty folder without a run marker (``run_config.json``).

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp(); open(os.path.join(d, "notes.txt"), "w").close()
        >>> check_deletable(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --overwrite refuses to delete ...: it does not hold a tfqkd run ...
    """
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(root):
        return
    if not os.path.isdir(root):
        raise NotADirectoryError(f"--output_dir {path!r} is a file, not a run directory; pass "
                                 "a directory.")
    real = os.path.realpath(root)
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if real == cwd or cwd.startswith(real.rstrip(os.sep) + os.sep) or real in (home, os.sep):
        raise ValueError(
            f"--overwrite refuses to delete {root}: it is the working directory, one of its "
            f"parents or the home directory. Pass a dedicated --output_dir (e.g. runs/NAME).")
    entries = os.listdir(root)
    if not entries:
        return
    if ".git" in entries:
        raise ValueError(f"--overwrite refuses to delete {root}: it holds a .git repository. "
                         "Pass a dedicated --output_dir (e.g. runs/NAME).")
    if not any(os.path.isfile(os.path.join(root, m)) for m in markers):
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"--overwrite refuses to delete {root}: it does not hold a tfqkd run (no "
            f"{' or '.join(markers[:1])}; it holds {shown}). Choose another --output_dir, or "
            f"delete the folder yourself if you really mean to.")


def _find_model_file(path: str, what: str = "model") -> str:
    """The file (or SavedModel folder) behind any form the docs show: run dir, model dir, file."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return path  # a SavedModel directory
        for sub in ("", "model"):
            for name in ("model.h5", "model.keras"):
                candidate = os.path.join(path, sub, name)
                if os.path.isfile(candidate):
                    return candidate
        raise FileNotFoundError(
            f"{what} {path!r} holds no saved model (looked for model.h5 / model.keras in it and "
            f"in its model/ folder); pass the output_dir of a completed recipe run, its model/ "
            f"folder, or a .h5 / .keras file.")
    raise FileNotFoundError(
        f"{what} {path!r} does not exist; pass the output_dir of a completed recipe run, its "
        f"model/ folder, or a .h5 / .keras file.")


def _saved_keras_version(path: str) -> Optional[str]:
    """The Keras version recorded in a saved model file, when it can be read cheaply."""
    try:
        if path.endswith(".keras") or (os.path.isfile(path) and zipfile.is_zipfile(path)):
            with zipfile.ZipFile(path) as z:
                return str(json.loads(z.read("metadata.json")).get("keras_version"))
        import h5py

        with h5py.File(path, "r") as f:
            v = f.attrs.get("keras_version")
            return v.decode() if isinstance(v, bytes) else (str(v) if v is not None else None)
    except Exception:  # unreadable: the caller reports the loader's own error
        return None


def _model_load_error(path: str, err: BaseException, what: str) -> Exception:
    """A message for a model file that does not load: which file, for what, and the fix."""
    text = str(err).split("\n")[0][:300]
    version = _saved_keras_version(path) if os.path.isfile(path) else None
    if version and version.startswith("3"):
        return TypeError(
            f"{what} {path!r} was saved by Keras {version} (Keras 3); tfqkd uses Keras 2 "
            f"(tf_keras). Re-create and save the model with `from tfqkd import keras` (or "
            f"`import tf_keras as keras`), or rebuild it in Keras 2 and copy the weights "
            f"(`model.set_weights(...)`). Loader said: {text}")
    if "Unknown layer" in text or "Unknown object" in text:
        return ValueError(
            f"{what} {path!r} uses a layer this process cannot rebuild ({text}). Models saved by "
            f"tfqkd load inside `tfqkd.quantize_scope()` (recipes.common.load_model enters it); "
            f"a layer of another package must be registered with "
            f"`keras.utils.register_keras_serializable` before loading.")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return ValueError(f"{what} {path!r} is empty (0 bytes): the save did not finish. "
                          f"Save the model again or point to another file.")
    if isinstance(err, OSError) or "signature" in text or "not a zip" in text.lower():
        return ValueError(
            f"{what} {path!r} is not a readable Keras model file ({text}); it is corrupt or "
            f"not a model. Save the model again (model.save('model.h5')) or point to another "
            f"file.")
    return ValueError(f"{what} {path!r} could not be loaded: {type(err).__name__}: {text}")


def load_model(path: str, compile: bool = False, *, what: str = "model") -> keras.Model:
    """Loads a model saved by a recipe or by tfqkd: a run dir, its ``model/`` dir, .h5, .keras.

    Enters ``tfqkd.quantize_scope()`` so quantized models and tfqkd layers deserialize. A file
    that does not load raises an error naming ``what`` (e.g. ``"--teacher"``), the file and the
    fix (corrupt or empty file, a Keras 3 model, a layer of an unknown package).
    """
    found = _find_model_file(path, what)
    import tfqkd  # an import failure propagates (a fallback scope only hid it behind load errors)

    with tfqkd.quantize_scope():
        try:
            return keras.models.load_model(found, compile=compile)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise _model_load_error(found, e, what) from e


# --------------------------------------------------------------------------------------------
# Data, models, optimizers
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
    """Train/test pipelines of a run plus their facts."""

    train: tf.data.Dataset
    test: tf.data.Dataset
    info: Any
    steps_per_epoch: int
    num_train: int
    num_test: int


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n < 0:
        n = sum(1 for _ in ds)
    return n


def data_source_kwargs(cfg: Config) -> Dict[str, Any]:
    """Where ``cfg.dataset`` is read from and how: the arguments every ``tfqkd.data`` call of a
    run shares (``data_dir``, ``image_size``, ``skip_corrupt``)."""
    image_size = getattr(cfg, "image_size", None)
    return dict(data_dir=cfg.data_dir, image_size=image_size or None,
                skip_corrupt=bool(getattr(cfg, "skip_corrupt_images", False)))


def data_kwargs_for_model(model: keras.Model, *, data_dir: Optional[str] = None,
                          image_size: Optional[int] = None,
                          skip_corrupt: bool = False) -> Dict[str, Any]:
    """``tfqkd.data`` arguments that feed ``model`` its own input size and normalisation (raw
    pixels for a model that preprocesses itself, see :func:`input_normalization`; for the tools).

    ``image_size`` wins when given; else the images are brought to the model's input height and
    width (a no-op where they already have it; a model trained with ``--image_size`` gets the
    size it was trained at).
    """
    kw: Dict[str, Any] = dict(data_dir=data_dir, skip_corrupt=bool(skip_corrupt))
    wanted = tuple(model.input_shape[1:3])
    if image_size:
        kw["image_size"] = int(image_size)
    elif None not in wanted:
        kw["image_size"] = tuple(int(d) for d in wanted)
    from tfqkd import models

    if models.expects_raw_pixels(model):  # the recipes trained it on raw pixels too
        kw["normalization"] = RAW_PIXELS
    return kw


def load_data(cfg: Config, *, augment: Optional[bool] = None) -> Data:
    """Loads ``cfg.dataset`` train/test pipelines via ``tfqkd.data.load_dataset``.

    Training batches drop the remainder (stable batch-norm statistics and equal replica shares);
    test batches keep every image.
    """
    from tfqkd import data as tdata

    source_kw = data_source_kwargs(cfg)
    info = tdata.dataset_info(cfg.dataset, **source_kw)
    common_kw = dict(batch_size=cfg.batch_size, seed=cfg.seed,
                     subset_seed=getattr(cfg, "subset_seed", None),
                     normalization=input_normalization(cfg), **source_kw)
    train = tdata.load_dataset(cfg.dataset, "train", augment=augment, subset=cfg.subset,
                               drop_remainder=True, **common_kw)
    test = tdata.load_dataset(cfg.dataset, "test", subset=getattr(cfg, "test_subset", None),
                              **common_kw)
    steps = _count(train)
    if steps == 0:
        raise ValueError(
            f"The training set of {cfg.dataset!r} (subset={cfg.subset}) has fewer images than "
            f"one batch (batch_size={cfg.batch_size}); lower --batch_size or raise --subset.")
    num_train = steps * cfg.batch_size
    num_test = sum(int(y.shape[0]) for _, y in test)
    return Data(train, test, info, steps, num_train, num_test)


def is_model_name(spec: Any) -> bool:
    """True when ``spec`` (a --student / --teacher / --arch value) names a model that
    ``tfqkd.models.get`` builds, rather than a saved model's path."""
    from tfqkd import models

    if not isinstance(spec, str) or os.path.exists(spec):
        return False
    try:
        models.min_input_size(spec)  # raises ValueError for a name models.get does not know
        return True
    except ValueError:
        return False


#: The data normalisation of a model that preprocesses itself: raw 0..255 pixels (an
#: ``imagenet:<family>`` whose preprocess_input is the identity).
RAW_PIXELS = "imagenet:efficientnet"


def input_normalization(cfg: Config) -> Optional[str]:
    """How the recipes normalise images for the model they train (``normalization=`` of
    ``tfqkd.data.load_dataset``): raw 0..255 pixels for a model that preprocesses inside itself
    (EfficientNet/V2, MobileNetV3: ``tfqkd.models.expects_raw_pixels``), else the per-channel
    mean/std of the training split (``None``), as for the CIFAR ResNets: the recipes train from
    random weights, where the ImageNet preprocessing has no advantage, and one convention for
    every other family keeps teachers and students of different families comparable."""
    from tfqkd import models

    spec = getattr(cfg, "student", None) or getattr(cfg, "arch", None)
    if is_model_name(spec):
        return RAW_PIXELS if models.takes_raw_pixels(spec) else None
    if isinstance(spec, str) and os.path.exists(spec):
        return RAW_PIXELS if models.expects_raw_pixels(load_model(spec, what="--student")) \
            else None
    return None


def adapt_teacher(teacher: keras.Model, cfg: Config, info: Any) -> keras.Model:
    """``teacher`` made to take the student's inputs: when one of them preprocesses itself (raw
    pixels) and the other takes mean/std-normalised images, a fixed 1x1 input adapter
    (``tfqkd.models.input_adapter``, exact) is put in front of the teacher."""
    from tfqkd import models
    from tfqkd.data.normalization import normalizer

    student_raw = input_normalization(cfg) == RAW_PIXELS
    if models.expects_raw_pixels(teacher) == student_raw:
        return teacher
    mean, std = _info_get(info, "mean"), _info_get(info, "std")
    mean_std = normalizer(None, mean, std)
    raw = lambda x: x  # noqa: E731
    channels = int(_info_get(info, "input_shape")[-1])
    adapter = models.input_adapter(
        raw if student_raw else (lambda x: mean_std(x / 255.0)),
        (lambda x: mean_std(x / 255.0)) if student_raw else raw, channels)
    inputs = keras.Input(tuple(_info_get(info, "input_shape")))
    log(f"teacher {teacher.name}: inputs converted from the student's "
        f"{'raw pixels' if student_raw else 'mean/std-normalised images'} (input adapter)")
    return keras.Model(inputs, teacher(adapter(inputs)), name=f"{teacher.name}_adapted")


def load_or_build_model(spec: str, cfg: Config, info: Any, *, what: str) -> keras.Model:
    """A model from a --student / --teacher value: a ``tfqkd.models.get`` name (fresh float
    weights, ``--alpha``, at the data's ``--image_size``) or a saved model's path."""
    from tfqkd import models

    if is_model_name(spec):
        # --alpha is the width of the families that have one (a MobileNet student next to an
        # EfficientNet teacher): the others build at their only width.
        alpha = cfg.alpha if models.has_alpha(spec) else 1.0
        return models.get(spec, int(_info_get(info, "num_classes")),
                          tuple(_info_get(info, "input_shape")), alpha=alpha, seed=cfg.seed)
    return load_model(spec, what=what)


def _info_get(info: Any, key: str) -> Any:
    return info[key] if isinstance(info, Mapping) else getattr(info, key)


def build_model(arch: str, width: float, info: Any, cfg: Config, *,
                seed: Optional[int] = None) -> keras.Model:
    """Builds a float model of ``arch`` (``resnet``: ResNet20/WRN20xwidth; ``tiny``)."""
    from tfqkd import models

    num_classes = int(_info_get(info, "num_classes"))
    shape = tuple(_info_get(info, "input_shape"))
    seed = cfg.seed if seed is None else seed
    if arch == "resnet":
        return models.wide_resnet20(width, num_classes, shape, weight_decay=cfg.weight_decay,
                                    seed=seed)
    if arch == "tiny":
        return models.tiny_resnet(num_classes, shape, width=width,
                                  weight_decay=cfg.weight_decay, seed=seed)
    if is_model_name(arch):
        alpha = getattr(cfg, "alpha", 1.0) if models.has_alpha(arch) else 1.0
        return models.get(arch, num_classes, shape, alpha=alpha, seed=seed)
    raise ValueError(f"--arch must be resnet, tiny or a tfqkd.models.get name "
                     f"({', '.join(models.names())}), got {arch!r}.")


def make_lr_schedule(cfg: Config, steps_per_epoch: int, epochs: Optional[int] = None):
    """The learning-rate schedule as a function of the optimizer's iteration counter.

    Because it reads the iteration counter (restored from checkpoints), a resumed run continues
    the schedule exactly where it stopped.
    """
    epochs = cfg.epochs if epochs is None else epochs
    total = max(1, int(epochs * steps_per_epoch))
    lr = float(cfg.learning_rate)
    if cfg.lr_schedule == "constant":
        return lr
    if cfg.lr_schedule == "step":
        # PiecewiseConstantDecay switches AFTER a boundary (step > b): -1 makes the first step
        # of the second half (iterations == total/2) the first one at lr/10.
        b = [max(0, int(0.5 * total) - 1), max(1, int(0.75 * total) - 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(b, [lr, lr * 0.1, lr * 0.01])
    if cfg.lr_schedule == "cosine":
        warm = int(getattr(cfg, "warmup_epochs", 0) or 0) * steps_per_epoch
        if warm:
            return keras.optimizers.schedules.CosineDecay(
                0.0, max(1, total - warm), warmup_target=lr, warmup_steps=warm)
        return keras.optimizers.schedules.CosineDecay(lr, total)
    raise ValueError(f"--lr_schedule must be cosine, step or constant, got {cfg.lr_schedule!r}.")


def make_optimizer(cfg: Config, steps_per_epoch: int, epochs: Optional[int] = None):
    """SGD with ``cfg.momentum`` and the ``cfg.lr_schedule`` schedule (weight decay lives in the
    models' L2 regularizers)."""
    return keras.optimizers.SGD(make_lr_schedule(cfg, steps_per_epoch, epochs),
                                momentum=cfg.momentum)


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
        self.rows = []
        if os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))
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
            keys: List[str] = []
            for r in self.rows:
                keys.extend(k for k in r if k not in keys)
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=keys, restval="")
            w.writeheader()
            w.writerows(self.rows)
            atomic_write_text(self.path, buf.getvalue())


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


def evaluate_accuracy(model: keras.Model, dataset: tf.data.Dataset) -> float:
    """Top-1 accuracy of a logits model on ``(images, labels)`` batches, in inference mode.

    Runs the model locally (no collectives), so every worker of a multi-worker run computes the
    same figure on the full test set.
    """
    @tf.function
    def correct(x, y):
        pred = tf.argmax(model(x, training=False), axis=-1, output_type=tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(pred, tf.cast(y, tf.int32)), tf.int64))

    hits = total = 0
    for x, y in dataset:
        hits += int(correct(x, y))
        total += int(y.shape[0])
    if total == 0:
        raise ValueError("evaluate_accuracy got an empty data set.")
    return hits / total


def write_results(out: OutputDir, cfg: Config, metrics: Mapping[str, Any],
                  extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Writes ``results.json`` (last file of a run: marks completion) and returns its content.

    Keys: the ``metrics`` (e.g. ``test_accuracy``), ``flags`` (the resolved config),
    ``versions``, ``wall_time_s`` (this attempt), ``total_wall_time_s`` (all attempts),
    ``attempts``, ``completed_at`` (UTC, ISO 8601), ``output_dir``, plus ``extra``.
    """
    res: Dict[str, Any] = dict(metrics)
    res.update(extra or {})
    res.update(
        flags=cfg.to_dict(),
        versions=versions(),
        wall_time_s=round(out.elapsed(), 3),
        total_wall_time_s=round(out.total_elapsed(), 3),
        attempts=out._attempt,
        completed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        output_dir=out.root,
    )
    out.record_progress()
    out.write_json("results.json", res)
    return res


# --------------------------------------------------------------------------------------------
# A recipe run from start to finish
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """An open recipe run: its configuration, output directory, strategy and data.

    ``finished`` holds the stored ``results.json`` when the output directory already has a
    completed run; then nothing else was set up (``data`` is None) and the recipe returns it.
    Otherwise the recipe builds its models and calls :meth:`begin` before training.
    """

    cfg: Config
    out: OutputDir
    strategy: Optional[tf.distribute.Strategy]
    data: Optional[Data]
    finished: Optional[Dict[str, Any]] = None

    def begin(self, runtime_keys: Iterable[str] = ()) -> None:
        """Every input is validated: ``--overwrite`` deletes the old run, ``run_config.json`` is
        written. Call it after loading the models and before training."""
        self.out.begin(self.cfg, runtime_keys)


def start_run(cfg: Config, default_dir: str,
              strategy: Optional[tf.distribute.Strategy] = None) -> Run:
    """Opens ``cfg.output_dir`` (or ``default_dir``), creates the strategy, seeds, loads data.

    The order matters: a completed run is reported (or refused, when the training options
    differ) before TensorFlow is touched; the strategy exists before any other TensorFlow state
    (MultiWorkerMirroredStrategy requires it); a resume with other options is refused before the
    data are loaded. Nothing is written or deleted here: the recipe calls :meth:`Run.begin` once
    its models are built, so a bad input fails with the output directory untouched.
    """
    _validate(cfg)  # again: a Config built with .replace() skipped make_config's checks
    out = OutputDir(cfg.output_dir or default_dir, overwrite=cfg.overwrite)
    if not cfg.overwrite:
        out.check_options(cfg)  # a finished or partial run with other options: refused now
        if out.is_complete():
            return Run(cfg, out, strategy, None, _rerun_finished(cfg, out))
    strategy = strategy or make_strategy(cfg.distribute, cfg.cpu_devices)
    out.attach(strategy)
    set_seed(cfg.seed)
    return Run(cfg, out, strategy, load_data(cfg))


def _rerun_finished(cfg: Config, out: OutputDir) -> Dict[str, Any]:
    """A finished run asked for again with the same options: its stored result, plus the
    runtime-only additions not yet done (``--export=MODE``: export, verify, record)."""
    res = out.read_results()
    mode = getattr(cfg, "export", "none") or "none"
    done = (res.get("export") or {}).get("mode") == mode and os.path.isfile(
        os.path.join(out.model_dir, f"model_{mode}.tflite"))
    if mode == "none" or done or not out.chief:
        return out.report_complete()
    log(f"{out.root} is already complete (test_accuracy={res.get('test_accuracy')}); "
        f"--export={mode} was added: exporting the finished model")
    run = Run(cfg, out, tf.distribute.get_strategy(), load_data(cfg))
    model = load_model(out.root, what="the finished run's model")
    kept = {k: v for k, v in res.items()
            if k not in ("flags", "versions", "wall_time_s", "total_wall_time_s", "attempts",
                         "completed_at", "output_dir", "export", "parity")}
    before = kept.pop("test_accuracy", None)
    return finish_run(run, model, "exported finished model", export_mode=mode,
                      extra={**kept, "test_accuracy_before_export": before})


def load_or_build_student(cfg: Config, data: Data) -> "tuple[keras.Model, str]":
    """The float model to quantize and a phrase saying where it came from.

    ``cfg.student`` (a saved float student) when given, else a freshly initialised
    ``cfg.arch``/``cfg.width`` model. Call inside the run's ``strategy.scope()``.
    """
    if cfg.student and is_model_name(cfg.student):
        model = load_or_build_model(cfg.student, cfg, data.info, what="--student")
        origin = f"a fresh float {model.name} (--student={cfg.student}, alpha={cfg.alpha:g})"
        log(f"--student: starting from {origin}")
        return model, origin
    if cfg.student:
        return load_model(cfg.student, what="--student"), f"float student {cfg.student}"
    model = build_model(cfg.arch, cfg.width, data.info, cfg)
    origin = f"a fresh float {model.name} (no --student given)"
    log(f"no --student: starting from {origin}")
    return model, origin


def export_and_verify(model: keras.Model, out: OutputDir, data: Data, mode: str) -> Dict[str, Any]:
    """Exports ``model`` to ``model/model_<mode>.tflite`` and verifies it on the test split."""
    from tfqkd import export as texport

    os.makedirs(out.model_dir, exist_ok=True)
    path = os.path.join(out.model_dir, f"model_{mode}.tflite")
    # align_student: the student's folded biases move (by <= ~1e-3 output steps) onto the
    # file's int32 grid, so the saved student computes what the shipped file computes.
    info = texport.export_tflite(model, path, representative_data=data.train, mode=mode,
                                 align_student=mode in ("int8", "int4"))
    report = texport.verify_tflite(path, model, data.test)
    rep = report.to_dict()
    rep.pop("layers", None)
    log(f"TFLite {mode}: {info['bytes']:,} bytes, top-1 {report.tflite_top1:.4f} "
        f"(Keras {report.keras_top1:.4f}), agreement {report.top1_agreement:.4f}")
    return {"export": dict(info), "parity": rep}


def finish_run(run: Run, model: keras.Model, label: str, *,
               metrics: Optional[Mapping[str, Any]] = None,
               extra: Optional[Mapping[str, Any]] = None, export_mode: str = "none",
               note: str = "") -> Dict[str, Any]:
    """Evaluates, saves (and optionally exports) ``model``, then writes ``results.json``.

    ``results.json`` gets ``test_accuracy`` of ``model`` on the test split plus ``metrics``,
    and ``model``, ``num_train``, ``num_test`` plus ``extra`` (see :func:`write_results`).
    ``export_mode`` other than ``"none"``: the chief first writes and verifies a ``.tflite``
    (full-integer modes align the student's biases with the file, see :func:`export_and_verify`).
    """
    extra = dict(extra or {})
    run.out.begin(run.cfg)  # no-op when the recipe already began (it should, before training)
    if export_mode != "none" and run.out.chief:
        # Before evaluating and saving: an integer export aligns the student's biases.
        extra.update(export_and_verify(model, run.out, run.data, export_mode))
    acc = evaluate_accuracy(model, run.data.test)
    run.out.save_model(model)
    res = write_results(run.out, run.cfg, {"test_accuracy": acc, **(metrics or {})},
                        {"model": model.name, "num_train": run.data.num_train,
                         "num_test": run.data.num_test, **extra})
    log(f"{label} test accuracy {acc:.4f}{note} -> {run.out.root}")
    return res
