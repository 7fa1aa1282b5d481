"""tfqkd.export: TFLite modes, exact weight levels in the file, parity, atomic writes, packing, errors.

Fast cases use a tiny ResNet on random digit-shaped data; one required case exports a W2A8
ResNet20 trained on the offline CIFAR-10 archive and checks parity on 500 test images.
"""

import os

import numpy as np
import pytest

import tfqkd
from conftest import centred_rms_ratio, file_tensor_steps, packed_ternary_bits, tflite_outputs
from tfqkd import export
from tfqkd._keras import keras, tf
from tfqkd.quantize import quantize_model, quantized_weights


def _fit(model, x, y, steps, lr=1e-3, batch=64):
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch)
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return model


def _per_channel_levels(values, axis):
    rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    return [np.unique(r) for r in rows]


@pytest.fixture(scope="module")
def tiny():
    """A W2A8 tiny ResNet (first/last layers 2-bit too), a few training steps on random data."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=256).astype("int32")
    q = quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2, activation_bits=8,
                       first_last_bits=None)
    _fit(q, x, y, steps=8)
    return q, x, y


def _folded_reference(q, name, plain):
    """Q(w) with the following batch norm folded in, as the file should hold it (O first).

    Independent of tfqkd.export's folding: Q(w) * gamma / sqrt(moving_variance + epsilon) per
    output channel, the batch norm being the kernel layer's only consumer in the graph.
    """
    kernel = quantized_weights(q)[name].astype(np.float64)
    users = [node.outbound_layer for node in plain.get_layer(name)._outbound_nodes]  # noqa: SLF001
    if len(users) == 1 and isinstance(users[0], keras.layers.BatchNormalization):
        bn = users[0]
        gamma = bn.gamma.numpy() if bn.scale else 1.0
        kernel = kernel * (gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon))
    return np.moveaxis(kernel.astype(np.float32), -1, 0)  # (h,w,in,out)->(out,h,w,in); dense too


@pytest.mark.parametrize("mode,storage", [("int8", "int8"), ("int4", "int4")])
def test_ternary_weights_land_exactly_on_levels(tiny, tmp_path, mode, storage):
    q, x, y = tiny
    path = tmp_path / f"m_{mode}.tflite"
    export.export_tflite(q, path, x[:64], mode=mode)
    plain = export.forward_model(q)
    qw = quantized_weights(q)
    layers = export.tflite_weight_levels(path, [layer.name for layer in plain.layers])
    assert len(layers) == len(qw) == 7
    folded = 0
    for entry in layers:
        assert entry["layer"] in qw, entry["tensor"]
        assert entry["dtype"] == storage
        values, scales = entry["values"].astype(np.int64), entry["scales"]
        top = 127 if storage == "int8" else 7
        for row in _per_channel_levels(values, entry["axis"]):
            assert len(row) <= 3
            assert set(np.abs(row).tolist()) <= {0, top}, (entry["layer"], row)
        # Dequantized file weights == Q(w) (BN folded) up to float32 rounding of the scale.
        ref = _folded_reference(q, entry["layer"], plain)
        scale = scales.reshape((-1,) + (1,) * (values.ndim - 1)) if scales.size > 1 else scales
        np.testing.assert_allclose(values * scale, ref, rtol=1e-5, atol=1e-7)
        assert np.array_equal(values != 0, ref != 0)
        # The fold is visible: unfolded Q(w) would miss this check (6 convs have a batch norm).
        unfolded = np.moveaxis(qw[entry["layer"]], -1, 0)
        folded += not np.allclose(values * scale, unfolded, rtol=1e-3, atol=0)
    assert folded == 6
    # int4 stores two weights per byte: the file is smaller than the int8 one by about half a
    # byte per weight (measured: 2,480 bytes fewer for 4,968 weights).
    n = sum(v.size for v in qw.values())
    if mode == "int4":
        int8 = export.export_tflite(q, tmp_path / "m_int8.tflite", x[:64], mode="int8")
        assert int8["bytes"] - path.stat().st_size >= 0.45 * n
    report = export.verify_tflite(path, q, (x, y))
    assert report.weight_storage == {storage: n}
    # Fixture seeds 0-7 (data, net): agreement int8 0.988-1.0, int4 0.957-1.0 of the 256 images
    # (flips only at Keras top-2 margins <= 0.028), max |logit diff| 0.014-0.048.
    assert report.top1_agreement >= 0.9 and report.max_logit_diff < 0.1, report
    assert all(layer["max_levels_per_channel"] <= 3 for layer in report.layers)


def test_int8_file_stores_identical_quantization_vectors_once(tiny, tmp_path):
    """Shared zero-point vectors: a smaller file that LiteRT reads to the same tensors and outputs."""
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    q, x, _ = tiny
    path = tmp_path / "m.tflite"
    export.export_tflite(q, path, x[:32], mode="int8")
    shared = path.read_bytes()
    plain = bytes(flatbuffer_utils.convert_object_to_bytearray(
        flatbuffer_utils.convert_bytearray_to_object(bytearray(shared))))
    # 7 kernels and 7 biases, one all-zero int64 zero point per channel each (8 or 16 channels).
    assert len(plain) - len(shared) >= 8 * 8 * 10

    def run(content):
        it = Interpreter(model_content=content)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x[:1])
        it.invoke()
        details = [(d["name"], d["dtype"],
                    [np.asarray(v).tolist() for v in d["quantization_parameters"].values()])
                   for d in it.get_tensor_details()]
        return it.get_tensor(it.get_output_details()[0]["index"]), details

    (out_a, det_a), (out_b, det_b) = run(shared), run(plain)
    assert np.array_equal(out_a, out_b) and det_a == det_b


def test_relative_output_error(tiny, tmp_path):
    """verify_tflite's relative error: ~0 for the model's own float file, large for another model's
    file; the value is the centred RMS ratio, recomputed here from the interpreter's outputs."""
    q, x, y = tiny
    f = export.export_tflite(q, tmp_path / "f.tflite", mode="float")
    # The float file computes forward_model(q): q without its activation rounding.
    plain = export.forward_model(q)
    assert export.verify_tflite(f["path"], plain, (x, y)).relative_output_error < 1e-4
    other = tfqkd.models.tiny_resnet(seed=1)
    report = export.verify_tflite(f["path"], other, (x, y))
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=f["path"])
    want = centred_rms_ratio(tflite_outputs(it, x), other(x, training=False).numpy())
    assert want > 0.5  # the two models' outputs are unrelated
    np.testing.assert_allclose(report.relative_output_error, want, rtol=1e-3)


