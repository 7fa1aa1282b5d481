"""Keras Applications families through the whole tfqkd path, at 32x32 and the smallest widths.

quantize_model -> Distiller.fit (a few KD steps on CIFAR-10 images) -> save, load under
quantize_scope -> export_tflite int8 / int4 + pack_weights / load_packed_weights -> verify_tflite.
Every model is built with ``weights=None`` straight from ``tfqkd.keras.applications``.

These are the slowest tests of the suite (every family converts twice); they carry the
``applications`` marker so CI can run them as a step of their own:
``python -m pytest -m applications tests`` (and ``-m "not applications"`` for the rest).
"""

import os
import warnings

import numpy as np
import pytest

import tfqkd
from conftest import centred_rms_ratio, file_tensor_steps
from tfqkd import export, keras
from tfqkd.quantize import quantize_model

pytestmark = pytest.mark.applications

A = keras.applications
#: family -> builder at its smallest width (alpha) where the family has one.
FAMILIES = {
    "mobilenet": lambda **k: A.MobileNet(alpha=0.25, **k),
    "mobilenet_v2": lambda **k: A.MobileNetV2(alpha=0.35, **k),
    "mobilenet_v3_small": lambda **k: A.MobileNetV3Small(alpha=0.75, **k),
    "mobilenet_v3_large": lambda **k: A.MobileNetV3Large(alpha=0.75, **k),
    "efficientnet_b0": lambda **k: A.EfficientNetB0(**k),
    "efficientnet_v2_b0": lambda **k: A.EfficientNetV2B0(**k),
    "resnet50": lambda **k: A.ResNet50(**k),
    "resnet50_v2": lambda **k: A.ResNet50V2(**k),
    "densenet121": lambda **k: A.DenseNet121(**k),
    # NASNetMobile's cells (separable convs split for quantization, cropping, concatenations,
    # two ReLUs on one cell output) with one normal cell per stage instead of four: the full
    # model costs ~15 min per run here. NASNet (the builder NASNetMobile calls with 1056 / 4 /
    # 32) is not exported by tf_keras.
    "nasnet_mobile": lambda **k: keras.src.applications.nasnet.NASNet(
        penultimate_filters=192, num_blocks=1, stem_block_filters=16, skip_reduction=False, **k),
}


def build(family, classifier_activation=None):
    """An Applications model, 32x32, 10 classes; batch norm follows the last batch's statistics.

    With momentum 0 a few training steps give the moving statistics of real activations:
    freshly initialised Applications models (moving variance 1) pass almost nothing through
    their depth (MobileNetV3's logits are ~1e-11), which would make parity checks vacuous.
    """
    model = FAMILIES[family](weights=None, classes=10, input_shape=(32, 32, 3),
                             classifier_activation=classifier_activation)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    return model


@pytest.fixture(scope="module")
def cifar(cifar10_archive):
    """64 CIFAR-10 training images (for KD and calibration) and 64 test images, of every class.

    A seeded shuffle: the archive lists its images class by class, and until 2026-12-06 these
    were 64 airplanes each."""
    train = tfqkd.data.load_dataset("cifar10", "train", data_dir=cifar10_archive, batch_size=64,
                                    subset=640, augment=False, shuffle=True, seed=0,
                                    image_size=32)
    test = tfqkd.data.load_dataset("cifar10", "test", data_dir=cifar10_archive, batch_size=64,
                                   subset=640, augment=False, shuffle=True, seed=0, image_size=32)
    (xt, yt), = train.take(1).as_numpy_iterator()
    (xv, yv), = test.take(1).as_numpy_iterator()
    return xt, yt.astype("int32"), xv, yv.astype("int32")


