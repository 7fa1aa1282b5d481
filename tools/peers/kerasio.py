"""The keras.io "Knowledge Distillation" example's ``Distiller``, the simplest KD peer.

One copy, on tfqkd's Keras 2 (``tfqkd._keras``), for the tools that run it beside tfqkd:
``tools/benchmark_distill.py`` times its step against ``tfqkd.Distiller``'s, and
``tools/compare_peers.py`` trains its ``kerasio_kd`` row with it. (``larq_rows.py``, in this
folder, runs in Larq's own environment and keeps its own copy.)

The structure is the example's: ``compile(optimizer, metrics, student_loss_fn,
distillation_loss_fn, alpha, temperature)`` and a ``train_step`` with the loss
``alpha * student_loss + (1 - alpha) * tau^2 * KL(softmax(t / tau) || softmax(s / tau))``
(alpha = 1 - lambda in tfqkd's notation). ``regularization=True`` adds the student's
regularization losses (``student.losses``), which the example leaves out, so that the objective
equals a ``tfqkd.Distiller``'s on a student with weight decay. ``train_step`` also returns the
total ``loss`` (for epoch logs; the example returns the two parts only).

Example:
    >>> import numpy as np
    >>> from tfqkd._keras import keras
    >>> student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> peer = KerasIODistiller(student, teacher)
    >>> peer.compile(keras.optimizers.SGD(0.1), metrics=["accuracy"],
    ...              student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...              distillation_loss_fn=keras.losses.KLDivergence(), alpha=0.5, temperature=4.0)
    >>> sorted(peer.train_on_batch(np.ones((2, 4), np.float32), np.array([0, 1]), return_dict=True))
    ['accuracy', 'distillation_loss', 'loss', 'student_loss']
"""

from __future__ import annotations

from tfqkd._keras import keras, tf

__all__ = ["KerasIODistiller"]


class KerasIODistiller(keras.Model):
    """The keras.io example's Distiller (Keras 2 version); see the module docstring."""

    def __init__(self, student: keras.Model, teacher: keras.Model, regularization: bool = False):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.regularization = regularization

    def compile(self, optimizer, metrics, student_loss_fn, distillation_loss_fn, alpha: float,
                temperature: float):
        super().compile(optimizer=optimizer, metrics=metrics)
        self.student_loss_fn, self.distillation_loss_fn = student_loss_fn, distillation_loss_fn
        self.alpha, self.temperature = alpha, temperature

    def call(self, x, training=False):
        return self.student(x, training=training)

    def train_step(self, data):
        x, y = data
        teacher_predictions = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            student_predictions = self.student(x, training=True)
            student_loss = self.student_loss_fn(y, student_predictions)
            distillation_loss = self.distillation_loss_fn(
                tf.nn.softmax(teacher_predictions / self.temperature, axis=1),
                tf.nn.softmax(student_predictions / self.temperature, axis=1),
            ) * self.temperature ** 2
            loss = self.alpha * student_loss + (1 - self.alpha) * distillation_loss
            if self.regularization and self.student.losses:
                loss += tf.add_n(self.student.losses)
        trainable_vars = self.student.trainable_variables
        gradients = tape.gradient(loss, trainable_vars)
        self.optimizer.apply_gradients(zip(gradients, trainable_vars))
        self.compiled_metrics.update_state(y, student_predictions)
        results = {m.name: m.result() for m in self.metrics}
        results.update({"loss": loss, "student_loss": student_loss,
                        "distillation_loss": distillation_loss})
        return results
