"""Recipe options: :class:`Option`, :class:`Config`, the shared option groups and presets, and
their two front ends, absl flags (:func:`define_flags`, :func:`config_from_flags`,
:func:`run_main`) and Python (:func:`make_config`). Part of :mod:`recipes.common` (which
re-exports every public name; its docstring explains the resolution order).

Example:
    >>> cfg = make_config(COMMON_OPTIONS + KD_OPTIONS, preset="smoke", epochs=3)
    >>> (cfg.arch, cfg.epochs, cfg.temperature)
    ('tiny', 3, 4.0)
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import types
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from recipes._util import _jsonable

from tfqkd.finite import NonFiniteError

__all__ = [
    "Option", "Config", "COMMON_OPTIONS", "PRESETS", "RUNTIME_KEYS", "KD_OPTIONS", "KD_DEFAULTS",
    "QUANT_OPTIONS", "QUANT_PRESETS", "merge_presets", "define_flags", "define_common_flags",
    "config_from_flags", "make_config", "run_main",
]


# --------------------------------------------------------------------------------------------
# Options, presets, configs
# --------------------------------------------------------------------------------------------

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
    "export", "export_runtime", "data_dir",
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
    head_bits = getattr(cfg, "softmax_head_bits", None)
    if head_bits not in (None, 8, 16):
        raise ValueError(f"--softmax_head_bits must be 8 (an int8 head) or 16 (int16), "
                         f"got {head_bits!r}.")
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

    # A console script (tfqkd-train-teacher, ...) is a __main__ without a docstring: show the
    # recipe's own as the usage text, as `python recipes/x.py` does.
    entry = sys.modules.get("__main__")
    if entry is not None and not entry.__doc__:
        entry.__doc__ = getattr(sys.modules.get(getattr(main, "__module__", "")), "__doc__", None)
    app.run(wrapped)


# --------------------------------------------------------------------------------------------
# Option groups shared by several recipes
# --------------------------------------------------------------------------------------------

#: The recipes' KD defaults: τ = 4 with the soft loss multiplied by τ² (until 2026-12-04: τ = 2
#: without τ², the paper's Eq. 3). Chosen on the CIFAR-10 holdout of the reproduction benchmark
#: (docs/recipes.md, validation images, not the test set): τ = 2 without τ² lost to hard labels
#: (65.08 vs 65.28 %), τ² fixed it (66.58 %) and τ = 4 with τ² was best for constant λ
#: (67.72 %; τ = 8: 67.22 %). The benchmark (tools/reproduce_cpu.py) and the quick start run
#: with them, so demo, benchmark and recipes agree.
KD_DEFAULTS = types.MappingProxyType({"temperature": 4.0, "temperature_squared": True})

#: Options shared by every recipe that distils (student, quantize_distill, qkd, and others').
#: Runs recorded with the former defaults resume with them.
KD_OPTIONS = [
    Option("temperature", KD_DEFAULTS["temperature"],
           "KD temperature τ > 0 (softens teacher and student).", "float", former_defaults=(2.0,)),
    Option("coefficient", 0.5, "KD coefficient λ in [0, 1]: weight of the soft loss "
           "(λ = 0.5 is the paper's starting point).", "float"),
    Option("soft_loss", "kl", "Soft loss: kl, ce (the paper's H(p_T, p_S); same gradient as kl) "
           "or cosine.", "enum", ("kl", "ce", "cosine")),
    Option("temperature_squared", KD_DEFAULTS["temperature_squared"],
           "Multiply the soft loss by τ² (Hinton's scaling, which keeps λ's meaning when τ "
           "changes; the paper's Eq. 3 has no such factor: --notemperature_squared).", "bool",
           former_defaults=(False,)),
]

#: Options of the recipes that quantize a float student (quantize_distill, qkd, speq).
QUANT_OPTIONS = [
    Option("weight_bits", 2, "Weight bit-width of the hidden layers (1 = binary, 2 = ternary).",
           "integer"),
    Option("activation_bits", None, "Activation bit-width (absent: float activations).",
           "integer"),
    Option("first_last_bits", 8, "Bit-width of the first and last layers' weights.", "integer"),
    Option("step", "l2", "Quantization step: l2 (L2-error minimising), std, or learned (LSQ: "
           "trainable, initialised at the l2 step).", "enum", ("l2", "std", "learned")),
    Option("per_channel", False, "One step size per output channel.", "bool"),
    Option("softmax_head_bits", None, "With --activation_bits: width of the logits and "
           "probabilities of a softmax-ended student, in the student and its integer file: 16 "
           "(int16, LiteRT's 16x8 kernels) or 8 (int8, for runtimes that take int8 tensors "
           "only); absent: 16 for heads of up to 131,072 weights, else 8.",
           "integer", former_defaults=(8,)),
    Option("precise_bn_batches", 100, "After training, re-estimate the student's batch-norm "
           "statistics over this many training batches (tfqkd.batch_norm: low-bit weights that "
           "flip late in training leave stale moving statistics); 0: off, the paper's exact "
           "procedure.", "integer"),
    Option("export_runtime", "xnnpack", "With --export=int8 or int4: the kernels the file will "
           "run on, whose rounding the student is aligned with and on which the parity is "
           "measured: xnnpack (LiteRT's default XNNPACK delegate) or builtin (LiteRT's built-in "
           "kernels without the default delegates, which round every kernel's output twice; "
           "tfqkd.export.export_tflite(runtime=...)).", "enum", ("xnnpack", "builtin")),
]

#: Presets of the recipes that retrain a converged float student (quantize_distill, speq): the
#: paper preset with a 10x lower peak learning rate (0.01) than training from scratch.
QUANT_PRESETS = {
    "smoke": dict(learning_rate=0.02),
    "cpu": dict(epochs=10, learning_rate=0.01),
    "paper": dict(epochs=200, learning_rate=0.01),
}
