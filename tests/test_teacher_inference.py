"""The teacher's inference copy (tfqkd.teacher_inference) and the Distiller options that use it.

The reference is always the teacher model itself (``teacher(x, training=False)``), run
independently of the copy. Tolerances (``probe_error``: |copy - teacher| / (1 + |teacher|)): float32
folding only reorders float32 arithmetic (measured 2.6e-7 on the net below; asserted 1e-4);
bfloat16 rounds every activation to an 8-bit mantissa (measured 8.3e-3, top-1 agreement 99.2 %;
asserted 0.1 and 90 %; on a trained WRN20x2 on CIFAR-10 see docs/distillation.md).
"""

import numpy as np
import pytest

import tfqkd
from tfqkd import keras
from tfqkd._keras import tf
from tfqkd.teacher_inference import InferenceTeacher, probe_error


def _teacher(seed=0, width=2):
    """A tiny ResNet whose batch norms hold non-trivial statistics (folding then matters)."""
    t = tfqkd.models.tiny_resnet(10, width=width, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in t.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([g * rng.uniform(0.5, 1.5, g.shape), b + rng.normal(0, 0.2, b.shape),
                               rng.normal(0, 0.2, m.shape), rng.uniform(0.5, 2.0, v.shape)])
    return t


def _x(n=32, seed=0):
    return np.random.default_rng(seed).random((n, 8, 8, 1)).astype("float32")


def test_folded_float32_copy_matches_the_teacher():
    t = _teacher()
    copy = InferenceTeacher(t)
    assert copy.reason is None and copy.folded > 0
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in copy.model.layers)
    x = _x()
    assert probe_error(copy(x), t(x, training=False)) < 1e-4


def test_bfloat16_copy_matches_the_teacher_within_rounding():
    t = _teacher()
    copy = InferenceTeacher(t, "bfloat16")
    assert copy.reason is None
    assert copy.model.get_layer("stem_conv").dtype == "bfloat16"
    x = _x(256)
    out, ref = copy(x).numpy(), t(x, training=False).numpy()
    assert out.dtype == np.float32
    assert probe_error(out, ref) < 0.1
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_refresh_follows_the_teachers_weights():
    t = _teacher()
    d = tfqkd.Distiller(tfqkd.models.tiny_resnet(seed=5), t, temperature=2.0)
    x = _x(8)
    t.set_weights([w * 0.5 for w in t.get_weights()])  # changed after the Distiller was built
    expected = tf.nn.softmax(t(x, training=False) / 2.0).numpy()
    np.testing.assert_allclose(d.teacher_probabilities(x).numpy(), expected, atol=1e-5)


def test_a_subclassed_teacher_runs_as_it_is():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(10)
            self.flat = keras.layers.Flatten()

        def call(self, x, training=None):
            return self.dense(self.flat(x))

    t = Sub()
    t(_x(1))
    copy = InferenceTeacher(t)
    assert copy.model is t and copy.reason
    with pytest.warns(UserWarning, match="runs as it is"):
        InferenceTeacher(t, "bfloat16")


def test_option_errors_and_config():
    s, t = tfqkd.models.tiny_resnet(seed=1), _teacher()
    with pytest.raises(ValueError, match="teacher_dtype"):
        tfqkd.Distiller(s, t, teacher_dtype="float16")
    with pytest.raises(ValueError, match="teacher_inference=True"):
        tfqkd.Distiller(s, t, teacher_dtype="bfloat16", teacher_inference=False)
    d = tfqkd.Distiller(s, t, teacher_dtype="bfloat16")
    cfg = d.get_config()
    assert cfg["teacher_dtype"] == "bfloat16" and cfg["teacher_inference"] is True
    assert tfqkd.Distiller.from_config(cfg).teacher_dtype == "bfloat16"


def _train(teacher_inference=True, teacher_dtype="float32", epochs=2):
    tf.random.set_seed(0)
    student = tfqkd.models.tiny_resnet(seed=1)
    d = tfqkd.Distiller(student, _teacher(), temperature=4.0, coefficient=0.7,
                        teacher_inference=teacher_inference, teacher_dtype=teacher_dtype)
    d.compile(keras.optimizers.SGD(0.05, momentum=0.9))
    x, y = _x(64, seed=3), np.arange(64) % 10
    h = d.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return h.history, [w.numpy() for w in student.trainable_weights]


def test_the_distiller_trains_the_same_with_the_inference_copy():
    live, w_live = _train(teacher_inference=False)
    folded, w_folded = _train()
    np.testing.assert_allclose(folded["soft_loss"], live["soft_loss"], rtol=1e-4)
    np.testing.assert_allclose(folded["loss"], live["loss"], rtol=1e-4)
    for a, b in zip(w_folded, w_live):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def test_the_distiller_trains_about_the_same_with_a_bfloat16_teacher():
    live, w_live = _train(teacher_inference=False)
    bf16, w_bf16 = _train(teacher_dtype="bfloat16")
    # The soft targets move by bfloat16 rounding: the losses follow within a few per cent.
    np.testing.assert_allclose(bf16["soft_loss"], live["soft_loss"], rtol=0.05, atol=1e-3)
    np.testing.assert_allclose(bf16["loss"], live["loss"], rtol=0.02)
    rel = [np.abs(a - b).max() / (np.abs(b).max() + 1e-12) for a, b in zip(w_bf16, w_live)]
    assert max(rel) < 0.05


def test_a_quantized_teacher_is_copied_exactly_or_runs_as_it_is():
    q = tfqkd.quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2)
    x = _x(16)
    copy = InferenceTeacher(q)  # tfmot wrappers are copied as they are (nothing to fold)
    assert copy.reason is None
    assert probe_error(copy(x), q(x, training=False)) < 1e-5
    with pytest.warns(UserWarning, match="runs as it is"):
        assert InferenceTeacher(q, "bfloat16").model is q


def test_a_normalization_layer_keeps_its_statistics():
    inputs = keras.Input((8, 8, 1))
    norm = keras.layers.Normalization(axis=-1, mean=0.5, variance=4.0)
    out = keras.layers.Dense(10)(keras.layers.Flatten()(norm(inputs)))
    t = keras.Model(inputs, out)
    x = _x(8)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 0.1)):
        copy = InferenceTeacher(t, dtype)
        assert copy.reason is None, copy.reason
        assert probe_error(copy(x), t(x, training=False)) < tol
