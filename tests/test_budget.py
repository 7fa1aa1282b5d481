"""Size budgets: kernel bytes at per-layer widths, against hand arithmetic and the real files."""

import os

import numpy as np
import pytest

import tfqkd
from tfqkd import export
from tfqkd.budget import kernel_bytes, layer_widths, tensor_bytes
from tfqkd.export.packed import _read_archive
from tfqkd.quantize import quantize_model

#: tiny_resnet's kernels: weights and output channels.
SHAPES = {"stem_conv": (3 * 3 * 1 * 8, 8), "stage1_block1_conv1": (3 * 3 * 8 * 8, 8),
          "stage1_block1_conv2": (3 * 3 * 8 * 8, 8), "stage2_block1_conv1": (3 * 3 * 8 * 16, 16),
          "stage2_block1_conv2": (3 * 3 * 16 * 16, 16),
          "stage2_block1_proj_conv": (1 * 1 * 8 * 16, 16), "classifier": (16 * 10, 10)}


def test_hand_computed_sizes_of_tiny_resnet_w2():
    model = tfqkd.models.tiny_resnet(seed=0)
    widths = layer_widths(model, weight_bits=2)
    assert widths == {name: 8 if name in ("stem_conv", "classifier") else 2 for name in SHAPES}
    # int8: one byte per weight.
    assert kernel_bytes(model, widths, "int8") == 72 + 576 + 576 + 1152 + 2304 + 128 + 160
    # int4: 8-bit stem and classifier as int8 (72 + 160), the ternary kernels two per byte.
    assert kernel_bytes(model, widths, "int4") == 72 + 160 + (576 + 576 + 1152 + 2304 + 128) // 2
    # packed, per channel: ternary 5 per byte rounded up, 8-bit 1 byte, + 4 bytes per channel.
    assert kernel_bytes(model, widths, "packed", per_channel=True) == (
        (72 + 32) + (116 + 32) * 2 + (231 + 64) + (461 + 64) + (26 + 64) + (160 + 40))
    # Mixed: a 4-bit classifier is 80 bytes in int4, 80 packed (+ 10 steps).
    mixed = layer_widths(model, weight_bits=2, layer_bits={"classifier": 4})
    assert kernel_bytes(model, mixed, "int4") == kernel_bytes(model, widths, "int4") - 80
    assert tensor_bytes(160, 4, "packed", num_steps=10) == 80 + 40
    assert tensor_bytes(7, 1, "packed") == 1 + 4
    assert tensor_bytes(1001, 3, "packed") == 376 + 4


def test_bad_storage_and_missing_widths_are_named():
    model = tfqkd.models.tiny_resnet(seed=0)
    with pytest.raises(ValueError, match="storage 'int3'"):
        tensor_bytes(10, 2, "int3")
    with pytest.raises(ValueError, match="stem_conv"):
        kernel_bytes(model, {}, "int8")


@pytest.mark.parametrize("seed", [0, 1])
def test_files_differ_by_exactly_the_kernel_bytes(seed, tmp_path):
    """The bytes a width choice changes are the kernel bytes: the rest of the file is the same
    for every choice (measured: the same 5,912 bytes, or 4 less from flatbuffer alignment)."""
    model = tfqkd.models.tiny_resnet(seed=seed)
    x = np.random.default_rng(seed).normal(size=(64, 8, 8, 1)).astype("float32")
    rest = []
    for layer_bits in (None, {"stage2_block1_conv2": 8, "stage1_block1_conv1": 4},
                       {"classifier": 4, "stage2_block1_conv1": 8}):
        q = quantize_model(model, weight_bits=2, activation_bits=8, per_channel=True,
                           layer_bits=layer_bits)
        q(x, training=True)
        widths = layer_widths(model, 2, layer_bits=layer_bits)
        path = os.path.join(tmp_path, "m.tflite")
        info = export.export_tflite(q, path, x, mode="int4")
        rest.append(info["bytes"] - kernel_bytes(model, widths, "int4"))
        archive = os.path.join(tmp_path, "m.tfqkdpw")
        export.pack_weights(q, archive)
        header, _, _ = _read_archive(archive)
        packed = sum(e["nbytes"] + e["step_nbytes"] for e in header["tensors"]
                     if e["name"].endswith("kernel"))
        # An upper bound (a kernel whose levels stop short of its width packs narrower);
        # measured equal here, where every kernel reaches its largest level.
        assert packed <= kernel_bytes(model, widths, "packed", per_channel=True)
        assert packed >= kernel_bytes(model, widths, "packed", per_channel=True) - 16
    assert max(rest) - min(rest) <= 16, rest
    assert rest[0] > 0
