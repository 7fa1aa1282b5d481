"""Trains a float WideResNet20xN teacher (paper §4: teachers of widths 1..10).

Defaults are the paper preset = common CIFAR practice: SGD momentum 0.9, lr 0.1 at batch 128,
weight decay 1e-4, cosine decay over 200 epochs, standard pad-crop-flip augmentation.

Examples::

    python recipes/train_teacher.py --width=2 --output_dir=runs/teacher_x2      # paper schedule
    python recipes/train_teacher.py --preset=cpu --dataset=cifar10 \\
        --data_dir=../shared/data --output_dir=runs/teacher_cpu
    python recipes/train_teacher.py --preset=smoke --dataset=digits --output_dir=/tmp/t

Outputs (see recipes/common.py): model/model.h5, checkpoints/, logs/, history.csv, results.json.
"""

from __future__ import annotations

from recipes import common
# The stage itself (options, presets, config, run) lives in recipes/_stages.py, which the quick
# start shares; this file is its command line.
from recipes._stages import TEACHER_OPTIONS as OPTIONS
from recipes._stages import TEACHER_PRESETS as PRESETS
from recipes._stages import teacher_config as make_config  # noqa: F401
from recipes._stages import train_teacher as run
from recipes.common import compile_classifier  # noqa: F401  (its home before recipes/common)


def _main(argv):
    del argv
    common.quiet_logs()
    run(common.config_from_flags(OPTIONS, PRESETS))


def main() -> None:
    """The command line (console script ``tfqkd-train-teacher``): absl flags from ``OPTIONS``."""
    common.run_main(_main, OPTIONS)


if __name__ == "__main__":
    main()