def test_tied_disagreements_count_only_ties_in_the_file(tmp_path):
    """A file whose outputs tie classes 0 and 1 (argmax 0) against models preferring class 1 by
    a hair (a tie, counted), class 0 (agreement) and class 2 (a real disagreement)."""
    def constant_logits(bias):
        inp = keras.Input((2,))
        dense = keras.layers.Dense(3, kernel_initializer="zeros")
        model = keras.Model(inp, dense(inp))
        dense.set_weights([np.zeros((2, 3), "float32"), np.asarray(bias, "float32")])
        return model

    path = export.export_tflite(constant_logits([0.0, 0.0, -5.0]), tmp_path / "t.tflite",
                                mode="float")["path"]
    x, y = np.ones((6, 2), "float32"), np.zeros(6, "int32")
    tie = export.verify_tflite(path, constant_logits([0.0, 0.01, -5.0]), (x, y))
    assert (tie.top1_agreement, tie.tied_disagreements) == (0.0, 6)
    same = export.verify_tflite(path, constant_logits([0.01, 0.0, -5.0]), (x, y))
    assert (same.top1_agreement, same.tied_disagreements) == (1.0, 0)
    other = export.verify_tflite(path, constant_logits([-5.0, -5.0, 0.0]), (x, y))
    assert (other.top1_agreement, other.tied_disagreements) == (0.0, 0)
    assert "6 disagreements are ties" in str(tie)


def test_align_student_skips_affine_layers_run_as_depthwise(tmp_path):
    """A Rescaling layer (MobileNetV3 / EfficientNet preprocessing) becomes a 1x1 depthwise
    convolution in the file; align_student aligns the conv's bias and leaves it alone (it raised
    IndexError on such layers)."""
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
    q = quantize_model(model, weight_bits=8, activation_bits=8)
    x = np.random.default_rng(0).uniform(0, 255, (32, 8, 8, 3)).astype("float32")
    q(x, training=True)
    info = export.export_tflite(q, tmp_path / "r.tflite", x, mode="int8", align_student=True)
    # The conv's 4 channels; not the rescaling's. (The Dense head's bias is not aligned either:
    # measured, not yet explained; the parity bound below holds without it.)
    assert info["aligned_biases"]["channels"] == 4
    report = export.verify_tflite(info["path"], q, (x, np.zeros(32, "int32")))
    assert report.relative_output_error < 0.05, report.relative_output_error


def test_realigned_relu_quantizer_forgets_its_signed_range():
    """An unsigned ReLU quantizer aligned into a signed group keeps the group's range, and one
    aligned again into an unsigned group drops it: else the old range is read back whenever the
    new clip equals the old span (here 3.0 = 2.0 - (-1.0))."""
    from tfqkd.export.ranges import _quantizer_range, _set_quantizer_range
    from tfqkd.quantizers import ActivationQuantizer

    quantizer, qvars = ActivationQuantizer(8), {"clip": tf.Variable(1.0)}
    assert _set_quantizer_range(quantizer, qvars, -1.0, 2.0)
    assert _quantizer_range(quantizer, qvars) == (-1.0, 2.0)
    assert _set_quantizer_range(quantizer, qvars, 0.0, 3.0)
    assert _quantizer_range(quantizer, qvars) == (0.0, 3.0)
    assert "signed_range" not in quantizer.get_config()


def test_twin_relus_on_one_tensor_share_one_range(tmp_path):
    """Two ReLU layers on one tensor (NASNet's cells) are one op after conversion, so they get one
    range. With the student's two ranges apart (here 1 %), the merged RELU stayed float: the
    intermittent NASNet ExportError of CI runs (reproduced at seed 5 of its one-cell net)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    c = keras.layers.Concatenate(name="cat")([
        keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp),
        keras.layers.Conv2D(4, 3, padding="same", name="c2")(inp)])
    r1 = keras.layers.Activation("relu", name="relu_a")(c)
    r2 = keras.layers.Activation("relu", name="relu_b")(c)
    pooled = keras.layers.AveragePooling2D(1, name="pool")(r2)
    h = keras.layers.Add()([keras.layers.Conv2D(4, 1, name="c3")(r1),
                            keras.layers.Conv2D(4, 1, name="c4")(pooled)])
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(
        keras.layers.GlobalAveragePooling2D()(h)))
    q = quantize_model(model, weight_bits=8, activation_bits=8)
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype("float32")
    q(x, training=True)

    def clip(name):
        return next(w for w in q.get_layer(name).weights if "clip" in w.name)

    clip("quant_relu_b").assign(clip("quant_relu_b") * 1.01)
    info = export.export_tflite(q, tmp_path / "t.tflite", x, mode="int8", align_student=True)
    # Aligned to the file's one range: the wider of the two.
    assert float(clip("quant_relu_a").numpy()) == float(clip("quant_relu_b").numpy())
    assert info["aligned_ranges"]["unaligned"] == []
    report = export.verify_tflite(info["path"], q, (x, np.zeros(32, "int32")))
    assert report.relative_output_error < 0.05, report.relative_output_error


def _pooled_head_student(gap_scale):
    """ReLU -> global average pooling over a 1x1 map -> dropout -> 1x1 conv head (MobileNet's
    head at 32x32), W8A8, head biases -1..1, and the pooling's own range ``gap_scale`` times the
    ReLU's: a student's two EMA ranges differ so. The converter removes both the mean and the
    dropout, so the head reads the ReLU's tensor. Returns ``(student, x, weight(layer, part))``."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.ReLU(name="relu")(keras.layers.Conv2D(8, 8, name="c1")(inp))
    h = keras.layers.GlobalAveragePooling2D(keepdims=True, name="gap")(h)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    out = keras.layers.Reshape((10,))(keras.layers.Conv2D(10, 1, name="head")(h))
    q = quantize_model(keras.Model(inp, out), weight_bits=8, activation_bits=8)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    q(x, training=True)

    def weight(layer, part):
        return next(w for w in q.get_layer(layer).weights if part in w.name)

    weight("quant_head", "bias").assign(np.linspace(-1.0, 1.0, 10).astype("float32"))
    gap_max = weight("quant_gap", "output_max")
    gap_max.assign(gap_max * gap_scale)
    return q, x, weight


