"""Soft (distillation) losses as pure functions.

Every soft loss has the signature ``fn(teacher_probs, student_logits, temperature) -> (B,)``:

* ``teacher_probs`` (B, C): the soft targets ``p_T = softmax(z_T / tau)``, already softened (the
  :class:`~tfqkd.distiller.Distiller` averages them over a teacher ensemble before calling the loss);
* ``student_logits`` (B, C): raw student logits ``z_S``; the loss softens them itself,
  ``p_S = softmax(z_S / tau)``, in log space where it can (numerically stable);
* ``temperature``: scalar ``tau`` > 0 (a Python float or a scalar tensor / ``tf.Variable``).

It returns one loss per example so that the caller can weight examples and divide by the *global*
batch size under ``tf.distribute`` (``tf.nn.compute_average_loss``).

Names accepted by :func:`get`: ``"kl"`` (Kullback-Leibler divergence ``KL(p_T || p_S)``), ``"ce"``
(cross-entropy with soft targets ``H(p_T, p_S)``, the term of the paper's Eq. 3) and ``"cosine"``
(cosine distance ``1 - cos(p_T, p_S)`` between the probability vectors, as SPEQ uses). ``kl`` and
``ce`` differ by the teacher's entropy ``H(p_T)``, which does not depend on the student: their
gradients with respect to the student are identical, but ``kl`` is 0 when the student matches the
teacher, which makes the logged soft loss easier to read.

Example:
    >>> import numpy as np
    >>> from tfqkd import losses
    >>> p_t = np.array([[0.7, 0.2, 0.1]], "float32")
    >>> z_s = np.log(p_t)  # a student whose softmax equals the teacher's probabilities
    >>> float(losses.get("kl")(p_t, z_s, 1.0)[0]) < 1e-6
    True
"""

from __future__ import annotations

from typing import Callable, Union

from tfqkd._keras import keras, tf

__all__ = ["kl_divergence", "soft_cross_entropy", "cosine_distance", "get", "SoftLoss"]

#: ``fn(teacher_probs (B, C), student_logits (B, C), temperature) -> per-example loss (B,)``.
SoftLoss = Callable[..., tf.Tensor]


def _student_log_probs(student_logits, temperature) -> tf.Tensor:
    # float32 even under mixed precision: softmax of fp16 logits / tau loses the small probabilities
    # that carry the teacher's "dark knowledge".
    z = tf.cast(student_logits, tf.float32)
    return tf.nn.log_softmax(z / tf.cast(temperature, tf.float32), axis=-1)


def _teacher(teacher_probs) -> tf.Tensor:
    return tf.cast(teacher_probs, tf.float32)


@keras.utils.register_keras_serializable(package="tfqkd")
def kl_divergence(teacher_probs, student_logits, temperature=1.0) -> tf.Tensor:
    """``KL(p_T || p_S) = sum_c p_T,c (log p_T,c - log p_S,c)`` per example, ``p_S = softmax(z_S/tau)``.

    Terms with ``p_T,c = 0`` contribute 0 (``0 log 0 = 0``), so one-hot targets are fine.

    Example:
        >>> import numpy as np
        >>> kl_divergence(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]), 1.0).numpy().round(4)
        array([0.6931], dtype=float32)
    """
    p_t = _teacher(teacher_probs)
    log_p_s = _student_log_probs(student_logits, temperature)
    # xlogy(0, 0) = 0, unlike p * log(p) which gives NaN for exact zeros.
    return tf.reduce_sum(tf.math.xlogy(p_t, p_t) - p_t * log_p_s, axis=-1)


@keras.utils.register_keras_serializable(package="tfqkd")
def soft_cross_entropy(teacher_probs, student_logits, temperature=1.0) -> tf.Tensor:
    """Cross-entropy with soft targets ``H(p_T, p_S) = -sum_c p_T,c log p_S,c`` per example.

    This is the soft term of the paper's Eq. (3). It equals :func:`kl_divergence` plus the
    teacher's entropy, a constant for the student.

    Example:
        >>> import numpy as np
        >>> soft_cross_entropy(np.array([[0.5, 0.5]]), np.array([[0.0, 0.0]])).numpy().round(4)
        array([0.6931], dtype=float32)
    """
    p_t = _teacher(teacher_probs)
    log_p_s = _student_log_probs(student_logits, temperature)
    return -tf.reduce_sum(p_t * log_p_s, axis=-1)


