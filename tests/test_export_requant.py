"""INT4 files: the student rounds as LiteRT's built-in kernels requantize (tfqkd.export.requant).

The references are the kernels' integer arithmetic written out here in Python integers
(``(acc * M + 2^30 + 2^(30 + shift)) >> (31 + shift)``) and the file's own tensors.
"""

import os
import warnings

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from conftest import file_tensor_steps
from tfqkd import export, quantize_scope
from tfqkd._keras import keras, tf
from tfqkd.export.requant import right_shift
from tfqkd.quantize import quantize_model
from tfqkd.quantizers import ActivationQuantizer, RangeQuantizer
from tfqkd.quantizers.activations import requantized_levels


def _kernel_levels(acc: np.ndarray, multipliers: np.ndarray, shift: int) -> np.ndarray:
    """The built-in kernels' requantization of int32 accumulators, in Python integers."""
    nudge = 2 ** 30 + (2 ** (30 + shift) if shift else 0)
    return np.array([[(int(a) * int(m) + nudge) >> (31 + shift) for a, m in zip(row, multipliers)]
                     for row in acc], np.int64)


@pytest.mark.parametrize("shift", [0, 1, 2, 4, 8])
def test_requantized_levels_equal_the_kernels_integer_arithmetic(shift):
    rng = np.random.default_rng(shift)
    multipliers = rng.integers(2 ** 30, 2 ** 31, size=40)  # M in [2^30, 2^31), one per channel
    acc = rng.integers(-5000, 5000, size=(300, 40))
    units = acc * multipliers.astype(np.float64) / 2.0 ** (31 + shift)  # exact in float64
    want = _kernel_levels(acc, multipliers, shift)
    got = requantized_levels(tf.constant(units), (shift,) * 40).numpy()
    np.testing.assert_array_equal(got, want)
    single = np.floor(units + 0.5)
    if shift:
        # The second rounding shows: a single rounding misses values just below a half.
        assert (single != want).mean() > 0.2 * 2.0 ** -(shift + 1), (single != want).mean()
    else:
        np.testing.assert_array_equal(single, want)


def _mean_levels(acc, multiplier, shift):
    """TFLite's MultiplyByQuantizedMultiplier (the built-in MEAN's requantization) in Python
    integers: SaturatingRoundingDoublingHighMul, its nudge by sign and C's truncating division,
    then RoundingDivideByPOT, which rounds half away from zero."""
    out = []
    for a in acc.ravel().tolist():
        ab = a * int(multiplier)
        nudge = 2 ** 30 if ab >= 0 else 1 - 2 ** 30
        high = abs(ab + nudge) // 2 ** 31 * (1 if ab + nudge >= 0 else -1)
        mask = (1 << shift) - 1
        threshold = (mask >> 1) + (1 if high < 0 else 0)
        out.append((high >> shift) + (1 if (high & mask) > threshold else 0))
    return np.array(out, np.int64).reshape(acc.shape)


@pytest.mark.parametrize("shift", [1, 2, 5])
def test_half_away_levels_equal_the_mean_kernels_integer_arithmetic(shift):
    rng = np.random.default_rng(shift)
    multiplier = int(rng.integers(2 ** 30, 2 ** 31))
    acc = rng.integers(-3000, 3000, size=4000)
    units = acc * float(multiplier) / 2.0 ** (31 + shift)
    want = _mean_levels(acc, multiplier, shift)
    got = requantized_levels(tf.constant(units), (shift,), half_away=True).numpy()
    np.testing.assert_array_equal(got, want)
    # Positive sums round as the kernels do; negative ones as their mirror image, which the
    # kernels' rounding misses just above a negative half.
    positive = acc > 0
    np.testing.assert_array_equal(
        requantized_levels(tf.constant(units), (shift,)).numpy()[positive], want[positive])
    assert (requantized_levels(tf.constant(units), (shift,)).numpy() != want).mean() > \
        0.2 * 2.0 ** -(shift + 1)


def test_half_away_rounding_is_kept_in_the_config_and_checked():
    q = RangeQuantizer(8, requant_shifts=(1,), requant_half_away=True)
    again = RangeQuantizer.from_config(q.get_config())
    assert again == q and again.requant_half_away and again.requant_shifts == (1,)
    assert "requant_half_away" not in RangeQuantizer(8, requant_shifts=(1,)).get_config()
    with pytest.raises(ValueError, match="requant_half_away must be True or False"):
        RangeQuantizer(8, requant_half_away="yes")