def _conv_ops(path):
    """({tensor index: details}, CONV_2D ops) of a TFLite file."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(path))
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    convs = [op for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]  # noqa
    return tensors, convs


def _is_head_conv(op, name):
    return op["op_name"] == "CONV_2D" and "head" in name


@pytest.mark.parametrize("gap_scale", [0.8, 1.3])
def test_bias_after_a_removed_mean_is_added_on_the_runtime_grid(tmp_path, gap_scale):
    """A global average pooling over a 1x1 map and a dropout are removed by the converter, so the
    head conv reads the ReLU's tensor, but its int32 bias was quantized with the scale of the
    dropout's output (the pooling's range). TFLite's kernels add ``B * s_in * s_w`` whatever the
    bias tensor states, so the head's bias came out ``s_pool / s_relu`` times what the student
    adds. The references here are that runtime rule and the student's own output on an input
    whose ReLU output is all zero (the head then outputs its bias alone)."""
    q, x, weight = _pooled_head_student(gap_scale)
    weight("quant_c1", "bias").assign(-np.ones(8, "float32"))  # x = 0: ReLU output 0
    info = export.export_tflite(q, tmp_path / "t.tflite", x, mode="int8")
    tensors, convs = _conv_ops(info["path"])
    assert len(convs) == 2  # the MEAN and the dropout are gone: the head reads the ReLU's
    for op in convs:
        x_t, w_t, b_t = (tensors[i] for i in op["inputs"][:3])
        runtime = x_t["quantization"][0] * w_t["quantization_parameters"]["scales"]
        np.testing.assert_allclose(b_t["quantization_parameters"]["scales"], runtime, rtol=1e-5)
    zero = np.zeros((1, 8, 8, 3), "float32")
    assert np.abs(q(zero, training=False).numpy()).max() > 0.9  # the bias is what comes out
    steps = file_tensor_steps(str(info["path"]), q, zero, _is_head_conv)
    assert steps.max() <= 1.01, steps


@pytest.mark.parametrize("gap_scale", [0.8, 1.3])
def test_pooling_over_one_position_shares_its_inputs_range(tmp_path, gap_scale):
    """The file has no pooling op to round the pooled value on its own grid, so the student must
    not either: the pooling and the ReLU get one range, and ``align_student`` moves the
    student's pooling quantizer to it. Before, the student rounded the ReLU's levels again on
    the pooling's grid and its logits differed from the file's by several steps."""
    q, x, _ = _pooled_head_student(gap_scale)
    info = export.export_tflite(q, tmp_path / "t.tflite", x, mode="int8", align_student=True)
    assert info["aligned_ranges"]["tensors"] >= 1
    steps = file_tensor_steps(str(info["path"]), q, x, _is_head_conv)
    assert steps.max() <= 1.01, steps.max()


def test_scalar_op_of_a_rounded_input_takes_the_image_of_its_range(tmp_path):
    """MobileNetV3's hard sigmoid, ``ReLU6(x + 3) * (1/6)``: the student rounds the ReLU6 and
    leaves the product unrounded. The file's range for the product is ``(1/6) * [0, c]``, the
    exact image of the ReLU6's grid, not the calibration images' min/max: calibrated on small
    inputs it clipped larger ones (V3Small: up to 216 steps off)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(8, 1, name="c1")(inp)
    gate = keras.layers.ReLU(6.0, name="r6")(x + 3.0) * (1.0 / 6.0)
    h = keras.layers.Multiply(name="hswish")([x, gate])
    out = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(h))
    q = quantize_model(keras.Model(inp, out), weight_bits=8, activation_bits=8)
    wide = np.random.default_rng(0).normal(scale=4.0, size=(64, 4, 4, 3)).astype("float32")
    q(wide, training=True)  # the student's ranges see the whole ReLU6 range
    narrow = wide * 0.05  # calibration images that never get near it
    info = export.export_tflite(q, tmp_path / "t.tflite", narrow, mode="int8", align_student=True)
    relu6_max = float(next(w for w in q.get_layer("quant_r6").weights if "clip" in w.name).numpy())
    assert relu6_max > 5.0
    tensors, _ = _conv_ops(info["path"])
    products = [t for t in tensors.values() if t["dtype"] == np.int8 and len(t["shape"]) == 4
                and "tf.math.multiply" in t["name"]]
    assert len(products) == 1, [t["name"] for t in tensors.values()]
    scale, zero_point = products[0]["quantization"]
    np.testing.assert_allclose(scale * (127 - zero_point), relu6_max / 6.0, rtol=1e-5)
    report = export.verify_tflite(info["path"], q, (wide, np.zeros(64, "int32")))
    assert report.relative_output_error < 0.05, report.relative_output_error


def _sub_model(q, layer_name):
    """The student up to the output of its layer ``layer_name`` (its wrapper's, quantized)."""
    return keras.Model(q.inputs, q.get_layer(layer_name).output)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_twin_relus_fuse_into_the_conv_and_the_student_rounds_once(tmp_path, seed):
    """NASNet applies ``Activation("relu")`` to one batch norm output several times. The
    converter merges the twins and fuses the one ReLU into the conv, so the file rounds the conv
    once, on the ReLU's range. The student also rounds the batch norm output (it has several
    readers) on its own range: twice. ``align_student`` puts that rounding on the ReLU's
    range. Before, the file's fused output differed from the student's by up to 2 steps on about
    a quarter of the values (NASNet's stem), and NASNetMobile agreed on 95 % of test images."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(8, 3, padding="same",
                                                                       name="c1")(inp))
    left = keras.layers.Conv2D(4, 1, name="left")(keras.layers.Activation("relu", name="r1")(h))
    right = keras.layers.Conv2D(4, 1, name="right")(keras.layers.Activation("relu", name="r2")(h))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Concatenate()([left, right]))
    q = quantize_model(keras.Model(inp, keras.layers.Dense(5, name="head")(pooled)),
                       weight_bits=8, activation_bits=8)
    x = np.random.default_rng(seed).normal(size=(32, 8, 8, 3)).astype("float32")
    for _ in range(3):  # batch norm statistics and every EMA range
        q(x, training=True)
    info = export.export_tflite(q, tmp_path / "t.tflite", x, mode="int8", align_student=True)
    steps = file_tensor_steps(str(info["path"]), _sub_model(q, "quant_r1"), x[:8],
                              lambda op, name: op["op_name"] == "CONV_2D" and "r1" in name)
    assert steps.max() < 0.01, (steps.max(), np.mean(steps > 0.5))


def test_average_pooling_rounds_exact_halves_as_the_file(tmp_path):
    """LiteRT's int8 AVERAGE_POOL_2D (XNNPACK and the reference kernels alike) keeps its input's
    scale and rounds the mean of the window's int8 values half away from zero; FakeQuant rounds
    the float mean half up. A 3x3 "same" pooling of a small map averages 4 or 6 values at the
    edges, so exact halves are frequent. ``align_student`` gives the pooling's quantizer the
    file's rule (``mean_window``); before, the pooled tensors differed by 1 step on the halves."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    # The conv's output and the pooling share one range in the file.
    pooled = keras.layers.AveragePooling2D(3, 1, "same", name="pool")(
        keras.layers.Conv2D(8, 1, name="c1")(inp))
    out = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(pooled))
    q = quantize_model(keras.Model(inp, out), weight_bits=8, activation_bits=8)
    x = np.random.default_rng(0).normal(size=(32, 6, 6, 3)).astype("float32")
    q(x, training=True)
    info = export.export_tflite(q, tmp_path / "t.tflite", x, mode="int8", align_student=True)
    assert info["aligned_ranges"]["integer_means"] == 1
    assert q.get_layer("quant_pool")._output_quantizers[0].mean_window == 9
    steps = file_tensor_steps(str(info["path"]), _sub_model(q, "quant_pool"), x[:8],
                              lambda op, name: op["op_name"] == "AVERAGE_POOL_2D")
    assert steps.max() < 0.01, (steps.max(), np.mean(steps > 0.5))
    # The rule survives saving: a reloaded student rounds the same way.
    q.save(tmp_path / "s.h5")
    with tfqkd.quantize_scope():
        reloaded = keras.models.load_model(tmp_path / "s.h5", compile=False)
    np.testing.assert_array_equal(_sub_model(reloaded, "quant_pool")(x).numpy(),
                                  _sub_model(q, "quant_pool")(x).numpy())


