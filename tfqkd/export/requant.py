"""``align_student`` for kernels that run on LiteRT's built-in kernels: their double rounding.

LiteRT requantizes an integer convolution's int32 accumulator ``acc`` to its int8 output in one
of two ways. XNNPACK multiplies by the float ``s_in * s_w / s_out`` and rounds once, as a
student's fake quantization does. The built-in kernels apply it as ``M * 2^-shift / 2^31`` (an
int32 ``M``) and round twice, first to ``2^-shift`` of a step, then to a step, both half up:
``(acc * M + 2^30 + 2^(30 + shift)) >> (31 + shift)``, i.e. ``floor(acc * m + 1/2 +
2^-(shift + 1))``. Values within ``2^-(shift + 1)`` below a half round up. An ``int4`` file runs
every INT4 convolution on the built-in kernels (XNNPACK takes no INT4 convolution), where a
4-bit kernel's coarse steps make the multiplier large and the shift small: 0 to 4 into 4-bit
activations, where 3-25 % of all values round up that a single rounding rounds down.

Measured (2026-12-07, LiteRT 2.3, x86): the formula gives every output of the int4 file's INT4
convolutions and depthwise convolutions tried (a 3x3 and a 1x1 test convolution, and
MobileNetV2's first projection, shifts 0-5), where one rounding missed 0.7-3.3 % of them. On
MobileNetV2 alpha 0.35, W4A4, 32x32, seeds 1 and 2, the int4 file's logits error against its
student was 0.84 and 1.01 of an unrelated file's before the student took the kernels' rounding
and 0.007 and 0.13 after; EfficientNetB0 / V2B0 W2A8, seeds 1-3: 0.52-0.96 before, 0.05-0.31
after. A fused activation (``Conv2D(activation="relu")``, a squeeze-excite gate's sigmoid)
rounds the kernel's output in its activation quantizer, which then takes the shifts.

:func:`_align_student_requantization` gives each student quantizer that rounds an INT4
kernel's output the kernel's right shifts (``requant_shifts``, one per output channel), so the
student rounds as the file does (:func:`tfqkd.quantizers.activations.requantized_levels`).

A file run without XNNPACK (``runtime="builtin"``: LiteRT's
``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``) rounds every CONV_2D, DEPTHWISE_CONV_2D
and FULLY_CONNECTED twice, int8 kernels too; ``align_student`` then gives all of them their
shifts. Measured (2026-12-07, LiteRT 2.3, x86; tests/test_export_requant.py): an int8 file of
a W4A4 student aligned for XNNPACK, run on the built-in kernels, was one step off on 0.5-1.0 %
of a depthwise layer's outputs and up to 7-13 steps off on 10-16 % of the next 1x1
convolution's; aligned for the built-in kernels, every value equal. The global pooling's
``MEAN`` (input and output on different grids, reduced axes dropped) rounds twice there too,
with the multiplier ``s_in / (n · s_out)`` and both roundings half away from zero
(``RangeQuantizer.requant_half_away``): measured, every pooled value equal once aligned, 4.7-24 %
one step off before (2026-12-07, a tiny ResNet on digits and the W4A4 test student).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

from tfqkd._keras import keras
from tfqkd.export._common import _layer_of, check_runtime
from tfqkd.export._flatbuffer import INT4 as _INT4
from tfqkd.export._flatbuffer import INT8 as _INT8
from tfqkd.export._flatbuffer import WEIGHT_OPS
from tfqkd.export._flatbuffer import op_names as _op_names
from tfqkd.export._flatbuffer import read as _read_flatbuffer
from tfqkd.export._flatbuffer import tensor_name as _tensor_name
from tfqkd.export.forward import _consumers, _fold_plan
from tfqkd.export.ranges import _activation_quantizers, _output_quantizers
from tfqkd.quantize_configs import is_quantizable_relu_layer
from tfqkd.quantizers import ActivationQuantizer, RangeQuantizer

#: Ops whose INT4 kernels run on LiteRT's built-in kernels in an ``int4`` file. Not
#: FULLY_CONNECTED: XNNPACK runs its INT4 kernel and rounds once (measured 2026-12-07, shifts
#: 4-6; the built-in kernel alone rounds twice).
_BUILTIN_INT4_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


def _double_rounding_ops(model_obj, runtime: str):
    """(input, kernel, output) tensors of each kernel op that rounds twice on ``runtime``: on
    ``"xnnpack"`` the INT4 convolutions, on ``"builtin"`` every kernel with an int8 output."""
    names = _op_names(model_obj)
    for sg in model_obj.subgraphs[:1]:
        for op in sg.operators:
            name = names[op.opcodeIndex]
            if name not in WEIGHT_OPS:
                continue
            x, w, out = (sg.tensors[int(op.inputs[0])], sg.tensors[int(op.inputs[1])],
                         sg.tensors[int(op.outputs[0])])
            if runtime == "builtin" and w.type in (_INT8, _INT4) and out.type == _INT8:
                yield x, w, out
            elif name in _BUILTIN_INT4_OPS and w.type == _INT4:
                yield x, w, out


def _builtin_means(model_obj):
    """(input, output, keep_dims) of each int8 ``MEAN`` of the file (a global average pooling).

    On the built-in kernels a ``MEAN`` that drops its reduced axes, with an output grid other
    than its input's, requantizes the int32 sum ``Σ(x − z_in)`` with the multiplier
    ``s_in / (n · s_out)`` in the same two roundings as a kernel (LiteRT 2.3, x86: every output
    of a tiny ResNet's global pooling equal to that formula, where one rounding missed 24 %).
    XNNPACK rounds once."""
    names = _op_names(model_obj)
    for sg in model_obj.subgraphs[:1]:
        for op in sg.operators:
            if names[op.opcodeIndex] != "MEAN":
                continue
            x, out = sg.tensors[int(op.inputs[0])], sg.tensors[int(op.outputs[0])]
            if x.type == _INT8 and out.type == _INT8:
                keep = bool(getattr(op.builtinOptions, "keepDims", False))
                yield x, out, keep


def right_shift(multiplier: float) -> int:
    """The right shift of TFLite's ``QuantizeMultiplier(multiplier)``: ``multiplier = M * 2^e /
    2^31`` with ``M`` in ``[2^30, 2^31)``; 0 when ``e >= 0`` (a left shift, one rounding).

    Example:
        >>> right_shift(0.0558), right_shift(1.5), right_shift(2.0 ** -20)
        (4, 0, 19)
    """
    significand, exponent = math.frexp(multiplier)
    if round(significand * 2 ** 31) == 2 ** 31:  # M rounds up to 2^31: TFLite halves it
        exponent += 1
    return max(0, -exponent)


def _supports_shifts(quantizer) -> bool:
    return isinstance(quantizer, ActivationQuantizer) or (
        type(quantizer) is RangeQuantizer and quantizer.bits == 8 and
        quantizer.mean_window is None)


def _align_student_requantization(model: keras.Model, plain: keras.Model, content: bytes,
                                  runtime: str = "xnnpack") -> Dict[str, Any]:
    """Sets ``requant_shifts`` on the student's quantizers of the outputs of the file's kernels
    that round twice on ``runtime`` (:func:`_double_rounding_ops`).

    Every other output quantizer loses its shifts, so aligning on an int8 file for XNNPACK
    (which rounds once) undoes an earlier alignment. Returns ``{"layers": number of quantizers
    given shifts, "unmatched": [kernel layers whose output quantizer was not found or cannot
    take them]}``.
    """
    quantizers = _kernel_output_quantizers(model)
    shifts: Dict[str, tuple] = {}
    unmatched: List[str] = []
    layer_names = [layer.name for layer in plain.layers]
    plan = _fold_plan(plain)
    consumers = _consumers(plain)
    model_obj = _read_flatbuffer(content)
    for x, w, out in _double_rounding_ops(model_obj, check_runtime(runtime)):
        kernel = _layer_of(_tensor_name(w), layer_names)
        rounding = _rounding_layer(kernel, _layer_of(_tensor_name(out), layer_names),
                                   plain, plan, consumers, quantizers)
        if rounding is None:
            unmatched.append(kernel or _tensor_name(w))
            continue
        multipliers = (float(x.quantization.scale[0]) *
                       np.asarray(w.quantization.scale, np.float64) /
                       float(out.quantization.scale[0]))
        shifts[rounding] = tuple(right_shift(float(m)) for m in multipliers)
    half_away = set()
    if runtime == "builtin":
        means, unmatched_means = _mean_shifts(model_obj, layer_names, quantizers)
        shifts.update(means)
        half_away = set(means)
        unmatched += unmatched_means
    # By quantizer: a layer's output quantizer (a sigmoid's fixed grid) is not its kernel's.
    wanted = {id(quantizers[name]): (name, want) for name, want in shifts.items()}
    every = {id(q): q for q in list(quantizers.values()) +
             [q for _, q, _ in _output_quantizers(model)]}
    changed = 0
    for key, quantizer in every.items():
        name, want = wanted.get(key, (None, None))
        if want is not None and not _supports_shifts(quantizer):
            unmatched.append(name)
            del shifts[name]
            want = None
        if hasattr(quantizer, "requant_shifts") and quantizer.requant_shifts != want:
            quantizer.requant_shifts = want
            changed += 1
        away = want is not None and name in half_away
        if getattr(quantizer, "requant_half_away", away) != away:
            quantizer.requant_half_away = away
            changed += 1
    if changed:
        # Keras traced predict/evaluate with the old quantizer attributes: trace again.
        model.predict_function = model.test_function = None
    return {"layers": len(shifts), "unmatched": sorted(set(unmatched))}


def _mean_shifts(model_obj, layer_names: List[str], quantizers: Dict[str, Any]):
    """({pooling layer: (its MEAN's right shift,)}, [MEANs the student cannot follow]) for a
    file run on the built-in kernels (:func:`_builtin_means`). A ``MEAN`` that keeps its axes
    (``keepdims=True``, e.g. MobileNetV3's squeeze-excite pooling) runs another integer kernel,
    and one whose input and output share a grid takes another path too: neither is matched,
    unless the mean is over one value (a 1x1 map), which rounds nothing."""
    shifts: Dict[str, tuple] = {}
    unmatched: List[str] = []
    for x, out, keep in _builtin_means(model_obj):
        layer = _layer_of(_tensor_name(out), layer_names)
        s_in, s_out = float(x.quantization.scale[0]), float(out.quantization.scale[0])
        same_grid = s_in == s_out and int(x.quantization.zeroPoint[0]) == int(
            out.quantization.zeroPoint[0])
        count = int(np.prod(x.shape)) // max(1, int(np.prod(out.shape)))
        if same_grid and count == 1:
            continue  # a mean of one value on its input's grid (a 1x1 map): nothing is rounded
        if keep or same_grid or layer not in quantizers:
            unmatched.append(layer or _tensor_name(out))
            continue
        shifts[layer] = (right_shift(s_in / (count * s_out)),)
    return shifts, unmatched


def _kernel_output_quantizers(model: keras.Model) -> Dict[str, Any]:
    """{inner layer name: the student quantizer that rounds what the layer's file op writes}.

    A fused activation's quantizer (a ``Conv2D(activation="relu")``'s ReLU rounding, or the
    pre-activation rounding before a fused sigmoid / softmax) rounds the op's output; else the
    layer's output quantizer does."""
    out = {name: quantizer for name, quantizer, _ in _output_quantizers(model)}
    fused = {}
    for name, where, quantizer, _ in _activation_quantizers(model):
        if where != "output":
            fused.setdefault(name, quantizer)
    out.update(fused)
    return out


def _rounding_layer(kernel: Optional[str], output_layer: Optional[str], plain: keras.Model,
                    plan: Dict[int, Any], consumers: Dict[int, List[Any]],
                    quantizers: Dict[str, Any]) -> Optional[str]:
    """The layer whose student output quantizer rounds what the kernel's op writes: the layer
    the op's output tensor is named after (a fused ReLU), else the kernel's folded batch norm,
    else the kernel, else the one layer consuming those if it is a ReLU (the converter fuses it
    into a FULLY_CONNECTED, whose output tensor keeps the MatMul's name). Never another
    consumer (an ``Add``'s quantizer rounds the sum, not the kernel's output)."""
    candidates = [output_layer]
    if kernel is not None:
        layer = plain.get_layer(kernel)
        bn = plan.get(id(layer))
        last = bn if bn is not None else layer
        after = consumers.get(id(last), [])
        relu = after[0] if len(after) == 1 and is_quantizable_relu_layer(after[0]) else None
        candidates += [bn.name if bn is not None else None, kernel,
                       relu.name if relu is not None else None]
    return next((name for name in candidates if name in quantizers), None)
