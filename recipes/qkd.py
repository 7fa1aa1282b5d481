"""QKD: quantize a float student, then self-studying, co-studying and tutoring (Kim et al. 2019).

See docs/qkd.md and ``tfqkd.qkd``:

1. Load the float student (``--student``; absent: a fresh float ResNet20 of ``--width``) and
   quantize it (``--weight_bits``, ``--activation_bits``, ``--first_last_bits``, as
   quantize_distill.py).
2. Load the float teacher (``--teacher``, a train_teacher output_dir or model.h5; absent: a fresh
   WRN20x``--teacher_width``, trained from scratch by co-studying alone, which QKD does not intend;
   the log says so).
3. Run the phases with their own budgets, each resumable (``tfqkd.qkd.run_qkd``):
   **SS** ``--ss_epochs`` on the labels alone; **CS** ``--cs_epochs`` teacher and student together
   (λs = ``--coefficient``, λt = ``--teacher_coefficient``, τ = ``--temperature``); **TU**
   ``--tu_epochs`` KD from the fixed co-studied teacher (λ = ``--coefficient``, following
   ``--coefficient_schedule`` → ``--coefficient_end``; ``linear`` is coefficient reducing).
   Every phase gets a fresh SGD optimizer whose learning-rate schedule spans that phase.
4. Save the QKD student (``model/model.h5``), the co-studied teacher (``teacher/model.h5``) and,
   with ``--export``, ``model/model_<mode>.tflite`` plus its parity report.

Output directory (besides the common ``run_config.json``, ``logs/<phase>/``, ``results.json``):
``qkd_state.json`` (the phase state: current phase, per-phase status/epochs/results, start and
resume events), ``checkpoints/<phase>/`` (in-phase ``BackupAndRestore`` state),
``phases/<phase>/`` (both models' weights at the end of each phase), ``history_<phase>.csv`` and
``history.csv`` (all phases, a ``phase`` column). Killed and run again with the same flags, the
recipe skips the finished phases and resumes inside the interrupted one.

results.json: ``test_accuracy`` (the QKD student), ``teacher_accuracy`` (the co-studied teacher),
``phases`` (per phase: epochs, seconds, student/teacher accuracy after it, last epoch's logs),
``initial_teacher_accuracy`` / ``float_student_accuracy`` when loaded from files.

Examples::

    python recipes/qkd.py --student=runs/student --teacher=runs/teacher_x2 --weight_bits=4 \\
        --activation_bits=4 --output_dir=runs/qkd_w4a4
    python recipes/qkd.py --preset=smoke --dataset=digits --output_dir=/tmp/qkd --export=int8
"""

from __future__ import annotations

import dataclasses
import os
import sys

from recipes import common
from recipes.common import KD_OPTIONS, QUANT_OPTIONS, Option, precise_bn, quantize

from tfqkd._keras import keras, tf
from tfqkd.training import read_history, write_history

QKD_OPTIONS = [
    Option("ss_epochs", 40, "Self-studying epochs: the quantized student alone, labels only "
           "(0 skips the phase).", "integer"),
    Option("cs_epochs", 60, "Co-studying epochs: teacher and student trained together.",
           "integer"),
    Option("tu_epochs", 100, "Tutoring epochs: KD from the fixed co-studied teacher.", "integer"),
    Option("teacher_coefficient", 0.5, "λt in [0, 1]: weight of the student's soft outputs in "
           "the teacher's loss during co-studying.", "float"),
    Option("teacher_learning_rate", None, "Peak learning rate of the teacher in co-studying "
           "(its own optimizer). Absent: one optimizer at --learning_rate updates both.", "float"),
    Option("coefficient_schedule", "constant", "λ schedule in tutoring: constant, linear "
           "(coefficient reducing: --coefficient -> --coefficient_end), cosine or step.", "enum",
           ("constant", "linear", "cosine", "step")),
    Option("coefficient_end", 0.0, "Final λ of non-constant tutoring schedules (CR: 0).",
           "float"),
]

#: QKD's own reported settings quantize weights and activations (W4A4, W3A3) with trainable step
#: sizes, so the recipe defaults to W4A4 with the learned (LSQ) step; runs recorded with the
#: former defaults (2-bit weights, float activations, the l2 step) resume with them.
QKD_QUANT_DEFAULTS = {"weight_bits": (4, 2), "activation_bits": (4, None), "step": ("learned", "l2")}
QKD_QUANT_OPTIONS = [
    dataclasses.replace(o, default=QKD_QUANT_DEFAULTS[o.name][0],
                        former_defaults=(QKD_QUANT_DEFAULTS[o.name][1],),
                        help=o.help.replace("(absent: float activations)",
                                            "(0: float activations)"))
    if o.name in QKD_QUANT_DEFAULTS else o
    for o in QUANT_OPTIONS
]

