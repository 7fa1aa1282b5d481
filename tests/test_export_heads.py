"""Softmax heads in integer files: 16-bit (int16 logits and probabilities) or the int8 head.

The references are NumPy's, from the file's own tensors read back from the interpreter: the
logits from the head kernel's int8 input and weights, the probabilities from the logits.
"""

import numpy as np
import pytest

from tfqkd import export
from tfqkd._flatbuffer import op_names, read, write
from tfqkd._keras import keras
from tfqkd.quantize import quantize_model
from tfqkd.quantize_configs import SOFTMAX_HEAD_RANGES


def _softmax_net(kind: str, seed: int) -> keras.Model:
    """A 10-class head: a Dense with a fused softmax (most Applications models) or a Dense and an
    ``Activation("softmax")`` (MobileNet, MobileNetV3). Small logits (a few units wide), as in a
    briefly trained student: top classes often less than 1/256 apart."""
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(inp)
    init = keras.initializers.RandomNormal(stddev=0.2, seed=seed + 1)
    if kind == "dense":
        out = keras.layers.Dense(10, activation="softmax", kernel_initializer=init,
                                 name="head")(h)
    else:
        z = keras.layers.Dense(10, kernel_initializer=init, name="logits")(h)
        out = keras.layers.Activation("softmax", name="head")(z)
    return keras.Model(inp, out)


def _student(kind, seed, **kwargs):
    q = quantize_model(_softmax_net(kind, seed), weight_bits=8, activation_bits=8, **kwargs)
    x = np.random.default_rng(seed).normal(size=(1000, 8)).astype("float32")
    q(x[:256], training=True)  # the range quantizers see data
    return q, x


def _head_tensors(path, x, kernel_reference=False):
    """(SOFTMAX input as float, its output as float, output tensor type, scale, zero point);
    with ``kernel_reference`` also (the logits in float64 from the head kernel's int8 input,
    weights and bias, the kernel's input and output tensor types, its output step)."""
    from ai_edge_litert.interpreter import Interpreter

    model_obj = read(open(path, "rb").read())
    names = op_names(model_obj)
    sg = model_obj.subgraphs[0]
    softmax = next(op for op in sg.operators if names[op.opcodeIndex] == "SOFTMAX")
    it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], x.shape)
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()

    def read_float(index):
        q = sg.tensors[index].quantization
        return (it.get_tensor(index).astype(np.float64) - q.zeroPoint[0]) * q.scale[0]

    out = sg.tensors[softmax.outputs[0]]
    found = (read_float(softmax.inputs[0]), read_float(softmax.outputs[0]), out.type,
             float(out.quantization.scale[0]), int(out.quantization.zeroPoint[0]))
    if not kernel_reference:
        return found
    kernel = next(op for op in sg.operators if names[op.opcodeIndex] == "FULLY_CONNECTED"
                  and int(op.outputs[0]) == int(softmax.inputs[0]))
    x_in, w, b = (int(i) for i in kernel.inputs[:3])
    source = next(op for op in sg.operators if int(op.outputs[0]) == x_in)
    features = read_float(int(source.inputs[0])) if names[source.opcodeIndex] == "QUANTIZE" \
        else read_float(x_in)  # the int8 features before the int16 re-expression
    w_t = sg.tensors[w]
    weights = it.get_tensor(w).astype(np.float64) * np.asarray(w_t.quantization.scale)[:, None]
    bias = 0.0 if b < 0 else \
        it.get_tensor(b).astype(np.float64) * np.asarray(sg.tensors[b].quantization.scale)
    return found + (features @ weights.T + bias, sg.tensors[x_in].type,
                    sg.tensors[int(kernel.outputs[0])].type,
                    float(sg.tensors[int(kernel.outputs[0])].quantization.scale[0]))


def _ties(p):
    top = np.sort(p, -1)
    return top[:, -1] == top[:, -2]


def _unique_top_logit(logits):
    return (logits == logits.max(-1, keepdims=True)).sum(-1) == 1