def _distil(student, teacher, x, y, steps=3, eager=False):
    """A few KD steps; ``eager``: ``run_eagerly=True`` (no graph trace).

    Tracing the KD train step costs more than the steps: measured (2026-12-07, 4 steps of 32
    images) 6.3 s in graph mode against 2.5 s eagerly (MobileNet) up to 43.4 s against 13.1 s
    (DenseNet121); ~190 s of the suite over the ten families. Graph-mode ``fit`` of an
    Applications student is run by ``test_depthwise_bit_widths``' W8A8 case (MobileNetV2) and
    tests/test_recipes.py (a student and teacher by name)."""
    d = tfqkd.Distiller(student, teacher, temperature=2.0, coefficient=0.5)
    d.compile(keras.optimizers.SGD(0.01), run_eagerly=eager)
    d.fit(x, y, batch_size=32, epochs=steps // 2 + 1, verbose=0)
    return student


def _save_load(q, tmp_path):
    path = os.path.join(tmp_path, "student.h5")
    q.save(path)
    with tfqkd.quantize_scope():
        return keras.models.load_model(path, compile=False)


#: (family, mode) -> _check_file bound where 0.75 does not hold. MobileNetV3's INT4 files track the
#: student less closely (written without alignment, the INT4 kernels' double rounding differs by
#: one step here and there, and hard-swish/hard-sigmoid grow those steps): measured seeds 1-10,
#: MobileNetV3Small 0.20-0.59, MobileNetV3Large 0.46-0.82 (CI failed at 0.78 against 0.75); the
#: same models' int8 files 0.16-0.41 and 0.20-0.44 (seeds 1-3 and 1-10 together). A file of
#: another model is near 1, so 0.95 still catches one.
MAX_RATIO = {("mobilenet_v3_small", "int4"): 0.95, ("mobilenet_v3_large", "int4"): 0.95}


def _int4_parity_warnings(caught):
    """The recorded warnings that are export_tflite's INT4-kernel parity warning."""
    return [w for w in caught if "LiteRT's INT4" in str(w.message)]


def _check_file(path, q, xv, yv, max_ratio=0.75):
    """The file's outputs track the student's: its relative output error is at most ``max_ratio``
    of that of an "unrelated" file, the student's own outputs for other images (reversed order).

    Top-1 agreement is reported, not asserted: these models (a few KD steps from random weights)
    have near-tied logits, and the one-step differences between the student's float rounding and
    the file's integer requantization, grown through 50+ layers, flip many of them (CI failed on
    MobileNetV3Large at 0.41 with a bound of 0.5). The relative error does not hinge on ties.
    Measured W2A8 without alignment, seeds 1-3 (2026-12-06), int8 / int4, as a fraction of the
    unrelated error: MobileNet 0.13-0.20 / 0.27-0.35, MobileNetV2 0.29-0.35 / 0.41-0.57,
    MobileNetV3Small 0.20-0.24 / 0.27-0.45 and MobileNetV3Large 0.27-0.33 / 0.49-0.74 (earlier,
    over seeds 1-10, up to 0.41 / 0.59 and 0.44 / 0.82: see MAX_RATIO), ResNet50 0.40-0.43 /
    0.42-0.52, ResNet50V2 0.44-0.51 / 0.48-0.53, DenseNet121 0.29-0.35 / 0.30-0.35, NASNet (one
    cell per stage, seeds 0-3, 2026-12-06) 0.18-0.23 / 0.18-0.23; a file of another model is
    near 1. On an Intel Xeon with AVX-512 (other float32 rounding, other students; 2026-12-07,
    seeds 1-2, every family): at most 0.46 where the bound is 0.75 (ResNet50V2 int4) and 0.65
    where it is 0.95 (MobileNetV3Large int4).
    """
    report = export.verify_tflite(path, q, (xv, yv))
    assert report.num_examples == len(yv)
    ref = q(xv, training=False).numpy()
    unrelated = centred_rms_ratio(ref[::-1], ref)
    assert report.relative_output_error <= max_ratio * unrelated, (
        f"relative output error {report.relative_output_error:.3f}, unrelated {unrelated:.3f}, "
        f"top-1 agreement {report.top1_agreement:.3f}")
    return report


def _check_stem(path, q, xv):
    """EfficientNet*: the file's stem swish output (after the preprocessing layers, the padded
    stride-2 conv and its folded batch norm) equals the student's but for a few values, the
    file written with ``align_student=True``. Measured over seeds 1-6, int8 and int4, both
    families (24 files): at most 5 of the 65,536 values differ, by at most 2 steps (one value);
    without alignment up to 33 differ and one unseeded CI run measured 3 steps.

    At the logits, relative output error as a fraction of the unrelated error (_check_file),
    seeds 1-3, measured 2026-12-06: int8 (aligned) EfficientNetB0 0.10-0.25, EfficientNetV2B0
    0.17-0.34, bounded at 0.75 by the caller; int4 0.52-0.64 and 0.71-0.96 before align_student
    gave the student the INT4 kernels' double rounding, 0.05-0.13 and 0.10-0.31 after (seeds
    1-3, 2026-12-07), bounded at 0.75 since.
    """
    student = keras.Model(q.inputs, q.get_layer("quant_stem_activation").output)
    steps = file_tensor_steps(path, student, xv[:8],
                              lambda op, name: op["op_name"] == "MUL" and "stem_activation" in name)
    assert np.mean(steps < 0.01) >= 0.9995, np.mean(steps < 0.01)
    assert steps.max() <= 3.01, steps.max()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_w2a8_whole_path(family, cifar, tmp_path):
    xt, yt, xv, yv = cifar
    # Seeded so that a failure reproduces; the bounds were measured over other seeds (_check_file).
    keras.utils.set_random_seed(0)
    teacher = build(family)
    teacher(xt[:32], training=True)  # batch statistics into the moving averages
    q = quantize_model(teacher, weight_bits=2, activation_bits=8)
    _distil(q, teacher, xt, yt, eager=True)
    q = _save_load(q, tmp_path)
    logits = q(xv, training=False).numpy()
    assert np.isfinite(logits).all() and logits.std() > 0  # not a dead network
    for mode in ("int8", "int4"):
        path = os.path.join(tmp_path, f"{family}_{mode}.tflite")
        # EfficientNet's stem check needs the student's biases on the file's grid (_check_stem);
        # the other families' bounds were measured on files written without alignment.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export.export_tflite(q, path, xt, mode=mode,
                                 align_student=family.startswith("efficientnet"))
        # A8: no INT4 parity warning (it is for students with < 8-bit activations).
        assert not _int4_parity_warnings(caught)
        if family.startswith("efficientnet"):
            _check_stem(path, q, xv)
            # int4 needs the INT4 kernels' double rounding in the student (align_student;
            # docs/export.md, "INT4 kernels: double rounding").
            _check_file(path, q, xv, yv)
        else:
            _check_file(path, q, xv, yv, max_ratio=MAX_RATIO.get((family, mode), 0.75))
    # Packed archive: the forward weights at their bit-width, bit-exact round trip.
    archive = os.path.join(tmp_path, f"{family}.tfqkdpw")
    stats = export.pack_weights(q, archive)
    assert stats["num_weights"] > 0
    plain = export.forward_model(q)
    want = plain(xv[:4]).numpy()
    # Into the same plain model with every weight set to zero (rebuilding a fresh QAT model
    # per family cost ~20 s for DenseNet121, a second forward_model 2-3 s).
    plain.set_weights([np.zeros_like(w) for w in plain.get_weights()])
    assert not np.array_equal(plain(xv[:4]).numpy(), want)
    restored = export.load_packed_weights(plain, archive)
    np.testing.assert_array_equal(restored(xv[:4]).numpy(), want)