# `epochs` is replaced by the three phase budgets.
OPTIONS = [o for o in common.COMMON_OPTIONS if o.name != "epochs"] + KD_OPTIONS + QKD_QUANT_OPTIONS + [
    Option("student", None, "Float student to quantize (train_student output_dir or model.h5). "
           "Absent: start from a fresh float ResNet20 (of --width)."),
    Option("width", 1.0, "Width of the fresh float student when --student is absent.", "float"),
    Option("teacher", None, "Trained float teacher (train_teacher output_dir or model.h5). "
           "Absent: a fresh WRN20x--teacher_width (trained only by co-studying)."),
    Option("teacher_width", 2.0, "Width of the fresh teacher when --teacher is absent.", "float"),
    Option("export", "none", "Export the QKD student to TFLite at the end: none, int8, int4, "
           "dynamic or float.", "enum", ("none", "int8", "int4", "dynamic", "float")),
] + QKD_OPTIONS

#: Retraining starts from converged float models, hence lr 0.01 as in quantize_distill.py. The
#: paper preset spends the usual 200 epochs as 40 SS + 60 CS + 100 TU: our choice, no paper
#: gives these phase lengths.
PRESETS = {
    "smoke": dict(ss_epochs=1, cs_epochs=2, tu_epochs=1, learning_rate=0.02, teacher_width=1.0),
    "cpu": dict(ss_epochs=2, cs_epochs=4, tu_epochs=4, learning_rate=0.01),
    "paper": dict(ss_epochs=40, cs_epochs=60, tu_epochs=100, learning_rate=0.01),
}

PHASE_NAMES = {"ss": "self-studying", "cs": "co-studying", "tu": "tutoring"}


def make_config(preset: str = "paper", **overrides) -> common.Config:
    """This recipe's configuration in Python.

    Example:
        >>> cfg = make_config("smoke", dataset="digits")
        >>> (cfg.ss_epochs, cfg.cs_epochs, cfg.tu_epochs)
        (1, 2, 1)
    """
    cfg = common.make_config(OPTIONS, PRESETS, preset, **overrides)
    _check(cfg)
    return cfg


def _check(cfg: common.Config) -> None:
    for name in ("ss_epochs", "cs_epochs", "tu_epochs"):
        value = getattr(cfg, name)
        if value is None or value < 0:
            raise ValueError(
                f"--{name} must be an integer >= 0 (0 skips the phase), got {value!r}."
            )
    if cfg.ss_epochs + cfg.cs_epochs + cfg.tu_epochs == 0:
        raise ValueError("--ss_epochs, --cs_epochs and --tu_epochs are all 0: nothing to train.")
    if cfg.distribute == "multi_worker":
        raise ValueError(
            "recipes/qkd.py keeps its phase state in one process: use --distribute=none or "
            "mirrored (multi_worker is not supported by the QKD recipe)."
        )
    if cfg.teacher_learning_rate is not None and cfg.teacher_learning_rate <= 0:
        raise ValueError(
            f"--teacher_learning_rate must be > 0, got {cfg.teacher_learning_rate!r}."
        )


def _phase_epochs(cfg: common.Config, phase: str) -> int:
    return int(getattr(cfg, f"{phase}_epochs"))


def _write_merged_history(out: common.OutputDir) -> None:
    """``history.csv``: the rows of every phase's history, with a ``phase`` column first."""
    rows = [{"phase": phase, **row} for phase in ("ss", "cs", "tu")
            for row in read_history(os.path.join(out.root, f"history_{phase}.csv"))]
    write_history(out.history_path, rows)


class _Recorder(keras.callbacks.Callback):
    """Persists wall time per epoch (results.json's total over attempts); logs a resume."""

    def __init__(self, out: common.OutputDir, phase: str, epochs: int):
        super().__init__()
        self.out, self.phase, self.epochs = out, phase, epochs
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first and epoch > 0:
            common.log(f"{PHASE_NAMES[self.phase]}: resuming at epoch {epoch + 1}/{self.epochs} "
                       f"from {os.path.join(self.out.checkpoint_dir, self.phase)}")
        self._first = False

    def on_epoch_end(self, epoch, logs=None):
        self.out.record_progress()


