"""Space-to-depth rewrite of narrow int8 convolutions: exact in integers, smaller tile waste."""

import numpy as np
import pytest

import tfqkd
from tfqkd import _flatbuffer, export, tflite_layout
from tfqkd._keras import keras
from tfqkd.quantize import quantize_model


def _conv3x3_same(x, w):
    """Integer reference: x (H, W, I), w (O, 3, 3, I) -> (H, W, O), zero padding."""
    h, wd, _ = x.shape
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((h, wd, w.shape[0]), np.int64)
    for ky in range(3):
        for kx in range(3):
            out += np.einsum("hwi,oi->hwo", xp[ky:ky + h, kx:kx + wd], w[:, ky, kx, :])
    return out


def _space_to_depth(x, b=2):
    h, w, c = x.shape
    return x.reshape(h // b, b, w // b, b, c).transpose(0, 2, 1, 3, 4).reshape(
        h // b, w // b, b * b * c)


def _depth_to_space(x, b=2):
    h, w, c = x.shape
    return x.reshape(h, w, b, b, c // (b * b)).transpose(0, 2, 1, 3, 4).reshape(
        h * b, w * b, c // (b * b))


def test_block_kernel_reproduces_the_convolution_exactly():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(6, 8, 3)).astype(np.int64)
    w = rng.integers(-127, 128, size=(5, 3, 3, 3)).astype(np.int64)
    direct = _conv3x3_same(x, w)
    block = tflite_layout._block_kernel(w)  # noqa: SLF001
    assert block.shape == (20, 3, 3, 12)
    # Every original weight appears once per output sub-position, the rest are zeros.
    assert np.count_nonzero(block) == 4 * np.count_nonzero(w)
    via_blocks = _depth_to_space(_conv3x3_same(_space_to_depth(x), block))
    np.testing.assert_array_equal(via_blocks, direct)


@pytest.fixture(scope="module")
def w2a8_tiny():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=128).astype("int32")
    q = quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2, activation_bits=8,
                       first_last_bits=8)
    q.compile(keras.optimizers.Adam(1e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return q, x, y


def _run(path, x):
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outs = []
    for xi in x:
        it.set_tensor(inp["index"], xi[None])
        it.invoke()
        outs.append(it.get_tensor(out["index"]).copy())
    return np.concatenate(outs)


def _op_names(path):
    model_obj = _flatbuffer.read(open(path, "rb").read())
    names = _flatbuffer.op_names(model_obj)
    return [names[op.opcodeIndex] for op in model_obj.subgraphs[0].operators]


def test_space_to_depth_export_is_bit_identical(w2a8_tiny, tmp_path):
    q, x, y = w2a8_tiny
    compact, wide = tmp_path / "compact.tflite", tmp_path / "s2d.tflite"
    a = export.export_tflite(q, compact, x[:64], mode="int8")
    b = export.export_tflite(q, wide, x[:64], mode="int8", space_to_depth=True)
    # tiny_resnet: the stem, stage 1's two convs (8 channels, 8x8) and stage 2's stride-1 conv
    # (16 channels, 4x4) are rewritten; the stride-2 conv, the 1x1 shortcut and the dense not.
    assert a["space_to_depth_convs"] == 0 and b["space_to_depth_convs"] == 4
    ops = _op_names(wide)
    assert ops.count("SPACE_TO_DEPTH") == ops.count("DEPTH_TO_SPACE") == 4
    assert ops.count("CONV_2D") == _op_names(compact).count("CONV_2D")
    np.testing.assert_array_equal(_run(wide, x), _run(compact, x))
    # Ternary channels stay ternary (zeros added), and a batched run (resized input) agrees too.
    report = export.verify_tflite(wide, q, (x, y))
    ternary = [entry for entry in report.layers if entry["layer"] not in ("stem_conv", "classifier")]
    assert ternary and all(entry["max_levels_per_channel"] <= 3 for entry in ternary)
    assert report.top1_agreement == export.verify_tflite(compact, q, (x, y)).top1_agreement
    assert b["bytes"] > a["bytes"]


def test_space_to_depth_needs_int8(w2a8_tiny, tmp_path):
    q, x, _ = w2a8_tiny
    with pytest.raises(ValueError, match="mode='int8'"):
        export.export_tflite(q, tmp_path / "f.tflite", mode="float", space_to_depth=True)
    assert not (tmp_path / "f.tflite").exists()
    with pytest.raises(ValueError, match="max_out_channels"):
        tflite_layout.space_to_depth_convs(b"", max_out_channels=0)


def test_float_file_is_left_alone(w2a8_tiny, tmp_path):
    q, _, _ = w2a8_tiny
    path = tmp_path / "f.tflite"
    export.export_tflite(q, path, mode="float")
    content = open(path, "rb").read()
    assert tflite_layout.space_to_depth_convs(content) == (content, 0)


def test_shared_buffers_are_copied_not_changed(w2a8_tiny, tmp_path):
    """A kernel buffer another tensor also reads gets a private copy: the other stays as it was."""
    q, x, _ = w2a8_tiny
    path = tmp_path / "m.tflite"
    export.export_tflite(q, path, x[:64], mode="int8")
    model_obj = _flatbuffer.read(open(path, "rb").read())
    sg = model_obj.subgraphs[0]
    names = _flatbuffer.op_names(model_obj)
    convs = [op for op in sg.operators if names[op.opcodeIndex] == "CONV_2D"
             and tuple(sg.tensors[op.inputs[1]].shape) == (8, 3, 3, 8)]
    assert len(convs) == 2  # stage 1's two 8 -> 8 convolutions
    first, second = (sg.tensors[op.inputs[1]] for op in convs)
    second.buffer = first.buffer  # both now read the first kernel
    shared = tmp_path / "shared.tflite"
    shared.write_bytes(_flatbuffer.write(model_obj))
    content, rewritten = tflite_layout.space_to_depth_convs(shared.read_bytes())
    assert rewritten == 4  # the stem, the two sharing a kernel, and stage 2's conv
    wide = tmp_path / "wide.tflite"
    wide.write_bytes(content)
    np.testing.assert_array_equal(_run(wide, x[:16]), _run(shared, x[:16]))


def test_shared_zero_biases_of_an_untrained_model(tmp_path):
    """An untrained float model's convolutions all have zero biases, which the converter stores
    in one buffer; narrow ones are rewritten, the 16-channel ones keep reading the original."""
    m = tfqkd.models.tiny_resnet(seed=0)
    x = np.random.default_rng(0).normal(size=(16,) + m.input_shape[1:]).astype("float32")
    path = tmp_path / "m.tflite"
    export.export_tflite(m, path, x, mode="int8")
    model_obj = _flatbuffer.read(path.read_bytes())
    sg = model_obj.subgraphs[0]
    names = _flatbuffer.op_names(model_obj)
    biases = [sg.tensors[op.inputs[2]].buffer for op in sg.operators
              if names[op.opcodeIndex] == "CONV_2D"]
    assert len(biases) > len(set(biases))  # the case under test: shared bias buffers
    content, rewritten = tflite_layout.space_to_depth_convs(path.read_bytes(), max_out_channels=8)
    assert rewritten == 3  # stem and stage 1's two convolutions; not the 16-channel ones
    wide = tmp_path / "wide.tflite"
    wide.write_bytes(content)
    np.testing.assert_array_equal(_run(wide, x), _run(path, x))