def test_padding_of_the_model_input_keeps_the_inputs_grid(tmp_path):
    """ResNet50V2 and DenseNet121 pad the model input before their first conv. The padding
    got a calibrated range of its own, so the file requantized the input once more (68 % of
    ResNet50V2's input values moved, up to half a step; 97.9 % agreement). It now shares the
    input's range: no second QUANTIZE, and the padded tensor is the student's."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    # Padding 2 for a 3x3 "valid" conv: not a "same" padding the converter could fold away.
    h = keras.layers.Conv2D(8, 3, name="c1")(keras.layers.ZeroPadding2D(2, name="pad")(inp))
    out = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling2D()(h))
    q = quantize_model(keras.Model(inp, out), weight_bits=8, activation_bits=8)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    q(x, training=True)  # the input quantizer's range: these 64 images'
    info = export.export_tflite(q, tmp_path / "t.tflite", x[:4], mode="int8",  # a narrower one
                                align_student=True)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(info["path"]))
    assert [op["op_name"] for op in it._get_ops_details()].count("QUANTIZE") == 1
    steps = file_tensor_steps(str(info["path"]), _sub_model(q, "pad"), x[:8],
                              lambda op, name: op["op_name"] == "PAD")
    assert steps.max() < 0.01, (steps.max(), np.mean(steps > 0.01))


def test_dense_kernel_keeps_the_students_per_channel_levels(tmp_path):
    """The converter takes a dense kernel's FakeQuant only per tensor, so a per-channel student's
    head was rounded once more onto one grid in the file (ResNet50's and DenseNet121's softmax
    heads: 2-11 % of the outputs off, by up to 20 steps). The file now holds the student's own
    integers and steps per output channel, which LiteRT's FULLY_CONNECTED runs."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, name="c1")(inp))
    q = quantize_model(keras.Model(inp, keras.layers.Dense(5, name="head")(h)), weight_bits=8,
                       activation_bits=8, per_channel=True)
    head = q.get_layer("quant_head")
    kernel = head.trainable_weights[0]  # channels of very different sizes: one grid fits few
    kernel.assign(kernel * np.array([0.02, 0.1, 1.0, 3.0, 0.3], np.float32))
    x = np.random.default_rng(0).normal(size=(32, 6, 6, 3)).astype("float32")
    q(x, training=True)
    info = export.export_tflite(q, tmp_path / "t.tflite", x, mode="int8", align_student=True)
    assert info["per_channel_dense_kernels"] == 1
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(info["path"]))
    it.allocate_tensors()
    fc = next(op for op in it._get_ops_details() if op["op_name"] == "FULLY_CONNECTED")
    w = next(d for d in it.get_tensor_details() if d["index"] == fc["inputs"][1])
    scales = w["quantization_parameters"]["scales"]
    assert len(scales) == 5
    in_file = it.get_tensor(w["index"]).astype(np.float64) * scales[:, None]
    student = quantized_weights(q)["head"]  # the kernel the student computes with
    np.testing.assert_allclose(in_file, np.asarray(student, np.float64).T, rtol=1e-6, atol=0)
    steps = file_tensor_steps(str(info["path"]), q, x[:8],
                              lambda op, name: op["op_name"] == "FULLY_CONNECTED")
    assert steps.max() <= 1.01, steps.max()


def test_float_and_dynamic_modes(tiny, tmp_path):
    q, x, y = tiny
    f = export.export_tflite(q, tmp_path / "f.tflite", mode="float")
    d = export.export_tflite(q, tmp_path / "d.tflite", mode="dynamic")
    rf = export.verify_tflite(f["path"], q, (x, y))
    rd = export.verify_tflite(d["path"], q, (x, y))
    assert rf.weight_storage == {"float32": rf.num_weights}
    assert rd.weight_storage.get("int8", 0) > 0
    assert d["bytes"] < f["bytes"]
    # The float file computes forward_model(q) exactly (no activation quantization).
    plain = export.forward_model(q)
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=f["path"])
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x[:1])
    it.invoke()
    out = it.get_tensor(it.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, plain(x[:1]).numpy(), atol=1e-4)
    d_report = str(rd)
    assert "top-1 agreement" in d_report and "levels<=" in d_report
    assert set(rd.to_dict()) >= {"keras_top1", "tflite_top1", "top1_agreement", "max_logit_diff",
                                 "file_bytes", "bits_per_weight", "layers"}


def test_forward_model_strips_wrappers(tiny):
    q, x, _ = tiny
    plain = export.forward_model(q)
    assert not any("Quantize" in type(layer).__name__ for layer in plain.layers)
    for name, kernel in quantized_weights(q).items():
        np.testing.assert_array_equal(plain.get_layer(name).get_weights()[0], kernel)


@pytest.mark.parametrize("method", ["fakequant", "ptq"])
def test_interrupted_export_leaves_no_file(tiny, tmp_path, method):
    q, x, _ = tiny

    def data():
        for i in range(4):
            yield [x[i:i + 1]]
        raise RuntimeError("data source failed")

    path = tmp_path / "m.tflite"
    with pytest.raises(Exception, match="data source failed"):
        export.export_tflite(q, path, data, mode="int8", method=method)
    assert os.listdir(tmp_path) == []
    # An existing file is not touched by a failed export either.
    path.write_bytes(b"old")
    with pytest.raises(Exception, match="data source failed"):
        export.export_tflite(q, path, data, mode="int8", method=method)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.tflite"]


def test_quantize_input_rounds_like_the_students_fakequant():
    """Input integers equal FakeQuant's, also for values a float32 hair from a rounding tie."""
    lo, hi = -1.9894737, 2.1264887  # a ResNet20 input range: zero point -5
    scale = (hi - lo) / 255
    zero = -128 - int(round(lo / scale))
    rng = np.random.default_rng(3)
    k = rng.integers(-128, 127, size=2000)
    x = np.concatenate([rng.normal(size=2000),
                        (k - zero + 0.5) * scale + rng.normal(scale=1e-6, size=2000),
                        [-50.0, 50.0]]).astype(np.float32)
    fq = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8).numpy()
    want = np.rint(fq / np.float32(scale)).astype(np.int64) + zero
    got = export.quantize_input(x, scale, zero).astype(np.int64)
    assert np.array_equal(got, want), np.flatnonzero(got != want)


def test_pack_round_trip_tiny_exact(tiny, tmp_path):
    q, _, _ = tiny
    stats = export.pack_weights(q, tmp_path / "w.tfqkdpw")
    kernels = quantized_weights(q).values()
    assert stats["encodings"]["ternary"] == sum(v.size for v in kernels)
    # The size the format defines (1.6 bits per level + one float32 step per tensor): 1.65 here.
    assert stats["bits_per_ternary_weight"] == pytest.approx(packed_ternary_bits(kernels))
    target = tfqkd.models.tiny_resnet(seed=123)
    export.load_packed_weights(target, tmp_path / "w.tfqkdpw")
    want = export.forward_weights(q)
    got = export.forward_weights(target)
    assert set(want) == set(got)
    for layer, weights in want.items():
        for name, value in weights.items():
            assert np.array_equal(got[layer][name], value), (layer, name)


