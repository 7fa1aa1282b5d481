"""The three training stages of the paper's Algorithm 1 as *config → results.json* functions:
a float teacher (:func:`train_teacher`), a float student (:func:`train_student`, hard labels or
KD) and a quantized student retrained with KD (:func:`quantize_distill`), each with its options,
presets and a Python config builder.

``recipes/train_teacher.py``, ``train_student.py`` and ``quantize_distill.py`` are their command
lines (see their docstrings for the user-facing description); ``recipes/quickstart.py`` chains
them in one process. They live here, beside :mod:`recipes.common`, so that no recipe imports
another.

Example:
    >>> teacher_config("smoke", dataset="digits").arch
    'tiny'
"""

from __future__ import annotations

from recipes import common
from recipes._paper_rows import (PAPER_ROWS, apply_row, check_row_inputs, check_row_teacher,
                                 row_record)
from recipes.common import (KD_OPTIONS, QUANT_OPTIONS, QUANT_PRESETS, Option,
                            coefficient_scheduler, compile_classifier, compile_distiller,
                            load_teachers, make_distiller, precise_bn, quantize)

from tfqkd._keras import tf

__all__ = [
    "TEACHER_OPTIONS", "TEACHER_PRESETS", "teacher_config", "train_teacher",
    "STUDENT_OPTIONS", "STUDENT_PRESETS", "student_config", "train_student",
    "QD_OPTIONS", "QD_PRESETS", "quantize_distill_config", "quantize_distill",
]

# --------------------------------------------------------------------------------------------
# Float teacher (recipes/train_teacher.py)
# --------------------------------------------------------------------------------------------
TEACHER_OPTIONS = common.COMMON_OPTIONS + [
    Option("width", 2.0, "Width multiplier N of WideResNet20xN (1 = ResNet20; the paper studies "
           "1, 1.2, 1.5, 1.7, 2, 3, 4, 5, 10).", "float"),
]

#: The teacher's preset values (on top of common.PRESETS).
TEACHER_PRESETS = {
    "smoke": dict(width=2.0),
    "cpu": dict(epochs=15),
    "paper": dict(epochs=200),
}


def teacher_config(preset: str = "paper", **overrides) -> common.Config:
    """This recipe's configuration in Python (same resolution as the command line).

    Example:
        >>> teacher_config("smoke", dataset="digits").arch
        'tiny'
    """
    return common.make_config(TEACHER_OPTIONS, TEACHER_PRESETS, preset, **overrides)


def train_teacher(cfg: common.Config, strategy: tf.distribute.Strategy = None) -> dict:
    """Trains the teacher described by ``cfg``; returns the content of results.json."""
    run_ = common.start_run(cfg, "runs/train_teacher", strategy)
    if run_.finished is not None:
        return run_.finished
    data = run_.data
    with run_.strategy.scope():
        model = common.build_model(cfg.arch, cfg.width, data.info, cfg)
        compile_classifier(model, cfg, data.steps_per_epoch)
    common.log(f"teacher {model.name}: {model.count_params():,} parameters, "
               f"{data.num_train} training images, {cfg.epochs} epochs, "
               f"{run_.strategy.num_replicas_in_sync} replica(s)")
    run_.begin()  # inputs validated: --overwrite may delete the old run now
    common.fit_with_resume(model, data.train, data.test, cfg.epochs, run_.out,
                           save_freq=cfg.save_freq, progress=cfg.progress,
                           validation_freq=cfg.validation_freq, name="teacher")
    return common.finish_run(run_, model, "teacher",
                             extra={"parameters": model.count_params()})


# --------------------------------------------------------------------------------------------
# Float student (recipes/train_student.py)
# --------------------------------------------------------------------------------------------
STUDENT_OPTIONS = common.COMMON_OPTIONS + KD_OPTIONS + [
    Option("width", 1.0, "Student width multiplier (1 = ResNet20).", "float"),
    Option("teacher", None, "Saved teacher (a train_teacher output_dir or model.h5): train with "
           "KD. Absent: hard labels only."),
]

STUDENT_PRESETS = {
    "smoke": dict(width=1.0),
    "cpu": dict(epochs=15),
    "paper": dict(epochs=200),
}


def student_config(preset: str = "paper", **overrides) -> common.Config:
    """This recipe's configuration in Python.

    Example:
        >>> student_config("smoke", dataset="digits", teacher=None).width
        1.0
    """
    return common.make_config(STUDENT_OPTIONS, STUDENT_PRESETS, preset, **overrides)


def train_student(cfg: common.Config, strategy: tf.distribute.Strategy = None) -> dict:
    """Trains the float student described by ``cfg``; returns the content of results.json."""
    run_ = common.start_run(cfg, "runs/train_student", strategy)
    if run_.finished is not None:
        return run_.finished
    data, strategy = run_.data, run_.strategy
    extra = {}
    with strategy.scope():
        student = common.build_model(cfg.arch, cfg.width, data.info, cfg)
        if cfg.teacher:
            teachers = load_teachers(cfg.teacher, strategy, cfg, data.info)
            model = make_distiller(student, teachers, cfg)
            compile_distiller(model, cfg, data.steps_per_epoch)
            mode = f"KD from {cfg.teacher} (τ={cfg.temperature:g}, λ={cfg.coefficient:g})"
        else:
            model = student
            compile_classifier(model, cfg, data.steps_per_epoch)
            mode = "hard labels"
    if cfg.teacher:
        extra["teacher_accuracy"] = common.evaluate_accuracy(teachers[0], data.test)
    common.log(f"student {student.name}: {student.count_params():,} parameters, {mode}, "
               f"{data.num_train} training images, {cfg.epochs} epochs, "
               f"{strategy.num_replicas_in_sync} replica(s)")
    run_.begin()  # inputs validated: --overwrite may delete the old run now
    common.fit_with_resume(model, data.train, data.test, cfg.epochs, run_.out,
                           save_freq=cfg.save_freq, progress=cfg.progress,
                           validation_freq=cfg.validation_freq, name="student")
    return common.finish_run(run_, student, "student", extra={
        "parameters": student.count_params(), "mode": "kd" if cfg.teacher else "hard", **extra})