@pytest.mark.parametrize("weight_bits,activation_bits,per_channel,mode", [
    (4, 4, True, "int4"),
    (8, 8, True, "int8"),
    (4, 4, False, "int8"),
])
def test_depthwise_bit_widths(weight_bits, activation_bits, per_channel, mode, cifar, tmp_path):
    xt, yt, xv, yv = cifar
    teacher = build("mobilenet_v2")
    teacher(xt[:32], training=True)
    q = quantize_model(teacher, weight_bits=weight_bits, activation_bits=activation_bits,
                       per_channel=per_channel)
    # The W8A8 case keeps graph-mode fit for an Applications student (see _distil).
    _distil(q, teacher, xt, yt, eager=weight_bits < 8)
    path = os.path.join(tmp_path, "mbv2.tflite")
    # A bias rounded to the file's int32 grid moves accumulators (at A4 by up to ~0.3 output
    # steps), so the student takes the file's biases (align_student) to be compared exactly.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = export.export_tflite(q, path, xt, mode=mode, align_student=True)
    # The INT4 parity warning is for files written without alignment
    # (tests/test_export_requant.py).
    assert not _int4_parity_warnings(caught)
    plain = export.forward_model(q)
    entries = export.tflite_weight_levels(path, [layer.name for layer in plain.layers])
    dw = [e for e in entries if e["op"] == "DEPTHWISE_CONV_2D"]
    assert dw and all(e["axis"] == 3 for e in dw)
    expected = "int4" if mode == "int4" and weight_bits <= 4 else "int8"
    # Every depthwise kernel (the first/last layers are 8-bit, never depthwise) is stored at
    # the trained width, with at most 2^bits - 1 levels per channel.
    assert all(e["dtype"] == expected for e in dw), [e["dtype"] for e in dw]
    assert max(e["max_levels_per_channel"] for e in dw) <= 2 ** weight_bits - 1
    assert info["bytes"] > 0
    if activation_bits == 8:
        # The first depthwise layer's output (after the stem, its kernel at the trained width)
        # equals the student's (measured, seeds 1-4: at most 1 step, 100.00 % equal; without
        # align_student up to 3 steps, 99.8 %, which failed a 2-step bound in CI). Logits:
        # relative error 0.01-0.09 of the unrelated error (0.33-0.44 without alignment).
        student = keras.Model(q.inputs, q.get_layer("quant_expanded_conv_depthwise_relu").output)
        steps = file_tensor_steps(path, student, xv[:8],
                                  lambda op, name: op["op_name"] == "DEPTHWISE_CONV_2D")
        assert steps.max() <= 1.01, steps.max()
        assert np.mean(steps < 0.01) >= 0.999, np.mean(steps < 0.01)
        _check_file(path, q, xv, yv, max_ratio=0.25)
        return
    # A4: every ReLU output is an int8 tensor on the student's 4-bit grid, clamped at its clip
    # by a MINIMUM: scale c / 15, zero point -128, at most 16 levels used.
    ranges = {layer.layer.name: float(layer._output_quantizers[0].clip_of(  # noqa: SLF001
        layer._output_quantizer_vars)) for layer in q.layers  # noqa: SLF001
        if getattr(layer, "_output_quantizers", None) and hasattr(
            layer._output_quantizers[0], "clip_of")}  # noqa: SLF001
    assert len(ranges) == 35  # MobileNetV2's 35 ReLU6 outputs
    relus = _relu_outputs(path, xv[:2])
    assert sorted(relus) == sorted(ranges)
    for name, (scale, zero, values) in relus.items():
        assert zero == -128 and scale == pytest.approx(ranges[name] / 15, rel=1e-6), name
        assert values.min() >= -128 and values.max() <= -128 + 15, name
    if mode == "int4":
        # LiteRT runs the INT4 kernels on its built-in kernels, which round twice; align_student
        # gave the student their rounding (tfqkd.export.requant) on every INT4 kernel's output.
        assert info["aligned_requantization"]["layers"] == len(
            [e for e in entries if e["dtype"] == "int4"]), info["aligned_requantization"]
        assert info["aligned_requantization"]["unmatched"] == []
    # A4 with the student's biases aligned (and, int4, its requantization): the file equals
    # the student at the first depthwise output (measured int8: 0 steps, 100 % equal, seeds
    # 1-3, per-tensor and per-channel; int4: 0 steps, seeds 1-4 (2026-12-07), where 3.6-4.1 %
    # of its values were one step off, seeds 1-3, before the requantization was aligned).
    # Deeper tensors were equal too in those six runs (out_relu 100 %; 35-44 % without
    # alignment), but one CI run measured out_relu 12 steps off: a rounding not yet traced, so
    # only the logits' relative error is bounded there (measured 0.00-0.15 of the unrelated
    # error with alignment, 0.88-0.96 without; int4 0.006, seeds 1-4, and 0.84-1.01 before the
    # requantization was aligned).
    student = keras.Model(q.inputs, q.get_layer("quant_expanded_conv_depthwise_relu").output)
    first_depthwise = "/expanded_conv_depthwise_relu_fq/"
    steps = file_tensor_steps(path, student, xv[:8], lambda op, name:
                              op["op_name"] == "MINIMUM" and first_depthwise in name)
    assert steps.max() <= 1.01, steps.max()
    assert np.mean(steps < 0.01) >= 0.999, np.mean(steps < 0.01)
    _check_file(path, q, xv, yv, max_ratio=0.75)
    if mode == "int8":
        _check_builtin_runtime(q, path, xt, xv, yv, tmp_path)


