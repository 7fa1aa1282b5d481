"""QKD: the co-studying step, the three-phase pipeline, phase resume after a kill."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tfqkd
from tfqkd._keras import keras, tf
from tfqkd.qkd import CoStudying, read_phase_state, run_qkd

REPO = pathlib.Path(__file__).resolve().parents[1]


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _changed(before, model):
    return [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = (np.arange(n) % 10).astype("int32")
    return x, y


@pytest.fixture(scope="module")
def digits():
    train = tfqkd.data.load_dataset("digits", "train", batch_size=50, subset=200, seed=0)
    test = tfqkd.data.load_dataset("digits", "test", batch_size=100, subset=200, seed=0)
    return train, test


# -- CoStudying ------------------------------------------------------------------------------------
def test_costudying_updates_both_models_and_reports_both_metrics():
    s = tfqkd.models.tiny_resnet(10, seed=0)
    t = tfqkd.models.tiny_resnet(10, width=2, seed=1)
    cs = CoStudying(s, t, temperature=3.0, student_coefficient=0.5, teacher_coefficient=0.3)
    cs.compile(optimizer=keras.optimizers.SGD(0.05))
    s0, t0 = _weights(s), _weights(t)
    x, y = _batch()
    logs = cs.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    for key in ("loss", "student_loss", "teacher_loss", "student_accuracy", "teacher_accuracy",
                "coefficient", "teacher_coefficient", "temperature"):
        assert key in logs, key
    # every kernel of both models moved (BN statistics too: both trained in training mode)
    kernels_s = [i for i, w in enumerate(s.weights) if "kernel" in w.name]
    kernels_t = [i for i, w in enumerate(t.weights) if "kernel" in w.name]
    assert all(_changed(s0, s)[i] for i in kernels_s)
    assert all(_changed(t0, t)[i] for i in kernels_t)
    assert logs["temperature"][-1] == pytest.approx(3.0)
    assert logs["teacher_coefficient"][-1] == pytest.approx(0.3)
    ev = cs.evaluate(x, y, verbose=0, return_dict=True)
    assert ev["loss"] == pytest.approx(ev["student_loss"] + ev["teacher_loss"], rel=1e-5)
    # the model's output is the student's
    np.testing.assert_allclose(cs.predict(x, verbose=0), s.predict(x, verbose=0), rtol=1e-5)


def _expected_grads(s, t, x, y, lam_s, lam_t, tau):
    """Each model's gradient of its own loss, computed independently (no stop-gradient tricks)."""
    from tfqkd import losses

    kl = losses.get("kl")
    zs_fixed = s(x, training=True)
    zt_fixed = t(x, training=True)
    ce = keras.losses.sparse_categorical_crossentropy
    with tf.GradientTape() as tape:
        zs = s(x, training=True)
        pt = tf.nn.softmax(zt_fixed / tau)
        ls = tf.reduce_mean((1 - lam_s) * ce(y, zs, from_logits=True)
                            + lam_s * tau ** 2 * kl(pt, zs, tau))
    gs = tape.gradient(ls, s.trainable_variables)
    with tf.GradientTape() as tape:
        zt = t(x, training=True)
        ps = tf.nn.softmax(zs_fixed / tau)
        lt = tf.reduce_mean((1 - lam_t) * ce(y, zt, from_logits=True)
                            + lam_t * tau ** 2 * kl(ps, zt, tau))
    gt = tape.gradient(lt, t.trainable_variables)
    return gs, gt


@pytest.mark.parametrize("separate_teacher_optimizer", [False, True])
def test_costudying_step_is_two_independent_distillation_steps(separate_teacher_optimizer):
    # The cross terms are stop-gradiented: one step on student_loss + teacher_loss must equal a
    # gradient step of each model on its own loss. (No BN, so the forward pass is deterministic.)
    def mlp(seed, width):
        return keras.Sequential([
            keras.Input((8, 8, 1)), keras.layers.Flatten(),
            keras.layers.Dense(width, activation="relu",
                               kernel_initializer=keras.initializers.GlorotUniform(seed)),
            keras.layers.Dense(10, kernel_initializer=keras.initializers.GlorotUniform(seed + 1)),
        ])

    s, t = mlp(0, 16), mlp(10, 32)
    x, y = _batch(16, seed=3)
    lam_s, lam_t, tau, lr = 0.7, 0.4, 2.5, 0.1
    gs, gt = _expected_grads(s, t, x, y, lam_s, lam_t, tau)
    exp_s = [v.numpy() - lr * g.numpy() for v, g in zip(s.trainable_variables, gs)]
    t_lr = 0.03 if separate_teacher_optimizer else lr
    exp_t = [v.numpy() - t_lr * g.numpy() for v, g in zip(t.trainable_variables, gt)]
    cs = CoStudying(s, t, temperature=tau, student_coefficient=lam_s, teacher_coefficient=lam_t)
    cs.compile(
        optimizer=keras.optimizers.SGD(lr),
        teacher_optimizer=keras.optimizers.SGD(t_lr) if separate_teacher_optimizer else None,
    )
    cs.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for v, e in zip(s.trainable_variables, exp_s):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6)
    for v, e in zip(t.trainable_variables, exp_t):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6)
    assert int(cs.optimizer.iterations.numpy()) == 1  # one step, whatever the optimizer layout


def test_costudying_config_roundtrip_and_scheduler_variables():
    s = tfqkd.models.tiny_resnet(10, seed=0)
    t = tfqkd.models.tiny_resnet(10, seed=1)
    cs = CoStudying(s, t, temperature=4.0, student_coefficient=0.2, teacher_coefficient=0.6,
                    soft_loss="ce", teacher_temperature=1.5)
    assert isinstance(cs.coefficient, tf.Variable) and not cs.coefficient.trainable
    assert cs.student_coefficient is cs.coefficient
    cs.coefficient.assign(0.1)  # what CoefficientScheduler does
    config = cs.get_config()
    json.dumps(config)
    clone = CoStudying.from_config(config)
    assert float(clone.coefficient.numpy()) == pytest.approx(0.1)
    assert float(clone.teacher_coefficient.numpy()) == pytest.approx(0.6)
    assert float(clone.temperature.numpy()) == pytest.approx(4.0)
    assert float(clone.teacher_temperature.numpy()) == pytest.approx(1.5)
    assert clone.soft_loss == "ce"
    assert clone.student is not s and clone.student.count_params() == s.count_params()
    assert keras.utils.get_registered_object("tfqkd>CoStudying") is CoStudying


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(student_coefficient=1.5), "student_coefficient"),
    (dict(teacher_coefficient=-0.1), "teacher_coefficient"),
    (dict(soft_loss="nope"), "nope"),
])
def test_costudying_rejects_bad_hyper_parameters(kwargs, match):
    s = tfqkd.models.tiny_resnet(10, seed=0)
    t = tfqkd.models.tiny_resnet(10, seed=1)
    with pytest.raises(ValueError, match=match):
        CoStudying(s, t, **kwargs)


def test_costudying_rejects_class_mismatch_and_same_model():
    s = tfqkd.models.tiny_resnet(10, seed=0)
    with pytest.raises(ValueError, match="class-count mismatch"):
        CoStudying(s, tfqkd.models.tiny_resnet(5, seed=1))
    with pytest.raises(ValueError, match="different models"):
        CoStudying(s, s)
    cs = CoStudying(s, tfqkd.models.tiny_resnet(10, seed=1))
    with pytest.raises(ValueError, match="loss="):
        cs.compile(optimizer="sgd", loss="mse")
