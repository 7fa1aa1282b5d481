"""Converter runs and what is done to their output: diagnosis, int8 level snapping, bias alignment.

* ``_convert``: one TFLite converter run in a mode (float, dynamic, int8 PTQ, fake-quant int8 /
  int4); ``_diagnose`` turns a rejection into an :class:`~tfqkd.export.ExportError` naming the
  layers and the modes that do convert; ``_float_ops`` finds ops left in float in an integer file.
* ``_snap_int8_levels``: PTQ files (``method="ptq"``) re-express channels whose trained levels
  are off the int8 grid, so that every level is exact.
* ``_match_bias_scales``: every int32 bias is stated on the grid the runtime adds it on
  (the converter sometimes quantizes it for an input it then removes).
* ``_align_student_biases``: ``align_student=True`` moves the student's folded biases onto the
  int32 grid the file stores them on.

Example:
    >>> import tfqkd
    >>> content = _convert(tfqkd.models.tiny_resnet(seed=0), "float", None, False, False)
    >>> content[4:8]
    b'TFL3'
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from tfqkd._keras import keras, tf
from tfqkd.export._common import ExportError, _layer_of
from tfqkd.export._flatbuffer import INT4 as _INT4
from tfqkd.export._flatbuffer import INT8 as _INT8
from tfqkd.export._flatbuffer import INT32 as _INT32
from tfqkd.export._flatbuffer import WEIGHT_OPS as _WEIGHT_OPS
from tfqkd.export._flatbuffer import buffer_values as _buffer_values
from tfqkd.export._flatbuffer import op_names as _op_names
from tfqkd.export._flatbuffer import read as _read_flatbuffer
from tfqkd.export._flatbuffer import tensor_name as _tensor_name
from tfqkd.export._flatbuffer import write as _write_flatbuffer
from tfqkd.export.fakequant import _channel_affine
from tfqkd.export.forward import _fold, _fold_plan
from tfqkd.export.packed import _pack_bits, _unpack_bits
from tfqkd.qat_weights import (
    KERNEL_LAYERS,
    QuantizedWeight,
    _inner,
    _is_quantize_layer,
    _layer_variables,
)

__all__: List[str] = []


def _converter_for(model: keras.Model):
    # from_concrete_functions fixes the batch to 1 (the deployment case) and keeps the graph
    # independent of Keras-version specifics of from_keras_model.
    spec = [tf.TensorSpec((1,) + tuple(t.shape[1:]), t.dtype) for t in model.inputs]
    fn = tf.function(lambda *x: model(list(x) if len(x) > 1 else x[0], training=False))
    concrete = fn.get_concrete_function(*spec)
    # The converter saves its trackable as a SavedModel before converting. Given the Keras model
    # it serialises every layer (tracing each layer's call: 70 % of DenseNet121's export time);
    # a bare module holding the same variables gives a byte-identical file 3x faster (measured on
    # DenseNet121 32x32 W2A8: int8 42 s -> 13 s, int4 47 s -> 15 s, the same bytes).
    holder = tf.Module()
    holder.variables_of_model = list(model.variables)
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)


def _convert(model: keras.Model, mode: str, calibration: Optional[Callable],
             int8_io: bool, allow_select_tf_ops: bool, fakequant: bool = False) -> bytes:
    """One converter run. ``fakequant``: ``model`` carries FakeQuant ops that fix every range."""
    conv = _converter_for(model)
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if mode in ("dynamic", "int8", "int4"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8" and not fakequant:
        conv.representative_dataset = calibration
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if mode == "int4":
        # The low-bit flag makes the converter honour FakeQuant's num_bits (INT4 tensors).
        conv._experimental_low_bit_qat = True  # noqa: SLF001 (the converter's INT4 weight path)
    if int8_io and mode in ("int8", "int4"):
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    if allow_select_tf_ops:
        ops = ops + [tf.lite.OpsSet.SELECT_TF_OPS]
    conv.target_spec.supported_ops = ops
    return conv.convert()


def _is_converter_error(err: BaseException) -> bool:
    return any(cls.__name__ == "ConverterError" for cls in type(err).__mro__)


def _shorten_tensor_names(content: bytes) -> bytes:
    """Keeps the first ';'-joined part of each tensor name (the producing op, e.g. a conv).

    The converter names fused tensors after every op folded into them (conv, bias add, batch
    norm, ReLU, FakeQuant...): kilobytes of strings in a ResNet20 file that nothing reads.
    """
    model_obj = _read_flatbuffer(content)
    for sg in model_obj.subgraphs:
        for t in sg.tensors:
            if isinstance(t.name, bytes) and b";" in t.name:
                t.name = t.name.split(b";")[0]
            elif isinstance(t.name, str) and ";" in t.name:
                t.name = t.name.split(";")[0]
    return _write_flatbuffer(model_obj)


def _float_ops(content: bytes) -> List[Tuple[str, str]]:
    """(op, output tensor name) of every op computing in float in a file meant to be integer."""
    model_obj = _read_flatbuffer(content)
    names = _op_names(model_obj)
    out = []
    for sg in model_obj.subgraphs:
        for op in sg.operators:
            name = names.get(op.opcodeIndex, "?")
            if name in ("QUANTIZE", "DEQUANTIZE"):
                continue
            tensors = [sg.tensors[i] for i in list(op.outputs) if i >= 0]
            if any(t.type == 0 for t in tensors):  # 0 = FLOAT32
                out.append((name, _tensor_name(tensors[0])))
    return out


def _mentioned_layers(message: str, model: keras.Model) -> List[str]:
    names = []
    for layer in model.layers:
        if re.search(r"(?<![\w])" + re.escape(layer.name) + r"(?![\w])", message):
            names.append(layer.name)
    return names


def _diagnose(model: keras.Model, failed_mode: str, err: Exception,
              calibration: Optional[Callable], layers: Optional[List[str]] = None) -> ExportError:
    """An error naming the layers the converter rejected and the modes that do work."""
    message = str(err)
    layers = layers or _mentioned_layers(message, model)
    working = []
    for mode in ("float", "dynamic", "int8"):
        if mode == failed_mode or (mode == "int8" and calibration is None):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _convert(model, mode, calibration, False, False)
            working.append(f"mode={mode!r}")
        except Exception:  # noqa: BLE001 (probing which modes convert)
            continue
    if not working:
        try:
            _convert(model, "float", None, False, True)
            working.append("mode='float' with allow_select_tf_ops=True (needs the Flex delegate)")
        except Exception:  # noqa: BLE001
            pass
    ops = sorted(set(re.findall(r"'(tf\.\w+|tfl\.\w+)'", message)))
    lines = [f"the TFLite converter rejected the model in mode {failed_mode!r}."]
    if layers:
        lines.append(f"Layers involved: {', '.join(layers)}.")
    if ops:
        lines.append(f"Unsupported ops: {', '.join(ops)}.")
    lines.append("Modes that do convert: " + (", ".join(working) if working else
                                              "none (replace those layers with TFLite builtins)") + ".")
    first = message.strip().splitlines()[0] if message.strip() else type(err).__name__
    lines.append(f"Converter said: {first[:500]}")
    return ExportError(" ".join(lines))


def _tflite_layout_levels(plain: keras.Model, kernels: Dict[str, QuantizedWeight]
                          ) -> Dict[str, np.ndarray]:
    """{layer: integer levels of its kernel, output channel first} for conv/dense kernels.

    ``kernels`` is the student's reading (:func:`tfqkd.qat_weights.kernel_weights`).
    """
    out = {}
    for layer in plain.layers:
        if type(layer) in (keras.layers.Conv2D, keras.layers.Dense):
            found = kernels.get(layer.name)
            if found is not None and found.levels is not None:
                out[layer.name] = np.moveaxis(found.levels, -1, 0)
    return out


def _snap_int8_levels(content: bytes, levels_by_layer: Dict[str, np.ndarray]
                      ) -> Tuple[bytes, int]:
    """Re-expresses int8 conv/dense weight channels whose trained levels are off the int8 grid.

    PTQ's per-channel scale ``s = max|w_c| / 127`` maps levels ``k * d`` (``|k| <= kmax``) to
    ``rint(127 k / kmax)``: exact only when ``kmax`` divides 127 (binary, ternary, 8-bit using
    level 127). For other channels the integers become ``k * n`` with ``n = floor(127 / kmax)``
    and the scale ``s * 127 / (kmax * n)`` (so every level is ``k * d`` again); the int32 bias,
    quantized with ``input_scale * s``, is rescaled to match. ``levels_by_layer`` holds the
    trained integer levels ``k`` of each kernel in TFLite layout (output channel first); a
    channel is changed only if the file's integers are exactly ``rint(127 k / kmax)``.
    Returns the new content and the number of channels changed.
    """
    model_obj = _read_flatbuffer(content)
    names = _op_names(model_obj)
    changed = 0
    layer_names = list(levels_by_layer)
    for sg in model_obj.subgraphs:
        for op in sg.operators:
            if names.get(op.opcodeIndex) not in ("CONV_2D", "FULLY_CONNECTED") or \
                    len(op.inputs) < 2:
                continue
            w_t = sg.tensors[op.inputs[1]]
            q = w_t.quantization
            buf = model_obj.buffers[w_t.buffer]
            if w_t.type != 9 or q is None or q.scale is None or buf.data is None or \
                    len(buf.data) == 0:  # 9 = INT8
                continue
            tname = _tensor_name(w_t)
            layer = _layer_of(tname, layer_names)
            shape = tuple(int(s) for s in w_t.shape)
            if layer is None or levels_by_layer[layer].shape != shape:
                continue
            levels = levels_by_layer[layer].reshape(shape[0], -1).astype(np.int64)
            ints = _buffer_values(buf, np.int8).reshape(shape)
            scales = np.asarray(q.scale, np.float64)
            per_channel = scales.size > 1
            if per_channel and int(q.quantizedDimension) != 0:
                continue
            rows = ints.reshape(shape[0], -1).astype(np.int64)
            if not per_channel:  # one scale for the tensor: one kmax for all rows
                rows, levels = rows.reshape(1, -1), levels.reshape(1, -1)
            new_rows, new_scales = rows.copy(), scales.copy()
            for c in range(rows.shape[0]):
                kmax = int(np.abs(levels[c]).max())
                if kmax == 0 or 127 % kmax == 0:
                    continue  # exact already
                # (ties such as 127 * 3 / 6 = 63.5 may round either way)
                if np.abs(127.0 * levels[c] / kmax - rows[c]).max() > 0.5 + 1e-6:
                    continue  # not the mapping we know how to undo
                n = 127 // kmax
                new_rows[c] = levels[c] * n
                new_scales[c] = scales[c] * 127.0 / (kmax * n)
                changed += 1
            if np.array_equal(new_scales, scales):
                continue
            out = new_rows.reshape(shape)
            buf.data = np.ascontiguousarray(out.astype(np.int8)).view(np.uint8).ravel()
            q.scale = new_scales.astype(np.float32).tolist()
            ratio = new_scales / scales
            # The int32 bias is quantized with input_scale * weight_scale_c: rescale it too.
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                b_t = sg.tensors[op.inputs[2]]
                b_buf = model_obj.buffers[b_t.buffer]
                if b_t.type == _INT32 and b_buf.data is not None and len(b_buf.data):
                    b_int = _buffer_values(b_buf, np.int32)
                    b_scales = np.asarray(b_t.quantization.scale, np.float64)
                    b_new = np.rint(b_int / ratio) if per_channel else np.rint(b_int / ratio[0])
                    b_buf.data = b_new.astype(np.int32).view(np.uint8).ravel()
                    b_t.quantization.scale = (b_scales * ratio).astype(np.float32).tolist()
    if not changed:
        return content, 0
    return _write_flatbuffer(model_obj), changed


def _int32_bias_ops(model_obj) -> Iterator[Tuple[Any, Any, Any, np.ndarray]]:
    """``(subgraph, op, bias buffer, int32 values)`` of every conv / depthwise / fully-connected
    op of ``model_obj`` (a ``ModelT``) that has an int32 bias."""
    names = _op_names(model_obj)
    for sg in model_obj.subgraphs:
        for op in sg.operators:
            if names.get(op.opcodeIndex) not in _WEIGHT_OPS or len(op.inputs) < 3 or \
                    op.inputs[2] < 0:
                continue
            b_t = sg.tensors[op.inputs[2]]
            buf = model_obj.buffers[b_t.buffer]
            if b_t.type != _INT32 or buf.data is None or not len(buf.data):
                continue
            yield sg, op, buf, _buffer_values(buf, np.int32)


def _restate_int32_bias(b_t, buf, value: np.ndarray, runtime: np.ndarray) -> None:
    """Writes the bias ``value`` (float, per channel) as int32 on the scales ``runtime``."""
    ints = np.clip(np.rint(value / runtime), -2 ** 31, 2 ** 31 - 1)
    buf.data = ints.astype(np.int32).view(np.uint8).ravel()
    b_t.quantization.scale = runtime.astype(np.float32).tolist()
    b_t.quantization.zeroPoint = [0] * ints.size


#: Relative difference between a bias's stored scale and ``s_in * s_w`` that is float32 noise.
_BIAS_SCALE_RTOL = 1e-5


def _match_bias_scales(content: bytes) -> Tuple[bytes, int]:
    """Re-expresses each int32 bias on the grid the runtime adds it on, ``s_in * s_w``.

    LiteRT's conv / depthwise / fully-connected kernels add the int32 bias ``B`` in accumulator
    units, ``s_in * s_w`` (the op's input scale times the channel's weight scale), whatever scale
    the bias tensor itself states. The converter quantizes the bias with the scale of the input
    it saw, and sometimes removes that input's op afterwards: an identity such as a dropout or a
    mean over a 1x1 map (MobileNet's global pooling and dropout at 32x32, EfficientNet's
    squeeze-excite pooling in the last stages), so the op now reads its producer's tensor,
    whose range differs. The file then adds ``B * s_in *
    s_w`` where it meant ``B * s_bias``: MobileNet's logits got a bias 1.074x too large and
    EfficientNetV2B0's 9.4x (measured on 32x32 int8 files, 2026-12-06). Here such a bias becomes
    ``rint(B * s_bias / (s_in * s_w))`` with the scale ``s_in * s_w``: the value the converter
    meant, rounded on the runtime's grid. Returns the new content and the number of channels
    changed.
    """
    model_obj = _read_flatbuffer(content)
    changed = 0
    for sg, op, buf, stored in _int32_bias_ops(model_obj):
        x_t, w_t, b_t = (sg.tensors[i] for i in op.inputs[:3])
        scales = [t.quantization.scale if t.quantization is not None else None
                  for t in (x_t, w_t, b_t)]
        if any(v is None or not len(v) for v in scales) or len(scales[0]) != 1:
            continue
        b_scale = np.broadcast_to(np.asarray(scales[2], np.float64), stored.shape)
        runtime = np.broadcast_to(float(scales[0][0]) * np.asarray(scales[1], np.float64),
                                  stored.shape)
        off = ~np.isclose(b_scale, runtime, rtol=_BIAS_SCALE_RTOL, atol=0.0)
        if not off.any():
            continue
        _restate_int32_bias(b_t, buf, stored * b_scale, runtime)
        changed += int(off.sum())
    if not changed:
        return content, 0
    return _write_flatbuffer(model_obj), changed


def _int4_values(buf, count: int) -> np.ndarray:
    """An INT4 tensor's values: 4-bit two's-complement codes, two per byte, the low nibble
    first, which is the packed archive's little-endian 4-bit packing (:func:`_unpack_bits`).

    Example:
        >>> class Buf: data = np.array([0x7F, 0x09], np.uint8)
        >>> _int4_values(Buf, 3).tolist()
        [-1, 7, -7]
    """
    codes = _unpack_bits(bytes(np.asarray(buf.data, np.uint8)), count, 4).astype(np.int16)
    return np.where(codes > 7, codes - 16, codes).astype(np.int8)


def _int4_bytes(values: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_int4_values`: values in [-8, 7] as INT4 tensor bytes.

    Example:
        >>> _int4_bytes(np.array([-1, 7, -7])).tolist()
        [127, 9]
    """
    return np.frombuffer(_pack_bits(np.asarray(values, np.int64) & 15, 4), np.uint8).copy()