def test_trits_and_bits_codecs():
    from tfqkd.export import packed as archive

    rng = np.random.default_rng(1)
    for n in (1, 4, 5, 6, 101):
        k = rng.integers(-1, 2, size=n)
        assert np.array_equal(archive._unpack_trits(archive._pack_trits(k), n), k)  # noqa: SLF001
        assert len(archive._pack_trits(k)) == -(-n // 5)  # noqa: SLF001
        for bits in (1, 3, 4):
            c = rng.integers(0, 2 ** bits, size=n)
            packed = archive._pack_bits(c, bits)  # noqa: SLF001
            assert len(packed) == -(-n * bits // 8)
            assert np.array_equal(archive._unpack_bits(packed, n, bits), c)  # noqa: SLF001


def test_snap_makes_4bit_levels_exact(tmp_path):
    """PTQ maps 4-bit levels k*d to rint(127k/7) (off-grid); snapping restores k*d exactly."""
    q = quantize_model(tfqkd.models.tiny_resnet(seed=2), weight_bits=4, first_last_bits=None)
    x = np.random.default_rng(2).normal(size=(32, 8, 8, 1)).astype("float32")
    info = export.export_tflite(q, tmp_path / "s.tflite", x, mode="int8", method="ptq")
    assert info["snapped_channels"] > 0
    plain = export.forward_model(q)
    for entry in export.tflite_weight_levels(tmp_path / "s.tflite",
                                             [layer.name for layer in plain.layers]):
        values, scales = entry["values"].astype(np.int64), entry["scales"]
        scale = scales.reshape((-1,) + (1,) * (values.ndim - 1)) if scales.size > 1 else scales
        ref = _folded_reference(q, entry["layer"], plain)
        np.testing.assert_allclose(values * scale, ref, rtol=1e-5, atol=1e-7)
        assert max(len(r) for r in _per_channel_levels(values, entry["axis"])) <= 15
    # An untrained float-activation net on 32 random inputs: near-ties abound. Measured for this
    # setup at seeds 2..7: 0.906 (seed 2, this one), 0.969, then 1.0 four times; the bound
    # leaves two images below the minimum.
    r = export.verify_tflite(tmp_path / "s.tflite", q, (x, np.zeros(32, "int32")))
    assert r.top1_agreement >= 0.85


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
def test_unknown_mode_and_missing_data(tiny, tmp_path):
    q, _, _ = tiny
    with pytest.raises(ValueError, match="unknown export mode 'int2'.*float, dynamic, int8, int4"):
        export.export_tflite(q, tmp_path / "m.tflite", mode="int2")
    for mode in ("int8", "int4"):
        with pytest.raises(ValueError, match=f"mode '{mode}'.*representative_data.*'dynamic'"):
            export.export_tflite(q, tmp_path / "m.tflite", mode=mode)
    with pytest.raises(ValueError, match="empty"):
        export.export_tflite(q, tmp_path / "m.tflite", np.zeros((0, 8, 8, 1), "float32"))
    assert os.listdir(tmp_path) == []


def test_unwritable_path(tiny, tmp_path):
    q, x, _ = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.export_tflite(q, tmp_path / "missing" / "m.tflite", mode="float")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export.export_tflite(q, tmp_path, mode="float")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.pack_weights(q, tmp_path / "missing" / "w.tfqkdpw")


def test_unconvertible_layer_is_named_with_working_modes(tmp_path):
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, name="dense")(inputs)
    h = keras.layers.Lambda(lambda t: tf.math.cumsum(t, axis=-1), name="running_sum")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    with pytest.raises(export.ExportError, match=r"running_sum.*mode='float'") as err:
        export.export_tflite(model, tmp_path / "m.tflite", x, mode="int8")
    assert "CUMSUM" in str(err.value)
    assert not (tmp_path / "m.tflite").exists()


def test_bad_archive_and_architecture(tiny, tmp_path):
    q, _, _ = tiny
    bogus = tmp_path / "bogus.bin"
    bogus.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a tfqkd packed-weights archive"):
        export.load_packed_weights(tfqkd.models.tiny_resnet(), bogus)
    export.pack_weights(q, tmp_path / "w.tfqkdpw")
    with pytest.raises(ValueError, match="same architecture"):
        export.load_packed_weights(tfqkd.models.tiny_resnet(width=2), tmp_path / "w.tfqkdpw")


# ------------------------------------------------------------------------------------------
# ResNet20 on CIFAR-10 (required): W2A8 student, int8 file, parity on 500 test images
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet20_w2(cifar10_archive):
    from tfqkd import data

    # tf.data's seeded shuffle also depends on TensorFlow's global seed, which other tests in the
    # same process may have set (keras.utils.set_random_seed): reset it so that this student,
    # and so the measured agreement, do not depend on which tests ran before.
    tf.random.set_seed(None)
    train = data.load_dataset("cifar10", "train", data_dir=cifar10_archive, batch_size=128,
                              subset=10000, seed=0, augment=False).repeat()
    q = quantize_model(tfqkd.models.resnet20(seed=0), weight_bits=2, activation_bits=8,
                       first_last_bits=8)
    q.compile(keras.optimizers.Adam(2e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(train, steps_per_epoch=RESNET20_STEPS, epochs=1, verbose=0)
    test = data.load_dataset("cifar10", "test", data_dir=cifar10_archive, batch_size=500,
                             subset=500, augment=False, shuffle=False)
    calibration = data.load_dataset("cifar10", "train", data_dir=cifar10_archive,
                                    batch_size=100, subset=200, augment=False, seed=1)
    return q, test, calibration


RESNET20_STEPS = 30


def test_resnet20_w2_int8_parity_and_levels(resnet20_w2, tmp_path):
    """int8 file of a W2A8 ResNet20 (30 QAT steps): ternary levels exact, every logit within 3
    output steps of the student's, top-1 agrees on >= 97%, and every image where it does not is a
    near-tie of the student (top-2 logits <= 3 steps apart).

    Measured over eight training orders each (docs/export.md: TF global seed unset, 1..7), on two
    CPUs, whose float32 kernels train different students from the same order. AMD EPYC (AVX2):
    agreement 98.8-100%, every disagreement's margin <= 1 step. Intel Xeon with AVX-512
    (2026-12-07): agreement 98.2-100%; the largest logit difference 1 step on seven orders and 2
    on one; margins <= 2 steps, one of 2 (both top logits one step off, in opposite directions).
    A flip needs the two logits' differences to add up to the margin. The bounds are one step
    above the largest measured (2 steps) and a point below the least agreement. The file itself
    is exact there: every CONV_2D, ADD and MEAN output of the unset order's file equals an
    integer reference to the bit (scratch replay, 16-32 images); the student's float32 rounding
    near ties is what differs, and its flips compound through the depth.

    With ``activation_bits`` the QAT student rounds every tensor the integer file rounds (input,
    ReLU outputs, pre-add conv+BN outputs, pooled features, logits) at the ranges the exporter
    writes into the file; ``align_student`` puts its folded biases on the file's int32 grid and
    :func:`export.quantize_input` rounds the input as the student does, so the two differ only
    on accumulators within float32 rounding of a tie.
    """
    q, test, calibration = resnet20_w2
    path = tmp_path / "resnet20_w2.tflite"
    info = export.export_tflite(q, path, calibration, mode="int8", num_calibration=200,
                                int8_io=True, align_student=True)
    # The student's biases moved onto the file's int32 grid: by far less than one output step.
    assert info["aligned_biases"]["channels"] > 700
    assert info["aligned_biases"]["max_shift_steps"] < 0.01
    report = export.verify_tflite(path, q, test)
    print(report)
    assert report.num_examples == 500 and report.input_dtype == "int8"
    assert report.weight_storage == {"int8": report.num_weights}
    qw = quantized_weights(q)
    eight_bit = {"stem_conv", "classifier"}  # first_last_bits=8
    ternary = [layer for layer in report.layers if layer["layer"] not in eight_bit]
    assert len(ternary) == len(qw) - 2 == 20
    assert all(layer["max_levels_per_channel"] <= 3 for layer in ternary)

    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = inp["quantization"], out["quantization"]
    x = next(iter(test))[0].numpy()
    file_out = tflite_outputs(it, export.quantize_input(x, s_in, z_in))
    logits = (file_out.astype(np.float32) - z_out) * s_out
    ref = q(x, training=False).numpy()
    agree = logits.argmax(-1) == ref.argmax(-1)
    assert abs(agree.mean() - report.top1_agreement) < 1e-9
    per_image = np.abs(logits - ref).max(axis=-1) / s_out
    print(f"agreement {agree.mean():.4f}; per-image max |logit diff| median "
          f"{np.median(per_image):.2f}, max {per_image.max():.2f} output steps ({s_out:.4f})")
    # Seed-robust: the student's logits are on the file's int8 grid, and the file differs from
    # them by rounding flips only (measured at most 2 steps); a wrong export (a bias, a level or
    # a range off) moves logits by many steps.
    assert per_image.max() <= 3.01, np.sort(per_image)[-5:]
    # So the file can flip only near-ties of the student (measured top-2 margins <= 2 steps); a
    # wrong export flips confident images too.
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margins_in_steps = (top2[:, 1] - top2[:, 0]) / s_out
    assert np.all(margins_in_steps[~agree] <= 3.01), margins_in_steps[~agree]
    # Below the least of the sixteen measured students (98.2%, the unset order on the Xeon).
    assert report.top1_agreement >= 0.97


def test_resnet20_packed_archive(resnet20_w2, tmp_path):
    q, _, _ = resnet20_w2
    stats = export.pack_weights(q, tmp_path / "r20.tfqkdpw")
    ternary = [v for k, v in quantized_weights(q).items() if k not in ("stem_conv", "classifier")]
    assert stats["encodings"]["ternary"] == sum(v.size for v in ternary) > 260_000
    # The claimed ~1.6 bits (log2(3) = 1.585; 5 trits per byte; 20 float32 steps): 1.6026.
    assert stats["bits_per_ternary_weight"] == pytest.approx(packed_ternary_bits(ternary))
    assert stats["bits_per_ternary_weight"] < 1.61
    target = tfqkd.models.resnet20(seed=7)
    export.load_packed_weights(target, tmp_path / "r20.tfqkdpw")
    want, got = export.forward_weights(q), export.forward_weights(target)
    for layer, weights in want.items():
        for name, value in weights.items():
            assert np.array_equal(got[layer][name], value), (layer, name)


# --------------------------------------------------------------------------------------------
# Regression: layers of Keras Applications models (depthwise convolutions, constant operands)
# --------------------------------------------------------------------------------------------
def _depthwise_net(hard_swish=False):
    """Conv -> BN -> ReLU -> DepthwiseConv -> BN -> ReLU (or hard-swish with float constants)."""
    init = keras.initializers.GlorotUniform(seed=1)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, kernel_initializer=init)(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False,
                                     depthwise_initializer=init)(h)
    h = keras.layers.BatchNormalization()(h)
    if hard_swish:  # as MobileNetV3 builds it: TFOpLambda layers with Python float operands
        h = keras.layers.Multiply()([h, keras.layers.ReLU(6.0)(h + 3.0) * (1.0 / 6.0)])
    else:
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10, kernel_initializer=init)(h))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_depthwise_kernels_export_with_exact_levels(tmp_path, mode):
    # Failed before: the DepthwiseConv2D branch reshaped with a TensorShape + [-1] (crash), then
    # XNNPACK refused the file of a dead channel block (collapsed activation range).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    q = quantize_model(_depthwise_net(), weight_bits=2, activation_bits=8, first_last_bits=None)
    path = tmp_path / "dw.tflite"
    export.export_tflite(q, path, x, mode=mode)
    plain = export.forward_model(q)
    entries = {e["layer"]: e for e in export.tflite_weight_levels(
        path, [layer.name for layer in plain.layers]) if e["layer"]}
    dw = [e for name, e in entries.items()
          if isinstance(plain.get_layer(name), keras.layers.DepthwiseConv2D)]
    assert len(dw) == 1 and dw[0]["axis"] == 3  # TFLite depthwise: per channel on the last axis
    # Ternary trained kernel: at most 3 integer levels per channel, symmetric.
    assert dw[0]["max_levels_per_channel"] <= 3
    report = export.verify_tflite(path, q, (x, np.zeros(32, "int32")))
    assert report.num_examples == 32


