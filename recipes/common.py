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

A new recipe ``recipes/my_recipe.py`` declares ``OPTIONS = common.COMMON_OPTIONS + [Option(...)]``
and ``PRESETS``, a ``run(cfg, strategy=None)`` with the body above, and its command line::

    def _main(argv):
        run(common.config_from_flags(OPTIONS, PRESETS))

    def main() -> None:                        # console script: add it to setup.py's list
        common.run_main(_main, OPTIONS)        # flags defined here, never at import time

    if __name__ == "__main__":
        main()

It imports ``recipes.common`` and the library, never another recipe (tests/test_recipes.py
checks): what two recipes share belongs here.

Where things live (this module re-exports every public name of them; import from here):

    ``recipes/_options.py``  :class:`Option`, :class:`Config`, ``COMMON_OPTIONS``, the shared
                             option groups ``KD_OPTIONS`` / ``QUANT_OPTIONS``, presets, the absl
                             and Python front ends, :func:`run_main`;
    ``recipes/_output.py``   :class:`OutputDir`, ``--overwrite`` safety, strategy and chief;
    ``recipes/_train.py``    :func:`fit_with_resume`, its callbacks;
    ``recipes/_data.py``     :func:`load_data`, the input normalisation of a model,
                             :func:`is_model_name`;
    ``recipes/_build.py``    config → objects: models, teachers, optimizers, compiled
                             classifiers and distillers, the quantized student, λ schedule,
                             batch-norm re-estimation;
    ``recipes/_run.py``      :func:`start_run`, :class:`Run`, :func:`finish_run`;
    ``recipes/_util.py``     :func:`log`, atomic writes, versions, seeding;
    ``tfqkd.training``       :func:`evaluate_accuracy`, :func:`load_model` (the library's, shared
                             with the tools and ``tfqkd.tuning``).

Recipes import this module and the library, never each other.

Example:
    >>> make_config(COMMON_OPTIONS, preset="smoke", epochs=3).epochs
    3
"""

from __future__ import annotations

from recipes._util import (atomic_write_json, atomic_write_text, log, quiet_logs,  # noqa: F401
                           set_seed, versions)
from recipes._options import (COMMON_OPTIONS, KD_DEFAULTS, KD_OPTIONS, PRESETS,  # noqa: F401
                              QUANT_OPTIONS, QUANT_PRESETS, RUNTIME_KEYS, Config, Option,
                              config_from_flags, define_common_flags, define_flags,
                              make_config, merge_presets, run_main)
from recipes._output import (RUN_MARKERS, OutputDir, check_deletable, is_chief,  # noqa: F401
                             make_strategy)
from recipes._train import (EpochLogger, HistoryLogger, ScalarSummaries,  # noqa: F401
                            evaluate_accuracy, fit_with_resume)
from recipes._data import (RAW_PIXELS, Data, _info_get, clean_training_set,  # noqa: F401
                           data_kwargs_for_model, data_source_kwargs, input_normalization,
                           is_model_name, load_data, load_evaluation_split)
from recipes._build import (adapt_teacher, build_model, coefficient_scheduler,  # noqa: F401
                            compile_classifier, compile_distiller, load_or_build_model,
                            load_or_build_student, load_teachers, make_distiller,
                            make_lr_schedule, make_optimizer, precise_bn, quantize,
                            teacher_paths)
from recipes._run import (  # noqa: F401
    Run, export_and_verify, export_runtime, finish_run, start_run, write_results)
# The shared training helpers, written once in the library.
from tfqkd.training import load_model  # noqa: F401

__all__ = [
    # options (_options)
    "Option", "Config", "COMMON_OPTIONS", "PRESETS", "RUNTIME_KEYS", "KD_OPTIONS", "KD_DEFAULTS",
    "QUANT_OPTIONS", "QUANT_PRESETS", "define_flags", "define_common_flags", "config_from_flags",
    "make_config", "merge_presets", "run_main",
    # output directory and distribution (_output)
    "make_strategy", "is_chief", "OutputDir", "check_deletable", "RUN_MARKERS",
    # training (_train)
    "fit_with_resume", "evaluate_accuracy", "HistoryLogger", "EpochLogger", "ScalarSummaries",
    # models and data (tfqkd.training, _data, _build)
    "load_model", "is_model_name", "Data", "load_data", "clean_training_set", "data_source_kwargs",
    "data_kwargs_for_model", "load_evaluation_split", "RAW_PIXELS", "input_normalization",
    "adapt_teacher", "load_or_build_model", "build_model", "load_or_build_student",
    "make_lr_schedule", "make_optimizer", "compile_classifier", "load_teachers", "make_distiller",
    "compile_distiller", "quantize", "coefficient_scheduler", "precise_bn", "teacher_paths",
    # a run (_run)
    "Run", "start_run", "finish_run", "write_results", "export_and_verify", "export_runtime",
    # utilities (_util)
    "log", "quiet_logs", "atomic_write_text", "atomic_write_json", "versions", "set_seed",
]