def _check_builtin_runtime(q, path, xt, xv, yv, tmp_path):
    """An int8 file run on LiteRT's built-in kernels (no XNNPACK), which round every kernel's
    output twice: ``runtime="builtin"`` gives the student that rounding at all 53 kernels."""
    before = export.verify_tflite(path, q, (xv, yv), runtime="builtin")
    builtin = os.path.join(tmp_path, "mbv2_builtin.tflite")
    info = export.export_tflite(q, builtin, xt, mode="int8", align_student=True,
                                runtime="builtin")
    assert info["aligned_requantization"] == {"layers": 53, "unmatched": []}
    after = export.verify_tflite(builtin, q, (xv, yv), runtime="builtin")
    # Relative output error on the built-in kernels, W4A4 per tensor, seeds 1-4 (2026-12-07):
    # 0.89-0.96 with the student aligned for XNNPACK (top-1 agreement 0.25-0.34), 0.000-0.033
    # aligned for the built-in kernels (agreement 1.0); per channel, seeds 1-2: 0.80-1.08 and
    # 0.00-0.15.
    assert before.relative_output_error > 0.5, before.relative_output_error
    assert after.relative_output_error < 0.25, after.relative_output_error


def _relu_outputs(path, x):
    """{layer name: (scale, zero point, int8 values over ``x``)} of every MINIMUM output (the
    file's low-bit activations, named ``<layer>_fq/Minimum``)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    details = {d["index"]: d for d in it.get_tensor_details()}
    mins = [details[op["outputs"][0]] for op in it._get_ops_details()  # noqa: SLF001
            if op["op_name"] == "MINIMUM"]
    out = {d["name"].split("/")[-2][:-len("_fq")]: (d["quantization"][0], d["quantization"][1], [])
           for d in mins}
    inp = it.get_input_details()[0]
    for image in x:
        it.set_tensor(inp["index"], image[None])
        it.invoke()
        for d in mins:
            out[d["name"].split("/")[-2][:-len("_fq")]][2].append(it.get_tensor(d["index"]))
    return {k: (s, z, np.concatenate([v.ravel() for v in vs])) for k, (s, z, vs) in out.items()}


def test_softmax_head_exports_integer_softmax(cifar, tmp_path):
    """The Applications default head (softmax) exports as an integer SOFTMAX with int16 output
    (steps of 1/32768: tfqkd's default 16-bit head; tests/test_export_heads.py has both)."""
    from tfqkd._flatbuffer import op_names, read

    xt, yt, xv, yv = cifar
    model = build("mobilenet_v2", classifier_activation="softmax")
    model(xt[:32], training=True)
    q = quantize_model(model, weight_bits=8, activation_bits=8, per_channel=True)
    # Eager: the graph trace cost more than the two steps (see _distil).
    q.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(),
              run_eagerly=True)
    q.fit(xt, yt, batch_size=32, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "softmax.tflite")
    export.export_tflite(q, path, xt, mode="int8")
    model_obj = read(open(path, "rb").read())
    names = op_names(model_obj)
    sg = model_obj.subgraphs[0]
    ops = [names[op.opcodeIndex] for op in sg.operators]
    out = sg.tensors[sg.operators[ops.index("SOFTMAX")].outputs[0]]
    assert out.type == 7 and out.quantization.scale[0] == pytest.approx(1 / 32768)
    assert int(out.quantization.zeroPoint[0]) == 0
    assert ops.count("DEQUANTIZE") <= 1  # only the float output at the end
    report = _check_file(path, q, xv, yv)
    assert report.max_logit_diff < 0.5  # measured 0.20-0.27 (accumulated rounding, see above)


