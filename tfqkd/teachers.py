"""The teacher side of distillation: teacher lists, their logits, checks, precomputed outputs.

A teacher is a built ``tf_keras`` model (or a list of them, an ensemble) that runs on the
student's batches. :func:`teacher_logits` reads its logits (a softmax-ended teacher's
log-probabilities, which soften to exactly the tempered target); :func:`precompute_teacher_logits`
runs it once over a data set without augmentation and yields ``(x, y, teacher_logits)`` batches,
which :func:`unpack_batch` (the :class:`tfqkd.Distiller`'s batch reader) recognises.

Example:
    >>> unpack_batch((1, 2, tf.zeros([4, 10])))[3].shape  # a rank-2 third element: logits
    TensorShape([4, 10])
    >>> unpack_batch((1, 2, tf.ones([4])))[2].shape  # a rank-1 one: sample weights
    TensorShape([4])
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._keras import keras, tf
from tfqkd.models.heads import softmax_layer

__all__ = ["teacher_logits", "precompute_teacher_logits", "unpack_batch",
           "PROBABILITY_EPSILON", "TeacherArg"]

TeacherArg = Union[keras.Model, Sequence[keras.Model], None]


def _model_name(model) -> str:
    return getattr(model, "name", type(model).__name__)


def _num_classes(model) -> Optional[int]:
    """The static size of the model's last output axis, or None when Keras cannot tell yet."""
    try:
        shape = model.output_shape
    except (AttributeError, RuntimeError, ValueError):
        return None
    if isinstance(shape, list):  # multi-output model: not a classifier we can check
        return None
    return None if not shape or shape[-1] is None else int(shape[-1])


def _check_model(model, role: str) -> None:
    if not isinstance(model, keras.Model):
        hint = ""
        if type(model).__module__.startswith("keras"):
            hint = (" It looks like a Keras 3 model; tfqkd uses Keras 2: build it with "
                    "`from tfqkd import keras`.")
        raise TypeError(f"The {role} must be a tf_keras Model, got {type(model).__name__}.{hint}")
    if not model.built:
        raise ValueError(
            f"The {role} {_model_name(model)!r} is not built, so its weights do not exist yet. "
            f"Build it first: call `{role}.build((None, *input_shape))`, call it on a batch "
            "(`model(x[:1])`), or create it as a functional model with a `keras.Input`."
        )


def _input_shape(model) -> Optional[Tuple[Optional[int], ...]]:
    try:
        shape = model.input_shape
    except (AttributeError, RuntimeError):
        return None
    if not isinstance(shape, tuple) or not all(d is None or isinstance(d, int) for d in shape):
        return None  # several inputs, or unknown: nothing to compare
    return shape


def _check_teacher_input(student, teacher, role: str) -> None:
    """The teacher runs on the student's batches: their input shapes must agree."""
    s, t = _input_shape(student), _input_shape(teacher)
    if s is None or t is None:
        return
    if len(s) != len(t) or any(a is not None and b is not None and a != b
                               for a, b in zip(s[1:], t[1:])):
        raise ValueError(
            f"The {role} {_model_name(teacher)!r} takes inputs of shape {t[1:]} but the student "
            f"{_model_name(student)!r} takes {s[1:]}: the {role} runs on the student's batches. "
            f"Use a {role} built for the same image size and channels (e.g. trained on the same "
            f"data set), or put a resizing layer inside it."
        )


def _as_teacher_list(teacher: TeacherArg) -> Tuple[keras.Model, ...]:
    if teacher is None:
        return ()
    if isinstance(teacher, keras.Model):
        return (teacher,)
    if isinstance(teacher, (list, tuple)):
        if len(teacher) == 0:
            raise ValueError(
                "teacher is an empty list: give one model, a non-empty list of models (an "
                "ensemble: their softened probabilities are averaged), or None when the soft "
                "targets come from precomputed teacher logits or a subclass's "
                "teacher_probabilities()."
            )
        return tuple(teacher)
    raise TypeError(
        f"teacher must be a Keras model, a list of models or None, got {type(teacher).__name__}."
    )


def _rank(t) -> Optional[int]:
    shape = getattr(t, "shape", None)
    return None if shape is None else shape.rank if hasattr(shape, "rank") else len(shape)


#: Probabilities below this are clipped before the log (float32's smallest normal is ~1.2e-38):
#: a softmax teacher's exact zeros would otherwise give -inf logits and NaN soft targets.
PROBABILITY_EPSILON = 1e-30


def teacher_logits(teacher: keras.Model, x, softmax: Optional[bool] = None) -> tf.Tensor:
    """The teacher's logits on ``x`` in float32 (no gradient is needed: called outside tapes).

    A softmax-ended teacher (``softmax``: whether it is; None checks with
    :func:`tfqkd.models.softmax_layer`) gives ``log(max(p, 1e-30))``: the log-probabilities
    are the logits up to a per-example constant, and ``softmax`` ignores constants, so
    ``softmax(log p / tau) = p**(1/tau) / sum p**(1/tau)`` is exactly the tempered target
    (only probabilities below 1e-30 are clipped).

    Example:
        >>> from tfqkd import keras
        >>> inputs = keras.Input((3,))
        >>> t = keras.Model(inputs, keras.layers.Softmax()(inputs))
        >>> [round(float(v), 4) for v in tf.nn.softmax(teacher_logits(t, tf.constant([[1., 2., 3.]])))[0]]
        [0.09, 0.2447, 0.6652]
    """
    if softmax is None:
        softmax = softmax_layer(teacher) is not None
    out = tf.cast(teacher(x, training=False), tf.float32)
    if softmax:
        out = tf.math.log(tf.maximum(out, PROBABILITY_EPSILON))
    return out


