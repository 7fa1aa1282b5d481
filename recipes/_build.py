"""Config → objects: the models (:func:`build_model`, :func:`load_or_build_student`,
:func:`load_teachers`), optimizers (:func:`make_optimizer`), compiled classifiers and
distillers, the quantized student (:func:`quantize`), the λ schedule and the batch-norm
re-estimation the recipes share. Part of :mod:`recipes.common`.

Example:
    >>> from recipes._options import Config
    >>> cfg = Config(learning_rate=0.1, lr_schedule="constant", momentum=0.9, epochs=2)
    >>> round(float(make_optimizer(cfg, steps_per_epoch=10).learning_rate), 6)
    0.1
"""

from __future__ import annotations

from typing import Any, Optional

from recipes._data import Data, RAW_PIXELS, _info_get, input_normalization, is_model_name
from recipes._options import Config
from recipes._train import evaluate_accuracy
from recipes._util import log

from tfqkd._keras import keras
from tfqkd import training
from tfqkd.training import load_model

__all__ = ["adapt_teacher", "load_or_build_model", "build_model", "make_lr_schedule",
           "make_optimizer", "load_or_build_student", "compile_classifier", "load_teachers",
           "make_distiller", "compile_distiller", "quantize", "coefficient_scheduler",
           "precise_bn"]


def adapt_teacher(teacher: keras.Model, cfg: Config, info: Any) -> keras.Model:
    """``teacher`` made to take the student's inputs: when one of them preprocesses itself (raw
    pixels) and the other takes mean/std-normalised images, a fixed 1x1 input adapter
    (``tfqkd.models.input_adapter``, exact) is put in front of the teacher."""
    from tfqkd import models
    from tfqkd.data.normalization import normalizer

    student_raw = input_normalization(cfg) == RAW_PIXELS
    if models.expects_raw_pixels(teacher) == student_raw:
        return teacher
    mean, std = _info_get(info, "mean"), _info_get(info, "std")
    mean_std = normalizer(None, mean, std)
    raw = lambda x: x  # noqa: E731
    channels = int(_info_get(info, "input_shape")[-1])
    adapter = models.input_adapter(
        raw if student_raw else (lambda x: mean_std(x / 255.0)),
        (lambda x: mean_std(x / 255.0)) if student_raw else raw, channels)
    inputs = keras.Input(tuple(_info_get(info, "input_shape")))
    log(f"teacher {teacher.name}: inputs converted from the student's "
        f"{'raw pixels' if student_raw else 'mean/std-normalised images'} (input adapter)")
    return keras.Model(inputs, teacher(adapter(inputs)), name=f"{teacher.name}_adapted")


def load_or_build_model(spec: str, cfg: Config, info: Any, *, what: str) -> keras.Model:
    """A model from a --student / --teacher value: a ``tfqkd.models.get`` name (fresh float
    weights, ``--alpha``, at the data's ``--image_size``) or a saved model's path."""
    from tfqkd import models

    if is_model_name(spec):
        # --alpha is the width of the families that have one (a MobileNet student next to an
        # EfficientNet teacher): the others build at their only width.
        alpha = cfg.alpha if models.has_alpha(spec) else 1.0
        return models.get(spec, int(_info_get(info, "num_classes")),
                          tuple(_info_get(info, "input_shape")), alpha=alpha, seed=cfg.seed)
    return load_model(spec, what=what)


def build_model(arch: str, width: float, info: Any, cfg: Config, *,
                seed: Optional[int] = None) -> keras.Model:
    """Builds a float model of ``arch`` (``resnet``: ResNet20/WRN20xwidth; ``tiny``)."""
    from tfqkd import models

    num_classes = int(_info_get(info, "num_classes"))
    shape = tuple(_info_get(info, "input_shape"))
    seed = cfg.seed if seed is None else seed
    if arch == "resnet":
        return models.wide_resnet20(width, num_classes, shape, weight_decay=cfg.weight_decay,
                                    seed=seed)
    if arch == "tiny":
        return models.tiny_resnet(num_classes, shape, width=width,
                                  weight_decay=cfg.weight_decay, seed=seed)
    if is_model_name(arch):
        alpha = getattr(cfg, "alpha", 1.0) if models.has_alpha(arch) else 1.0
        return models.get(arch, num_classes, shape, alpha=alpha, seed=seed)
    raise ValueError(f"--arch must be resnet, tiny or a tfqkd.models.get name "
                     f"({', '.join(models.names())}), got {arch!r}.")


