"""A recipe run from start to finish: :func:`start_run` (output directory, strategy, seed, data;
a finished run is reported instead), :class:`Run`, :func:`finish_run` (evaluate, save, optional
TFLite export, ``results.json`` last). Part of :mod:`recipes.common`.

Example:
    >>> Run.__dataclass_fields__.keys() >= {"cfg", "out", "strategy", "data", "finished"}
    True
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, Iterable, Mapping, Optional

from recipes._data import Data, clean_training_set, load_data
from recipes._options import Config, _validate
from recipes._output import OutputDir, make_strategy
from recipes._train import evaluate_accuracy
from recipes._util import log, set_seed, versions

from tfqkd._keras import keras, tf
from tfqkd.training import load_model

__all__ = ["write_results", "Run", "start_run", "export_and_verify", "export_runtime", "finish_run"]


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
              strategy: Optional[tf.distribute.Strategy] = None, *,
              validation: Optional[float] = None) -> Run:
    """Opens ``cfg.output_dir`` (or ``default_dir``), creates the strategy, seeds, loads data
    (``validation=f``: with that fraction of the training images held out, :func:`load_data`).

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
    return Run(cfg, out, strategy, load_data(cfg, validation=validation))


def _rerun_finished(cfg: Config, out: OutputDir) -> Dict[str, Any]:
    """A finished run asked for again with the same options: its stored result, plus the
    runtime-only additions not yet done (``--export=MODE``: export, verify, record)."""
    res = out.read_results()
    mode = getattr(cfg, "export", "none") or "none"
    # Results written before --export_runtime existed were exported for XNNPACK.
    done = (res.get("export") or {}).get("mode") == mode and \
        (res.get("parity") or {}).get("runtime", "xnnpack") == export_runtime(cfg) and \
        os.path.isfile(os.path.join(out.model_dir, f"model_{mode}.tflite"))
    if mode == "none" or done or not out.chief:
        return out.report_complete()
    log(f"{out.root} is already complete (test_accuracy={res.get('test_accuracy')}); "
        f"--export={mode} (--export_runtime={export_runtime(cfg)}) was added: exporting the "
        "finished model")
    run = Run(cfg, out, tf.distribute.get_strategy(), load_data(cfg))
    model = load_model(out.root, what="the finished run's model")
    kept = {k: v for k, v in res.items()
            if k not in ("flags", "versions", "wall_time_s", "total_wall_time_s", "attempts",
                         "completed_at", "output_dir", "export", "parity")}
    before = kept.pop("test_accuracy", None)
    return finish_run(run, model, "exported finished model", export_mode=mode,
                      extra={**kept, "test_accuracy_before_export": before})


def export_runtime(cfg: Config) -> str:
    """``--export_runtime`` (``"xnnpack"`` for a recipe without the option)."""
    return getattr(cfg, "export_runtime", None) or "xnnpack"


def export_and_verify(model: keras.Model, out: OutputDir, data: Data, mode: str,
                      runtime: str = "xnnpack") -> Dict[str, Any]:
    """Exports ``model`` to ``model/model_<mode>.tflite`` and verifies it on the test split, run
    on ``runtime``'s kernels (``tfqkd.export.RUNTIMES``)."""
    from tfqkd import export as texport

    os.makedirs(out.model_dir, exist_ok=True)
    path = os.path.join(out.model_dir, f"model_{mode}.tflite")
    # align_student: the student's folded biases move (by <= ~1e-3 output steps) onto the
    # file's int32 grid, and its output quantizers take the rounding of the runtime's kernels,
    # so the saved student computes what the shipped file computes there.
    info = texport.export_tflite(model, path, representative_data=data.train, mode=mode,
                                 align_student=mode in ("int8", "int4"), runtime=runtime)
    report = texport.verify_tflite(path, model, data.test, runtime=runtime)
    rep = report.to_dict()
    rep.pop("layers", None)
    rep["runtime"] = runtime
    log(f"TFLite {mode} ({runtime} kernels): {info['bytes']:,} bytes, top-1 "
        f"{report.tflite_top1:.4f} (Keras {report.keras_top1:.4f}), agreement "
        f"{report.top1_agreement:.4f}")
    return {"export": dict(info), "parity": rep}


def finish_run(run: Run, model: keras.Model, label: str, *,
               metrics: Optional[Mapping[str, Any]] = None,
               extra: Optional[Mapping[str, Any]] = None, export_mode: str = "none",
               note: str = "") -> Dict[str, Any]:
    """Evaluates, saves (and optionally exports) ``model``, then writes ``results.json``.

    ``results.json`` gets ``test_accuracy`` of ``model`` on the test split, ``train_accuracy``
    on the images it trained on without augmentation (:func:`clean_training_set`; without a
    ``cfg.validation`` hold-out), plus
    ``metrics``, and ``model``, ``num_train``, ``num_test`` plus ``extra`` (see
    :func:`write_results`).
    ``export_mode`` other than ``"none"``: the chief first writes and verifies a ``.tflite``
    (full-integer modes align the student's biases with the file, see :func:`export_and_verify`).
    """
    extra = dict(extra or {})
    run.out.begin(run.cfg)  # no-op when the recipe already began (it should, before training)
    if export_mode != "none" and run.out.chief:
        # Before evaluating and saving: an integer export aligns the student's biases.
        extra.update(export_and_verify(model, run.out, run.data, export_mode,
                                       export_runtime(run.cfg)))
    acc = evaluate_accuracy(model, run.data.test)
    # A recipe with a --validation hold-out trained without those images.
    held_out = getattr(run.cfg, "validation", None) or None
    train_acc = evaluate_accuracy(model, clean_training_set(run.cfg, validation=held_out))
    run.out.save_model(model)
    res = write_results(run.out, run.cfg,
                        {"test_accuracy": acc, "train_accuracy": train_acc, **(metrics or {})},
                        {"model": model.name, "num_train": run.data.num_train,
                         "num_test": run.data.num_test, **extra})
    log(f"{label} test accuracy {acc:.4f} (training images {train_acc:.4f}){note} -> "
        f"{run.out.root}")
    return res
