"""Stop training at the first non-finite value: in the inputs, the loss, the gradients or the weights.

Why tfqkd checks this itself. Keras' ``TerminateOnNaN`` looks at the reported loss only, and on
this stack a NaN does not always reach the loss: on some CPUs TensorFlow's oneDNN graph rewrites
fuse ``Conv2D``/``FusedBatchNorm`` with the following ReLU, and the fused ReLU maps NaN to 0.
One NaN pixel then makes every activation after the first ReLU 0, the loss reads exactly
``ln(classes)``, while the gradients turn the shadow weights into NaN (measured on a float and on a
QAT ResNet: 14 of their weights NaN after one step, the loss 2.3026 = ln 10). With
``TF_ENABLE_ONEDNN_OPTS=0`` or grappler's remapper off, the same step reports a NaN loss. tfqkd's
own quantizers propagate a NaN (``tests/test_finite.py`` checks each of them), so the guard has to
look at the inputs, gradients and weights, not the loss alone.

The check runs inside the compiled train step (:func:`step_flags`, :func:`weights_flag`), costs
one ``is_finite`` reduction per tensor (``tools/benchmark_distill.py`` reports it), and
:class:`StopOnNonFinite` raises :class:`NonFiniteError` after the first bad step, naming the epoch,
the step, what was not finite and what to try. The exception stops ``fit`` before the epoch's
checkpoint is written, so a resumable run keeps its last good checkpoint, and a recipe never
writes ``results.json`` for a diverged run.

Example:
    >>> import numpy as np
    >>> import tfqkd
    >>> from tfqkd import keras
    >>> model = tfqkd.models.tiny_resnet(10, input_shape=(8, 8, 1), seed=0)
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> x = np.ones((4, 8, 8, 1), "float32")
    >>> x[1, 2, 3, 0] = np.nan
    >>> try:
    ...     model.fit(x, np.zeros(4), epochs=1, verbose=0, callbacks=[StopOnNonFinite()])
    ... except NonFiniteError as e:
    ...     print(str(e).splitlines()[0].split(":")[0])
    Training stopped at epoch 1, step 1

    What it names depends on the CPU: where oneDNN fuses the ReLU (as above) "the model's weights
    after the update are not finite"; on a CPU where it does not (seen on an AVX2 AMD EPYC
    without AVX-512, 2026-12-07) "the loss is not finite".
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

from tfqkd._keras import keras, tf

__all__ = ["NonFiniteError", "StopOnNonFinite", "CHECKS", "all_finite", "step_flags",
           "weights_flag", "new_flags_variable", "record_flags", "guarded_update",
           "minimize_checked"]

#: What a train step checks, in the order of :func:`record_flags`' vector.
CHECKS = ("inputs", "loss", "gradients", "weights")

_WHAT = {
    "inputs": "the input batch contains NaN or infinity",
    "loss": "the loss is not finite",
    "gradients": "the gradients are not finite",
    "weights": "the model's weights after the update are not finite",
}

_ADVICE = {
    "inputs": ("check the data: tfqkd.data.load_arrays(...) and np.isfinite(x).all(); a custom "
               "pipeline that divides by a zero standard deviation produces NaN"),
    "loss": ("lower the learning rate (--learning_rate), check the labels are class indices in "
             "[0, classes), and check a teacher's outputs are finite"),
    "gradients": ("lower the learning rate (--learning_rate), or clip gradients "
                  "(optimizer clipnorm=...)"),
    "weights": ("lower the learning rate (--learning_rate) or clip gradients; if the loss looked "
                "normal, check the inputs for NaN (a fused ReLU hides a NaN input from the loss)"),
}


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinity; the message names the epoch, step, check and fix."""

    def __init__(self, epoch: int, step: int, check: str, detail: str = ""):
        self.epoch, self.step, self.check = epoch, step, check
        lines = [f"Training stopped at epoch {epoch}, step {step}: {_WHAT[check]}."]
        if detail:
            lines.append(detail)
        lines.append(f"What to try: {_ADVICE[check]}.")
        lines.append("No result was recorded for this run; the last checkpoint (if any) is the "
                     "last good one.")
        super().__init__("\n".join(lines))


def all_finite(tensors: Iterable[Any]) -> tf.Tensor:
    """True where every floating-point element of every tensor is finite (None entries skipped)."""
    checks = []
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, tf.IndexedSlices):
            t = t.values
        t = tf.convert_to_tensor(t)
        if t.dtype.is_floating:
            checks.append(tf.reduce_all(tf.math.is_finite(t)))
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


def step_flags(inputs: Any, loss: Any, gradients: Optional[Sequence[Any]]) -> tf.Tensor:
    """``(inputs, loss, gradients)`` as a float32 vector, 1.0 where that part is not finite.

    ``gradients=None`` skips the gradient check (a loss-scaling optimizer skips non-finite steps
    itself, so non-finite gradients are not an error there).
    """
    bad = lambda ok: 1.0 - tf.cast(ok, tf.float32)  # noqa: E731
    grads_ok = tf.constant(True) if gradients is None else all_finite(gradients)
    return tf.stack([bad(all_finite(tf.nest.flatten(inputs))), bad(all_finite([loss])),
                     bad(grads_ok)])