def test_constant_operands_rebuild(tmp_path):
    # Failed before: "Unexpectedly found an instance of type float" (x + 3.0 in a hard-swish).
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype("float32")
    net = _depthwise_net(hard_swish=True)
    np.testing.assert_allclose(export.forward_model(net)(x).numpy(), net(x).numpy(), rtol=1e-6)
    q = quantize_model(net, weight_bits=4, activation_bits=8, first_last_bits=None)
    info = export.export_tflite(q, tmp_path / "hs.tflite", x, mode="int8")
    assert info["bytes"] > 0


def test_scalar_operands_become_integer_kernels_in_int4(tmp_path):
    """x + c, c - x, x / c, c * x by Python numbers (MobileNetV3's hard-swish): the int4 file has
    no float op (they run as 1x1 depthwise convolutions) and tracks the student like int8's."""
    from tfqkd._flatbuffer import op_names, read

    init = keras.initializers.GlorotUniform(seed=3)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", kernel_initializer=init)(inp)
    h = keras.layers.ReLU(6.0)(h + 3.0) * (1.0 / 6.0)
    h = 2.0 - h
    h = keras.layers.DepthwiseConv2D(3, padding="same", depthwise_initializer=init)(h / 4.0)
    h = keras.layers.GlobalAveragePooling2D()(0.5 * h)
    net = keras.Model(inp, keras.layers.Dense(10, kernel_initializer=init)(h))
    x = np.random.default_rng(1).normal(size=(32, 8, 8, 3)).astype("float32")
    q = quantize_model(net, weight_bits=4, activation_bits=8, first_last_bits=None)
    q(x, training=True)
    errors = {}
    for mode in ("int8", "int4"):
        path = str(tmp_path / f"{mode}.tflite")
        export.export_tflite(q, path, x, mode=mode)
        model_obj = read(open(path, "rb").read())
        names = op_names(model_obj)
        ops = [names[op.opcodeIndex] for op in model_obj.subgraphs[0].operators]
        errors[mode] = export.verify_tflite(path, q, (x, np.zeros(32, "int32")))
        if mode == "int4":
            # Five scalar ops rewritten (the Conv's and the Dense's own ADD are fused/absent).
            assert ops.count("DEPTHWISE_CONV_2D") == 1 + 5, ops
            assert not {"ADD", "SUB", "MUL", "DIV"} & set(ops), ops
    # Measured 0.0027 (int8) and 0.0032 (int4); with c - x mapped as x - c, 1.0.
    assert errors["int4"].relative_output_error < 0.05, errors["int4"]
    assert errors["int8"].relative_output_error < 0.05, errors["int8"]


