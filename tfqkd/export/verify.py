"""Reading ``.tflite`` files back: weight tensors as stored, and parity with the Keras model.

:func:`verify_tflite` runs a file with LiteRT on labelled data and compares it with the Keras
model it came from (a :class:`ParityReport`), feeding int8 inputs rounded by
:func:`quantize_input` as the student rounds them; :func:`tflite_weight_levels` reads every
conv/dense weight tensor back from the interpreter (storage type, integers, scales, distinct
levels per channel).

Example:
    >>> quantize_input(np.array([0.0, 0.25], np.float32), 0.25, 0).tolist()
    [0, 1]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._keras import keras
from tfqkd.export._common import _as_numpy, _layer_of, _open_interpreter
from tfqkd.export._flatbuffer import WEIGHT_OPS as _WEIGHT_OPS
from tfqkd.export._flatbuffer import op_names as _op_names
from tfqkd.export._flatbuffer import read as _read_flatbuffer
from tfqkd.export._flatbuffer import tensor_name as _tensor_name
from tfqkd.qat_weights import _inner

__all__ = ["ParityReport", "verify_tflite", "tflite_weight_levels", "quantize_input"]


_TYPE_BITS = {0: 32, 1: 16, 2: 32, 3: 8, 4: 64, 7: 16, 9: 8, 10: 64, 16: 64, 17: 4}
_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16",
               9: "int8", 10: "float64", 17: "int4"}


def tflite_weight_levels(path: Union[str, os.PathLike], layer_names: Sequence[str] = ()
                         ) -> List[Dict[str, Any]]:
    """Reads every conv/dense weight tensor back from the LiteRT interpreter.

    Returns one dict per weight tensor (in operator order): ``op``, ``tensor`` (name), ``layer``
    (the Keras layer it comes from, when one of ``layer_names`` appears in the name), ``dtype``
    (storage type in the file: ``int8``, ``int4``, ``float32``...), ``storage_bits``, ``shape``,
    ``size``, ``values`` (integers as stored, float for float tensors), ``scales`` (per channel),
    ``axis`` (quantized dimension) and ``max_levels_per_channel`` (distinct values per output
    channel, maximum over channels).

    Example:
        >>> import os, tempfile, tfqkd
        >>> p = os.path.join(tempfile.mkdtemp(), "m.tflite")
        >>> from tfqkd.export import export_tflite
        >>> _ = export_tflite(tfqkd.models.tiny_resnet(seed=0), p, mode="float")
        >>> tflite_weight_levels(p)[0]["dtype"]
        'float32'
    """
    from ai_edge_litert.interpreter import Interpreter

    with open(path, "rb") as f:
        content = f.read()
    model_obj = _read_flatbuffer(content)
    names = _op_names(model_obj)
    interpreter = Interpreter(model_content=content)
    sg = model_obj.subgraphs[0]
    out = []
    seen = set()
    for op in sg.operators:
        op_name = names.get(op.opcodeIndex)
        if op_name not in _WEIGHT_OPS or len(op.inputs) < 2 or op.inputs[1] in seen:
            continue
        index = int(op.inputs[1])
        t = sg.tensors[index]
        buf = model_obj.buffers[t.buffer]
        if buf.data is None or len(buf.data) == 0:
            if not (getattr(buf, "size", 0) or 0):
                continue  # a runtime tensor (e.g. a dequantized float weight): skip
        seen.add(index)
        values = np.asarray(interpreter.get_tensor(index))  # INT4 comes back unpacked as int8
        q = t.quantization
        scales = np.asarray(q.scale if q is not None and q.scale is not None else [], np.float64)
        axis = int(q.quantizedDimension) if scales.size > 1 else None
        if op_name == "DEPTHWISE_CONV_2D":
            axis = 3  # output channels of a (1, h, w, c*mult) depthwise kernel
        elif axis is None:
            axis = 0  # TFLite stores conv (O,H,W,I) and dense (O,I) output-channel first
        rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        levels = max(len(np.unique(r)) for r in rows)
        tname = _tensor_name(t)
        out.append({
            "op": op_name, "tensor": tname, "layer": _layer_of(tname, layer_names),
            "dtype": _TYPE_NAMES.get(t.type, str(t.type)), "storage_bits": _TYPE_BITS.get(t.type, 0),
            "shape": tuple(int(s) for s in t.shape), "size": int(values.size), "values": values,
            "scales": scales, "axis": axis, "max_levels_per_channel": int(levels),
        })
    return out


@dataclasses.dataclass
class ParityReport:
    """How a ``.tflite`` file compares with its Keras model on a data set (:func:`verify_tflite`).

    Example:
        >>> r = ParityReport("m.tflite", 10, 0.9, 0.9, 1.0, 0.01, 1000, 2000, 0.5, 4.0, [])
        >>> r.to_dict()["top1_agreement"]
        1.0
    """

    path: str
    num_examples: int
    keras_top1: float
    tflite_top1: float
    top1_agreement: float
    max_logit_diff: float
    file_bytes: int
    num_weights: int
    bytes_per_weight: float
    bits_per_weight: float
    layers: List[Dict[str, Any]]
    input_dtype: str = "float32"
    weight_storage: Dict[str, int] = dataclasses.field(default_factory=dict)
    #: RMS of the file's minus the model's outputs over the RMS of the model's, both centred per
    #: example (a shift common to all classes changes no prediction). Unlike top-1 agreement it
    #: does not hinge on near-tied logits. Measured: 0.003 for a 5-layer W4A8 net's int8 file,
    #: 0.14-0.53 for 50+-layer Applications models a few steps from random weights (one-step
    #: rounding differences grow with depth; docs/export.md), about 1 for a file whose outputs
    #: are unrelated to the model's.
    relative_output_error: float = float("nan")
    #: Disagreements where the file's output at the model's top-1 class equals the file's maximum:
    #: the file ties the two classes (equal int8 logits, or one 1/256 step of an int8 softmax)
    #: and its argmax takes the lower index. Near-tied models (a few training steps) have many
    #: of these with an int8 head, next to none with a 16-bit one (tfqkd.export.heads).
    tied_disagreements: int = 0

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of every figure."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"TFLite parity report for {self.path}",
            f"  examples            {self.num_examples}",
            f"  Keras top-1         {self.keras_top1:.4f}",
            f"  TFLite top-1        {self.tflite_top1:.4f}",
            f"  top-1 agreement     {self.top1_agreement:.4f} ({self.tied_disagreements} "
            "disagreements are ties in the file)",
            f"  max |logit diff|    {self.max_logit_diff:.5f}",
            f"  relative error      {self.relative_output_error:.4f}",
            f"  file size           {self.file_bytes} bytes",
            f"  conv/dense weights  {self.num_weights} "
            f"({self.bytes_per_weight:.3f} bytes = {self.bits_per_weight:.2f} bits per weight, "
            "whole file)",
            f"  weight storage      {self.weight_storage}",
            "  per-layer weights (distinct values per output channel, max over channels):",
        ]
        for layer in self.layers:
            lines.append(f"    {str(layer['layer'] or layer['tensor'])[:40]:40s} {layer['dtype']:7s} "
                         f"{str(layer['shape']):18s} levels<={layer['max_levels_per_channel']}")
        return "\n".join(lines)


def _batches(dataset, limit: Optional[int]) -> Iterable[Tuple[np.ndarray, np.ndarray]]:
    if isinstance(dataset, tuple) and len(dataset) == 2 and not isinstance(dataset[0], tuple):
        x, y = (_as_numpy(dataset[0]), _as_numpy(dataset[1]))
        dataset = [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)]
    count = 0
    for element in dataset:
        if not isinstance(element, (tuple, list)) or len(element) < 2:
            raise ValueError("verify_tflite needs labelled data: a dataset of (images, labels) "
                             "batches or a tuple (images, labels) of arrays.")
        x = _as_numpy(element[0]).astype(np.float32)
        y = _as_numpy(element[1]).reshape(-1).astype(np.int64)
        if limit is not None:
            x, y = x[:limit - count], y[:limit - count]
        if len(x) == 0:
            return
        count += len(x)
        yield x, y


def _invoke_batch(interpreter, inp, out, feed: np.ndarray) -> np.ndarray:
    """Outputs for a batch; one image at a time when the file is fixed to batch 1.

    A file whose graph holds batch-1 constants (Keras Applications' ``Reshape((classes,))``
    head becomes RESHAPE to ``[1, classes]``) cannot be resized to a larger batch: LiteRT
    fails in XNNPACK's reshape then. The deployed file runs one image per call anyway.
    """
    if int(interpreter.get_input_details()[0]["shape"][0]) == feed.shape[0]:
        try:
            interpreter.set_tensor(inp["index"], feed)
            interpreter.invoke()
            return interpreter.get_tensor(out["index"])
        except (RuntimeError, ValueError):
            if feed.shape[0] == 1:
                raise
    interpreter.resize_tensor_input(inp["index"], (1,) + tuple(feed.shape[1:]))
    interpreter.allocate_tensors()
    rows = []
    for i in range(feed.shape[0]):
        interpreter.set_tensor(inp["index"], feed[i:i + 1])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"]).copy())
    return np.concatenate(rows, axis=0)


def verify_tflite(
    path: Union[str, os.PathLike],
    model: keras.Model,
    dataset: Any,
    *,
    max_examples: Optional[int] = None,
    num_threads: Optional[int] = None,
    print_report: bool = False,
    runtime: str = "xnnpack",
) -> ParityReport:
    """Runs ``path`` with LiteRT on ``dataset`` and compares it with ``model`` (a :class:`ParityReport`).

    Args:
        path: The ``.tflite`` file.
        model: The Keras model it was exported from (QAT or plain).
        dataset: ``(images, labels)`` batches (a ``tf.data.Dataset`` or any iterable) or a tuple
            of arrays ``(images, labels)``.
        max_examples: Stop after this many examples.
        num_threads: LiteRT interpreter threads.
        print_report: Also print the report.
        runtime: The kernels that run the file (``tfqkd.export.RUNTIMES``): ``"xnnpack"``
            (LiteRT's default) or ``"builtin"`` (its built-in kernels without the default
            delegates; compare with a student exported with ``runtime="builtin"``).

    Example:
        >>> import numpy as np, os, tempfile, tfqkd
        >>> m = tfqkd.models.tiny_resnet(seed=0)
        >>> p = os.path.join(tempfile.mkdtemp(), "m.tflite")
        >>> from tfqkd.export import export_tflite
        >>> _ = export_tflite(m, p, mode="float")
        >>> x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
        >>> verify_tflite(p, m, (x, np.zeros(4, "int32"))).top1_agreement
        1.0
    """
    path = os.fspath(path)
    interpreter = _open_interpreter(path, runtime, num_threads=num_threads)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    current_batch = None
    one_by_one = False
    n = agree = keras_ok = tfl_ok = tied = 0
    max_diff = 0.0
    diff_sq = ref_sq = 0.0
    for x, y in _batches(dataset, max_examples):
        if x.shape[0] != current_batch and not one_by_one:
            try:
                interpreter.resize_tensor_input(inp["index"],
                                                (x.shape[0],) + tuple(inp["shape"][1:]))
                interpreter.allocate_tensors()
                current_batch = x.shape[0]
            except (RuntimeError, ValueError):
                one_by_one = True  # see _invoke_batch
        feed = x
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            feed = quantize_input(x, scale, zero, inp["dtype"])
        logits = _invoke_batch(interpreter, inp, out, feed)
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            logits = (logits.astype(np.float32) - zero) * scale
        ref = model(x, training=False)
        ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).numpy()
        if ref.shape[-1] != logits.shape[-1]:
            raise ValueError(f"the file outputs {logits.shape[-1]} values per example but the "
                             f"model {ref.shape[-1]}: is {path!r} an export of this model?")
        max_diff = max(max_diff, float(np.abs(ref - logits).max()))
        diff = (logits - ref).astype(np.float64)
        centred = ref.astype(np.float64) - ref.mean(-1, keepdims=True)
        diff_sq += float(((diff - diff.mean(-1, keepdims=True)) ** 2).sum())
        ref_sq += float((centred ** 2).sum())
        p_ref, p_tfl = ref.argmax(-1), logits.argmax(-1)
        agree += int((p_ref == p_tfl).sum())
        at_ref = np.take_along_axis(logits, p_ref[:, None], -1)[:, 0]
        tied += int(((p_ref != p_tfl) & (at_ref == logits.max(-1))).sum())
        keras_ok += int((p_ref == y).sum())
        tfl_ok += int((p_tfl == y).sum())
        n += len(y)
    if n == 0:
        raise ValueError("verify_tflite got an empty dataset.")
    layer_names = [_inner(layer).name for layer in model.layers]
    layers = tflite_weight_levels(path, layer_names)
    num_weights = sum(layer["size"] for layer in layers)
    storage: Dict[str, int] = {}
    for layer in layers:
        storage[layer["dtype"]] = storage.get(layer["dtype"], 0) + layer["size"]
    size = os.path.getsize(path)
    report = ParityReport(
        path=path, num_examples=n, keras_top1=keras_ok / n, tflite_top1=tfl_ok / n,
        top1_agreement=agree / n, max_logit_diff=max_diff, file_bytes=size,
        num_weights=num_weights, bytes_per_weight=size / max(num_weights, 1),
        bits_per_weight=8.0 * size / max(num_weights, 1),
        layers=[{k: v for k, v in layer.items() if k not in ("values", "scales")}
                for layer in layers],
        input_dtype=np.dtype(inp["dtype"]).name, weight_storage=storage,
        relative_output_error=(float(np.sqrt(diff_sq / ref_sq)) if ref_sq > 0
                               else 0.0 if diff_sq == 0 else float("inf")),
        tied_disagreements=tied)
    if print_report:
        print(report)
    return report


def quantize_input(x: Any, scale: float, zero_point: int, dtype: Any = np.int8) -> np.ndarray:
    """Integers for a full-integer file's input, rounded exactly as the student's input quantizer.

    The student rounds its input with ``FakeQuantWithMinMaxVars``, in float32 (TensorFlow's
    kernel): ``floor((clip(x) - min) / scale - q0 + 0.5)`` with ``q0 = zero - qmin`` and the
    nudged ``min = -q0 * scale``. ``np.rint(x / scale) + zero`` is the same number except where
    ``x / scale`` sits within float32 rounding of a tie; CIFAR pixels take 256 values per
    channel, so when one of them does, every image has it (measured: 0.15 % of a test set's
    input values differed).

    Example:
        >>> quantize_input(np.array([0.0, 0.3, -1.0], np.float32), 0.1, -5).tolist()
        [-5, -2, -15]
    """
    info = np.iinfo(dtype)
    s = np.float32(scale)
    q0 = np.float32(int(zero_point) - info.min)  # the zero point on the unsigned 0..2^b-1 grid
    lo = np.float32(-q0 * s)
    hi = np.float32(np.float32(info.max - info.min - q0) * s)
    clamped = np.minimum(np.maximum(np.asarray(x, np.float32), lo), hi)
    k = np.floor((clamped - lo) / s - q0 + np.float32(0.5))
    return (k + int(zero_point)).astype(dtype)
