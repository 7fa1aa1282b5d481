"""The softmax head of an integer file at 16 bits: int16 logits and int16 probabilities.

The converter writes a softmax head as an int8 kernel (the logits, 255 steps over their whole
range) and an int8 ``SOFTMAX`` (probabilities in steps of 1/256). Top classes whose logits fall
on one int8 step tie, and argmax takes the lower index; where a top-2 pair sits within a step,
a one-step rounding flip anywhere upstream changes the prediction. In 10-class students
trained briefly, 14-23 of 1,000 test images had tied int8 logits (DenseNet121,
MobileNetV3Large; docs/export.md).

At 16 bits the head runs on LiteRT's 16x8 kernels: a ``QUANTIZE`` re-expresses the head's int8
input as int16 (same scale, zero point 0: exact), the ``FULLY_CONNECTED`` / ``CONV_2D`` reads it
with its int8 kernel and an int64 bias (the same integers) and writes int16 logits (zero point
0, the student's 16-bit step, :class:`~tfqkd.quantizers.RangeQuantizer` ``bits=16``), any
``RESHAPE`` passes them on, and ``SOFTMAX`` writes int16 probabilities in steps of 1/32768
(:data:`tfqkd.quantize_configs.SOFTMAX_HEAD_RANGES`). Only the head changes; every other op
stays int8. The 16x8 kernels do not run on XNNPACK, so by default only heads of up to
:data:`~tfqkd.quantize_configs.SIXTEEN_BIT_HEAD_MAX_WEIGHTS` logits weights are 16-bit.

Example:
    >>> import numpy as np, os, tempfile
    >>> from tfqkd._keras import keras
    >>> from tfqkd.export import export_tflite
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    >>> p = os.path.join(tempfile.mkdtemp(), "m.tflite")
    >>> x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    >>> export_tflite(model, p, x, mode="int8")["softmax_head_bits"]
    16
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from tfqkd._keras import keras
from tfqkd.export._flatbuffer import INT8 as _INT8
from tfqkd.export._flatbuffer import INT16 as _INT16
from tfqkd.export._flatbuffer import INT32 as _INT32
from tfqkd.export._flatbuffer import INT64 as _INT64
from tfqkd.export._flatbuffer import buffer_values as _buffer_values
from tfqkd.export._flatbuffer import op_names as _op_names
from tfqkd.export._flatbuffer import read as _read_flatbuffer
from tfqkd.export._flatbuffer import write as _write_flatbuffer
from tfqkd.export.ranges import _activation_quantizers
from tfqkd.models.heads import softmax_layer
from tfqkd.quantize_configs import SIXTEEN_BIT_HEAD_MAX_WEIGHTS, SOFTMAX_HEAD_RANGES
from tfqkd.quantizers import RangeQuantizer

__all__: List[str] = []

_LOGIT_OPS = ("FULLY_CONNECTED", "CONV_2D")


def _sixteen_bit_logits(model: keras.Model) -> Tuple[Optional[str], Optional[float]]:
    """(inner name, step) of the layer with the student's 16-bit logits quantizer
    (``RangeQuantizer(16)``: the head's pre-activation quantizer, or the output quantizer of the
    logits layer of a separate softmax); the step is None before the range has seen data."""
    for name, where, quantizer, qvars in _activation_quantizers(model):
        if where != "post_activation" and isinstance(quantizer, RangeQuantizer) and \
                quantizer.bits == 16:
            lo, hi = quantizer.range_of(qvars)
            return name, (hi / 32767.0 if hi > lo else None)
    return None, None


def _student_head(model: keras.Model) -> Tuple[Optional[str], Optional[int], Optional[float]]:
    """(inner name of the softmax head or None, the width the student rounds its probabilities
    at or None, the step of its 16-bit logits or None).

    A student without a quantizer on its head (a float model, or weights-only QAT) computes the
    head in float: None, the file's head then takes the default width for its size.
    """
    name = softmax_layer(model)
    if name is None:
        return None, None, None
    layer = model.get_layer(name) if name in {x.name for x in model.layers} else None
    quantizers = getattr(layer, "_output_quantizers", None) or []
    inner = getattr(getattr(layer, "layer", None), "name", name)
    bits = getattr(quantizers[0], "bits", None) if quantizers else None
    bits = bits if bits in SOFTMAX_HEAD_RANGES else None
    return inner, bits, _sixteen_bit_logits(model)[1]


def _int8_head_kernel(model: keras.Model, bits_by_layer: Dict[str, Optional[int]],
                      requested: Optional[int]) -> Dict[str, Optional[int]]:
    """``bits_by_layer`` with a <= 4-bit logits kernel of a 16-bit head stored as int8 in an
    ``int4`` file: LiteRT's 16x8 kernels take int8 weights only (its levels are exact on the
    int8 grid; the few bytes of one classifier are the price)."""
    name, _ = _sixteen_bit_logits(model)
    if requested == 8 or name is None or not (bits_by_layer.get(name) or 8) <= 4:
        return bits_by_layer
    return {**bits_by_layer, name: 8}


def _requantized(tensor, dtype: int, scale: float) -> None:
    q = tensor.quantization
    tensor.type = dtype
    q.scale = np.array([scale], np.float32)
    q.zeroPoint = np.array([0], np.int64)
    q.min = q.max = None


def _find_head(model_obj, names) -> Optional[Dict[str, Any]]:
    """The main subgraph's softmax head: ``SOFTMAX`` (int8) whose output leaves the graph, fed by
    an int8 ``FULLY_CONNECTED`` / ``CONV_2D`` without a fused activation through ``RESHAPE``
    ops only, each tensor read by the next op alone. None if the file has no such head."""
    sg = model_obj.subgraphs[0]
    outputs = {int(i) for i in sg.outputs}
    readers: Dict[int, list] = {}
    producer: Dict[int, Any] = {}
    for op in sg.operators:
        for i in op.inputs:
            readers.setdefault(int(i), []).append(op)
        for i in op.outputs:
            producer[int(i)] = op
    for softmax in sg.operators:
        if names[softmax.opcodeIndex] != "SOFTMAX":
            continue
        out = int(softmax.outputs[0])
        after = readers.get(out, [])
        leaves = (out in outputs and not after) or (
            out not in outputs and len(after) == 1 and names[after[0].opcodeIndex] == "DEQUANTIZE"
            and int(after[0].outputs[0]) in outputs)
        if not leaves or sg.tensors[out].type != _INT8:
            continue
        reshapes, tensor = [], int(softmax.inputs[0])
        op = producer.get(tensor)
        while op is not None and names[op.opcodeIndex] == "RESHAPE":
            if len(readers.get(tensor, [])) != 1 or tensor in outputs:
                return None
            reshapes.append(op)
            tensor = int(op.inputs[0])
            op = producer.get(tensor)
        if op is None or names[op.opcodeIndex] not in _LOGIT_OPS or \
                len(readers.get(tensor, [])) != 1 or tensor in outputs:
            return None
        options = op.builtinOptions
        if getattr(options, "fusedActivationFunction", 0) != 0:
            return None
        inputs = [int(i) for i in op.inputs]
        if sg.tensors[inputs[0]].type != _INT8 or sg.tensors[inputs[1]].type != _INT8 or (
                len(inputs) > 2 and inputs[2] >= 0 and sg.tensors[inputs[2]].type != _INT32):
            return None
        return {"softmax": softmax, "reshapes": reshapes, "kernel": op, "logits": tensor}
    return None


def _opcode(model_obj, names, builtin: int, name: str) -> int:
    from tensorflow.lite.python import schema_py_generated as schema

    for index, op_name in names.items():
        if op_name == name:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    model_obj.operatorCodes.append(code)
    return len(model_obj.operatorCodes) - 1


def _widen_head(content: bytes, logits_step: Optional[float],
                max_weights: Optional[int] = None) -> Tuple[bytes, bool]:
    """Rewrites the file's softmax head to 16 bits (see the module docstring). ``logits_step``:
    the student's 16-bit logits step; None: the int8 logits' range over 32767 steps.
    ``max_weights``: leave a head whose kernel has more weights as it is. Returns the new content
    and whether the head was rewritten."""
    from tensorflow.lite.python import schema_py_generated as schema

    model_obj = _read_flatbuffer(content)
    names = _op_names(model_obj)
    head = _find_head(model_obj, names)
    if head is None:
        return content, False
    sg = model_obj.subgraphs[0]
    kernel = head["kernel"]
    if max_weights is not None and \
            int(np.prod(sg.tensors[int(kernel.inputs[1])].shape)) > max_weights:
        return content, False
    x_index = int(kernel.inputs[0])
    x = sg.tensors[x_index]
    if logits_step is None:
        q = sg.tensors[head["logits"]].quantization
        scale, zero = float(q.scale[0]), int(q.zeroPoint[0])
        logits_step = max(abs(-128 - zero), abs(127 - zero)) * scale / 32767.0
    # The int8 input as int16: q16 = q8 - zero point, on the same scale (exact).
    x16 = copy.deepcopy(x)
    x16.name = (x.name if isinstance(x.name, bytes) else str(x.name).encode()) + b"_int16"
    x16.buffer = len(model_obj.buffers)
    model_obj.buffers.append(schema.BufferT())
    _requantized(x16, _INT16, float(x.quantization.scale[0]))
    sg.tensors.append(x16)
    quantize = schema.OperatorT()
    quantize.opcodeIndex = _opcode(model_obj, names, schema.BuiltinOperator.QUANTIZE, "QUANTIZE")
    quantize.inputs = np.array([x_index], np.int32)
    quantize.outputs = np.array([len(sg.tensors) - 1], np.int32)
    position = next(i for i, op in enumerate(sg.operators) if op is kernel)
    sg.operators.insert(position, quantize)
    inputs = [int(i) for i in kernel.inputs]
    inputs[0] = len(sg.tensors) - 1
    if len(inputs) > 2 and inputs[2] >= 0:
        # The same integers as int64, in a tensor and buffer of their own (the converter lets
        # identical constants share a buffer).
        bias = copy.deepcopy(sg.tensors[inputs[2]])
        values = _buffer_values(model_obj.buffers[bias.buffer], np.int32).astype(np.int64)
        data = schema.BufferT()
        data.data = np.frombuffer(values.tobytes(), np.uint8)
        model_obj.buffers.append(data)
        bias.buffer, bias.type = len(model_obj.buffers) - 1, _INT64
        # Stated on the scales the kernel adds it on, s_in * s_w, one per weight scale: the
        # 16x8 kernels check the bias's scale against s_in * s_w within 2 % of the (fine) int16
        # output step and read a single scale for per-tensor weights. The integers stay: the
        # runtime adds them on s_in * s_w whatever the stated scale.
        w_scales = np.asarray(sg.tensors[inputs[1]].quantization.scale, np.float64)
        bias.quantization.scale = (float(x.quantization.scale[0]) * w_scales).astype(np.float32)
        bias.quantization.zeroPoint = np.zeros(len(w_scales), np.int64)
        sg.tensors.append(bias)
        inputs[2] = len(sg.tensors) - 1
    kernel.inputs = np.array(inputs, np.int32)
    kernel.builtinOptions.quantizedBiasType = _INT64
    _requantized(sg.tensors[head["logits"]], _INT16, logits_step)
    for reshape in head["reshapes"]:
        _requantized(sg.tensors[int(reshape.outputs[0])], _INT16, logits_step)
    lo, hi = SOFTMAX_HEAD_RANGES[16]
    _requantized(sg.tensors[int(head["softmax"].outputs[0])], _INT16, (hi - lo) / 65535.0)
    return _write_flatbuffer(model_obj), True


def _head_report(model: keras.Model, content: bytes, requested: Optional[int]
                 ) -> Tuple[bytes, Optional[str], Optional[int]]:
    """The file with its softmax head at the requested width (None: the student's).

    Returns (content, the head's inner layer name if it was widened, the head's width in the
    file, or None when the file has no softmax head)."""
    inner, bits, logits_step = _student_head(model)
    if requested is not None:
        bits = requested
    if bits != 8:  # 16, or None: the default width for the head's size
        content, widened = _widen_head(content, logits_step,
                                       None if bits == 16 else SIXTEEN_BIT_HEAD_MAX_WEIGHTS)
        if widened:
            return content, inner, 16
        if bits == 16 and inner is not None:
            warnings.warn(
                f"the softmax head {inner!r} stays int8 in the file: it is not a Dense / Conv2D "
                "(through reshapes) feeding the softmax, which the 16-bit head needs, but the "
                "model rounds it at 16 bits, so the file can disagree where top classes are "
                "close. Quantize with softmax_head_bits=8 to make the model match the file.",
                UserWarning, stacklevel=3)
    return content, None, (8 if inner is not None else None)


def _check_head_bits(bits: Any) -> Optional[int]:
    if bits is None:
        return None
    if isinstance(bits, bool) or bits not in SOFTMAX_HEAD_RANGES:
        raise ValueError(f"softmax_head_bits must be None (the student's head), 8 (int8, steps "
                         f"of 1/256) or 16 (int16 logits and probabilities, steps of 1/32768), "
                         f"got {bits!r}.")
    return int(bits)
