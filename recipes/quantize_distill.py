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

from recipes import common
# The stage itself (options, presets, config, run) lives in recipes/_stages.py, which the quick
# start shares; this file is its command line.
from recipes._stages import QD_OPTIONS as OPTIONS
from recipes._stages import QD_PRESETS as PRESETS
from recipes._stages import quantize_distill_config as make_config  # noqa: F401
from recipes._stages import quantize_distill as run
from recipes.common import (QUANT_OPTIONS, coefficient_scheduler, precise_bn,  # noqa: F401
                            quantize)  # their home before recipes/common


def _main(argv):
    del argv
    common.quiet_logs()
    run(common.config_from_flags(OPTIONS, PRESETS))


def main() -> None:
    """The command line (console script ``tfqkd-quantize-distill``): absl flags from ``OPTIONS``."""
    common.run_main(_main, OPTIONS)


if __name__ == "__main__":
    main()