def _per_channel_dense_weights(content: bytes, plain: keras.Model,
                               kernels: Dict[str, QuantizedWeight]) -> Tuple[bytes, int]:
    """Gives each int8 / INT4 fully-connected kernel the student's per-channel levels and steps.

    The converter takes no per-channel FakeQuant on a dense kernel ("tfl.transpose op has
    mismatched quantized axes"), so the fake-quant graph rounds a per-channel student's dense
    kernel once more onto one per-tensor grid: the softmax heads of ResNet50, DenseNet121 and
    NASNetMobile then differed from the student's on 2-11 % of their outputs, by up to 20 steps.
    LiteRT runs FULLY_CONNECTED with per-channel int8 and INT4 weights (axis 0; INT4 measured
    2026-12-07: both resolvers honour each channel's scale), so here each such kernel becomes
    the student's own integers ``k * n`` (``n = floor(qmax / kmax)``, ``qmax`` 127 or 7) with
    the scales ``step_c / n``, and its int32 bias is restated on the new scales. In an ``int4``
    file a per-channel student's 4-bit dense kernel was otherwise re-rounded onto one 15-level
    grid for all channels: up to 16 output steps off on 93 % of values (W4A4, seed 0). Only
    kernels whose file values are exactly the per-tensor rounding of the student's are changed.
    Returns the new content and the number of kernels changed.
    """
    found = {}
    for layer in plain.layers:
        w = kernels.get(layer.name)
        if type(layer) is keras.layers.Dense and w is not None and w.levels is not None and \
                w.per_channel:
            steps = np.asarray(w.step, np.float64).reshape(-1)
            if steps.size == w.levels.shape[-1] and np.abs(w.levels).max() <= 127:
                found[layer.name] = (w.levels.T.astype(np.int64), steps)
    if not found:
        return content, 0
    model_obj = _read_flatbuffer(content)
    names = _op_names(model_obj)
    changed = 0
    for sg in model_obj.subgraphs:
        for op in sg.operators:
            if names.get(op.opcodeIndex) != "FULLY_CONNECTED" or len(op.inputs) < 2:
                continue
            x_t, w_t = sg.tensors[op.inputs[0]], sg.tensors[op.inputs[1]]
            q, buf = w_t.quantization, model_obj.buffers[w_t.buffer]
            if w_t.type not in (_INT8, _INT4) or q is None or q.scale is None or \
                    not len(q.scale) or len(set(np.asarray(q.scale).tolist())) != 1 or \
                    buf.data is None or not len(buf.data):  # on one grid (one scale, repeated)
                continue
            layer = _layer_of(_tensor_name(w_t), list(found))
            if layer is None or found[layer][0].shape != tuple(int(d) for d in w_t.shape):
                continue
            levels, steps = found[layer]
            int4 = w_t.type == _INT4
            qmax = 7 if int4 else 127
            scale = float(q.scale[0])
            ints = (_int4_values(buf, levels.size) if int4 else
                    _buffer_values(buf, np.int8)).reshape(levels.shape)
            if np.abs(ints * scale - levels * steps[:, None]).max() > 0.5 * scale * (1 + 1e-5):
                continue  # not the per-tensor rounding of the student's kernel (a folded BN)
            kmax = np.abs(levels).max(axis=1)
            if kmax.max() > qmax:
                continue
            n = np.where(kmax > 0, qmax // np.maximum(kmax, 1), 1)
            new_scales = np.where(kmax > 0, steps / n, scale)
            new_ints = levels * n[:, None]
            buf.data = _int4_bytes(new_ints) if int4 else np.ascontiguousarray(
                new_ints.astype(np.int8)).view(np.uint8).ravel()
            q.scale, q.zeroPoint = new_scales.astype(np.float32).tolist(), [0] * len(n)
            q.quantizedDimension = 0
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                b_t = sg.tensors[op.inputs[2]]
                b_buf = model_obj.buffers[b_t.buffer]
                if b_t.type == _INT32 and b_buf.data is not None and len(b_buf.data) and \
                        b_t.quantization is not None and len(b_t.quantization.scale):
                    stored = _buffer_values(b_buf, np.int32)
                    value = stored * np.asarray(b_t.quantization.scale, np.float64)
                    runtime = float(x_t.quantization.scale[0]) * new_scales  # s_in * s_w,c
                    _restate_int32_bias(b_t, b_buf, value, runtime)
                    b_t.quantization.quantizedDimension = 0
            changed += 1
    if not changed:
        return content, 0
    return _write_flatbuffer(model_obj), changed


def _align_student_biases(model: keras.Model, plain: keras.Model, content: bytes
                          ) -> Dict[str, Any]:
    """Moves the student's folded biases onto the int32 grid the file stores them on.

    The file holds each conv/dense bias (batch norm folded in) as an int32 ``B`` with scale
    ``s_in * s_w`` (input scale times the channel's weight scale): it adds ``B * s_in * s_w``
    where the student adds the float ``b``, an error of up to half that scale, i.e. up to about
    ``0.5 * s_in * s_w / s_out`` (~1e-3) output steps. Tiny, but the accumulators of a
    low-bit network take few distinct values, so some land that close to a rounding tie and
    round the other way; one flipped step then moves its consumers and, through 19 layers, the
    logits (measured: 25-38 % of ResNet20's int8 logits differed by 1-2 steps before, 1-7 %
    after). Here the student's batch-norm ``beta`` (``moving_mean`` without one; the layer's own
    bias when no batch norm is folded) is shifted by ``B * s_in * s_w - b`` so that the student
    computes the file's bias. Returns ``{"channels", "max_shift_steps"}`` (largest shift in
    output quantization steps).
    """
    model_obj = _read_flatbuffer(content)
    plan = _fold_plan(plain)
    layer_names = [layer.name for layer in plain.layers]
    student = {_inner(layer).name: layer for layer in model.layers if not _is_quantize_layer(layer)}
    updates = []
    max_shift = 0.0
    for sg, op, _, ints in _int32_bias_ops(model_obj):
        w_t, b_t = sg.tensors[op.inputs[1]], sg.tensors[op.inputs[2]]
        if b_t.quantization is None or b_t.quantization.scale is None:
            continue
        name = _layer_of(_tensor_name(w_t), layer_names)
        if name is None:
            continue
        layer = plain.get_layer(name)
        stored = ints * np.asarray(b_t.quantization.scale, np.float64)
        if isinstance(layer, keras.layers.BatchNormalization):
            # An unfolded batch norm (after a concatenation or a residual Add: DenseNet's
            # and ResNetV2's pre-activation batch norms) runs as a 1x1 depthwise
            # convolution `a*x + b` with its bias on the same int32 grid `s_in * s_w`.
            # With one weight per channel that grid is ~1/127 of the input step times
            # |a|, so its rounding is far coarser than a kernel's: align the student's
            # own beta (moving mean without one).
            affine = _channel_affine(layer, stored.size)
            if affine is None:
                continue
            bn, (g, bias) = layer, affine
        elif isinstance(layer, KERNEL_LAYERS):
            bn = plan.get(id(layer))
            _, bias, g = _fold(layer, bn)
        else:
            # Another per-channel affine layer the fake-quant graph runs as a 1x1 depthwise
            # convolution (Rescaling, Normalization, ``x * c``): its constant bias is not a
            # student weight to align.
            continue
        if stored.shape != bias.shape:
            continue
        shift = stored - bias.astype(np.float64)
        out_q = sg.tensors[op.outputs[0]].quantization
        if out_q is not None and out_q.scale is not None and len(out_q.scale):
            max_shift = max(max_shift, float(np.abs(shift).max() / out_q.scale[0]))
        target = student.get(bn.name if bn is not None else name)
        if target is None:
            continue
        variables = _layer_variables(target)
        if bn is not None and "beta" in variables:
            updates.append((variables["beta"], shift))
        elif bn is not None:  # center=False: the same shift through the moving mean
            updates.append((variables["moving_mean"], -shift / g))
        elif "bias" in variables:
            updates.append((variables["bias"], shift))
    for var, shift in updates:
        var.assign((var.numpy().astype(np.float64) + shift).astype(np.float32))
    return {"channels": int(sum(s.size for _, s in updates)), "max_shift_steps": max_shift}
