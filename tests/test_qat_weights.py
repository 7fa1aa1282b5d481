"""tfqkd.qat_weights: one reading of a QAT kernel's levels, shared by every exporter path.

The int8 / INT4 files, the packed archive and ``quantization_info`` must hold the integers the
reader states; a path that re-derived levels of its own could disagree (an 8-bit kernel's
smallest used level is often not 1; a per-channel depthwise kernel has one step per input
channel and multiplier).
"""

import subprocess
import sys

import numpy as np
import pytest

import tfqkd
from tfqkd import export
from tfqkd._keras import keras, tf
from tfqkd.export import packed
from tfqkd.qat_weights import integer_levels, kernel_weights, read_layer_weights
from tfqkd.quantize import quantization_info, quantize_model


@pytest.fixture(scope="module")
def mixed():
    """2-bit per-channel convolutions, a 4-bit per-channel stem and classifier, a few steps."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=128).astype("int32")
    q = quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2, activation_bits=8,
                       first_last_bits=4, per_channel=True)
    q.compile(keras.optimizers.Adam(1e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0)
    return q, x


def _archive_levels(path):
    """{layer: integer levels of its kernel} decoded from the archive's own codes."""
    header, payload, _ = packed._read_archive(path)  # noqa: SLF001
    out = {}
    for e in header["tensors"]:
        if e["name"] not in ("kernel", "depthwise_kernel") or e["encoding"] == "raw":
            continue
        n = int(np.prod(e["shape"]))
        data = payload[e["offset"]:e["offset"] + e["nbytes"]]
        if e["encoding"] == "ternary":
            k = packed._unpack_trits(data, n)  # noqa: SLF001
        elif e["encoding"] == "binary":
            k = packed._unpack_bits(data, n, 1).astype(np.int64) * 2 - 1  # noqa: SLF001
        else:
            k = packed._unpack_bits(data, n, e["bits"]).astype(np.int64) - e["kmax"]  # noqa: SLF001
        out[e["layer"]] = k.reshape(e["shape"])
    return out


def _assert_file_holds(ints, k, layer):
    """Per output channel, the file's integers are the reader's levels times one integer."""
    for c in range(k.shape[-1]):
        kc = np.moveaxis(k, -1, 0)[c].ravel().astype(np.int64)
        fc = ints[c].ravel().astype(np.int64)  # TFLite conv weights: output channel first
        kmax, fmax = np.abs(kc).max(), np.abs(fc).max()
        if kmax == 0:
            assert fmax == 0, (layer, c)
            continue
        assert fmax % kmax == 0, (layer, c, kmax, fmax)
        assert np.array_equal(fc, kc * (fmax // kmax)), (layer, c)


def test_reader_states_the_quantizers_levels(mixed):
    q, _ = mixed
    kernels = kernel_weights(q)
    assert {w.bits for w in kernels.values()} == {2, 4}
    assert kernels["stem_conv"].bits == 4 and kernels["stage1_block1_conv1"].bits == 2
    info = quantization_info(q)
    for name, w in kernels.items():
        assert w.stated and w.per_channel
        # Exact: the levels times the step are the forward kernel, bit for bit.
        assert np.array_equal((w.step * w.levels.astype(np.float32)).astype(np.float32), w.value)
        assert np.abs(w.levels).max() <= 2 ** (w.bits - 1) - 1
        assert np.array_equal(info[name]["levels"], w.levels)


@pytest.mark.parametrize("mode,method", [("int8", "fakequant"), ("int8", "ptq"),
                                         ("int4", "fakequant")])
def test_file_archive_and_reader_hold_the_same_levels(mixed, tmp_path, mode, method):
    q, x = mixed
    kernels = kernel_weights(q)
    archive = tmp_path / "w.tfqkdpw"
    export.pack_weights(q, archive)
    stored = _archive_levels(archive)
    path = tmp_path / f"m_{mode}_{method}.tflite"
    export.export_tflite(q, path, x[:64], mode=mode, method=method)
    plain = export.forward_model(q)
    entries = {e["layer"]: e for e in export.tflite_weight_levels(
        path, [layer.name for layer in plain.layers]) if e["layer"]}
    checked = set()
    for name, w in kernels.items():
        assert np.array_equal(stored[name], w.levels), name  # the archive: identical levels
        if not isinstance(plain.get_layer(name), keras.layers.Conv2D):
            continue  # TFLite's fully-connected weights are per tensor: a per-channel Dense
            # kernel is not on one grid there
        _assert_file_holds(entries[name]["values"], w.levels, name)
        checked.add(w.bits)
    assert checked == {2, 4}


def test_per_channel_depthwise_kernels_pack_as_levels(tmp_path):
    inp = keras.Input((6, 6, 3))
    h = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(inp)
    out = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(h))
    q = quantize_model(keras.Model(inp, out), weight_bits=3, first_last_bits=None,
                       per_channel=True)
    layer = next(layer for layer in q.layers
                 if isinstance(getattr(layer, "layer", None), keras.layers.DepthwiseConv2D))
    w = read_layer_weights(layer)["depthwise_kernel"]
    assert w.stated and w.step.shape == (3, 2)  # one step per input channel and multiplier
    export.pack_weights(q, tmp_path / "dw.tfqkdpw")
    assert np.array_equal(_archive_levels(tmp_path / "dw.tfqkdpw")[layer.layer.name], w.levels)
    target = export.forward_model(q)
    export.load_packed_weights(target, tmp_path / "dw.tfqkdpw")
    got = target.get_layer(layer.layer.name).get_weights()[0]
    assert np.array_equal(got, w.value)


def test_integer_levels_of_plain_values():
    k, step, per_channel = integer_levels(np.array([[0.25, -0.5], [0.0, 0.75]], np.float32))
    assert k.tolist() == [[1, -2], [0, 3]] and float(step) == 0.25 and not per_channel
    assert integer_levels(np.array([[0.1], [0.3333]], np.float32)) is None
    assert integer_levels(np.array([[np.nan, 1.0]], np.float32)) is None


def test_quantize_side_does_not_import_the_exporter():
    # The reader sits on the quantize side; the exporter imports it, never the other way round
    # (no import cycle, no function-level imports between the two).
    code = ("import sys, tfqkd.quantize, tfqkd.qat_weights, tfqkd.quantize_configs; "
            "print(sorted(m for m in sys.modules if m.startswith('tfqkd.export')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
