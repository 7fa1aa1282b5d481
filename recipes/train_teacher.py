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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes import common  # noqa: E402
from recipes.common import Option  # noqa: E402

from tfqkd._keras import keras, tf  # noqa: E402

OPTIONS = common.COMMON_OPTIONS + [
    Option("width", 2.0, "Width multiplier N of WideResNet20xN (1 = ResNet20; the paper studies "
           "1, 1.2, 1.5, 1.7, 2, 3, 4, 5, 10).", "float"),
]

#: Recipe-specific preset values (on top of common.PRESETS).
PRESETS = {
    "smoke": dict(width=2.0),
    "cpu": dict(epochs=15),
    "paper": dict(epochs=200),
}


def make_config(preset: str = "paper", **overrides) -> common.Config:
    """This recipe's configuration in Python (same resolution as the command line).

    Example:
        >>> make_config("smoke", dataset="digits").arch
        'tiny'
    """
    return common.make_config(OPTIONS, PRESETS, preset, **overrides)


def compile_classifier(model: keras.Model, cfg: common.Config, steps_per_epoch: int) -> None:
    """Compiles a classifier: SGD + schedule, sparse CE (from logits, or from the probabilities
    of a softmax-ended model such as an Applications model), top-1 accuracy."""
    from tfqkd.models import softmax_layer

    model.compile(
        optimizer=common.make_optimizer(cfg, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=softmax_layer(model) is None),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def run(cfg: common.Config, strategy: tf.distribute.Strategy = None) -> dict:
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


def main(argv):
    del argv
    common.quiet_logs()
    run(common.config_from_flags(OPTIONS, PRESETS))


if __name__ == "__main__":
    common.run_main(main, OPTIONS)