def _bias_offsets(path, student_pre, x, conv_layer):
    """Per output channel of the file's op for Keras layer ``conv_layer``: mean of (student's
    pre-rounding value - the file's exact integer result) over ``x``, in units of the file's
    int32 bias step ``s_in * s_w / s_out``.

    The reference is recomputed here with numpy from the file's own int8 input, int8 kernel
    and int32 bias (a 1x1 conv or a 3x3 depthwise conv, SAME padding), not by tfqkd.
    ``student_pre`` is a Keras model whose output is the student's float value before the
    output is rounded (the batch-norm output, or a conv output feeding its ReLU quantizer).
    """
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    det = {d["index"]: d for d in it.get_tensor_details()}
    ops = [o for o in it._get_ops_details()  # noqa: SLF001 (the op graph)
           if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    # By the kernel's name: Applications name their convolutions, while the ReLU a file op is
    # fused with gets a per-process suffix (re_lu_1, re_lu_34...).
    found = [o for o in ops if f"/{conv_layer}/" in det[o["inputs"][1]]["name"]]
    assert len(found) == 1, (conv_layer, [det[o["inputs"][1]]["name"] for o in ops][:12])
    op = found[0]
    t_in, t_w, t_b = (det[i] for i in op["inputs"])
    t_out = det[op["outputs"][0]]
    inputs = []
    for image in x:
        it.set_tensor(it.get_input_details()[0]["index"], image[None])
        it.invoke()
        inputs.append(it.get_tensor(t_in["index"])[0])
    s_in, z_in = t_in["quantization"]
    s_out, z_out = t_out["quantization"]
    s_w = t_w["quantization_parameters"]["scales"].astype(np.float64)
    kernel = it.get_tensor(t_w["index"]).astype(np.float64)
    xin = np.stack(inputs).astype(np.float64) - z_in
    if op["op_name"] == "DEPTHWISE_CONV_2D":  # kernel (1, kh, kw, C)
        stride = xin.shape[1] // int(t_out["shape"][1])
        acc = tf.nn.depthwise_conv2d(xin, kernel.transpose(1, 2, 3, 0), [1, stride, stride, 1],
                                     "SAME").numpy()
    else:  # 1x1 conv, kernel (C_out, 1, 1, C_in)
        assert kernel.shape[1:3] == (1, 1), kernel.shape
        acc = np.einsum("nhwi,oi->nhwo", xin, kernel[:, 0, 0, :])
    unit = s_in * s_w / s_out
    exact = (np.round(acc) + it.get_tensor(t_b["index"])) * unit + z_out
    student = student_pre(x, training=False).numpy().astype(np.float64) / s_out + z_out
    inside = (exact > -127.5) & (exact < 126.5)  # not clamped
    diff = np.where(inside, student - exact, 0.0).reshape(-1, exact.shape[-1])
    count = inside.reshape(-1, exact.shape[-1]).sum(axis=0)
    # A channel clamped at every position (e.g. negative before a ReLU) shows no offset.
    assert (count > 0).sum() >= 2, "at most one channel unclamped: nothing to compare"
    return (diff.sum(axis=0) / np.maximum(count, 1) / unit)[count > 0]


def test_align_student_reaches_slash_named_layers(cifar, tmp_path):
    """align_student finds every kernel of MobileNetV3, whose layer names hold slashes.

    Regression: the file's tensor names were split at every ``/`` and matched one part at a
    time, so ``expanded_conv/squeeze_excite/Conv`` was taken for the stem ``Conv`` (and its
    bias "aligned" onto the wrong layer, up to 6 output steps) and ``expanded_conv/depthwise``
    was not found at all. Measured at seed 0, largest per-channel offset of the student from
    the file's exact integer result, in int32 bias steps: before, 0.44 at the first depthwise
    layer and 23 at the first squeeze-excite conv; after, 0.0017 and 0.0029 (float rounding).
    """
    xt, yt, xv, yv = cifar
    keras.utils.set_random_seed(0)
    teacher = build("mobilenet_v3_small")
    teacher(xt[:32], training=True)
    q = quantize_model(teacher, weight_bits=8, activation_bits=8, per_channel=True)
    _distil(q, teacher, xt, yt, steps=1, eager=True)
    path = os.path.join(tmp_path, "v3s.tflite")
    export.export_tflite(q, path, xt, mode="int8", align_student=True)
    checks = {
        # depthwise -> (plain) batch norm -> ReLU quantizer
        "expanded_conv/depthwise": q.get_layer("expanded_conv/depthwise/BatchNorm").output,
        # squeeze-excite 1x1 conv -> ReLU quantizer
        "expanded_conv/squeeze_excite/Conv": q.get_layer(
            "quant_expanded_conv/squeeze_excite/Conv").output,
    }
    for conv_layer, tensor in checks.items():
        offsets = _bias_offsets(path, keras.Model(q.inputs, tensor), xv[:8], conv_layer)
        assert np.abs(offsets).max() < 0.05, (conv_layer, np.round(offsets, 4))


def _dense_block(seed):
    """DenseNet's pattern in miniature: a ReLU output and a convolution's (signed) output
    concatenated, then an unfolded batch norm (it follows the concatenation, so no kernel takes
    it) -> ReLU -> 1x1 conv."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    y = layers.Conv2D(8, 3, padding="same", name="branch")(x)
    z = layers.BatchNormalization(name="pre_bn")(layers.Concatenate(name="concat")([x, y]))
    z = layers.Conv2D(16, 1, name="after")(layers.ReLU(name="pre_relu")(z))
    out = layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D(name="gap")(z))
    return keras.Model(inp, out)


@pytest.mark.parametrize("seed", [0, 1])
def test_align_student_matches_concatenation_groups_and_unfolded_batch_norm(seed, tmp_path):
    """align_student makes a DenseNet-style student compute what its int8 file computes.

    Regressions, measured on this model before the fix (seeds 0 and 1):
    * the file rounds all inputs of a concatenation and its output on one scale (TFLite's
      same-scale constraint: the union of the student's ranges) while the student rounded each
      on its own range: 7 % of ``stem_relu``'s values, 26-28 % of ``branch``'s and 22-23 % of
      ``concat``'s differed by more than half a step (up to 1.8 steps). Now the student's
      quantizers take the file's range, the unsigned ReLU one too (the group is signed), and
      every value is equal;
    * an unfolded batch norm runs as a 1x1 depthwise convolution whose int32 bias has a grid of
      ~1/127 input step, and its beta was not aligned: with its input aligned (measured on a
      variant with two ReLU inputs), the student was still up to 0.48 bias steps off the
      file's exact integer result (5.9-6.8 with both causes); now 0.0003.
    """
    q = quantize_model(_dense_block(seed), weight_bits=8, activation_bits=8, per_channel=True)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 16, 16, 3)).astype("float32")
    q.compile(keras.optimizers.Adam(1e-2),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, rng.integers(0, 10, 256), batch_size=32, epochs=2, verbose=0)
    path = os.path.join(tmp_path, "dense.tflite")
    info = export.export_tflite(q, path, x[:64], mode="int8", align_student=True)
    for name in ("stem_relu", "branch", "concat"):
        student = keras.Model(q.inputs, q.get_layer(f"quant_{name}").output)
        steps = file_tensor_steps(path, student, x[:4],
                                  lambda op, tensor, n=name: f"/{n}/" in tensor)
        assert steps.max() < 0.01, (name, float(steps.max()))
    offsets = _bias_offsets(path, keras.Model(q.inputs, q.get_layer("pre_bn").output), x[:8],
                            "pre_bn")
    assert np.abs(offsets).max() < 0.05, np.round(offsets, 4)
    assert info["aligned_ranges"]["unaligned"] == []
    assert info["aligned_ranges"]["tensors"] >= 2  # the group's EMA ranges never agree
    # Aligning is idempotent: exporting the aligned student again writes the same file (the
    # ReLU's clip, widened to the signed group's grid, must not widen the group again), also
    # after saving and loading it (the signed range is in the quantizer's config).
    with open(path, "rb") as first:
        first_bytes = first.read()
    for n, student in enumerate((q, _save_load(q, tmp_path))):
        again = os.path.join(tmp_path, f"again{n}.tflite")
        export.export_tflite(student, again, x[:64], mode="int8", align_student=True)
        with open(again, "rb") as second:
            assert second.read() == first_bytes, ("re-export", n)
