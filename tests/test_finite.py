"""Non-finite values: quantizers propagate NaN, training stops at the first bad step with a clear error.

References are NumPy's ``isnan`` on known inputs and the step index where the test put the NaN.
"""

import pathlib

import numpy as np
import pytest

import tfqkd
from tfqkd._keras import keras, tf
from tfqkd.finite import CHECKS, NonFiniteError, StopOnNonFinite
from tfqkd.quantizers import (ActivationQuantizer, RangeQuantizer, SymmetricQuantizer,
                              symmetric_quantize)

from conftest import run_script

REPO = pathlib.Path(__file__).resolve().parents[1]

NAN_AT = (1, 1, 2, 3)


def _kernel_with_nan():
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 8)).astype("float32")
    w[NAN_AT] = np.nan
    return w


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("step", ["l2", "std", "learned"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_quantizer_keeps_nan(bits, step, per_channel):
    w = _kernel_with_nan()
    layer = keras.layers.Layer()
    q = SymmetricQuantizer(bits, step, per_channel=per_channel)
    variables = q.build(w.shape, "kernel", layer)
    if step == "learned":  # an initialised learned step: the NaN must not come from the step
        variables["step"].assign(tf.fill(variables["step"].shape, 0.1))
    graph = tf.function(lambda t: q(t, True, variables), autograph=False)
    for out in (q(tf.constant(w), True, variables), graph(tf.constant(w))):
        assert np.isnan(out.numpy()[NAN_AT]), "a NaN weight became a quantization level"


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_symmetric_quantize_keeps_nan_with_a_finite_step(bits):
    out = symmetric_quantize(np.array([np.nan, 0.3, -0.3], "float32"), bits, 0.25).numpy()
    assert np.isnan(out[0])
    assert np.all(np.isfinite(out[1:]))


@pytest.mark.parametrize("clip", ["ema", "fixed", "pact"])
def test_activation_quantizer_keeps_nan(clip):
    q = ActivationQuantizer(4, clip=clip)
    variables = q.build((4,), "act", keras.layers.Layer())
    x = tf.constant([np.nan, 0.5, 1.0, -1.0])
    for training in (True, False):
        assert np.isnan(q(x, training, variables).numpy()[0])


def test_nan_activation_clip_is_not_replaced_by_the_default():
    q = ActivationQuantizer(4, clip="ema", clip_value=6.0)
    variables = q.build((3,), "act", keras.layers.Layer())
    variables["clip"].assign(np.nan)  # the state a NaN batch leaves behind
    x = tf.constant([0.5, 1.0, 2.0])
    assert np.all(np.isnan(q(x, False, variables).numpy()))
    q(x, True, variables)  # a finite batch must not restart the EMA from scratch
    assert np.isnan(variables["clip"].numpy())


def test_nan_range_is_kept():
    q = RangeQuantizer(8)
    variables = q.build((3,), "out", keras.layers.Layer())
    variables["min_var"].assign(np.nan)
    variables["max_var"].assign(np.nan)
    x = tf.constant([-0.5, 0.2, 1.0])
    q(x, True, variables)
    assert np.isnan(variables["min_var"].numpy()) and np.isnan(variables["max_var"].numpy())
    assert np.all(np.isnan(q(x, False, variables).numpy()))


def _data(nan_sample=None):
    x = np.random.default_rng(0).random((64, 8, 8, 1), dtype=np.float32)
    y = np.arange(64) % 10
    if nan_sample is not None:
        x[nan_sample, 2, 2, 0] = np.nan
    return x, y


def _student(seed=0):
    return tfqkd.quantize_model(tfqkd.models.tiny_resnet(10, input_shape=(8, 8, 1), seed=seed),
                                weight_bits=2)


def _trainable(model):
    return [v.numpy().copy() for v in model.trainable_variables]


@pytest.mark.parametrize("nan_sample, step", [(0, 1), (40, 3)])
def test_distiller_stops_at_the_nan_batch_and_keeps_the_weights(nan_sample, step):
    x, y = _data(nan_sample)
    teacher = tfqkd.models.tiny_resnet(10, input_shape=(8, 8, 1), seed=1)
    student = _student()
    distiller = tfqkd.Distiller(student, teacher, temperature=2.0)
    distiller.compile(keras.optimizers.SGD(0.01, momentum=0.9))
    snapshots = []
    keep = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: snapshots.append(_trainable(student)))
    with pytest.raises(NonFiniteError) as err:
        distiller.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                      callbacks=[StopOnNonFinite(), keep])
    assert (err.value.epoch, err.value.step, err.value.check) == (1, step, "inputs")
    message = str(err.value)
    assert "epoch 1, step %d" % step in message and "input batch" in message
    assert "What to try" in message
    # The bad step was not applied: the weights are those after the last good step.
    last_good = snapshots[-1] if snapshots else None
    if last_good is not None:
        for before, after in zip(last_good, _trainable(student)):
            np.testing.assert_array_equal(before, after)
    assert int(distiller.optimizer.iterations) == step - 1
    assert all(np.isfinite(v).all() for v in _trainable(student))


def test_distiller_divergence_stops_training():
    x, y = _data()
    distiller = tfqkd.Distiller(_student(), tfqkd.models.tiny_resnet(10, input_shape=(8, 8, 1),
                                                                     seed=1))
    distiller.compile(keras.optimizers.SGD(1e12))
    with pytest.raises(NonFiniteError) as err:
        distiller.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[StopOnNonFinite()])
    assert err.value.check in CHECKS[1:]
    assert err.value.epoch == 1  # 4 steps of lr 1e12 cannot stay finite


def test_plain_qat_model_with_a_nan_input_stops():
    # No in-graph checks here: the callback reads the loss and the weights. A fused ReLU may hide
    # the NaN from the loss (see tfqkd.finite), never from the weights.
    x, y = _data(40)
    model = _student()
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(NonFiniteError) as err:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[StopOnNonFinite()])
    assert err.value.step == 3 and err.value.check in ("loss", "weights")


def test_finite_training_is_not_stopped():
    x, y = _data()
    distiller = tfqkd.Distiller(_student(), tfqkd.models.tiny_resnet(10, input_shape=(8, 8, 1),
                                                                     seed=1))
    distiller.compile(keras.optimizers.SGD(0.01))
    history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0,
                            callbacks=[StopOnNonFinite()])
    assert len(history.history["loss"]) == 2
    np.testing.assert_array_equal(distiller.non_finite_flags.numpy(), np.zeros(len(CHECKS)))


def test_costudying_stops_at_a_nan_input():
    from tfqkd.qkd import CoStudying

    x, y = _data(20)
    model = CoStudying(_student(), tfqkd.models.tiny_resnet(10, input_shape=(8, 8, 1), seed=1))
    model.compile(keras.optimizers.SGD(0.01))
    with pytest.raises(NonFiniteError) as err:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[StopOnNonFinite()])
    assert (err.value.step, err.value.check) == (2, "inputs")


def test_recipe_that_diverges_fails_and_records_no_result(tmp_path):
    out = tmp_path / "run"
    p = run_script(REPO / "recipes" / "train_student.py", "--preset=smoke", "--dataset=digits",
                   "--epochs=1", "--learning_rate=1e12", f"--output_dir={out}", ok=False)
    assert p.returncode != 0
    assert "Training stopped at epoch 1" in p.stdout + p.stderr
    assert not (out / "results.json").exists()
