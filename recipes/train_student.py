"""Trains the float ResNet20 student: hard labels, or KD from a saved teacher (paper §4.4).

The paper compares two ways of pretraining the float student that is later quantized:
with hard labels only (no ``--teacher``), or with knowledge distillation from a float teacher
(``--teacher=runs/teacher``), loss ``(1 - λ)·H(y, p_S) + λ·H(p_T, p_S)`` at temperature τ.

Defaults: the paper preset (see recipes/common.py and docs/recipes.md); KD with τ = 4, the soft
loss multiplied by τ², and constant λ = 0.5 when a teacher is given.

Examples::

    python recipes/train_student.py --output_dir=runs/student_hard
    python recipes/train_student.py --teacher=runs/teacher_x2 --temperature=4 --coefficient=0.5 \\
        --output_dir=runs/student_kd
    python recipes/train_student.py --preset=smoke --dataset=digits --output_dir=/tmp/s
"""

from __future__ import annotations

from recipes import common
# The stage itself (options, presets, config, run) lives in recipes/_stages.py, which the quick
# start shares; this file is its command line.
from recipes._stages import STUDENT_OPTIONS as OPTIONS
from recipes._stages import STUDENT_PRESETS as PRESETS
from recipes._stages import student_config as make_config  # noqa: F401
from recipes._stages import train_student as run
from recipes.common import (KD_OPTIONS, compile_distiller, load_teachers,  # noqa: F401
                            make_distiller)  # their home before recipes/common


def _main(argv):
    del argv
    common.quiet_logs()
    run(common.config_from_flags(OPTIONS, PRESETS))


def main() -> None:
    """The command line (console script ``tfqkd-train-student``): absl flags from ``OPTIONS``."""
    common.run_main(_main, OPTIONS)


if __name__ == "__main__":
    main()