@pytest.mark.parametrize("kind", ["dense", "activation"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_softmax_head_is_16_bit_in_the_file_and_in_the_student(kind, seed, tmp_path):
    q, x = _student(kind, seed)
    head = q.get_layer("quant_head")._output_quantizers[0]
    assert (head.bits, head.min, head.max) == (16, -1.0, 32767 / 32768)
    logits_layer = q.get_layer("quant_head" if kind == "dense" else "quant_logits")
    logits_q = (logits_layer._quantize_activations[0].quantizer if kind == "dense"
                else logits_layer._output_quantizers[0])
    assert type(logits_q).__name__ == "RangeQuantizer" and logits_q.bits == 16
    path = tmp_path / "head16.tflite"
    info = export.export_tflite(q, path, x[:256], mode="int8", align_student=True)
    assert info["softmax_head_bits"] == 16 and info["aligned_ranges"]["unaligned"] == []
    logits, probs, dtype, scale, zero, reference, x_type, z_type, step = _head_tensors(
        path, x, kernel_reference=True)
    assert (dtype, scale, zero) == (7, 1 / 32768, 0)  # int16 probabilities
    assert (x_type, z_type) == (7, 7)  # the kernel reads and writes int16
    # The int16 logits: the exact float64 logits of the file's int8 features, rounded on the
    # grid and clipped to its range (the student's, from its first 256 images).
    reference = np.clip(reference, -32768 * step, 32767 * step)
    assert np.abs(logits - reference).max() <= 0.5 * step * (1 + 1e-3)
    assert step < (reference.max() - reference.min()) / 20000  # a 16-bit grid, not int8's 255
    # The file's probabilities: softmax of its logits, to within LiteRT's table error.
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    assert np.abs(probs - soft).max() < 32 / 32768
    # The file's top two probabilities tie only where the exact logits (clipped to the range)
    # are within one int16 step (seeds 0-4: 0-1 of 1,000 such pairs: equal dot products, both
    # clipped at the top, or 0.8 steps apart).
    exact_top = np.sort(reference, -1)
    assert np.all((exact_top[:, -1] - exact_top[:, -2] < step)[_ties(probs)])
    report = export.verify_tflite(path, q, (x, np.zeros(len(x), "int32")))
    assert report.top1_agreement == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_an_int8_head_ties_where_the_int16_head_does_not(seed, tmp_path):
    """``softmax_head_bits=8``: the converter's int8 output on the 1/256 grid, student alike. On
    large near-tied logits that grid ties top classes whose int8 logits differ."""
    q8, x = _student("dense", seed, softmax_head_bits=8)
    head = q8.get_layer("quant_head")._output_quantizers[0]
    assert (head.bits, head.min, head.max) == (8,) + SOFTMAX_HEAD_RANGES[8]
    path8 = tmp_path / "head8.tflite"
    assert export.export_tflite(q8, path8, x[:256], mode="int8")["softmax_head_bits"] == 8
    logits, probs, dtype, scale, zero = _head_tensors(path8, x)
    assert (dtype, scale, zero) == (9, 1 / 256, -128)  # int8
    grid_ties = _ties(probs) & _unique_top_logit(logits)
    print("ties on the int8 grid with one top logit:", int(grid_ties.sum()))
    assert grid_ties.sum() >= 5  # measured 17-47 of 1,000 (seeds 0-3)
    # The same student's file at 16 bits separates them.
    path16 = tmp_path / "head16.tflite"
    export.export_tflite(q8, path16, x[:256], mode="int8", softmax_head_bits=16)
    _, probs16, dtype16, _, _ = _head_tensors(path16, x)
    assert dtype16 == 7 and not _ties(probs16)[grid_ties].any()
    report = export.verify_tflite(path8, q8, (x, np.zeros(len(x), "int32")))
    assert report.top1_agreement == 1.0


def test_int8_io_keeps_an_int16_head_and_a_saved_student_keeps_its_width(tmp_path):
    from tfqkd import quantize_scope

    q, x = _student("activation", 0)
    saved = tmp_path / "student.h5"
    q.save(saved)
    with quantize_scope():
        loaded = keras.models.load_model(saved, compile=False)
    assert loaded.get_layer("quant_head")._output_quantizers[0].bits == 16
    np.testing.assert_array_equal(loaded(x).numpy(), q(x).numpy())
    path = tmp_path / "io.tflite"
    export.export_tflite(loaded, path, x[:256], mode="int8", int8_io=True)
    from ai_edge_litert.interpreter import Interpreter

    out = Interpreter(model_path=str(path)).get_output_details()[0]
    assert out["dtype"] == np.int16 and out["quantization"] == (1 / 32768, 0)
    assert export.verify_tflite(path, loaded, (x, np.zeros(len(x), "int32"))).top1_agreement == 1.0


def test_bad_softmax_head_bits_are_named_and_leave_no_file(tmp_path):
    with pytest.raises(ValueError, match="softmax_head_bits must be 8 .* or 16"):
        quantize_model(_softmax_net("dense", 0), weight_bits=8, activation_bits=8,
                       softmax_head_bits=12)
    q, x = _student("dense", 0)
    path = tmp_path / "bad.tflite"
    with pytest.raises(ValueError, match="softmax_head_bits must be None .* 8 .* or 16"):
        export.export_tflite(q, path, x[:64], mode="int8", softmax_head_bits=4)
    assert list(tmp_path.iterdir()) == []


def test_a_wide_head_stays_int8_by_default_and_16_bit_on_request(tmp_path):
    """The 16x8 head does not run on XNNPACK: by default only logits kernels of up to
    SIXTEEN_BIT_HEAD_MAX_WEIGHTS weights get it (a 200 x 700 = 140,000-weight head does not)."""
    from tfqkd.quantize_configs import SIXTEEN_BIT_HEAD_MAX_WEIGHTS, default_head_bits

    assert default_head_bits(200 * 700) == 8
    assert default_head_bits(SIXTEEN_BIT_HEAD_MAX_WEIGHTS) == 16
    inp = keras.Input((8,))
    h = keras.layers.Dense(200, activation="relu")(inp)
    wide = keras.Model(inp, keras.layers.Dense(700, activation="softmax", name="head")(h))
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    for requested, expected in ((None, 8), (16, 16)):
        q = quantize_model(wide, weight_bits=8, activation_bits=8, softmax_head_bits=requested)
        q(x, training=True)
        assert q.get_layer("quant_head")._output_quantizers[0].bits == expected
        info = export.export_tflite(q, tmp_path / f"wide_{expected}.tflite", x, mode="int8")
        assert info["softmax_head_bits"] == expected
    # A float model's head takes the default for its size too.
    info = export.export_tflite(wide, tmp_path / "float.tflite", x, mode="int8")
    assert info["softmax_head_bits"] == 8


def test_a_restated_bias_of_a_per_tensor_head_still_loads(tmp_path):
    """The exporter restates an int32 bias per channel where the converter stated it for an input
    it then removed (tfqkd.export.convert._match_bias_scales; EfficientNetB0's head at 32x32).
    The 16x8 kernel reads one bias scale for per-tensor weights and checks it against s_in * s_w
    within 2 % of its fine output step: the 16-bit head must still load. (It did not: "Node 236
    (FULLY_CONNECTED) failed to prepare", check_applications, 2026-12-07.)"""
    from tfqkd.export.heads import _widen_head

    q, x = _student("dense", 0)
    head = q.get_layer("quant_head").layer
    head.bias.assign(np.linspace(-0.5, 0.5, 10).astype("float32"))  # a bias the file keeps
    int8_path = tmp_path / "int8.tflite"
    export.export_tflite(q, int8_path, x[:256], mode="int8", softmax_head_bits=8)
    model_obj = read(int8_path.read_bytes())
    names = op_names(model_obj)
    sg = model_obj.subgraphs[0]
    fc = [op for op in sg.operators if names[op.opcodeIndex] == "FULLY_CONNECTED"][-1]
    weights, bias = sg.tensors[int(fc.inputs[1])], sg.tensors[int(fc.inputs[2])]
    assert len(weights.quantization.scale) == 1  # per-tensor weights
    # As _match_bias_scales states a bias: one scale per channel, the same value.
    channels = int(bias.shape[0])
    bias.quantization.scale = np.full(channels, bias.quantization.scale[0], np.float32)
    bias.quantization.zeroPoint = np.zeros(channels, np.int64)
    content, widened = _widen_head(write(model_obj), None)
    assert widened
    path = tmp_path / "restated.tflite"
    path.write_bytes(content)
    report = export.verify_tflite(path, q, (x, np.zeros(len(x), "int32")))  # loads and runs
    assert report.num_examples == len(x)


def test_a_16_bit_head_the_file_cannot_take_is_named_in_a_warning(tmp_path):
    """A softmax computed by ops other than a Dense / Conv2D (here an Add of two logits) keeps the
    converter's int8 head; the 16-bit student must not pass silently."""
    inp = keras.Input((8,))
    a = keras.layers.Dense(10, name="logits_a")(inp)
    b = keras.layers.Dense(10, name="logits_b")(inp)
    out = keras.layers.Activation("softmax", name="head")(keras.layers.Add()([a, b]))
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    q = quantize_model(keras.Model(inp, out), weight_bits=8, activation_bits=8,
                       softmax_head_bits=16)
    q(x, training=True)
    with pytest.warns(UserWarning, match="softmax head 'head' stays int8"):
        info = export.export_tflite(q, tmp_path / "add.tflite", x, mode="int8")
    assert info["softmax_head_bits"] == 8