@keras.utils.register_keras_serializable(package="tfqkd")
def cosine_distance(teacher_probs, student_logits, temperature=1.0) -> tf.Tensor:
    """Cosine distance ``1 - <p_T, p_S> / (|p_T| |p_S|)`` between the probability vectors.

    In [0, 1] for probability vectors (they are non-negative); 0 when the student's softened
    distribution is proportional to (hence equal to) the teacher's.

    Example:
        >>> import numpy as np
        >>> cosine_distance(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]])).numpy().round(4)
        array([0.2929], dtype=float32)
    """
    p_t = _teacher(teacher_probs)
    p_s = tf.exp(_student_log_probs(student_logits, temperature))
    cos = tf.reduce_sum(
        tf.math.l2_normalize(p_t, axis=-1, epsilon=1e-12)
        * tf.math.l2_normalize(p_s, axis=-1, epsilon=1e-12),
        axis=-1,
    )
    return 1.0 - cos


_BY_NAME = {
    "kl": kl_divergence,
    "kld": kl_divergence,
    "kl_divergence": kl_divergence,
    "ce": soft_cross_entropy,
    "cross_entropy": soft_cross_entropy,
    "soft_cross_entropy": soft_cross_entropy,
    "cosine": cosine_distance,
    "cosine_distance": cosine_distance,
}


def get(identifier: Union[str, SoftLoss]) -> SoftLoss:
    """Returns the soft loss ``fn(teacher_probs, student_logits, temperature) -> (B,)``.

    Args:
        identifier: ``"kl"``, ``"ce"`` or ``"cosine"`` (the long names ``"kl_divergence"``,
            ``"soft_cross_entropy"``, ``"cosine_distance"`` work too), the registered name of a
            function registered with ``keras.utils.register_keras_serializable``, or any callable
            with that signature (returned unchanged).

    Raises:
        ValueError: for an unknown name or a value that is neither a string nor callable.

    Example:
        >>> get("ce") is soft_cross_entropy
        True
        >>> my_loss = lambda p_t, z_s, tau: tf.reduce_sum(tf.abs(p_t - tf.nn.softmax(z_s / tau)), -1)
        >>> get(my_loss) is my_loss
        True
    """
    if callable(identifier):
        return identifier
    if isinstance(identifier, str):
        fn = _BY_NAME.get(identifier.lower())
        if fn is not None:
            return fn
        registered = keras.utils.get_registered_object(identifier)
        if callable(registered):
            return registered
        raise ValueError(
            f"Unknown soft loss {identifier!r}. Use one of 'kl', 'ce', 'cosine', or pass a callable "
            "fn(teacher_probs, student_logits, temperature) -> per-example loss of shape (batch,)."
        )
    raise ValueError(
        f"soft_loss must be a name ('kl', 'ce', 'cosine') or a callable "
        f"fn(teacher_probs, student_logits, temperature) -> (batch,), got {identifier!r} "
        f"of type {type(identifier).__name__}."
    )


def serialize(fn: SoftLoss) -> str:
    """The name under which :func:`get` finds ``fn`` again (for ``get_config``).

    Example:
        >>> serialize(kl_divergence)
        'kl'
    """
    for name in ("kl", "ce", "cosine"):
        if _BY_NAME[name] is fn:
            return name
    name = keras.utils.get_registered_name(fn)
    if keras.utils.get_registered_object(name) is fn:
        return name
    raise ValueError(
        f"The soft loss {fn!r} is not registered, so it cannot be serialized by name. Decorate it "
        "with @keras.utils.register_keras_serializable(package='...') to make get_config work."
    )
