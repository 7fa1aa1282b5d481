"""SPEQ: quantize a float student and retrain it by self-distillation (no separate teacher).

Boo et al., AAAI 2021 (see docs/speq.md and ``tfqkd.speq``):

1. Load the float student (``--student``, a train_student output_dir or model.h5; absent: a fresh
   float ResNet20, said so in the log).
2. Quantize it with ``tfqkd.speq.speq_quantize``: weights to ``--weight_bits``, activations to
   ``--activation_bits`` with stochastic-precision activation quantizers (``--high_bits``,
   ``--probability``).
3. Retrain with ``L = (1 - λ)·H(y, p_S) + λ·cosine(p_T, p_S)``, the teacher ``p_T`` being the
   same network run with a random activation precision per layer (``tfqkd.speq.SPEQ``); λ follows
   ``--coefficient_schedule`` as in quantize_distill.py.
4. Save the quantized student (``model/model.h5``) and, with ``--export=int8`` (or ``int4``,
   ``dynamic``, ``float``), ``model/model_<mode>.tflite`` plus its parity report.

results.json has ``test_accuracy`` (the student at its target precision) and
``stochastic_teacher_accuracy`` (one stochastic-precision pass over the test split).

Examples::

    python recipes/speq.py --student=runs/student --weight_bits=2 --activation_bits=2 \\
        --output_dir=runs/speq_w2a2
    python recipes/speq.py --preset=smoke --dataset=digits --output_dir=/tmp/speq --export=int8
"""

from __future__ import annotations

from recipes import common
from recipes.common import (QUANT_OPTIONS, QUANT_PRESETS, Option, coefficient_scheduler,
                            compile_distiller, precise_bn)

from tfqkd._keras import keras, tf
from tfqkd.speq import stochastic_teacher_accuracy

SPEQ_OPTIONS = [
    Option("temperature", 2.0, "Temperature τ > 0 of the soft targets and the student.", "float"),
    Option("coefficient", 0.5, "Self-distillation coefficient λ in [0, 1].", "float"),
    Option("soft_loss", "cosine", "Soft loss: cosine (SPEQ), kl or ce.", "enum",
           ("cosine", "kl", "ce")),
    Option("coefficient_schedule", "constant", "λ schedule: constant, linear (--coefficient -> "
           "--coefficient_end over training), cosine or step.", "enum",
           ("constant", "linear", "cosine", "step")),
    Option("coefficient_end", 0.0, "Final λ of non-constant schedules.", "float"),
    Option("high_bits", "8", "The teacher's alternative activation precision: a bit-width "
           "(> --activation_bits, <= 8) or 'float'."),
    Option("probability", 0.5, "Per-layer chance of the high precision in each teacher pass.",
           "float"),
    Option("teacher_passes", 1, "Stochastic teacher passes averaged per step.", "integer"),
    Option("teacher_bn", "inference", "Batch norm in the teacher pass: inference (moving "
           "statistics) or batch (batch statistics, state restored).", "enum",
           ("inference", "batch")),
]

OPTIONS = common.COMMON_OPTIONS + SPEQ_OPTIONS + [
    o if o.name != "activation_bits" else Option(
        "activation_bits", 2, "The student's activation bit-width (SPEQ varies activation "
        "precision, so activations are always quantized).", "integer")
    for o in QUANT_OPTIONS
] + [
    Option("student", None, "Float student to quantize (train_student output_dir or model.h5). "
           "Absent: start from a fresh float ResNet20 (of --width)."),
    Option("width", 1.0, "Width of the fresh float student when --student is absent.", "float"),
    Option("export", "none", "Export the quantized student to TFLite at the end: none, int8, "
           "int4, dynamic or float.", "enum", ("none", "int8", "int4", "dynamic", "float")),
]

#: quantize_distill's (common.QUANT_PRESETS): retraining starts from a converged float model,
#: hence lr 0.01.
PRESETS = QUANT_PRESETS