def test_quantizers_take_requant_shifts_and_keep_them_in_their_config():
    x = tf.constant(np.linspace(-0.2, 1.7, 97, dtype=np.float32))
    relu = ActivationQuantizer(4, clip="fixed", clip_value=1.5, requant_shifts=(3,))
    step = 1.5 / 15
    want = np.clip(np.floor(np.clip(x.numpy(), 0, 1.5) / step + 0.5 + 2.0 ** -4), 0, 15)
    np.testing.assert_array_equal(np.round(relu(x, False, {}).numpy() / step), want)
    again = ActivationQuantizer.from_config(relu.get_config())
    assert again == relu and again.requant_shifts == (3,)

    layer = keras.layers.Layer()
    linear = RangeQuantizer(8, requant_shifts=(2,))
    variables = linear.build((), "out", layer)
    variables["min_var"].assign(-1.0)
    variables["max_var"].assign(1.55)
    scale = 2.55 / 255
    zero = np.floor(1.0 / scale + 0.5)
    y = linear(x, False, variables).numpy()
    levels = np.clip(np.floor(x.numpy() / scale + 0.5 + 2.0 ** -3), -zero, 255 - zero)
    np.testing.assert_allclose(y / scale, levels, atol=1e-3)
    assert RangeQuantizer.from_config(linear.get_config()).requant_shifts == (2,)
    # Without shifts the config has no key (students saved before it load as they were).
    assert "requant_shifts" not in RangeQuantizer(8).get_config()


@pytest.mark.parametrize("bad", [(-1,), (32,), (1.5,), "4", ()])
def test_bad_requant_shifts_are_refused(bad):
    with pytest.raises(ValueError, match="requant_shifts"):
        ActivationQuantizer(4, requant_shifts=bad)


def test_requant_shifts_need_an_8_bit_range_quantizer():
    with pytest.raises(ValueError, match="requant_shifts applies to an 8-bit"):
        RangeQuantizer(16, requant_shifts=(1,))


def test_right_shift_follows_tflites_quantize_multiplier():
    # m = M * 2^e / 2^31 with M in [2^30, 2^31): the right shift is -e when e < 0.
    assert [right_shift(m) for m in (0.9, 0.5, 0.49, 0.06, 2.0 ** -20, 3.0)] == \
        [0, 0, 1, 4, 19, 0]
    # M rounding up to 2^31 moves to the next exponent, as TFLite halves it.
    assert right_shift(0.5 - 2.0 ** -40) == 0


def _trained(model, seed: int, weight_bits: int = 4, activation_bits: int = 4,
             per_channel: bool = True):
    """``model`` quantized and fitted 2 epochs to random targets; with its 64 random images."""
    q = quantize_model(model, weight_bits=weight_bits, activation_bits=activation_bits,
                       per_channel=per_channel)
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    q.compile(keras.optimizers.SGD(0.01), "mse")
    q.fit(data, rng.normal(size=(64, 4)).astype(np.float32), epochs=2, batch_size=16, verbose=0)
    return q, data


