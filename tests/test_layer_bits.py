"""Per-layer bit-widths (mixed precision): quantize_model -> fit -> save/load -> int8 / int4
export -> packed archive, each layer at its own width for kernels and ReLU outputs."""

import os

import numpy as np
import pytest

import tfqkd
from conftest import centred_rms_ratio
from tfqkd import export, keras
from tfqkd.export.packed import _read_archive
from tfqkd.quantize import quantization_info, quantize_model, quantized_weights

#: tiny_resnet's kernels: stem_conv and classifier are first/last (8 bits by default).
KERNEL_BITS = {"stage1_block1_conv1": 4, "stage2_block1_conv2": 8, "classifier": 2}
RELU_BITS = {"stem_relu": 4, "stage1_block1_relu1": 2}


def _most_values_per_channel(kernel):
    """The largest number of distinct values in one output channel (last axis) of a kernel."""
    flat = np.asarray(kernel).reshape(-1, kernel.shape[-1])
    return max(len(np.unique(flat[:, c])) for c in range(flat.shape[1]))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(96, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, 96)
    q = quantize_model(tfqkd.models.tiny_resnet(seed=3), weight_bits=2, activation_bits=8,
                       per_channel=True, layer_bits=KERNEL_BITS, layer_activation_bits=RELU_BITS)
    q.compile(keras.optimizers.SGD(0.01),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = os.path.join(tmp_path_factory.mktemp("mixed"), "q.h5")
    q.save(path)
    with tfqkd.quantize_scope():
        loaded = keras.models.load_model(path, compile=False)
    return q, loaded, x, tmp_path_factory.mktemp("files")


def test_each_kernel_and_relu_at_its_own_width_through_save_load(mixed):
    q, loaded, x, _ = mixed
    want = {"stem_conv": 8, "stage1_block1_conv2": 2, "stage2_block1_conv1": 2,
            "stage2_block1_proj_conv": 2, **KERNEL_BITS}
    for model in (q, loaded):
        info = quantization_info(model)
        assert {name: info[name]["bits"] for name in want} == want
        kernels = quantized_weights(model)
        for name, bits in want.items():
            # Symmetric b-bit: at most 2^b - 1 values per channel (3 = ternary at 2 bits).
            assert _most_values_per_channel(kernels[name]) <= 2 ** bits - 1, name
        assert _most_values_per_channel(kernels["stage1_block1_conv1"]) > 3  # 4-bit, not ternary
    np.testing.assert_allclose(loaded(x[:8], training=False), q(x[:8], training=False),
                               rtol=1e-5, atol=1e-5)
    for model in (q, loaded):
        for name in ("stem_relu", "stage1_block1_relu1", "stage1_block1_relu2"):
            out = keras.Model(model.inputs, model.get_layer("quant_" + name).output)(x[:8])
            distinct = len(np.unique(out.numpy()))
            if name in RELU_BITS:
                assert distinct <= 2 ** RELU_BITS[name], (name, distinct)
            else:
                assert distinct > 16, (name, distinct)  # 8-bit: finer than 4-bit


def test_int4_file_and_packed_archive_store_each_kernel_at_its_width(mixed):
    q, _, x, tmp = mixed
    path = os.path.join(tmp, "mixed_int4.tflite")
    info = export.export_tflite(q, path, x[:32], mode="int4")
    entries = {e["layer"]: e for e in export.tflite_weight_levels(
        path, [layer.name for layer in export.forward_model(q).layers])}
    for name, bits in {"stem_conv": 8, "stage1_block1_conv2": 2, **KERNEL_BITS}.items():
        assert info["weight_bits"][name] == (4 if bits <= 4 else 8), name
        assert entries[name]["dtype"] == ("int4" if bits <= 4 else "int8"), name
        assert entries[name]["max_levels_per_channel"] <= 2 ** bits - 1, name
    assert entries["stage1_block1_conv1"]["max_levels_per_channel"] > 3
    archive = os.path.join(tmp, "mixed.tfqkdpw")
    export.pack_weights(q, archive)
    header, _, _ = _read_archive(archive)
    kernels = {e["layer"]: e for e in header["tensors"] if e["name"].endswith("kernel")}
    assert kernels["classifier"]["encoding"] == "ternary"
    assert kernels["stage1_block1_conv1"]["encoding"] == "int"
    assert 3 <= kernels["stage1_block1_conv1"]["bits"] <= 4
    assert kernels["stage2_block1_conv2"]["bits"] > 4


def test_int8_file_rounds_each_relu_on_its_own_grid_and_equals_the_student(mixed):
    from ai_edge_litert.interpreter import Interpreter

    q, _, x, tmp = mixed
    path = os.path.join(tmp, "mixed_int8.tflite")
    export.export_tflite(q, path, x[:32], mode="int8", align_student=True)
    it = Interpreter(model_path=path)
    it.allocate_tensors()
    scales = {d["name"].split("/")[-2][:-len("_fq")]: d["quantization"]
              for d in it.get_tensor_details() if d["name"].endswith("_fq/Minimum")}
    assert sorted(scales) == sorted(RELU_BITS)  # 8-bit ReLUs need no clamp of their own
    for name, bits in RELU_BITS.items():
        layer = q.get_layer("quant_" + name)
        clip = float(layer._output_quantizers[0].clip_of(layer._output_quantizer_vars))  # noqa
        assert scales[name][0] == pytest.approx(clip / (2 ** bits - 1), rel=1e-6)
        assert scales[name][1] == -128
    report = export.verify_tflite(path, q, (x[32:], np.zeros(64, "int32")))
    ref = q(x[32:], training=False).numpy()
    unrelated = centred_rms_ratio(ref[::-1], ref)
    # Measured, seeds 1-4: relative error 0.005-0.008 against unrelated 0.31-0.57.
    assert report.relative_output_error <= 0.1 * unrelated, (report.relative_output_error,
                                                             unrelated)


def test_bad_per_layer_bits_name_the_problem():
    model = tfqkd.models.tiny_resnet(seed=0)
    with pytest.raises(ValueError, match="'nope'.*stem_conv"):
        quantize_model(model, layer_bits={"nope": 4})
    with pytest.raises(ValueError, match="stem_conv"):
        quantize_model(model, activation_bits=8, layer_activation_bits={"stem_conv": 4})
    with pytest.raises(ValueError, match="needs activation_bits"):
        quantize_model(model, layer_activation_bits={"stem_relu": 4})
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, layer_bits={"stem_conv": 9})
    with pytest.raises(ValueError, match="mapping"):
        quantize_model(model, layer_bits=4)


def test_callable_and_first_last_float_override():
    model = tfqkd.models.tiny_resnet(seed=0)
    q = quantize_model(model, weight_bits=2, first_last_bits="float",
                       layer_bits=lambda layer: 4 if layer.name == "classifier" else None)
    info = quantization_info(q)
    assert info["classifier"]["bits"] == 4  # named: quantized although first/last are float
    assert "stem_conv" not in info  # still float
    assert info["stage1_block1_conv1"]["bits"] == 2