def make_config(preset: str = "paper", **overrides) -> common.Config:
    """This recipe's configuration in Python (same resolution as the command line).

    Example:
        >>> make_config("smoke", dataset="digits").activation_bits
        2
    """
    return common.make_config(OPTIONS, PRESETS, preset, **overrides)


def parse_high_bits(value) -> "int | None":
    """``--high_bits`` as ``speq_quantize`` takes it: an int, or None for ``float``.

    Example:
        >>> parse_high_bits("float"), parse_high_bits("8")
        (None, 8)
    """
    if value is None or str(value).strip().lower() in ("float", "none", "32"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"--high_bits must be a bit-width (e.g. 8) or 'float', got {value!r}.") from None


def _high_text(value) -> str:
    bits = parse_high_bits(value)
    return "float" if bits is None else f"{bits} bits"


def quantize(model: keras.Model, cfg: common.Config) -> keras.Model:
    """``tfqkd.speq.speq_quantize`` with the bit-widths and SPEQ settings of ``cfg``."""
    from tfqkd.speq import speq_quantize

    return speq_quantize(model, cfg.weight_bits, cfg.activation_bits,
                         high_bits=parse_high_bits(cfg.high_bits), probability=cfg.probability,
                         first_last_bits=cfg.first_last_bits, per_channel=cfg.per_channel,
                         step=cfg.step)


def make_speq(student: keras.Model, cfg: common.Config):
    """A ``tfqkd.speq.SPEQ`` model from ``cfg``'s τ, λ, soft loss and teacher settings."""
    from tfqkd.speq import SPEQ

    return SPEQ(student, temperature=cfg.temperature, coefficient=cfg.coefficient,
                soft_loss=cfg.soft_loss, teacher_passes=cfg.teacher_passes,
                teacher_bn=cfg.teacher_bn)


def run(cfg: common.Config, strategy: tf.distribute.Strategy = None) -> dict:
    """Runs SPEQ as configured by ``cfg``; returns the content of results.json."""
    run_ = common.start_run(cfg, "runs/speq", strategy)
    if run_.finished is not None:
        return run_.finished
    data = run_.data
    extra: dict = {}
    with run_.strategy.scope():
        float_student, origin = common.load_or_build_student(cfg, data)
        student = quantize(float_student, cfg)
        model = make_speq(student, cfg)
        compile_distiller(model, cfg, data.steps_per_epoch)
    callbacks = [coefficient_scheduler(cfg)]
    if cfg.student:
        extra["float_student_accuracy"] = common.evaluate_accuracy(float_student, data.test)
    common.log(
        f"speq: {origin} -> W{cfg.weight_bits}A{cfg.activation_bits} (first/last "
        f"{cfg.first_last_bits} bits), teacher: activations at {_high_text(cfg.high_bits)} with p="
        f"{cfg.probability:g} per layer, τ={cfg.temperature:g}, λ {cfg.coefficient:g} "
        f"{cfg.coefficient_schedule}, {cfg.soft_loss} loss, {data.num_train} training images, "
        f"{cfg.epochs} epochs")
    run_.begin()  # inputs validated: --overwrite may delete the old run now
    common.fit_with_resume(model, data.train, data.test, cfg.epochs, run_.out, callbacks,
                           save_freq=cfg.save_freq, progress=cfg.progress,
                           validation_freq=cfg.validation_freq, name="speq")
    extra.update(precise_bn(cfg, student, data))
    teacher_acc = stochastic_teacher_accuracy(student, data.test)
    return common.finish_run(run_, student, "SPEQ student",
                             extra={"mode": "speq", "stochastic_teacher_accuracy": teacher_acc,
                                    **extra},
                             export_mode=cfg.export, note=f" (stochastic teacher {teacher_acc:.4f})")


def _main(argv):
    del argv
    common.quiet_logs()
    run(common.config_from_flags(OPTIONS, PRESETS))


def main() -> None:
    """The command line (console script ``tfqkd-speq``): absl flags from ``OPTIONS``."""
    common.run_main(_main, OPTIONS)


if __name__ == "__main__":
    main()
