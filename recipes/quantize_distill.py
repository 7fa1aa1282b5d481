"""The paper's Algorithm 1: quantize a float student, retrain it with KD, optionally export.

1. Load the float student (``--student``, a train_student output_dir or model.h5; absent: a fresh
   float ResNet20, said so in the log).
2. Quantize it: weights to ``--weight_bits`` (2 = ternary), activations to ``--activation_bits``
   (absent: float activations), first and last layers to ``--first_last_bits``
   (``tfqkd.quantize_model``).
3. Retrain with ``L = (1 - λ)·H(y, p_S) + λ·H(p_T, p_S)`` from one or more teachers
   (``--teacher`` repeated: an ensemble averaging the softened probabilities), temperature
   ``--temperature``, λ from ``--coefficient`` following ``--coefficient_schedule``: ``constant``,
   ``linear`` (the paper's coefficient reducing, CR: λ → ``--coefficient_end`` = 0 over the run),
   ``cosine`` or ``step``. Without ``--teacher`` it retrains with hard labels only (the baseline).
4. Save the quantized student (``model/model.h5``: reload with ``common.load_model`` or inside
   ``tfqkd.quantize_scope()``) and, with ``--export=int8`` (or ``int4``, ``dynamic``,
   ``float``), a TFLite file ``model/model_<mode>.tflite`` plus its parity report.

Defaults: the paper preset with a 10x lower peak learning rate (0.01) than training from scratch,
since retraining starts from a converged float model (see docs/recipes.md).

Examples::

    python recipes/quantize_distill.py --student=runs/student --teacher=runs/teacher_x2 \\
        --coefficient_schedule=linear --output_dir=runs/q2_kd_cr
    python recipes/quantize_distill.py --student=runs/student --output_dir=runs/q2_hard
    python recipes/quantize_distill.py --preset=smoke --dataset=cifar10 \\
        --data_dir=../shared/data --output_dir=/tmp/q --export=int8
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes import common  # noqa: E402
from recipes.common import Option  # noqa: E402
from recipes.train_student import (KD_OPTIONS, compile_distiller, load_teachers,  # noqa: E402
                                   make_distiller)
from recipes.train_teacher import compile_classifier  # noqa: E402

from tfqkd._keras import keras, tf  # noqa: E402

QUANT_OPTIONS = [
    Option("weight_bits", 2, "Weight bit-width of the hidden layers (1 = binary, 2 = ternary).",
           "integer"),
    Option("activation_bits", None, "Activation bit-width (absent: float activations).",
           "integer"),
    Option("first_last_bits", 8, "Bit-width of the first and last layers' weights.", "integer"),
    Option("step", "l2", "Quantization step: l2 (L2-error minimising) or std.", "enum",
           ("l2", "std")),
    Option("per_channel", False, "One step size per output channel.", "bool"),
    Option("precise_bn_batches", 100, "After training, re-estimate the student's batch-norm "
           "statistics over this many training batches (tfqkd.batch_norm: low-bit weights that "
           "flip late in training leave stale moving statistics); 0: off, the paper's exact "
           "procedure.", "integer"),
]

OPTIONS = common.COMMON_OPTIONS + KD_OPTIONS + QUANT_OPTIONS + [
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
]

PRESETS = {
    "smoke": dict(learning_rate=0.02),
    "cpu": dict(epochs=10, learning_rate=0.01),
    "paper": dict(epochs=200, learning_rate=0.01),
}


def make_config(preset: str = "paper", **overrides) -> common.Config:
    """This recipe's configuration in Python.

    Example:
        >>> make_config("smoke", teacher=["runs/t"], coefficient_schedule="linear").weight_bits
        2
    """
    return common.make_config(OPTIONS, PRESETS, preset, **overrides)


def quantize(model: keras.Model, cfg: common.Config) -> keras.Model:
    """``tfqkd.quantize_model`` with the bit-widths and step estimator of ``cfg``."""
    import tfqkd

    return tfqkd.quantize_model(model, weight_bits=cfg.weight_bits,
                                activation_bits=cfg.activation_bits,
                                first_last_bits=cfg.first_last_bits,
                                per_channel=cfg.per_channel, step=cfg.step)


def precise_bn(cfg: common.Config, student: keras.Model, data: common.Data) -> dict:
    """Runs ``--precise_bn_batches`` on the trained student; its results.json entries.

    The statistics are re-estimated on the training batches (with their augmentation); the entry
    records the test accuracy before, so the effect is visible. Nothing to do (and ``{}``) when
    the option is 0; a student without batch norm is logged and left as it is.
    """
    from tfqkd.batch_norm import batch_norm_layers, recalibrate_batch_norm

    if not cfg.precise_bn_batches:
        return {}
    entry = {"batches": cfg.precise_bn_batches, "layers": 0}
    if not batch_norm_layers(student):
        common.log("precise BN: the student has no batch-norm layer; nothing to re-estimate")
        return {"precise_bn": entry}
    entry["test_accuracy_before"] = common.evaluate_accuracy(student, data.test)
    entry["layers"] = recalibrate_batch_norm(student, data.train, cfg.precise_bn_batches)
    common.log(f"batch-norm statistics of {entry['layers']} layers re-estimated over "
               f"{cfg.precise_bn_batches} training batches (test accuracy before: "
               f"{entry['test_accuracy_before']:.4f})")
    return {"precise_bn": entry}


def _teachers_of(cfg) -> list:
    t = cfg.teacher
    if not t:
        return []
    return [t] if isinstance(t, str) else list(t)


def coefficient_scheduler(cfg: common.Config):
    """The λ schedule of ``cfg``: ``--coefficient`` → ``--coefficient_end`` (unless constant)."""
    from tfqkd.callbacks import CoefficientScheduler

    end = cfg.coefficient if cfg.coefficient_schedule == "constant" else cfg.coefficient_end
    return CoefficientScheduler(cfg.coefficient_schedule, start=cfg.coefficient, end=end)


def run(cfg: common.Config, strategy: tf.distribute.Strategy = None) -> dict:
    """Runs Algorithm 1 as configured by ``cfg``; returns the content of results.json."""
    run_ = common.start_run(cfg, "runs/quantize_distill", strategy)
    if run_.finished is not None:
        return run_.finished
    data, strategy = run_.data, run_.strategy
    teacher_paths = _teachers_of(cfg)
    extra: dict = {}
    with strategy.scope():
        float_student, origin = common.load_or_build_student(cfg, data)
        student = quantize(float_student, cfg)
        if teacher_paths:
            teachers = load_teachers(teacher_paths, strategy, cfg, data.info)
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


def main(argv):
    del argv
    common.quiet_logs()
    run(common.config_from_flags(OPTIONS, PRESETS))


if __name__ == "__main__":
    common.run_main(main, OPTIONS)