def weights_flag(variables: Sequence[tf.Variable]) -> tf.Tensor:
    """1.0 (float32 scalar) where a variable holds a NaN or infinity, else 0.0."""
    return 1.0 - tf.cast(all_finite([tf.convert_to_tensor(v) for v in variables]), tf.float32)


def new_flags_variable() -> tf.Variable:
    """The per-step result of the checks, one entry per :data:`CHECKS` (kept out of training)."""
    return tf.Variable(tf.zeros([len(CHECKS)]), trainable=False, name="non_finite_flags",
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def record_flags(variable: tf.Variable, flags: tf.Tensor) -> Any:
    """Stores ``flags`` (summed over the replicas under ``tf.distribute``) in ``variable``."""
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        flags = ctx.all_reduce(tf.distribute.ReduceOp.SUM, flags)
    return variable.assign(flags)


def _is_loss_scaling(optimizer) -> bool:
    return isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)


def _default_strategy() -> bool:
    # Under any tf.distribute strategy (even one replica) apply_gradients merges across
    # replicas, which cannot happen inside a tf.cond branch.
    return not tf.distribute.has_strategy()


def guarded_update(flags_variable: tf.Variable, inputs: Any, loss: tf.Tensor,
                   gradients: Optional[Sequence[Any]], variables: Sequence[tf.Variable],
                   apply: Callable[[], Any]) -> None:
    """Runs ``apply()`` (the optimizer update) unless the step is not finite; records the checks.

    Outside a ``tf.distribute`` strategy a non-finite step is not applied, so the model keeps its
    last good trainable weights (batch-norm statistics and activation ranges are updated by the
    forward pass and may already hold NaN). Under a strategy the update is applied either way
    (a conditional ``apply_gradients`` cannot be merged across replicas); the
    weights are then not finite, but :class:`StopOnNonFinite` stops before the epoch's checkpoint.
    The weights are checked after the update.
    """
    flags = step_flags(inputs, loss, gradients)
    if _default_strategy():
        step_ok = tf.reduce_all(tf.equal(flags, 0.0))

        def _apply():
            apply()
            return tf.constant(True)

        tf.cond(step_ok, _apply, lambda: tf.constant(False))
    else:
        apply()
    with tf.control_dependencies([flags]):
        flags = tf.concat([flags, weights_flag(variables)[None]], axis=0)
    record_flags(flags_variable, flags)


def minimize_checked(model: keras.Model, loss: tf.Tensor, tape: tf.GradientTape,
                     variables: Sequence[tf.Variable], inputs: Any) -> None:
    """``model.optimizer.minimize(loss, variables, tape=tape)`` inside :func:`guarded_update`.

    The checks are recorded in ``model.non_finite_flags`` (:func:`new_flags_variable`).
    """
    optimizer = model.optimizer
    variables = list(variables)
    if _is_loss_scaling(optimizer):
        # It scales the loss, unscales the gradients and skips non-finite steps itself: no
        # gradient check, and its own update logic is left alone.
        guarded_update(model.non_finite_flags, inputs, loss, None, variables,
                       lambda: optimizer.minimize(loss, variables, tape=tape))
        return
    grads = tape.gradient(loss, variables)
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    guarded_update(model.non_finite_flags, inputs, loss, grads, variables,
                   lambda: optimizer.apply_gradients(pairs))


class StopOnNonFinite(keras.callbacks.Callback):
    """Raises :class:`NonFiniteError` after the first training step with a NaN or infinity.

    With a model that runs the in-graph checks (``tfqkd.Distiller``, its subclasses and QKD's
    ``CoStudying``: a ``non_finite_flags`` variable) it reads their result. With any other model
    (e.g. a plain QAT model in ``model.fit``) it checks the reported loss and, because a fused
    ReLU can hide a NaN input from the loss, every trainable weight after each step (one compiled
    ``is_finite`` reduction).

    Args:
        check_weights: For models without in-graph checks, also check the weights (default True).
    """

    def __init__(self, check_weights: bool = True):
        super().__init__()
        self.check_weights = bool(check_weights)
        self._epoch = 0
        self._weights_ok = None

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self._epoch = epoch

    def _flags_of(self, model) -> Optional[tf.Variable]:
        return getattr(model, "non_finite_flags", None)

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        flags_var = self._flags_of(self.model)
        if flags_var is not None:
            flags = flags_var.numpy()
            for name, value in zip(CHECKS, flags):
                if value > 0:
                    self._stop(batch, name)
            return
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(batch, "loss")
        if self.check_weights:
            if self._weights_ok is None:
                variables = self.model.trainable_variables
                self._weights_ok = tf.function(lambda: all_finite(variables))
            if not bool(self._weights_ok()):
                self._stop(batch, "weights")

    def _stop(self, batch: int, check: str) -> None:
        self.model.stop_training = True
        lr = getattr(getattr(self.model, "optimizer", None), "learning_rate", None)
        detail = ""
        try:
            detail = f"(learning rate at this step: {float(tf.convert_to_tensor(lr)):.6g})"
        except (TypeError, ValueError):
            pass
        raise NonFiniteError(self._epoch + 1, batch + 1, check, detail)
