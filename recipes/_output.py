"""A run's output directory (:class:`OutputDir`: layout, atomic writers, resume checks,
``--overwrite`` safety) and the distribution strategy that decides which worker writes
(:func:`make_strategy`, :func:`is_chief`). Part of :mod:`recipes.common`.

Example:
    >>> import os, tempfile
    >>> out = OutputDir(os.path.join(tempfile.mkdtemp(), "run"))
    >>> os.path.basename(out.history_path), out.is_complete()
    ('history.csv', False)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Iterable, Optional, Sequence

from recipes._options import (_FORMER_DEFAULTS, _OPTION_DEFAULTS, RUNTIME_KEYS, Config,
                              _adopt_former_defaults)
from recipes._util import _jsonable, atomic_write_json, atomic_write_text, log

from tfqkd._io import atomic_path
from tfqkd._keras import keras, tf

__all__ = ["make_strategy", "is_chief", "OutputDir", "RUN_MARKERS", "check_deletable"]

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
