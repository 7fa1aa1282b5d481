"""``export_tflite``: a (quantized) student to a ``.tflite`` file in one of four modes.

The steps: the float forward model (:mod:`tfqkd.export.forward`), then either the converter's
post-training quantization or the fake-quant graph (:mod:`tfqkd.export.fakequant`), one
converter run (:mod:`tfqkd.export.convert`), optionally the space-to-depth layout rewrite
(:mod:`tfqkd.export.layout`), and an atomic write (:mod:`tfqkd._io`). Bit-widths and integer
levels of the kernels are read once, by :func:`tfqkd.qat_weights.kernel_weights`.

Example:
    >>> import os, tempfile, tfqkd
    >>> p = os.path.join(tempfile.mkdtemp(), "m.tflite")
    >>> export_tflite(tfqkd.models.tiny_resnet(seed=0), p, mode="dynamic")["mode"]
    'dynamic'
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Union

from tfqkd._io import atomic_write
from tfqkd._keras import keras
from tfqkd.export._common import (MODES, ExportError, _check_writable, _iter_samples, _layer_of,
                                   check_runtime)
from tfqkd.export.convert import (
    _align_student_biases,
    _convert,
    _diagnose,
    _float_ops,
    _is_converter_error,
    _match_bias_scales,
    _per_channel_dense_weights,
    _shorten_tensor_names,
    _snap_int8_levels,
    _tflite_layout_levels,
)
from tfqkd.export.fakequant import _fakequant_model
from tfqkd.export.forward import forward_model
from tfqkd.export.heads import _check_head_bits, _head_report, _int8_head_kernel
from tfqkd.export.layout import space_to_depth_convs
from tfqkd.export.requant import _align_student_requantization
from tfqkd.export.ranges import (
    _align_student_ranges,
    _student_activation_bits,
    _student_activation_ranges,
    _student_input_ranges,
    _student_pre_activation_ranges,
    _student_weight_levels,
)
from tfqkd.qat_weights import kernel_weights
from tfqkd.quantize_configs import SOFTMAX_HEAD_RANGES

__all__ = ["export_tflite"]


def export_tflite(
    model: keras.Model,
    path: Union[str, os.PathLike],
    representative_data: Any = None,
    mode: str = "int8",
    *,
    num_calibration: Optional[int] = 500,
    int8_io: bool = False,
    method: str = "fakequant",
    snap_levels: bool = True,
    allow_select_tf_ops: bool = False,
    align_student: bool = False,
    runtime: str = "xnnpack",
    space_to_depth: bool = False,
    softmax_head_bits: Optional[int] = None,
) -> Dict[str, Any]:
    """Converts a (quantized) student to a ``.tflite`` file, written atomically.

    Args:
        model: A functional Keras model: a float model, a tfmot/tfqkd QAT model (layers in
            ``QuantizeWrapperV2``), or :func:`forward_model` of one.
        path: Output file. Written through a temporary file in the same directory and
            ``os.replace``: an error (also one raised by ``representative_data``) never leaves a
            partial file.
        representative_data: Images to calibrate activation ranges, required by ``"int8"`` and
            ``"int4"``: a ``tf.data.Dataset`` of images or of ``(images, labels)``, an array of
            images, or a generator function yielding ``[images]`` as the TFLite converter takes.
        mode: One of :data:`MODES`: ``"float"``, ``"dynamic"`` (int8 weights, float
            activations), ``"int8"`` (full integer), ``"int4"`` (full integer with weights trained
            at <= 4 bits stored as INT4; LiteRT runs those on its built-in kernels, which
            round twice: ``align_student=True`` gives the student that rounding, and without
            it a student with < 8-bit activations gets a ``UserWarning``).
        num_calibration: At most this many images are used for calibration (``None``: all).
        int8_io: Full-integer modes only: integer input and output tensors instead of float32
            (int8; a softmax head's output is int16 at ``softmax_head_bits=16``).
        method: How ``"int8"`` fixes ranges. ``"fakequant"`` (default): batch norm folded by us,
            kernels behind a per-channel FakeQuant whose grid holds the trained levels exactly,
            activations at the student's own quantizer ranges (calibrated min/max where it has
            none) -- the file computes what the QAT student computes. ``"ptq"``: the converter's
            full-integer post-training quantization of :func:`forward_model` (calibrated min/max
            everywhere; per-channel ``max|w|/127`` scales, exact for binary/ternary/8-bit, other
            bit-widths fixed by ``snap_levels``).
        snap_levels: ``method="ptq"`` only: re-express 3..7-bit channels so that their trained
            levels are exact in the file.
        allow_select_tf_ops: Let ops without a TFLite builtin run as TF (Flex) ops; the file then
            needs the Flex delegate.
        align_student: Full-integer modes: after writing, change ``model`` *in place* so that
            the student computes what the file computes (see docs/export.md, Parity): shift its
            folded biases (batch norm ``beta``), and the ``beta`` of batch norms the file runs
            as 1x1 depthwise convolutions, onto the int32 grid the file stores them on (by at
            most half a bias step); and set the output quantizers of tensors the file rounds on
            one shared scale (a concatenation, a pooling or a reshape with its inputs) to that
            scale's range; in an ``int4`` file, whose INT4 convolutions run on LiteRT's
            built-in kernels, give the quantizers of their outputs the kernels' double
            rounding (``requant_shifts``, :mod:`tfqkd.export.requant`; an int8 file, which
            XNNPACK runs with one rounding, clears them, unless ``runtime="builtin"``).
            Without it, values near a rounding tie, and in such groups most values, round
            differently and the difference spreads through the network.
        runtime: The kernels the file will run on, whose rounding ``align_student`` gives the
            student (``tfqkd.export.RUNTIMES``): ``"xnnpack"`` (default; LiteRT's XNNPACK
            delegate, one rounding, the INT4 convolutions of an ``int4`` file on built-in
            kernels) or ``"builtin"`` (LiteRT's built-in kernels without the default
            delegates, as ``verify_tflite(..., runtime="builtin")`` runs them: every CONV_2D,
            DEPTHWISE_CONV_2D and FULLY_CONNECTED with an int8 output rounds twice, int8
            kernels too, and so does a global pooling's MEAN: the student takes every one's
            shifts). Other ops are not aligned (an ADD's double rounding is at ~2^-20 of a
            step; a MEAN that keeps its axes or shares its input's grid is listed as
            unmatched).
        space_to_depth: ``"int8"`` only: run every 3x3 stride-1 convolution with <= 16 output
            channels on a 2x2 space-to-depth view (``tfqkd.export.layout.space_to_depth_convs``):
            bit-identical outputs, but those kernels take 16x the bytes (ResNet20: 0.47 x
            instead of 0.27 x the float file) and 4x the multiply-adds. Faster only on CPUs
            whose int8 kernels cost the same for 16 as for 64 channels (ResNet20 on an AMX
            Xeon: 1.4-1.8x faster; on an AMD EPYC: 1.8x slower); measure on the target with
            ``tools/benchmark_tflite.py`` (``faster_int8_layout``).
        softmax_head_bits: Full-integer modes: the width of the logits and probabilities of a
            softmax the model ends in. ``None`` (default): the student's (``quantize_model``'s
            ``softmax_head_bits``; for a student that keeps its head float, 16 up to 131,072
            logits weights, else 8: :func:`tfqkd.quantize_configs.default_head_bits`). 16: the
            head runs on LiteRT's 16x8 kernels, int16 logits and probabilities in steps of
            1/32768 (:mod:`tfqkd.export.heads`); 8: the converter's int8 head (probabilities
            in steps of 1/256), for runtimes that take int8 tensors only.

    Returns:
        ``{"path", "mode", "bytes", "snapped_channels", "weight_bits", "aligned_biases",
        "aligned_ranges", "aligned_requantization", "space_to_depth_convs",
        "rescaled_bias_channels", "per_channel_dense_kernels", "softmax_head_bits"}`` (with
        ``align_student``, else None: ``aligned_biases`` ``{"channels", "max_shift_steps"}``,
        ``aligned_ranges`` ``{"tensors", "unaligned", "integer_means"}``, the quantizers moved,
        the names of those that cannot take the file's range, and the average poolings given
        the runtime's rounding of a mean; ``aligned_requantization`` ``{"layers",
        "unmatched"}``, the quantizers given the double rounding of the kernels (and global
        poolings) that round twice on ``runtime`` and the layers whose output quantizer could
        not take it, named in a ``UserWarning`` too;
        ``space_to_depth_convs``: how many convolutions were rewritten;
        ``rescaled_bias_channels``: int32 bias channels the converter stated on another scale
        than the runtime adds them on, re-expressed;
        ``per_channel_dense_kernels``: dense kernels of a per-channel student written with its
        per-channel integers and steps, which the converter would only take per tensor;
        ``softmax_head_bits``: 8 or 16 for a full-integer file with a softmax head, else None).

    Raises:
        ValueError: unknown mode, missing/empty representative data.
        FileNotFoundError / PermissionError / IsADirectoryError: ``path`` cannot be written.
        ExportError: the converter rejected layers (named, with the modes that would work).

    Example:
        >>> import numpy as np, os, tempfile, tfqkd
        >>> m = tfqkd.models.tiny_resnet(seed=0)
        >>> p = os.path.join(tempfile.mkdtemp(), "m.tflite")
        >>> x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32")
        >>> export_tflite(m, p, x, mode="int8")["mode"]
        'int8'
    """
    if mode not in MODES:
        raise ValueError(f"unknown export mode {mode!r}; choose one of {', '.join(MODES)} "
                         "('int8' for a full-integer file, 'int4' for 4-bit weights).")
    if mode in ("int8", "int4") and representative_data is None:
        raise ValueError(
            f"mode {mode!r} calibrates activation ranges and needs representative_data (a "
            "tf.data.Dataset of images or (images, labels), an array, or a generator function), "
            "e.g. tfqkd.data.load_dataset('cifar10', 'train', augment=False). Without data use "
            "mode='dynamic' (int8 weights, float activations).")
    softmax_head_bits = _check_head_bits(softmax_head_bits)
    check_runtime(runtime)
    if num_calibration is not None and num_calibration < 1:
        raise ValueError(f"num_calibration must be >= 1 or None, got {num_calibration!r}.")
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a tf_keras Model (from tfqkd._keras import keras), got "
                        f"{type(model).__name__}.")
    path = _check_writable(path)
    input_rank = len(model.inputs[0].shape)

    try:
        plain = forward_model(model)
        # The one reading of every kernel: bit-width, integer levels and step, as the quantizer
        # states them (inferred from the values where it does not, or for a float model).
        kernels = kernel_weights(model)
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 (an unusual layer: say which)
        raise ExportError(f"could not rebuild model {model.name!r} as a plain float model for "
                          f"export: {err}") from err
    bits_by_layer: Dict[str, Optional[int]] = {name: w.bits for name, w in kernels.items()}
    if mode == "int4":
        bits_by_layer = _int8_head_kernel(model, bits_by_layer, softmax_head_bits)

    if method not in ("fakequant", "ptq"):
        raise ValueError(f"unknown int8 method {method!r}; choose 'fakequant' or 'ptq'.")
    if space_to_depth and mode != "int8":
        raise ValueError(f"space_to_depth=True rewrites int8 convolutions; mode {mode!r} has "
                         "none. Use mode='int8' or drop space_to_depth.")
    calibration = None
    if representative_data is not None and mode in ("int8", "int4"):
        def calibration():
            for sample in _iter_samples(representative_data, input_rank, num_calibration):
                yield [sample]

    snapped = 0
    used_bits: Dict[str, int] = {}
    to_convert = plain
    file_ranges: Dict[str, Any] = {}
    fakequant = mode == "int4" or (mode == "int8" and method == "fakequant")
    if fakequant:
        low_bit_activations = _student_activation_bits(model)
        # Calibration runs here, in Python: an error of the data propagates as it is.
        to_convert, used_bits, file_ranges = _fakequant_model(
            plain, bits_by_layer,
            _iter_samples(representative_data, input_rank, num_calibration),
            low_bit=mode == "int4", fixed_ranges=_student_activation_ranges(model), source=model,
            input_ranges=_student_input_ranges(model),
            weight_levels=_student_weight_levels(kernels),
            pre_activation_ranges=_student_pre_activation_ranges(model),
            activation_bits=low_bit_activations)
        if mode == "int4" and low_bit_activations and not align_student and \
                any(bits <= 4 for bits in used_bits.values()):
            warnings.warn(
                "mode='int4' with activations below 8 bits and align_student=False: LiteRT runs "
                "INT4 convolutions on its built-in kernels, which round a requantized output "
                "twice, and at low-bit activations that rounding differs from the student's on "
                "3-25 % of values, which compounds until the file no longer tracks the student "
                "(docs/export.md, 'INT4 kernels: double rounding'). Export with "
                "align_student=True, which gives the student the kernels' rounding.",
                UserWarning, stacklevel=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            content = _convert(to_convert, mode, calibration, int8_io, allow_select_tf_ops,
                               fakequant=fakequant)
    except Exception as err:  # noqa: BLE001 (only converter failures are translated)
        if _is_converter_error(err):
            raise _diagnose(plain, mode, err, calibration) from err
        raise
    if mode in ("int8", "int4"):
        leftover = _float_ops(content)
        if leftover:
            layer_names = [layer.name for layer in plain.layers]
            culprits = sorted({_layer_of(t, layer_names) or t for _, t in leftover})
            ops = sorted({op for op, _ in leftover})
            raise _diagnose(plain, mode, ExportError(
                f"ops {', '.join(ops)} have no integer kernel and stayed float (layers "
                f"{', '.join(culprits)})"), calibration, layers=culprits)
    content = _shorten_tensor_names(content)
    content, rescaled_biases = _match_bias_scales(content)
    per_channel_dense = 0
    if fakequant:
        # int8 and INT4 kernels alike, so that every dense kernel of a per-channel student has
        # per-channel scales at any width (tfqkd.budget prices a file's non-kernel bytes as the
        # same for every width choice).
        content, per_channel_dense = _per_channel_dense_weights(content, plain, kernels)
    if mode == "int8" and method == "ptq" and snap_levels:
        content, snapped = _snap_int8_levels(content, _tflite_layout_levels(plain, kernels))
    head_bits = None
    int8_head = content  # the int32 biases _align_student_biases reads, the head's included
    if mode in ("int8", "int4"):
        content, widened, head_bits = _head_report(model, content, softmax_head_bits)
        if widened is not None:
            file_ranges[widened] = SOFTMAX_HEAD_RANGES[16]
    written, rewritten = content, 0
    if space_to_depth:
        written, rewritten = space_to_depth_convs(content)
    atomic_write(path, written)
    aligned = aligned_ranges = aligned_requantization = None
    if align_student and mode in ("int8", "int4"):
        # The rewrite only tiles biases: align on the compact file's one copy per channel.
        aligned = _align_student_biases(model, plain, int8_head)
        aligned_ranges = _align_student_ranges(model, file_ranges)
        aligned_requantization = _align_student_requantization(model, plain, content,
                                                               runtime)
        if aligned_requantization["unmatched"]:
            # Not silent: there the file rounds otherwise than the student (e.g. a keepdims
            # MEAN on the built-in kernels), and its outputs may drift from the student's.
            warnings.warn(
                f"align_student: the student cannot take the {runtime} kernels' rounding at "
                f"{', '.join(aligned_requantization['unmatched'])}; the file may differ from it "
                "there (docs/export.md, 'Files run without XNNPACK').", UserWarning,
                stacklevel=2)
    return {"path": path, "mode": mode, "bytes": len(written), "snapped_channels": snapped,
            "weight_bits": used_bits or {k: v for k, v in bits_by_layer.items() if v},
            "aligned_biases": aligned, "aligned_ranges": aligned_ranges,
            "aligned_requantization": aligned_requantization,
            "space_to_depth_convs": rewritten, "rescaled_bias_channels": rescaled_biases,
            "per_channel_dense_kernels": per_channel_dense, "softmax_head_bits": head_bits}