def _a4_student(seed: int):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(x)
    x = keras.layers.ReLU(name="conv_relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.ReLU(name="dw_relu")(x)
    x = keras.layers.Conv2D(8, 1, name="project")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    return _trained(keras.Model(inputs, outputs), seed)


#: (student layer, file op, the op output's layer in the file's tensor name) of the INT4 kernels.
_INT4_OUTPUTS = [("conv_relu", "MINIMUM", "/conv_relu_fq/"), ("dw_relu", "MINIMUM", "/dw_relu_fq/"),
                 ("project", "CONV_2D", "/project/")]


@pytest.mark.parametrize("seed", [0, 1])
def test_int4_file_equals_the_aligned_student_at_every_int4_kernel(seed, tmp_path):
    q, data = _a4_student(seed)
    path = os.path.join(tmp_path, "a4.tflite")
    info = export.export_tflite(q, path, data[:32], mode="int4", align_student=True)
    # The stem (first layer) and the head (last) are 8-bit: INT8, run by XNNPACK.
    assert info["aligned_requantization"] == {"layers": 3, "unmatched": []}
    for layer, op_name, tensor in _INT4_OUTPUTS:
        student = keras.Model(q.inputs, q.get_layer(f"quant_{layer}").output)
        steps = file_tensor_steps(path, student, data[32:40], lambda op, name, o=op_name, t=tensor:
                                  op["op_name"] == o and t in name)
        # Measured: every value equal (0 steps), seeds 0 and 1. Without the kernels' rounding
        # in the student: one step off on 1.2-1.7 % of conv_relu and 5.4-5.6 % of dw_relu, and
        # up to 23 steps off on 54-58 % of the projection's outputs.
        assert steps.max() < 0.01, (layer, steps.max(), np.mean(steps > 0.01))
    # Saved and loaded, the student keeps the kernels' rounding.
    saved = os.path.join(tmp_path, "a4.h5")
    q.save(saved)
    with quantize_scope():
        loaded = keras.models.load_model(saved, compile=False)
    np.testing.assert_array_equal(loaded(data[32:40], training=False).numpy(),
                                  q(data[32:40], training=False).numpy())
    # An int8 file runs on XNNPACK, which rounds once: aligning on it clears the shifts.
    export.export_tflite(q, os.path.join(tmp_path, "a4_int8.tflite"), data[:32], mode="int8",
                         align_student=True)
    shifts = [getattr(layer._output_quantizers[0], "requant_shifts", None)  # noqa: SLF001
              for layer in q.layers if getattr(layer, "_output_quantizers", None)]
    assert shifts and all(s is None for s in shifts), shifts


def test_int4_file_of_an_a4_student_without_alignment_warns(tmp_path):
    q, data = _a4_student(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = export.export_tflite(q, os.path.join(tmp_path, "a4.tflite"), data[:32],
                                    mode="int4", align_student=False)
    assert info["aligned_requantization"] is None
    assert any("align_student=True" in str(w.message) and "built-in kernels" in str(w.message)
               for w in caught), [str(w.message) for w in caught]


def test_fused_activations_take_the_shifts_of_their_kernel(tmp_path):
    """A Conv2D(activation="relu") rounds its output in its fused activation quantizer, a
    Conv2D(activation="sigmoid") before the sigmoid (a squeeze-excite gate): those quantizers,
    not the layer's output quantizer (the sigmoid's fixed grid), take the kernel's shifts."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv")(x)
    gate = keras.layers.Conv2D(16, 1, activation="sigmoid", name="gate")(x)
    x = keras.layers.Multiply()([x, gate])
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    q, data = _trained(keras.Model(inputs, outputs), 0, activation_bits=8)
    path = os.path.join(tmp_path, "fused.tflite")
    info = export.export_tflite(q, path, data[:32], mode="int4", align_student=True)
    assert info["aligned_requantization"] == {"layers": 2, "unmatched": []}
    conv, gate_layer = q.get_layer("quant_conv"), q.get_layer("quant_gate")
    assert conv._quantize_activations[0].quantizer.requant_shifts  # noqa: SLF001
    assert gate_layer._quantize_activations[0].quantizer.requant_shifts  # noqa: SLF001
    assert not hasattr(gate_layer._output_quantizers[0], "requant_shifts")  # noqa: SLF001
    student = keras.Model(q.inputs, conv.output)
    steps = file_tensor_steps(path, student, data[32:40], lambda op, name:
                              op["op_name"] == "CONV_2D" and "/conv/" in name)
    # Measured: every value equal, seed 0.
    assert steps.max() < 0.01, (steps.max(), np.mean(steps > 0.01))


@pytest.mark.parametrize("per_channel", [False, True])
def test_int4_fully_connected_runs_on_xnnpack_and_keeps_one_rounding(per_channel, tmp_path):
    """An int4 file's INT4 FULLY_CONNECTED runs on XNNPACK, which rounds once: the aligned
    student's Dense keeps its single rounding (no shifts), and the file equals it.

    Measured (scratch, LiteRT 2.3, x86, seeds 0 and 1, W4A8 and W4A4): under the default
    resolver every INT4 FULLY_CONNECTED output equals one rounding; under the built-in kernels
    alone it equals the double rounding (shifts 4-6), which differs on 0.2-5.3 % of values.
    A per-channel student's dense kernels are written per channel, INT4 ones too: before, an
    INT4 kernel was re-rounded onto one grid for all channels, and the second dense layer's
    output was up to 16 steps off on 93 % of values.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(48, name="fc")(x)
    x = keras.layers.ReLU(name="fc_relu")(x)
    x = keras.layers.Dense(32, name="fc2")(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    q, data = _trained(keras.Model(inputs, outputs), 0, per_channel=per_channel)
    path = os.path.join(tmp_path, "fc.tflite")
    info = export.export_tflite(q, path, data[:32], mode="int4", align_student=True)
    assert info["aligned_requantization"] == {"layers": 0, "unmatched": []}
    # fc and fc2 (INT4) and the 8-bit head (INT8).
    assert info["per_channel_dense_kernels"] == (3 if per_channel else 0)
    entries = export.tflite_weight_levels(path, ["fc", "fc2", "head"])
    assert sorted(e["dtype"] for e in entries if e["op"] == "FULLY_CONNECTED") == [
        "int4", "int4", "int8"]
    for layer, op_name, tensor in [("fc_relu", "MINIMUM", "/fc_relu_fq/"),
                                   ("fc2", "FULLY_CONNECTED", "/fc2/")]:
        student = keras.Model(q.inputs, q.get_layer(f"quant_{layer}").output)
        steps = file_tensor_steps(path, student, data[32:40], lambda op, name, o=op_name, t=tensor:
                                  op["op_name"] == o and t in name)
        assert steps.max() < 0.01, (layer, steps.max(), np.mean(steps > 0.01))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_relu_at_4_bits_rounds_on_the_students_grid(mode, seed, tmp_path):
    """A ``Conv2D(activation="relu")`` at 4-bit activations: the file rounds the conv's output
    on the student's 4-bit grid ``[0, c]`` (CONV_2D, then a MINIMUM at ``c``), as it does a
    ReLU layer's. Before, the file calibrated an 8-bit range of its own for a fused ReLU's
    output: 1 to 8 file steps off the student on 44 % of values (seed 0)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    q, data = _trained(keras.Model(inputs, outputs), seed)
    path = os.path.join(tmp_path, "fused_a4.tflite")
    export.export_tflite(q, path, data[:32], mode=mode, align_student=True)
    for layer in ("stem", "conv"):
        act = q.get_layer(f"quant_{layer}")._quantize_activations[0]  # noqa: SLF001
        clip = float(act.quantizer.clip_of(act._post_activation_vars))  # noqa: SLF001
        student = keras.Model(q.inputs, q.get_layer(f"quant_{layer}").output)
        steps = file_tensor_steps(path, student, data[32:40], lambda op, name, t=layer:
                                  op["op_name"] == "MINIMUM" and f"/{t}_fq/" in name)
        assert steps.max() < 0.01, (layer, steps.max(), np.mean(steps > 0.01))
        # The file's step is the student's 4-bit step, not a calibrated 8-bit one.
        it = Interpreter(model_path=path)
        scale = next(d["quantization"][0] for d in it.get_tensor_details()
                     if f"/{layer}_fq/" in d["name"])
        np.testing.assert_allclose(scale, clip / 15, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_file_on_builtin_kernels_equals_a_student_aligned_for_them(seed, tmp_path):
    """LiteRT's built-in kernels (no XNNPACK) round every int8 kernel's output twice, and the
    global pooling's MEAN too: ``runtime="builtin"`` gives the student that rounding at each."""
    q, data = _a4_student(seed)
    images = data[32:40]
    on_xnnpack = os.path.join(tmp_path, "xnnpack.tflite")
    export.export_tflite(q, on_xnnpack, data[:32], mode="int8", align_student=True)
    project = keras.Model(q.inputs, q.get_layer("quant_project").output)
    steps = file_tensor_steps(on_xnnpack, project, images, lambda op, name:
                              op["op_name"] == "CONV_2D" and "/project/" in name,
                              builtin_kernels=True)
    # Aligned for XNNPACK, the file on the built-in kernels: measured up to 7 / 13 steps off on
    # 10.4 / 16.3 % of the projection's outputs (seeds 0 / 1; above 1 % at seeds 2-4 too).
    assert np.mean(steps > 0.01) > 0.01, np.mean(steps > 0.01)
    before = export.verify_tflite(on_xnnpack, q, (images, np.zeros(8, "int32")),
                                  runtime="builtin")

    path = os.path.join(tmp_path, "builtin.tflite")
    info = export.export_tflite(q, path, data[:32], mode="int8", align_student=True,
                                runtime="builtin")
    # Every kernel (the stem, conv, depthwise and projection convolutions and the dense head)
    # and the global pooling's MEAN, which rounds its sum twice there too.
    assert info["aligned_requantization"] == {"layers": 6, "unmatched": []}
    outputs = [("stem_relu", "MINIMUM", "/stem_relu_fq/")] + _INT4_OUTPUTS + [
        ("pool", "MEAN", "/pool/")]
    for layer, op_name, tensor in outputs:
        student = keras.Model(q.inputs, q.get_layer(f"quant_{layer}").output)
        steps = file_tensor_steps(path, student, images, lambda op, name, o=op_name, t=tensor:
                                  op["op_name"] == o and t in name, builtin_kernels=True)
        # Measured: every value equal, seeds 0-4.
        assert steps.max() < 0.01, (layer, steps.max(), np.mean(steps > 0.01))
    report = export.verify_tflite(path, q, (images, np.zeros(8, "int32")), runtime="builtin")
    # So the logits equal the student's but for float32 noise. Relative error, seeds 0-4:
    # 0.009, 0.031, 0.011, 0.011, 0.051 aligned for XNNPACK; 0.003-0.008 aligned for the
    # built-in kernels but the MEAN (before 2026-12-07); 2e-8 to 1e-7 with it. One flipped
    # logit step would be ~1e-2.
    assert report.num_examples == 8
    assert before.relative_output_error > 1e-3, before.relative_output_error
    assert report.relative_output_error < 1e-5, report.relative_output_error
    pool = q.get_layer("quant_pool")._output_quantizers[0]  # noqa: SLF001 (tfmot API)
    assert pool.requant_shifts is not None and pool.requant_half_away
    # Aligned for XNNPACK again (one rounding everywhere): the pooling's rounding is undone too.
    export.export_tflite(q, on_xnnpack, data[:32], mode="int8", align_student=True)
    assert pool.requant_shifts is None and not pool.requant_half_away


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_layers_with_their_own_relu_take_the_builtin_rounding(seed, tmp_path):
    """A ReLU layer after a Dense is fused into the FULLY_CONNECTED, whose output tensor keeps
    the MatMul's name: the ReLU's quantizer is found through the graph and takes the shifts."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.ReLU(name="fc1_relu")(keras.layers.Dense(32, name="fc1")(x))
    x = keras.layers.ReLU(name="fc2_relu")(keras.layers.Dense(16, name="fc2")(x))
    outputs = keras.layers.Dense(4, name="head")(x)
    q, data = _trained(keras.Model(inputs, outputs), seed, per_channel=False)
    path = os.path.join(tmp_path, "dense.tflite")
    info = export.export_tflite(q, path, data[:32], mode="int8", align_student=True,
                                runtime="builtin")
    # Before the graph was followed: {"layers": 1, "unmatched": ["fc1", "fc2"]}.
    assert info["aligned_requantization"] == {"layers": 3, "unmatched": []}
    for layer in ("fc1_relu", "fc2_relu"):
        student = keras.Model(q.inputs, q.get_layer(f"quant_{layer}").output)
        steps = file_tensor_steps(path, student, data[32:40], lambda op, name, t=layer:
                                  op["op_name"] == "MINIMUM" and f"/{t}_fq/" in name,
                                  builtin_kernels=True)
        # Measured: every value equal (aligned for XNNPACK instead, seed 0: fc2_relu one step
        # off on 0.8 %).
        assert steps.max() < 0.01, (layer, steps.max(), np.mean(steps > 0.01))


def test_unknown_runtime_is_refused_before_anything_is_written(tmp_path):
    q, data = _a4_student(0)
    path = tmp_path / "m.tflite"
    with pytest.raises(ValueError, match=r"unknown runtime 'tflm'.*'xnnpack'.*'builtin'"):
        export.export_tflite(q, path, data[:32], mode="int8", align_student=True,
                             runtime="tflm")
    assert not path.exists()
    export.export_tflite(q, path, data[:32], mode="int8")
    with pytest.raises(ValueError, match="unknown runtime"):
        export.verify_tflite(path, q, (data[:4], np.zeros(4, "int32")), runtime="XNNPACK")