def run(cfg: common.Config, strategy: tf.distribute.Strategy = None) -> dict:
    """Runs QKD as configured by ``cfg``; returns the content of results.json."""
    from tfqkd import qkd

    if cfg.activation_bits == 0:  # the command line's way to ask for float activations
        cfg = cfg.replace(activation_bits=None)
    _check(cfg)
    run_ = common.start_run(cfg, "runs/qkd", strategy)
    if run_.finished is not None:
        return run_.finished
    out, strategy, data = run_.out, run_.strategy, run_.data
    extra: dict = {}
    with strategy.scope():
        float_student, origin = common.load_or_build_student(cfg, data)
        if cfg.teacher:
            teacher = common.load_model(cfg.teacher, what="--teacher")
            teacher_origin = f"teacher {cfg.teacher}"
        else:
            teacher = common.build_model(cfg.arch, cfg.teacher_width, data.info, cfg,
                                         seed=cfg.seed + 1)
            teacher_origin = (f"a fresh float {teacher.name} (no --teacher given: co-studying "
                              "trains it from scratch; QKD expects a trained teacher)")
        teacher.trainable = True
        student = quantize(float_student, cfg)
    # Evaluated before run_qkd, so the models are still those of the files even on a resume.
    if cfg.student:
        extra["float_student_accuracy"] = common.evaluate_accuracy(float_student, data.test)
    if cfg.teacher:
        extra["initial_teacher_accuracy"] = common.evaluate_accuracy(teacher, data.test)
    common.log(
        f"qkd: {origin} -> W{cfg.weight_bits}A{cfg.activation_bits or 'float'} (first/last "
        f"{cfg.first_last_bits} bits); {teacher_origin}; SS {cfg.ss_epochs} + CS {cfg.cs_epochs} "
        f"+ TU {cfg.tu_epochs} epochs, τ={cfg.temperature:g}, λs={cfg.coefficient:g}, "
        f"λt={cfg.teacher_coefficient:g}, {data.num_train} training images"
    )

    def make_optimizer(phase: str):
        return common.make_optimizer(cfg, data.steps_per_epoch, max(1, _phase_epochs(cfg, phase)))

    def make_teacher_optimizer():
        return common.make_optimizer(cfg.replace(learning_rate=cfg.teacher_learning_rate),
                                     data.steps_per_epoch, max(1, cfg.cs_epochs))

    # None: in co-studying one optimizer (the phase's) updates both models.
    teacher_optimizer = None if cfg.teacher_learning_rate is None else make_teacher_optimizer

    progress = cfg.progress
    if progress == "auto":
        progress = "bar" if sys.stdout.isatty() else "line"

    def callbacks(phase: str):
        cbs = [common.ScalarSummaries(os.path.join(out.log_dir, phase)),
               _Recorder(out, phase, _phase_epochs(cfg, phase))]
        if progress == "line":
            cbs.append(common.EpochLogger(_phase_epochs(cfg, phase), PHASE_NAMES[phase]))
        return cbs

    run_.begin()  # inputs validated: --overwrite may delete the old run now
    state = qkd.read_phase_state(out.root)
    for phase in ("ss", "cs", "tu"):
        if state and state["phases"][phase]["status"] == "done":
            common.log(f"{PHASE_NAMES[phase]}: already done in a previous attempt; skipped")
    # --validation_freq=0: no validation during fit, but every phase still ends with an
    # evaluation on the test split, so results.json has per-phase accuracies.
    phases = qkd.run_qkd(
        student, teacher, data.train, data.test,
        ss_epochs=cfg.ss_epochs, cs_epochs=cfg.cs_epochs, tu_epochs=cfg.tu_epochs,
        output_dir=out.root, temperature=cfg.temperature, student_coefficient=cfg.coefficient,
        teacher_coefficient=cfg.teacher_coefficient, tu_coefficient=cfg.coefficient,
        tu_coefficient_schedule=cfg.coefficient_schedule, tu_coefficient_end=cfg.coefficient_end,
        soft_loss=cfg.soft_loss, temperature_squared=cfg.temperature_squared,
        optimizer=make_optimizer, teacher_optimizer=teacher_optimizer,
        save_freq=cfg.save_freq if cfg.save_freq == "epoch" else int(cfg.save_freq),
        validation_freq=max(0, int(cfg.validation_freq or 0)),
        callbacks=callbacks, strategy=strategy, verbose=1 if progress == "bar" else 0,
    )
    _write_merged_history(out)
    extra.update(precise_bn(cfg, student, data))
    teacher_acc = common.evaluate_accuracy(teacher, data.test)
    out.save_model(teacher, "teacher")
    return common.finish_run(run_, student, "QKD student",
                             metrics={"teacher_accuracy": teacher_acc},
                             extra={"teacher": teacher.name, "mode": "qkd", "phases": phases,
                                    **extra},
                             export_mode=cfg.export, note=f" (co-studied teacher {teacher_acc:.4f})")


def _main(argv):
    del argv
    common.quiet_logs()
    run(common.config_from_flags(OPTIONS, PRESETS))


def main() -> None:
    """The command line (console script ``tfqkd-qkd``): absl flags from ``OPTIONS``."""
    common.run_main(_main, OPTIONS)


if __name__ == "__main__":
    main()