def _applications_like_net():
    """The layers Applications models add: preprocessing, swish, SE, concat, avg-pool, standalone
    batch norm, a Reshape head to batch-1 constants and a softmax."""
    seeds = iter(range(20, 40))  # distinct kernels (identical constants are merged)

    def init():
        return keras.initializers.GlorotUniform(seed=next(seeds))

    inp = keras.Input((8, 8, 3))
    h = keras.layers.Rescaling(1.0 / 255.0)(inp)
    h = keras.layers.Normalization(mean=[0.5, 0.4, 0.3], variance=[0.1, 0.2, 0.3])(h)
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, kernel_initializer=init())(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("swish")(h)
    se = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    se = keras.layers.Conv2D(4, 1, activation="swish", kernel_initializer=init())(se)
    se = keras.layers.Conv2D(8, 1, activation="sigmoid", kernel_initializer=init())(se)
    h = keras.layers.Multiply()([h, se])
    b = keras.layers.BatchNormalization()(h)  # standalone: not after a kernel layer
    b = keras.layers.ReLU()(b)
    b = keras.layers.Conv2D(4, 1, kernel_initializer=init())(b)
    h = keras.layers.Concatenate()([h, b])
    h = keras.layers.AveragePooling2D(2)(h)
    h = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    h = keras.layers.Conv2D(10, 1, kernel_initializer=init())(h)
    h = keras.layers.Reshape((10,))(h)
    return keras.Model(inp, keras.layers.Activation("softmax")(h))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_applications_layers_become_integer_ops(tmp_path, mode):
    # Failed before: preprocessing/swish/sigmoid/softmax stayed float (MUL, ADD, LOGISTIC,
    # SOFTMAX), avg-pool/concat broke the converter's same-scale constraint, and the batch-1
    # Reshape head made verify_tflite crash in XNNPACK.
    from tfqkd._flatbuffer import op_names, read

    x = np.random.default_rng(2).uniform(0, 255, size=(16, 8, 8, 3)).astype("float32")
    net = _applications_like_net()
    for layer in net.layers:  # non-trivial batch-norm statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(np.linspace(-0.2, 0.2, n))
            layer.moving_variance.assign(np.linspace(0.5, 2.0, n))
    q = quantize_model(net, weight_bits=4, activation_bits=8, first_last_bits=None)
    path = tmp_path / "apps.tflite"
    export.export_tflite(q, path, x, mode=mode)  # raises if any op stayed float
    model_obj = read(path.read_bytes())
    names = op_names(model_obj)
    sg = model_obj.subgraphs[0]
    ops = [names[op.opcodeIndex] for op in sg.operators]
    assert "SOFTMAX" in ops and "LOGISTIC" in ops and "CONCATENATION" in ops
    softmax = sg.operators[ops.index("SOFTMAX")]
    q_out = sg.tensors[softmax.outputs[0]].quantization
    assert sg.tensors[softmax.outputs[0]].type == 7  # int16: the softmax head
    assert q_out.scale[0] == pytest.approx(1 / 32768) and int(q_out.zeroPoint[0]) == 0
    report = export.verify_tflite(path, q, (x, np.zeros(16, "int32")))
    assert report.num_examples == 16
    # Probabilities: the file's within a few hundredths of the student's.
    assert report.max_logit_diff < 0.1


def _relu6_net():
    """MobileNetV2's pattern: conv -> BN -> ReLU6, depthwise -> BN -> ReLU6, 1x1 conv -> BN."""
    init = keras.initializers.GlorotUniform(seed=2)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False,
                            kernel_initializer=init, name="stem")(inp)
    h = keras.layers.ReLU(6.0, name="stem_relu")(keras.layers.BatchNormalization()(h))
    h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False,
                                     depthwise_initializer=init)(h)
    h = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(h))
    h = keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 1, use_bias=False,
                                                              kernel_initializer=init)(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10, kernel_initializer=init)(h))


