"""SPEQ: the stochastic-precision quantizer, the self-distilling SPEQ model, its recipe."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfqkd._keras import keras, tf
from tfqkd import speq
from tfqkd.quantizers import ActivationQuantizer
from tfqkd.speq import StochasticPrecisionQuantizer, stochastic_precision

# Activations spread over [0, 4]: the 2-bit grid of the range [0, 4] is far from float and from 8 bits.
_X = np.linspace(0.0, 4.0, 64, dtype="float32").reshape(4, 16)


def _built(q, name="act"):
    layer = keras.layers.Layer()
    weights = q.build((None, 16), name, layer)
    weights["clip"].assign(4.0)  # as if trained: activations clipped to [0, 4]
    return layer, weights


# ---------------------------------------------------------------- quantizer
def test_quantizer_student_pass_is_deterministic_target_bits():
    q = StochasticPrecisionQuantizer(bits=2, high_bits=8, probability=0.5)
    _, w = _built(q)
    a, b = q(_X, False, w).numpy(), q(_X, False, w).numpy()
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 4  # 2 bits: four levels, nothing else
    # Exactly the toolkit's ActivationQuantizer: same graph, so the same export.
    expected = ActivationQuantizer(2, clip="fixed", clip_value=4.0)(_X, False, {}).numpy()
    np.testing.assert_array_equal(a, expected)
    assert isinstance(q, ActivationQuantizer)


def test_quantizer_teacher_draws_precision_per_call_and_per_layer():
    q1 = StochasticPrecisionQuantizer(bits=2, high_bits=None, probability=0.5)
    q2 = StochasticPrecisionQuantizer(bits=2, high_bits=None, probability=0.5)
    _, w1 = _built(q1, "a")
    _, w2 = _built(q2, "b")
    low = q1(_X, False, w1).numpy()
    seen1, pairs = set(), set()
    with stochastic_precision():
        for _ in range(40):
            o1, o2 = q1(_X, False, w1).numpy(), q2(_X, False, w2).numpy()
            for o in (o1, o2):  # every output is one of the two precisions, nothing in between
                assert np.array_equal(o, low) or np.allclose(o, _X)
            is_float = (bool(np.allclose(o1, _X)), bool(np.allclose(o2, _X)))
            seen1.add(is_float[0])
            pairs.add(is_float)
    assert seen1 == {True, False}
    assert len(pairs) >= 3  # the two layers draw independently (P(fail) ~ 40 * 0.5^40)
    # Leaving the context restores the deterministic student behaviour.
    np.testing.assert_array_equal(q1(_X, False, w1).numpy(), low)


def test_quantizer_probability_zero_teacher_equals_student_and_one_is_high():
    q0 = StochasticPrecisionQuantizer(bits=2, high_bits=8, probability=0.0)
    q1 = StochasticPrecisionQuantizer(bits=2, high_bits=8, probability=1.0)
    _, w0 = _built(q0)
    _, w1 = _built(q1)
    student = q0(_X, False, w0).numpy()
    with stochastic_precision():
        np.testing.assert_array_equal(q0(_X, False, w0).numpy(), student)
        eight = q1(_X, False, w1).numpy()
    assert len(np.unique(eight)) > 16  # 8 bits: many levels
    np.testing.assert_allclose(eight, _X, atol=0.5 * 4.0 / 255 + 1e-6)


def test_quantizer_in_tf_function_draws_afresh_without_retracing_and_tensor_flag():
    q = StochasticPrecisionQuantizer(bits=2, high_bits=None, probability=0.5)
    _, w = _built(q)
    flag = tf.Variable(True, trainable=False)

    @tf.function
    def step(x):
        student = q(x, False, w)
        with stochastic_precision(flag):
            teacher = q(x, False, w)
        return student, teacher

    outs = [step(tf.constant(_X)) for _ in range(30)]
    assert step.experimental_get_tracing_count() == 1
    students = {o[0].numpy().tobytes() for o in outs}
    teachers = {o[1].numpy().tobytes() for o in outs}
    assert len(students) == 1 and len(teachers) == 2
    flag.assign(False)  # the run-time flag switches the traced teacher off, still no retrace
    assert all(np.array_equal(step(tf.constant(_X))[1].numpy(), outs[0][0].numpy()) for _ in range(5))
    assert step.experimental_get_tracing_count() == 1


def test_quantizer_config_round_trip_and_registration():
    q = StochasticPrecisionQuantizer(bits=4, high_bits=None, probability=0.25, clip="pact",
                                     clip_value=3.0, ema_decay=0.9)
    config = q.get_config()
    assert StochasticPrecisionQuantizer.from_config(config) == q
    serialized = keras.utils.serialize_keras_object(q)
    assert serialized["registered_name"] == "tfqkd>StochasticPrecisionQuantizer"
    restored = keras.utils.deserialize_keras_object(serialized)
    assert isinstance(restored, StochasticPrecisionQuantizer) and restored == q
    assert json.loads(json.dumps(config)) == config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=0), "bits"),
        (dict(bits=2, high_bits=16), "high_bits"),
        (dict(bits=4, high_bits=2), "high_bits"),
        (dict(probability=1.5), "probability"),
        (dict(probability="0.5"), "probability"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(clip="minmax"), "clip"),
    ],
)
def test_quantizer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StochasticPrecisionQuantizer(**kwargs)