def make_lr_schedule(cfg: Config, steps_per_epoch: int, epochs: Optional[int] = None):
    """The learning-rate schedule as a function of the optimizer's iteration counter.

    Because it reads the iteration counter (restored from checkpoints), a resumed run continues
    the schedule exactly where it stopped.
    """
    epochs = cfg.epochs if epochs is None else epochs
    total = max(1, int(epochs * steps_per_epoch))
    lr = float(cfg.learning_rate)
    if cfg.lr_schedule == "constant":
        return lr
    if cfg.lr_schedule == "step":
        # PiecewiseConstantDecay switches AFTER a boundary (step > b): -1 makes the first step
        # of the second half (iterations == total/2) the first one at lr/10.
        b = [max(0, int(0.5 * total) - 1), max(1, int(0.75 * total) - 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(b, [lr, lr * 0.1, lr * 0.01])
    if cfg.lr_schedule == "cosine":
        warm = int(getattr(cfg, "warmup_epochs", 0) or 0) * steps_per_epoch
        if warm:
            return keras.optimizers.schedules.CosineDecay(
                0.0, max(1, total - warm), warmup_target=lr, warmup_steps=warm)
        return keras.optimizers.schedules.CosineDecay(lr, total)
    raise ValueError(f"--lr_schedule must be cosine, step or constant, got {cfg.lr_schedule!r}.")


def make_optimizer(cfg: Config, steps_per_epoch: int, epochs: Optional[int] = None):
    """SGD with ``cfg.momentum`` (no Nesterov) and the ``cfg.lr_schedule`` schedule (weight decay
    lives in the models' L2 regularizers), from ``tfqkd.training.make_optimizer``."""
    return training.make_optimizer("sgd", make_lr_schedule(cfg, steps_per_epoch, epochs),
                                   momentum=cfg.momentum, nesterov=False)


def load_or_build_student(cfg: Config, data: Data) -> "tuple[keras.Model, str]":
    """The float model to quantize and a phrase saying where it came from.

    ``cfg.student`` (a saved float student) when given, else a freshly initialised
    ``cfg.arch``/``cfg.width`` model. Call inside the run's ``strategy.scope()``.
    """
    if cfg.student and is_model_name(cfg.student):
        model = load_or_build_model(cfg.student, cfg, data.info, what="--student")
        origin = f"a fresh float {model.name} (--student={cfg.student}, alpha={cfg.alpha:g})"
        log(f"--student: starting from {origin}")
        return model, origin
    if cfg.student:
        return load_model(cfg.student, what="--student"), f"float student {cfg.student}"
    model = build_model(cfg.arch, cfg.width, data.info, cfg)
    origin = f"a fresh float {model.name} (no --student given)"
    log(f"no --student: starting from {origin}")
    return model, origin


# --------------------------------------------------------------------------------------------
# Compiled classifiers and distillers, quantization, λ schedule, batch-norm re-estimation
# --------------------------------------------------------------------------------------------

def compile_classifier(model: keras.Model, cfg: Config, steps_per_epoch: int) -> None:
    """Compiles a classifier: SGD + schedule, sparse CE (from logits, or from the probabilities
    of a softmax-ended model such as an Applications model), top-1 accuracy."""
    from tfqkd.models import softmax_layer

    model.compile(
        optimizer=make_optimizer(cfg, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=softmax_layer(model) is None),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def teacher_paths(cfg: Config) -> list:
    """``--teacher`` (a multi-string flag: one path, a list, or absent) as a list of paths."""
    t = cfg.teacher
    if not t:
        return []
    return [t] if isinstance(t, str) else list(t)


def load_teachers(paths, strategy, cfg=None, info=None) -> list:
    """Loads saved teacher models (frozen) inside ``strategy``'s scope; with ``cfg`` and the
    data ``info`` a path may also be a ``tfqkd.models.get`` name (a fresh model) and a teacher
    taking other inputs than the student gets an input adapter (:func:`adapt_teacher`)."""
    if isinstance(paths, str):
        paths = [paths]
    teachers = []
    with strategy.scope():
        for p in paths:
            if cfg is None:
                t = load_model(p, what="--teacher")
            else:
                t = adapt_teacher(load_or_build_model(p, cfg, info, what="--teacher"), cfg, info)
            t.trainable = False
            teachers.append(t)
    return teachers


def make_distiller(student, teachers, cfg: Config):
    """A compiled-ready ``tfqkd.Distiller`` from ``cfg``'s τ, λ and soft loss."""
    import tfqkd

    return tfqkd.Distiller(student, teachers if len(teachers) > 1 else teachers[0],
                           temperature=cfg.temperature, coefficient=cfg.coefficient,
                           soft_loss=cfg.soft_loss,
                           temperature_squared=cfg.temperature_squared)


def compile_distiller(distiller, cfg: Config, steps_per_epoch: int) -> None:
    """Compiles a distiller (``tfqkd.Distiller``, ``tfqkd.speq.SPEQ``): SGD + schedule, top-1."""
    distiller.compile(optimizer=make_optimizer(cfg, steps_per_epoch),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])


def quantize(model: keras.Model, cfg: Config) -> keras.Model:
    """``tfqkd.quantize_model`` with the bit-widths and step estimator of ``cfg``."""
    import tfqkd

    return tfqkd.quantize_model(model, weight_bits=cfg.weight_bits,
                                activation_bits=cfg.activation_bits,
                                first_last_bits=cfg.first_last_bits,
                                per_channel=cfg.per_channel, step=cfg.step,
                                softmax_head_bits=getattr(cfg, "softmax_head_bits", None))


def coefficient_scheduler(cfg: Config):
    """The λ schedule of ``cfg``: ``--coefficient`` → ``--coefficient_end`` (unless constant)."""
    from tfqkd.callbacks import CoefficientScheduler

    end = cfg.coefficient if cfg.coefficient_schedule == "constant" else cfg.coefficient_end
    return CoefficientScheduler(cfg.coefficient_schedule, start=cfg.coefficient, end=end)


def precise_bn(cfg: Config, student: keras.Model, data: Data) -> dict:
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
        log("precise BN: the student has no batch-norm layer; nothing to re-estimate")
        return {"precise_bn": entry}
    entry["test_accuracy_before"] = evaluate_accuracy(student, data.test)
    entry["layers"] = recalibrate_batch_norm(student, data.train, cfg.precise_bn_batches)
    log(f"batch-norm statistics of {entry['layers']} layers re-estimated over "
        f"{cfg.precise_bn_batches} training batches (test accuracy before: "
        f"{entry['test_accuracy_before']:.4f})")
    return {"precise_bn": entry}