# --------------------------------------------------------------------------------------------
# Quantize + distil (recipes/quantize_distill.py)
# --------------------------------------------------------------------------------------------
QD_OPTIONS = common.COMMON_OPTIONS + KD_OPTIONS + QUANT_OPTIONS + [
    Option("student", None, "Float student to quantize: a saved model (train_student "
           "output_dir or model.h5) or a tfqkd.models.get name (mobilenet_v2, efficientnet_b0, "
           "...: a fresh float model with --alpha at --image_size). Absent: a fresh float "
           "ResNet20 (of --width)."),
    Option("width", 1.0, "Width of the fresh float student when --student is absent.", "float"),
    Option("teacher", None, "Teacher model (output_dir or model.h5; or a tfqkd.models.get "
           "name: a fresh, untrained model, for smoke tests); repeat for an ensemble. "
           "Absent: hard labels only (the baseline).", "multi_string"),
    Option("coefficient_schedule", "constant", "λ schedule: constant, linear (CR: "
           "--coefficient -> --coefficient_end over training), cosine or step.", "enum",
           ("constant", "linear", "cosine", "step")),
    Option("coefficient_end", 0.0, "Final λ of non-constant schedules (CR: 0).", "float"),
    Option("export", "none", "Export the quantized student to TFLite at the end: none, int8, "
           "int4, dynamic or float.", "enum", ("none", "int8", "int4", "dynamic", "float")),
    Option("row", None, "A reported row of the paper by name (cifar10-w2, cifar100-w2-cr): sets "
           "the options the paper states (results.json records each value's source: the paper "
           "or our choice); needs --student and one --teacher of the row's width. The budget "
           "(epochs, learning rate) comes from --preset: the paper gives none.", "enum",
           tuple(sorted(PAPER_ROWS))),
]

#: lr 0.01: retraining starts from a converged float model (common.QUANT_PRESETS).
QD_PRESETS = QUANT_PRESETS


def quantize_distill_config(preset: str = "paper", **overrides) -> common.Config:
    """This recipe's configuration in Python.

    Example:
        >>> quantize_distill_config("smoke", teacher=["runs/t"], coefficient_schedule="linear").weight_bits
        2
    """
    return apply_row(common.make_config(QD_OPTIONS, QD_PRESETS, preset, **overrides))


def quantize_distill(cfg: common.Config, strategy: tf.distribute.Strategy = None) -> dict:
    """Runs Algorithm 1 as configured by ``cfg``; returns the content of results.json."""
    cfg = apply_row(cfg)
    check_row_inputs(cfg, common.teacher_paths(cfg))
    run_ = common.start_run(cfg, "runs/quantize_distill", strategy)
    if run_.finished is not None:
        return run_.finished
    data, strategy = run_.data, run_.strategy
    teacher_paths = common.teacher_paths(cfg)
    extra: dict = {"row": row_record(cfg)} if cfg.row else {}
    with strategy.scope():
        float_student, origin = common.load_or_build_student(cfg, data)
        student = quantize(float_student, cfg)
        if teacher_paths:
            teachers = load_teachers(teacher_paths, strategy, cfg, data.info)
            check_row_teacher(cfg, teacher_paths[0], teachers[0],
                              int(common._info_get(data.info, "num_classes")),
                              tuple(common._info_get(data.info, "input_shape")))
            model = make_distiller(student, teachers, cfg)
            compile_distiller(model, cfg, data.steps_per_epoch)
        else:
            model = student
            compile_classifier(model, cfg, data.steps_per_epoch)
    callbacks = []
    if teacher_paths:
        scheduler = coefficient_scheduler(cfg)
        callbacks.append(scheduler)
        extra["teacher_accuracy"] = [common.evaluate_accuracy(t, data.test) for t in teachers]
        end = scheduler.end
        mode = (f"KD from {len(teachers)} teacher(s), τ={cfg.temperature:g}, λ {cfg.coefficient:g}"
                f" {cfg.coefficient_schedule}" + (f" -> {end:g}" if end != cfg.coefficient else ""))
    else:
        mode = "hard labels only"
    if cfg.student:
        extra["float_student_accuracy"] = common.evaluate_accuracy(float_student, data.test)
    common.log(f"quantize_distill: {origin} -> W{cfg.weight_bits}"
               f"A{cfg.activation_bits or 'float'} (first/last {cfg.first_last_bits} bits), "
               f"{mode}, {data.num_train} training images, {cfg.epochs} epochs, "
               f"{strategy.num_replicas_in_sync} replica(s)")
    run_.begin()  # inputs validated: --overwrite may delete the old run now
    common.fit_with_resume(model, data.train, data.test, cfg.epochs, run_.out, callbacks,
                           save_freq=cfg.save_freq, progress=cfg.progress,
                           validation_freq=cfg.validation_freq, name="quantized")
    extra.update(precise_bn(cfg, student, data))
    return common.finish_run(run_, student, "quantized student",
                             extra={"mode": "kd" if teacher_paths else "hard", **extra},
                             export_mode=cfg.export)