def unpack_batch(data) -> Tuple[Any, Any, Any, Any]:
    """Splits a Distiller batch into ``(x, y, sample_weight, teacher_logits)`` (missing parts None).

    Example:
        >>> unpack_batch({"x": 1, "y": 2, "teacher_logits": 3})
        (1, 2, None, 3)
    """
    if isinstance(data, dict) and "x" in data:
        return data["x"], data.get("y"), data.get("sample_weight"), data.get("teacher_logits")
    if isinstance(data, list):
        data = tuple(data)
    if not isinstance(data, tuple):
        return data, None, None, None
    if len(data) == 1:
        return data[0], None, None, None
    if len(data) == 2:
        return data[0], data[1], None, None
    if len(data) == 3:
        third = data[2]
        rank = _rank(third)
        if rank is not None and rank >= 2:
            return data[0], data[1], None, third
        return data[0], data[1], third, None
    if len(data) == 4:
        return data[0], data[1], data[3], data[2]
    raise ValueError(
        f"A Distiller batch has 2 to 4 elements (x, y[, teacher_logits][, sample_weight]) or "
        f"is a dict with keys x, y[, teacher_logits, sample_weight]; got {len(data)} elements."
    )


def precompute_teacher_logits(
    teacher: Union[keras.Model, Sequence[keras.Model]],
    dataset: tf.data.Dataset,
    *,
    batch_size: Optional[int] = None,
    shuffle: bool = False,
    seed: Optional[int] = None,
) -> tf.data.Dataset:
    """Runs the teacher(s) once over ``dataset`` and returns batches ``(x, y, teacher_logits)``.

    For data WITHOUT random augmentation the teacher's outputs are the same every epoch, so one
    teacher pass per data set replaces one per step; the Distiller recognises the third element
    and skips the teacher. The examples and logits are held in memory (CIFAR-10's train split:
    about 0.6 GB of float32 images).

    Args:
        teacher: A model or a list of models (logits stacked to (B, K, C); the Distiller averages
            their softened probabilities, exactly as with live teachers).
        dataset: Batched ``(x, y)`` (or ``(x, y, sample_weight)``) elements, e.g. from
            ``tfqkd.data.load_dataset(..., augment=False)``. Read exactly once.
        batch_size: Batch size of the result; default: that of the first batch of ``dataset``.
        shuffle: Reshuffle the examples each epoch (order within the cached set).
        seed: Shuffle seed.

    Returns:
        A batched dataset of ``(x, y, teacher_logits)`` (plus ``sample_weight`` if present).

    Example:
        >>> import numpy as np, tfqkd
        >>> from tfqkd._keras import tf
        >>> x = np.random.rand(10, 8, 8, 1).astype("float32"); y = np.arange(10) % 10
        >>> ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
        >>> out = precompute_teacher_logits(tfqkd.models.tiny_resnet(seed=0), ds)
        >>> [tuple(t.shape) for t in next(iter(out))]
        [(4, 8, 8, 1), (4,), (4, 10)]
    """
    teachers = _as_teacher_list(teacher)
    if not teachers:
        raise ValueError("precompute_teacher_logits needs a teacher model or a list of models.")
    for i, t in enumerate(teachers):
        _check_model(t, "teacher" if len(teachers) == 1 else f"teacher[{i}]")
    softmax_heads = [softmax_layer(t) is not None for t in teachers]

    @tf.function(reduce_retracing=True)
    def forward(x):
        outs = [teacher_logits(t, x, softmax) for t, softmax in zip(teachers, softmax_heads)]
        return outs[0] if len(outs) == 1 else tf.stack(outs, axis=1)

    parts: List[List[np.ndarray]] = []
    first_batch = None
    for element in dataset:
        x, y, sw, given = unpack_batch(element)
        if given is not None:
            raise ValueError("dataset already carries teacher logits (a third element of rank >= 2).")
        if y is None:
            raise ValueError("dataset must yield (x, y) batches: the labels are needed for the hard loss.")
        logits = forward(x)
        row = [x, y, logits] + ([sw] if sw is not None else [])
        row = [tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else np.asarray(t), r)
               for r in row]
        if first_batch is None:
            first_batch = int(logits.shape[0])
        parts.append(row)
    if not parts:
        raise ValueError("dataset is empty: nothing to run the teacher on.")
    columns = [
        tf.nest.map_structure(lambda *arrays: np.concatenate(arrays, axis=0), *[p[i] for p in parts])
        for i in range(len(parts[0]))
    ]
    out = tf.data.Dataset.from_tensor_slices(tuple(columns))
    if shuffle:
        n = int(columns[2].shape[0])
        out = out.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return out.batch(batch_size or first_batch).prefetch(tf.data.AUTOTUNE)