def test_w8_relu6_file_matches_the_student_at_the_first_layer(tmp_path):
    """Failed before on two counts, each alone enough (checked by reverting each fix): (a) 8-bit
    kernels whose smallest used level is not 1 were put on a calibrated grid instead of the
    student's step; (b) MobileNet-style inputs (pixels / 127.5 - 1) lie exactly on rounding
    ties of the [-1, 1] input grid, where the student rounds up and the file to even. The first
    ReLU6 output (no earlier layer to carry a difference) must then equal the student's, up to
    one step of integer rounding."""
    from ai_edge_litert.interpreter import Interpreter

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, size=(64, 8, 8, 3)) / 127.5 - 1.0).astype("float32")
    y = rng.integers(0, 10, size=64)
    q = quantize_model(_relu6_net(), weight_bits=8, activation_bits=8, per_channel=True)
    _fit(q, x, y, steps=4)
    path = str(tmp_path / "relu6.tflite")
    export.export_tflite(q, path, x, mode="int8")
    it = Interpreter(model_path=path)
    it.allocate_tensors()
    ops = it._get_ops_details()  # noqa: SLF001 (the op graph: which tensor feeds which op)
    conv = next(op for op in ops if op["op_name"] == "CONV_2D")
    # (a) the stem's int8 kernel holds the student's integer levels (times 127 // max level).
    levels = tfqkd.quantize.quantization_info(q)["stem"]["levels"].astype(np.int64)  # HWIO
    file_kernel = it.get_tensor(conv["inputs"][1]).astype(np.int64)  # OHWI
    kmax = np.abs(levels).reshape(-1, levels.shape[-1]).max(axis=0)
    np.testing.assert_array_equal(file_kernel, np.transpose(levels * (127 // kmax), (3, 0, 1, 2)))
    # (b): the stem's ReLU6 output (the first CONV_2D's, fused), image by image.
    student = keras.Model(q.inputs, q.get_layer("quant_stem_relu").output)
    steps = file_tensor_steps(path, student, x[:16], lambda op, name: op["op_name"] == "CONV_2D")
    assert steps.max() <= 1.01, steps.max()
    assert np.mean(steps < 0.01) >= 0.99, np.mean(steps < 0.01)


@pytest.mark.parametrize("seed", [0, 1])
def test_swish_and_squeeze_excite_round_as_the_file_does(tmp_path, seed):
    """EfficientNet's pattern at W8A8: swish runs in the file as LOGISTIC (1/256 grid) + MUL, the
    SE gate as a pinned LOGISTIC. The student now computes swish the same way (before: float
    sigmoid, 5 % of the first swish outputs 2 steps off the file's; with it reverted this test
    fails), so the first swish output equals the file's but for a few values one or two steps
    off, where the conv+BN output before it sits on a rounding boundary (seeds 0-5: 99.95-99.98 %
    equal, at most 2 steps; reverted: 97.6 %)."""
    init = keras.initializers.GlorotUniform(seed=3)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, kernel_initializer=init)(inp)
    h = keras.layers.Activation("swish", name="stem_act")(keras.layers.BatchNormalization()(h))
    se = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    se = keras.layers.Conv2D(2, 1, activation="swish", kernel_initializer=init,
                             name="se_reduce")(se)
    se = keras.layers.Conv2D(8, 1, activation="sigmoid", kernel_initializer=init, name="gate")(se)
    h = keras.layers.Multiply()([h, se])
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(10, kernel_initializer=init)(h))
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    q = quantize_model(model, weight_bits=8, activation_bits=8, per_channel=True)
    _fit(q, x, rng.integers(0, 10, size=64), steps=4)
    path = str(tmp_path / "swish.tflite")
    export.export_tflite(q, path, x, mode="int8")
    student = keras.Model(q.inputs, q.get_layer("quant_stem_act").output)
    steps = file_tensor_steps(path, student, x[:16],
                               lambda op, name: op["op_name"] == "MUL" and "stem_act" in name)
    assert steps.max() <= 2.01, steps.max()
    assert np.mean(steps < 0.01) >= 0.995, np.mean(steps < 0.01)
    # A swish fused into a conv is split (conv, then its own swish layer) so that the student
    # rounds the conv's output as the file does; the caller's model is left as it was.
    assert model.get_layer("se_reduce").activation.__name__ == "swish"
    assert len(model.get_layer("se_reduce")._inbound_nodes) == 1  # noqa: SLF001
    reduce = keras.Model(q.inputs, q.get_layer("quant_se_reduce_swish").output)
    steps = file_tensor_steps(path, reduce, x[:16],
                               lambda op, name: op["op_name"] == "MUL" and "se_reduce" in name)
    assert steps.max() <= 1.01, steps.max()  # seeds 0-5: at most 1 step (0-1 of 32 values)
    gate = keras.Model(q.inputs, q.get_layer("quant_gate").output)
    steps = file_tensor_steps(path, gate, x[:16],
                               lambda op, name: op["op_name"] == "LOGISTIC" and "gate" in name)
    assert steps.max() <= 2.01, steps.max()  # its input, the SE conv's swish, is 1 step off


@pytest.mark.parametrize("seed", [0, 1])
def test_a_wide_gate_input_is_rounded_only_where_the_sigmoid_still_moves(tmp_path, seed):
    """A squeeze-excite gate with pre-activations of tens (an EfficientNetB0 student's reached
    [-78, 51]): the file's LOGISTIC input used to get that whole range, a step of ~0.4, so one
    rounding flip moved the gate by up to 32 output steps. Its range is now clipped to
    [-8, 8], where round(256 * sigmoid) has already saturated: the file's LOGISTIC input step
    is at most 16/255 (before: 0.75 here, seeds 0 and 1), and student and file agree on every
    gate value but for one-step flips of its input."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inp = keras.Input((4, 4, 3))
    h = keras.layers.Conv2D(8, 1, kernel_initializer=keras.initializers.GlorotUniform(seed),
                            name="stem")(inp)
    se = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    wide = keras.initializers.RandomNormal(0.0, 40.0, seed)
    se = keras.layers.Conv2D(8, 1, activation="sigmoid", name="gate", kernel_initializer=wide)(se)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Multiply()([h, se]))
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    x = rng.normal(size=(64, 4, 4, 3)).astype("float32")
    q = quantize_model(model, weight_bits=8, activation_bits=8, per_channel=True)
    _fit(q, x, rng.integers(0, 10, size=64), steps=4)
    path = str(tmp_path / "gate.tflite")
    export.export_tflite(q, path, x, mode="int8")
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path)
    details = {d["index"]: d for d in it.get_tensor_details()}
    logistic = [o for o in it._get_ops_details() if o["op_name"] == "LOGISTIC"]  # noqa: SLF001
    assert len(logistic) == 1, [o["op_name"] for o in it._get_ops_details()]  # noqa: SLF001
    gate_in = details[logistic[0]["inputs"][0]]
    # The data really is wide: the student's EMA range (not the clipped one) spans tens.
    pre = q.get_layer("quant_gate").quantize_config.pre_activation_quantizer
    weights = {v.name.split("/")[-1].split(":")[0]: v for v in q.get_layer("quant_gate").weights}
    span = float(weights["pre_activation_max"].numpy() - weights["pre_activation_min"].numpy())
    assert span > 40.0, span
    assert gate_in["quantization"][0] <= 16.0 / 255.0 * (1 + 1e-6), gate_in["quantization"]
    assert pre.get_config()["limits"] == [-8.0, 8.0]  # in its config: a saved student keeps it
    gate = keras.Model(q.inputs, q.get_layer("quant_gate").output)
    steps = file_tensor_steps(path, gate, x[:16],
                               lambda op, name: op["op_name"] == "LOGISTIC")
    assert steps.max() <= 4.01, steps.max()  # a flip of the input: 0.063 * 256 / 4 steps at most
    assert np.mean(steps < 0.01) >= 0.99, np.mean(steps < 0.01)


def test_packed_weights_restore_a_normalization_layer(tmp_path):
    """load_packed_weights into a model whose Normalization had other statistics: the layer's
    derived mean/variance tensors are recomputed (before, it kept using the old ones: a zeroed
    EfficientNet gave outputs of 1e11 after the restore)."""
    inp = keras.Input((4, 4, 3))
    norm = keras.layers.Normalization(axis=-1)
    h = keras.layers.Conv2D(4, 1, kernel_initializer=keras.initializers.GlorotUniform(seed=0))(
        norm(inp))
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h)))
    norm.set_weights([np.array([100.0, 50.0, 10.0]), np.array([400.0, 100.0, 4.0]), np.array(1)])
    norm.finalize_state()
    q = quantize_model(model, weight_bits=4)
    x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    archive = str(tmp_path / "n.tfqkdpw")
    export.pack_weights(q, archive)
    want = export.forward_model(q)(x).numpy()
    blank = export.forward_model(q)
    blank(x)  # built and run with the statistics it has now
    blank.set_weights([np.ones_like(w) for w in blank.get_weights()])
    blank(x)
    restored = export.load_packed_weights(blank, archive)
    np.testing.assert_array_equal(restored(x).numpy(), want)
