"""Exports quantized students to TFLite, checks the files, and packs weights at their true bit-width.

Four TFLite modes, one function (:func:`export_tflite`):

* ``"float"``   -- float32 everything (the reference file).
* ``"dynamic"`` -- int8 weights, float activations (no calibration data needed).
* ``"int8"``    -- full-integer: int8 weights *and* activations, calibrated on representative data;
  optionally int8 input/output (``int8_io=True``).
* ``"int4"``    -- like ``"int8"`` but weights trained at <= 4 bits are stored as TFLite ``INT4``
  tensors (two weights per byte); LiteRT runs them.

How a tfmot/tfqkd QAT student becomes a TFLite file. The QAT model computes its kernels as
``quantizer(w, training=False, weights=vars)`` inside ``QuantizeWrapperV2``; the converter cannot
see through custom quantizers, so :func:`forward_model` first rebuilds a *plain* Keras model of the
same architecture whose kernels are those forward-pass values ``Q(w)`` (wrappers stripped, batch
norm kept). Then:

* ``int8``: full-integer post-training quantization of that model. Batch norm folding multiplies each
  output channel by one number, so a ternary channel ``{-d, 0, d}`` stays ternary, and the per-channel
  int8 scale ``max|w_c| / 127`` maps it exactly onto ``{-127, 0, 127}`` (binary likewise onto
  ``{-127, 127}``). For 3..8-bit kernels whose levels ``k * d`` do not land on that grid (127 is
  prime), the file's weight tensors are afterwards *snapped*: the scale of such a channel becomes
  ``d_c / n_c`` with ``n_c = floor(127 / kmax_c)`` and the integers ``k * n_c``, and the int32 bias is
  re-expressed in the new scale, so every trained level is represented exactly.
* ``int4``: batch norm is folded by us, every kernel goes through a ``FakeQuantWithMinMaxVarsPerChannel``
  (4 bits for kernels trained at <= 4 bits, 8 bits otherwise) whose range puts the trained levels on
  the integer grid, every activation through an 8-bit ``FakeQuantWithMinMaxVars`` whose range is
  the student's own where it has a quantizer there (with ``activation_bits`` tfqkd students have one
  at every such tensor, input included: the file then rounds as the student does) and is
  calibrated on the representative data elsewhere, and the converter's low-bit QAT path
  (``_experimental_low_bit_qat``) emits ``INT4`` weight tensors.

:func:`verify_tflite` runs a file with LiteRT and compares it with the Keras model (a
:class:`ParityReport`), feeding int8 inputs rounded by :func:`quantize_input` as the student
rounds them; ``export_tflite(..., align_student=True)`` puts the student's folded biases on the
file's int32 grid so that the two compute the same; :func:`tflite_weight_levels` reads the weight
tensors back from the interpreter.
:func:`pack_weights` / :func:`load_packed_weights` store the forward weights at their
true bit-width (ternary: 5 trits per byte, 1.6 bits) with exact round trip.

Example:
    >>> import numpy as np, tempfile, os
    >>> import tfqkd
    >>> from tfqkd import export
    >>> m = tfqkd.models.tiny_resnet(seed=0)
    >>> d = tempfile.mkdtemp()
    >>> info = export.export_tflite(m, os.path.join(d, "m.tflite"), mode="float")
    >>> info["mode"], info["bytes"] > 0
    ('float', True)
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import struct
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._flatbuffer import WEIGHT_OPS as _WEIGHT_OPS
from tfqkd._flatbuffer import op_names as _op_names
from tfqkd._flatbuffer import read as _read_flatbuffer
from tfqkd._flatbuffer import write as _write_flatbuffer
from tfqkd._keras import keras, tf
from tfqkd.tflite_layout import space_to_depth_convs

__all__ = [
    "MODES",
    "ExportError",
    "ParityReport",
    "export_tflite",
    "verify_tflite",
    "quantize_input",
    "tflite_weight_levels",
    "forward_model",
    "forward_weights",
    "pack_weights",
    "load_packed_weights",
    "packed_archive_stats",
    "PINNED_OUTPUT_RANGES",
    "activation_name",
]

#: Export modes understood by :func:`export_tflite`.
MODES: Tuple[str, ...] = ("float", "dynamic", "int8", "int4")

_KERNEL_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
_PACK_MAGIC = b"TFQKDPW1"


class ExportError(RuntimeError):
    """The TFLite converter (or the rebuild before it) rejected the model; the message says why."""


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
def _check_writable(path: Union[str, os.PathLike]) -> str:
    """Fails before any expensive work when ``path`` cannot be written."""
    path = os.fspath(path)
    if not path or os.path.isdir(path):
        raise IsADirectoryError(f"export path {path!r} is a directory; pass a file name such as "
                                f"{os.path.join(path or '.', 'model.tflite')!r}.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist; "
                                f"create it first (os.makedirs({directory!r})).")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path!r}: directory {directory!r} is not writable; "
                              "choose another output path.")
    return path


def _atomic_write(path: str, data: bytes) -> None:
    """All or nothing, with the permissions of every other tfqkd output (``tfqkd._io``)."""
    from tfqkd._io import atomic_write

    atomic_write(path, data)


def _open_interpreter(path: str, **kwargs):
    """A LiteRT interpreter for ``path``, with an error naming the file when it is not a model."""
    from ai_edge_litert.interpreter import Interpreter

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no TFLite file at {path!r}; create one with export_tflite().")
    if os.path.getsize(path) == 0:
        raise ValueError(f"TFLite file {path!r} is empty (0 bytes): the export did not finish. "
                         "Export it again (export_tflite() or tools/export_tflite.py).")
    try:
        return Interpreter(model_path=path, **kwargs)
    except ValueError as e:
        raise ValueError(f"TFLite file {path!r} is not a valid TFLite model ({e}); it is corrupt "
                         "or another kind of file. Export it again (export_tflite() or "
                         "tools/export_tflite.py).") from e


# --------------------------------------------------------------------------------------------
# tfmot wrappers -> plain float model with the forward-pass kernels
# --------------------------------------------------------------------------------------------
def _tfmot_classes():
    from tensorflow_model_optimization.python.core.quantization.keras import (
        quantize_aware_activation, quantize_layer, quantize_wrapper)
    return (quantize_wrapper.QuantizeWrapper, quantize_layer.QuantizeLayer,
            quantize_aware_activation.QuantizeAwareActivation)


def _is_wrapper(layer) -> bool:
    return isinstance(layer, _tfmot_classes()[0])


def _is_quantize_layer(layer) -> bool:
    return isinstance(layer, _tfmot_classes()[1])


def _inner(layer):
    return layer.layer if _is_wrapper(layer) else layer


def _weight_short_name(w) -> str:
    return w.name.split("/")[-1].split(":")[0]


def _layer_variables(layer) -> Dict[str, Any]:
    """{short name: variable} of the (inner) layer's own weights.

    tfmot's wrapper assigns the quantized tensor to ``layer.kernel``, which drops the kernel
    variable from the inner layer's ``weights`` (and its name scope is not reliable after
    cloning); the wrapper's ``_weight_vars`` still hold it.
    """
    if not _is_wrapper(layer):
        return {_weight_short_name(w): w for w in layer.weights}
    found = {}
    for weight, _, _ in layer._weight_vars:  # noqa: SLF001 (tfmot API)
        found[_weight_short_name(weight)] = weight
    for w in layer.layer.weights:
        found.setdefault(_weight_short_name(w), w)
    return found


def _layer_forward_weights(layer) -> Dict[str, np.ndarray]:
    """{short name: value as the forward pass uses it} for ``layer`` (its inner layer if wrapped)."""
    variables = _layer_variables(layer)
    quantized = {}
    if _is_wrapper(layer):
        for weight, quantizer, quantizer_vars in layer._weight_vars:  # noqa: SLF001 (tfmot API)
            q = quantizer(weight, training=False, weights=quantizer_vars)
            quantized[weight.ref()] = np.asarray(q.numpy() if hasattr(q, "numpy") else q,
                                                 dtype=np.float32)
    return {name: quantized[v.ref()] if v.ref() in quantized else v.numpy()
            for name, v in variables.items()}


def _quantized_weight_bits(layer) -> Dict[str, Optional[int]]:
    """{short weight name: trained bit-width (None if the quantizer does not state it)}."""
    if not _is_wrapper(layer):
        return {}
    out = {}
    for weight, quantizer, _ in layer._weight_vars:  # noqa: SLF001
        bits = None
        for attr in ("bits", "num_bits", "weight_bits"):
            value = getattr(quantizer, attr, None)
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                bits = int(value)
                break
        out[_weight_short_name(weight)] = bits
    return out


def forward_weights(model: keras.Model) -> Dict[str, Dict[str, np.ndarray]]:
    """``{inner layer name: {weight name: value as the forward pass uses it}}``.

    For a QAT model each quantized weight is replaced by ``quantizer(w, training=False, ...)``;
    weight names are the short variable names (``kernel``, ``gamma``, ``moving_mean``...).

    Example:
        >>> import tfqkd
        >>> w = forward_weights(tfqkd.models.tiny_resnet(seed=0))
        >>> w["stem_conv"]["kernel"].shape
        (3, 3, 1, 8)
    """
    out = {}
    for layer in model.layers:
        if _is_quantize_layer(layer):
            continue
        weights = _layer_forward_weights(layer)
        if weights:
            out[_inner(layer).name] = weights
    return out


def _clone_plain_layer(layer):
    """A fresh float layer with the configuration of ``layer`` (the inner layer of a wrapper)."""
    inner = _inner(layer)
    config = inner.get_config()
    if "activation" in config and hasattr(inner, "activation"):
        # tfmot swaps activations for quantize-aware wrappers or a NoOpActivation (when the
        # activation moved to a following layer): export the plain function.
        act = inner.activation
        while isinstance(act, _tfmot_classes()[2]):
            act = act.activation
        if type(act).__name__ == "NoOpActivation":
            act = keras.activations.linear
        config["activation"] = keras.activations.serialize(act)
    if isinstance(inner, keras.Model):
        raise ExportError(
            f"layer {inner.name!r} is a nested model; export supports flat functional models. "
            "Flatten it first (build the student as one functional model).")
    return inner.__class__.from_config(config)


def _rebuild(model: keras.Model, layer_fn: Callable, input_fn: Optional[Callable] = None
             ) -> keras.Model:
    """Re-runs the functional graph of ``model`` with ``layer_fn(layer, args, kwargs) -> outputs``."""
    if not getattr(model, "_is_graph_network", False):
        raise ExportError(
            f"model {model.name!r} is a subclassed model ({type(model).__name__}); export needs a "
            "functional or Sequential Keras model (its graph is rebuilt layer by layer). For a "
            "Distiller pass distiller.student.")
    new_inputs = [keras.Input(shape=t.shape[1:], batch_size=None, dtype=t.dtype,
                              name=t.name.split(":")[0]) for t in model.inputs]
    tensors: Dict[int, Any] = {}
    for old, new in zip(model.inputs, new_inputs):
        tensors[id(old)] = input_fn(new) if input_fn else new

    def lookup(x):
        # Call arguments may hold Python constants (MobileNetV3's hard-swish: ``x + 3.0``,
        # ``x * (1 / 6)``), which is_keras_tensor rejects: pass them through as they are.
        if tf.is_tensor(x) and keras.backend.is_keras_tensor(x):
            return tensors[id(x)]
        return x

    for depth in sorted(model._nodes_by_depth, reverse=True):  # noqa: SLF001 (as Functional does)
        for node in model._nodes_by_depth[depth]:  # noqa: SLF001
            if node.is_input:
                continue
            args = tf.nest.map_structure(lookup, node.call_args)
            kwargs = {k: tf.nest.map_structure(lookup, v) for k, v in node.call_kwargs.items()
                      if k not in ("training", "mask")}
            outputs = layer_fn(node.layer, args, kwargs)
            for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
                tensors[id(old)] = new
    outputs = [tensors[id(t)] for t in model.outputs]
    return keras.Model(new_inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)


def forward_model(model: keras.Model) -> keras.Model:
    """A plain float Keras model of the same architecture whose kernels are the forward ``Q(w)``.

    tfmot ``QuantizeWrapper``s are replaced by their inner layers (same names), ``QuantizeLayer``s
    are dropped, activation fake-quantization is removed, and every weight is set to what the QAT
    model's forward pass uses (:func:`forward_weights`). A float model comes back as a copy.

    Example:
        >>> import numpy as np, tfqkd
        >>> m = tfqkd.models.tiny_resnet(seed=0)
        >>> f = forward_model(m)
        >>> x = np.zeros((1, 8, 8, 1), "float32")
        >>> bool(np.allclose(f(x), m(x)))
        True
    """
    clones = {}

    def layer_fn(layer, args, kwargs):
        if _is_quantize_layer(layer):
            return args[0] if len(args) == 1 else args
        if id(layer) not in clones:
            clones[id(layer)] = (_clone_plain_layer(layer), layer)
        return clones[id(layer)][0](*args, **kwargs)

    plain = _rebuild(model, layer_fn)
    for new, old in clones.values():
        weights = _layer_forward_weights(old)
        if new.weights:
            try:
                new.set_weights([weights[_weight_short_name(w)] for w in new.weights])
            except KeyError as err:
                raise ExportError(f"layer {new.name!r}: weight {err} not found in the original "
                                  f"layer (has {sorted(weights)}).") from err
    from tfqkd.quantize import finalize_layer_states

    finalize_layer_states(plain)  # a Normalization layer's statistics come from its weights
    return plain


# --------------------------------------------------------------------------------------------
# Integer levels of a quantized kernel
# --------------------------------------------------------------------------------------------
def _integer_levels(q: np.ndarray, max_level: int = 127
                    ) -> Optional[Tuple[np.ndarray, np.ndarray, bool]]:
    """Writes ``q`` exactly as ``k * step`` (integer ``k``, ``|k| <= max_level``) if possible.

    Tries one step for the whole tensor, then one per output channel (last axis). Returns
    ``(k int32 array, step float32 (scalar or per channel), per_channel)`` or ``None`` when ``q``
    is not (bit-exactly) on such a grid.
    """
    q = np.asarray(q, dtype=np.float32)
    if q.size == 0 or not np.all(np.isfinite(q)):
        return None

    def fit(values: np.ndarray) -> Optional[Tuple[np.ndarray, np.float32]]:
        mags = np.abs(values[values != 0])
        if mags.size == 0:
            return np.zeros(values.shape, np.int32), np.float32(0.0)
        smallest = np.float32(mags.min())
        for divisor in range(1, 9):  # the smallest used level need not be level 1
            step = np.float32(smallest / np.float32(divisor))
            k = np.rint(values / step)
            if np.abs(k).max() > max_level:
                return None
            if np.array_equal((step * k.astype(np.float32)).astype(np.float32), values):
                return k.astype(np.int32), step
        return None

    whole = fit(q)
    if whole is not None:
        return whole[0], np.asarray(whole[1], np.float32), False
    if q.ndim < 2:
        return None
    cols = q.reshape(-1, q.shape[-1])
    ks, steps = [], []
    for c in range(cols.shape[1]):
        f = fit(cols[:, c])
        if f is None:
            return None
        ks.append(f[0])
        steps.append(f[1])
    return (np.stack(ks, axis=1).reshape(q.shape).astype(np.int32),
            np.asarray(steps, np.float32), True)


def _level_bits(kmax: int) -> int:
    """Bits of a signed symmetric code with levels -kmax..kmax (2-bit = ternary)."""
    return max(1, int(math.ceil(math.log2(2 * kmax + 1))))


# --------------------------------------------------------------------------------------------
# Representative data
# --------------------------------------------------------------------------------------------
def _as_numpy(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _images_of(element, input_rank: int) -> np.ndarray:
    """Images from a data element: an array, ``(images, labels)``, or ``[images]``."""
    if isinstance(element, dict):
        element = next(iter(element.values()))
    if isinstance(element, (tuple, list)):
        if not element:
            raise ValueError("representative_data yielded an empty element.")
        element = element[0]
    x = _as_numpy(element).astype(np.float32)
    if x.ndim == input_rank - 1:
        x = x[None]
    if x.ndim != input_rank:
        raise ValueError(f"representative_data yielded an array of shape {x.shape}; the model "
                         f"takes inputs of rank {input_rank} (batch, ...).")
    return x


def _iter_samples(data, input_rank: int, limit: Optional[int]) -> Iterable[np.ndarray]:
    """Single-image batches ``(1, ...)`` from a Dataset, an array or a generator function."""
    if isinstance(data, tf.data.Dataset):
        source: Iterable = iter(data)
    elif isinstance(data, np.ndarray) or tf.is_tensor(data):
        source = [_as_numpy(data)]
    elif callable(data):
        source = data()
    elif isinstance(data, (list, tuple)) and data:
        source = [np.asarray(data, dtype=np.float32)]  # a list of images
    else:
        raise TypeError(
            f"representative_data must be a tf.data.Dataset (of images or (images, labels)), an "
            f"array of images, or a generator function yielding [images]; got "
            f"{type(data).__name__}.")
    count = 0
    for element in source:
        batch = _images_of(element, input_rank)
        for i in range(batch.shape[0]):
            if limit is not None and count >= limit:
                return
            yield batch[i:i + 1]
            count += 1
    if count == 0:
        raise ValueError("representative_data is empty: the converter needs at least one image "
                         "to calibrate activation ranges.")


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def _converter_for(model: keras.Model):
    # from_concrete_functions fixes the batch to 1 (the deployment case) and keeps the graph
    # independent of Keras-version specifics of from_keras_model.
    spec = [tf.TensorSpec((1,) + tuple(t.shape[1:]), t.dtype) for t in model.inputs]
    fn = tf.function(lambda *x: model(list(x) if len(x) > 1 else x[0], training=False))
    concrete = fn.get_concrete_function(*spec)
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], model)


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


def _quantizer_range(quantizer, qvars) -> Optional[Tuple[float, float]]:
    """The fixed range an activation quantizer uses at inference, if it has one."""
    try:
        if hasattr(quantizer, "range_of"):  # tfqkd RangeQuantizer (its widened range)
            return quantizer.range_of(qvars)
        if hasattr(quantizer, "clip_of"):  # tfqkd ActivationQuantizer (and subclasses): [0, c]
            return 0.0, float(np.asarray(quantizer.clip_of(qvars)))
        if isinstance(qvars, dict) and "min_var" in qvars and "max_var" in qvars:  # tfmot
            return float(np.asarray(qvars["min_var"])), float(np.asarray(qvars["max_var"]))
    except Exception:  # noqa: BLE001 (an unusual quantizer: calibrate instead)
        return None
    return None


def _student_activation_ranges(model: keras.Model) -> Dict[str, Tuple[float, float]]:
    """{inner layer name: (min, max) of its output quantizer} for every wrapped layer with one."""
    out = {}
    for layer in model.layers:
        if _is_wrapper(layer) and getattr(layer, "_output_quantizers", None):
            r = _quantizer_range(layer._output_quantizers[0],  # noqa: SLF001 (tfmot API)
                                 getattr(layer, "_output_quantizer_vars", {}))
            if r is not None and np.isfinite(r).all() and r[1] > r[0]:
                out[layer.layer.name] = r
    return out


def _student_pre_activation_ranges(model: keras.Model) -> Dict[str, Tuple[float, float]]:
    """{inner layer name: (min, max)} of the quantizer before a fused softmax / sigmoid / tanh."""
    out = {}
    for layer in model.layers:
        for act in getattr(layer, "_quantize_activations", None) or []:
            if not (_is_wrapper(layer) and getattr(act, "_should_pre_quantize", lambda: False)()):
                continue
            r = _quantizer_range(act.quantizer, getattr(act, "_pre_activation_vars", {}))
            if r is not None and np.isfinite(r).all() and r[1] > r[0]:
                out[layer.layer.name] = r
    return out


def _student_weight_levels(model: keras.Model) -> Dict[str, Tuple[np.ndarray, np.ndarray, bool]]:
    """{layer name: (integer levels, step, per_channel)} of every kernel a tfqkd quantizer rounds.

    Read from the quantizer (:func:`tfqkd.quantize.quantization_info`), not inferred from the
    rounded kernel: an 8-bit kernel's smallest used level is often not 1.
    """
    from tfqkd.quantize import quantization_info  # tfqkd.quantize imports this module's users

    out = {}
    for key, info in quantization_info(model).items():
        name, _, weight = key.partition("/")
        if weight and weight not in ("kernel", "depthwise_kernel"):
            continue
        step = np.asarray(info["step"], np.float32)
        out[name] = (info["levels"].astype(np.int32),
                     step if info["per_channel"] else step.reshape(()), bool(info["per_channel"]))
    return out


def _student_input_ranges(model: keras.Model) -> List[Optional[Tuple[float, float]]]:
    """Per model input: (min, max) of the tfmot ``QuantizeLayer`` right after it, else None.

    tfqkd's scheme (with ``activation_bits``) puts one there, as tfmot's default scheme does; the
    file's int8 input then uses the range the QAT model rounds its input with.
    """
    out: List[Optional[Tuple[float, float]]] = []
    for inp in model.inputs:
        found = None
        for layer in model.layers:
            if not _is_quantize_layer(layer) or not layer._inbound_nodes:  # noqa: SLF001
                continue
            if any(t is inp for t in tf.nest.flatten(layer._inbound_nodes[0].input_tensors)):  # noqa
                r = _quantizer_range(layer.quantizer, getattr(layer, "quantizer_vars", {}))
                if r is not None and np.isfinite(r).all() and r[1] > r[0]:
                    found = r
        out.append(found)
    return out


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
                t = tensors[0].name
                out.append((name, t.decode() if isinstance(t, bytes) else str(t)))
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


# --------------------------------------------------------------------------------------------
# int8: snap non-ternary channels so trained levels are exact
# --------------------------------------------------------------------------------------------
def _tflite_layout_levels(plain: keras.Model) -> Dict[str, np.ndarray]:
    """{layer: integer levels of its kernel, output channel first} for conv/dense kernels."""
    out = {}
    for layer in plain.layers:
        if type(layer) in (keras.layers.Conv2D, keras.layers.Dense):
            found = _integer_levels(layer.get_weights()[0])
            if found is not None:
                out[layer.name] = np.moveaxis(found[0], -1, 0)
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
            tname = w_t.name.decode() if isinstance(w_t.name, bytes) else str(w_t.name)
            layer = _layer_of(tname, layer_names)
            shape = tuple(int(s) for s in w_t.shape)
            if layer is None or levels_by_layer[layer].shape != shape:
                continue
            levels = levels_by_layer[layer].reshape(shape[0], -1).astype(np.int64)
            ints = np.frombuffer(bytes(np.asarray(buf.data, np.uint8)), np.int8).reshape(shape)
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
                if b_t.type == 2 and b_buf.data is not None and len(b_buf.data):  # 2 = INT32
                    b_int = np.frombuffer(bytes(np.asarray(b_buf.data, np.uint8)), np.int32)
                    b_scales = np.asarray(b_t.quantization.scale, np.float64)
                    b_new = np.rint(b_int / ratio) if per_channel else np.rint(b_int / ratio[0])
                    b_buf.data = b_new.astype(np.int32).view(np.uint8).ravel()
                    b_t.quantization.scale = (b_scales * ratio).astype(np.float32).tolist()
    if not changed:
        return content, 0
    return _write_flatbuffer(model_obj), changed


# --------------------------------------------------------------------------------------------
# int4: our own fake-quant graph for the converter's low-bit QAT path
# --------------------------------------------------------------------------------------------
class _FakeQuantKernelLayer(keras.layers.Layer):
    """Conv2D / DepthwiseConv2D / Dense with constant folded weights behind a per-channel FakeQuant."""

    def __init__(self, template, kernel, bias, fq_max, num_bits, name, linear=False):
        super().__init__(name=name)
        self._kind = type(template).__name__
        self._template = template
        self._kernel = tf.constant(kernel, tf.float32)
        self._bias = tf.constant(bias, tf.float32)
        self._fq_max = tf.constant(fq_max, tf.float32)
        self._num_bits = int(num_bits)
        # linear: the activation runs after its own FakeQuant (_IntegerActivation).
        self._activation = keras.activations.get(
            None if linear else getattr(template, "activation", None))

    def call(self, inputs):
        t = self._template
        kernel = self._kernel
        if self._kind == "DepthwiseConv2D":
            # Output channel of a depthwise kernel (h, w, cin, mult) is cin*mult: quantize on it.
            flat = tf.reshape(kernel, list(kernel.shape[:2]) + [-1])
            flat = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                flat, -self._fq_max, self._fq_max, num_bits=self._num_bits, narrow_range=True)
            kernel = tf.reshape(flat, self._kernel.shape)
            y = tf.nn.depthwise_conv2d(inputs, kernel, (1,) + tuple(t.strides) + (1,),
                                       t.padding.upper(), dilations=t.dilation_rate)
        elif self._kind == "Dense":
            # TFLite's fully-connected weights are per-tensor (a per-channel range would sit on
            # the wrong axis after the converter's transpose): one range for the whole kernel.
            fq_max = tf.reduce_max(self._fq_max)
            kernel = tf.quantization.fake_quant_with_min_max_vars(
                kernel, -fq_max, fq_max, num_bits=self._num_bits, narrow_range=True)
            y = tf.matmul(inputs, kernel)
        else:
            kernel = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                kernel, -self._fq_max, self._fq_max, num_bits=self._num_bits, narrow_range=True)
            if True:
                y = tf.nn.conv2d(inputs, kernel, t.strides, t.padding.upper(),
                                 dilations=t.dilation_rate)
        return self._activation(tf.nn.bias_add(y, self._bias))


class _FakeQuantActivation(keras.layers.Layer):
    """8-bit FakeQuant with a fixed (calibrated) range."""

    def __init__(self, lo, hi, name):
        super().__init__(name=name)
        self._lo = float(min(lo, 0.0))
        self._hi = float(max(hi, 0.0))
        if self._hi - self._lo < 1e-4:
            # A (near-)constant tensor, e.g. a channel block that is dead on the calibration
            # data: any range represents it, but a collapsed one gives its producer and consumers
            # requantization ratios (in_scale * w_scale / out_scale) of 1e3..1e-10, which XNNPACK
            # refuses ("failed to create XNNPACK runtime"). Use a unit range instead.
            self._hi = self._lo + 1.0

    def call(self, inputs):
        return tf.quantization.fake_quant_with_min_max_vars(inputs, self._lo, self._hi,
                                                            num_bits=8, narrow_range=False)


#: Output ranges TFLite's int8 kernels require: LOGISTIC and SOFTMAX scale 1/256 and zero point
#: -128, TANH scale 1/128 and zero point 0 (FakeQuant ranges giving exactly those grids). The
#: student rounds these outputs on the same grids (tfqkd.quantize).
PINNED_OUTPUT_RANGES: Dict[str, Tuple[float, float]] = {
    "softmax": (0.0, 255.0 / 256.0), "sigmoid": (0.0, 255.0 / 256.0),
    "tanh": (-1.0, 127.0 / 128.0)}
#: Activations that are not a ReLU the converter fuses: they get an input FakeQuant of their own.
_SPLIT_ACTIVATIONS = ("softmax", "sigmoid", "tanh", "swish", "silu")
#: Layers TFLite runs with the same scale on input and output (the converter rejects others).
_SAME_SCALE_LAYERS = (keras.layers.AveragePooling2D, keras.layers.MaxPooling2D,
                      keras.layers.Reshape, keras.layers.Flatten, keras.layers.ZeroPadding2D,
                      keras.layers.Cropping2D)


def activation_name(layer) -> str:
    """Name of the activation a kernel, ``Activation`` or ``Softmax`` layer applies.

    ``"linear"`` if none; tfqkd's ``integer_swish`` reads as ``"swish"``.

    Example:
        >>> activation_name(keras.layers.Dense(2, activation="sigmoid"))
        'sigmoid'
        >>> activation_name(keras.layers.Softmax()), activation_name(keras.layers.Flatten())
        ('softmax', 'linear')
    """
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    act = getattr(layer, "activation", None)
    if act is None:
        return "linear"
    return getattr(act, "__name__", type(act).__name__)


class _IntegerActivation(keras.layers.Layer):
    """An activation as TFLite's integer kernels run it; swish gets its sigmoid on the 1/256 grid."""

    def __init__(self, kind, name):
        super().__init__(name=name)
        self._kind = kind

    def call(self, inputs):
        if self._kind in ("swish", "silu"):  # x * sigmoid(x): LOGISTIC (pinned grid), then MUL
            lo, hi = PINNED_OUTPUT_RANGES["sigmoid"]
            gate = tf.quantization.fake_quant_with_min_max_vars(tf.sigmoid(inputs), lo, hi,
                                                                num_bits=8)
            return inputs * gate
        return keras.activations.get(self._kind)(inputs)


def _linear_clone(layer):
    """``layer`` without its activation (same weights), to measure pre-activation ranges."""
    config = layer.get_config()
    config["activation"] = "linear"
    clone = layer.__class__.from_config(config)
    clone.build(layer.input_shape)
    clone.set_weights(layer.get_weights())
    return clone


def _is_plain_relu(layer) -> bool:
    # ReLU and ReLU6 (MobileNet, MobileNetV2): TFLite fuses both into the producing conv/add, so
    # the file rounds only their output, as the student's activation quantizer does.
    if isinstance(layer, keras.layers.ReLU):
        return (layer.max_value is None or float(layer.max_value) == 6.0) and \
            float(layer.threshold) == 0.0 and float(layer.negative_slope) == 0.0
    if isinstance(layer, keras.layers.Activation):
        return getattr(layer.activation, "__name__", "") in ("relu", "relu6")
    return False


def _consumers(model: keras.Model) -> Dict[int, List[Any]]:
    """{id(layer): [layers consuming its output inside ``model``]}."""
    out: Dict[int, List[Any]] = {}
    for depth in model._nodes_by_depth:  # noqa: SLF001
        for node in model._nodes_by_depth[depth]:  # noqa: SLF001
            if node.is_input:
                continue
            for parent in node.parent_nodes:
                out.setdefault(id(parent.layer), []).append(node.layer)
    return out


def _fold_plan(plain: keras.Model) -> Dict[int, Any]:
    """{id(kernel layer): batch-norm layer folded into it}."""
    consumers = _consumers(plain)
    plan = {}
    for layer in plain.layers:
        if not isinstance(layer, _KERNEL_LAYERS):
            continue
        if getattr(layer, "activation", None) not in (None, keras.activations.linear):
            continue
        users = consumers.get(id(layer), [])
        if len(users) == 1 and isinstance(users[0], keras.layers.BatchNormalization) and \
                len(users[0]._inbound_nodes) == 1 and users[0].axis in ([-1], [3], [1], -1):  # noqa
            plan[id(layer)] = users[0]
    return plan


def _fold(layer, bn) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kernel, bias and per-output-channel multiplier g of ``layer`` with ``bn`` folded in."""
    weights = layer.get_weights()
    kernel = weights[0].astype(np.float64)
    bias = weights[1].astype(np.float64) if getattr(layer, "use_bias", False) else None
    out_ch = kernel.shape[-1] * (kernel.shape[-2] if isinstance(layer, keras.layers.DepthwiseConv2D)
                                 else 1)
    if bias is None:
        bias = np.zeros(out_ch)
    g = np.ones(out_ch)
    if bn is not None:
        params = dict(zip([w.name.split("/")[-1].split(":")[0] for w in bn.weights],
                          bn.get_weights()))
        gamma = params.get("gamma", np.ones(out_ch))
        beta = params.get("beta", np.zeros(out_ch))
        g = gamma / np.sqrt(params["moving_variance"] + bn.epsilon)
        bias = (bias - params["moving_mean"]) * g + beta
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        shape = kernel.shape
        kernel = (kernel.reshape(shape[:2] + (-1,)) * g).reshape(shape)
    else:
        kernel = kernel * g
    return kernel.astype(np.float32), bias.astype(np.float32), g


def _weight_grid(q: np.ndarray, g: np.ndarray, bits: int, depthwise: bool,
                 per_tensor: bool = False, levels=None) -> Tuple[np.ndarray, int]:
    """Per-channel FakeQuant range that puts ``k * d_c * g_c`` exactly on a ``bits`` grid.

    Returns (max_c, bits actually used: ``bits`` if the levels fit, else 8). With
    ``per_tensor`` (dense kernels) the grid is shared by all channels, exact when the step is.
    ``levels`` is ``(k, step, per_channel)`` as the student's quantizer states it; without it
    they are inferred from ``q`` (which fails for 8-bit kernels whose smallest used level is
    far from 1, and for depthwise kernels with one step per input channel).
    """
    if levels is None:
        levels = _integer_levels(q)
    qmax = 2 ** (bits - 1) - 1
    flat = q.reshape(q.shape[:2] + (-1,)) if depthwise else q
    out_ch = flat.shape[-1]
    absmax = np.abs(flat.reshape(-1, out_ch)).max(axis=0).astype(np.float64) * np.abs(g)
    if levels is None:
        return np.maximum(absmax, 1e-8), 8
    k, step, per_channel = levels
    if per_tensor:
        kmax_all = int(np.abs(k).max())
        if kmax_all > qmax:
            bits, qmax = 8, 127
        if per_channel or not np.allclose(g, g[0]) or kmax_all == 0:
            return np.full(out_ch, max(absmax.max(), 1e-8)), bits
        n = qmax // kmax_all
        return np.full(out_ch, float(step) * abs(g[0]) / n * qmax), bits
    kflat = (k.reshape(k.shape[:2] + (-1,)) if depthwise else k).reshape(-1, out_ch)
    kmax = np.abs(kflat).max(axis=0)
    if kmax.max() > qmax:
        bits, qmax = 8, 127
    if depthwise and per_channel:
        step = np.asarray(step).reshape(-1)  # (cin, mult) from the quantizer: channel c*mult+m
        if step.size != out_ch:
            step = np.repeat(step, out_ch // step.size)
    step = np.broadcast_to(np.asarray(step, np.float64), (out_ch,)) * np.abs(g)
    n = np.where(kmax > 0, qmax // np.maximum(kmax, 1), 1)
    fq_max = np.where(kmax > 0, step / n * qmax, np.maximum(absmax, 1e-8))
    return np.maximum(fq_max, 1e-12), bits


def _channel_affine(layer, channels: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(a, b)`` per channel with ``layer(x) == a * x + b`` for a per-channel affine layer, else None.

    Batch norm (not folded into a kernel), ``Normalization`` and ``Rescaling`` (the preprocessing
    layers of MobileNetV3 / EfficientNet) are such maps. TFLite has no integer kernel for a float
    MUL/ADD by constants, so the fake-quant graph runs them as a 1x1 depthwise convolution.
    """
    def per_channel(v) -> np.ndarray:
        v = np.asarray(v, np.float64).reshape(-1)
        return np.broadcast_to(v, (channels,)).copy() if v.size in (1, channels) else None

    if isinstance(layer, keras.layers.BatchNormalization):
        if layer.axis not in ([-1], [3], -1, 3):
            return None
        params = dict(zip([_weight_short_name(w) for w in layer.weights], layer.get_weights()))
        gamma = params.get("gamma", np.ones(channels))
        a = gamma / np.sqrt(params["moving_variance"] + layer.epsilon)
        return a, params.get("beta", np.zeros(channels)) - params["moving_mean"] * a
    if isinstance(layer, keras.layers.Rescaling):
        a, b = per_channel(layer.scale), per_channel(layer.offset)
        return None if a is None or b is None else (a, b)
    if isinstance(layer, keras.layers.Normalization):
        mean = per_channel(layer.mean.numpy() if hasattr(layer.mean, "numpy") else layer.mean)
        var = per_channel(layer.variance.numpy() if hasattr(layer.variance, "numpy")
                          else layer.variance)
        if mean is None or var is None:
            return None
        std = np.maximum(np.sqrt(var), keras.backend.epsilon())
        return (std, mean) if layer.invert else (1.0 / std, -mean / std)
    return None


def _calibrate_ranges(source: keras.Model, names: Sequence[str], samples: Iterable[np.ndarray],
                      pre: Sequence[Any] = ()
                      ) -> Tuple[List[Tuple[float, float]], List[Tuple[float, float]]]:
    """(min, max) of every model input and of the output of each (inner) layer in ``names``.

    Measured on ``source``, the student itself: its activation quantizers clip, so downstream
    ranges of the student are much narrower than those of the unclipped float rebuild.
    ``pre``: ``(layer name, fn)`` pairs; their ranges (appended after those of ``names``) are of
    ``fn(input of that layer in source)``, e.g. a kernel layer's output before its activation.
    """
    by_inner = {_inner(layer).name: layer for layer in source.layers}
    probe = keras.Model(source.inputs, [by_inner[name].output for name in names] +
                        [by_inner[name].input for name, _ in pre])
    n_in, n_out = len(source.inputs), len(names) + len(pre)
    lo = np.full(n_in + n_out, np.inf)
    hi = np.full(n_in + n_out, -np.inf)
    batch: List[np.ndarray] = []

    def update(xs):
        x = np.concatenate(xs, axis=0)
        outs = probe(x, training=False)
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        for k, (_, fn) in enumerate(pre):
            outs[len(names) + k] = fn(outs[len(names) + k])
        for i, v in enumerate([x] + [np.asarray(o) for o in outs]):
            lo[i] = min(lo[i], float(np.min(v)))
            hi[i] = max(hi[i], float(np.max(v)))

    for s in samples:
        batch.append(s)
        if len(batch) == 64:
            update(batch)
            batch = []
    if batch:
        update(batch)
    ranges = list(zip(lo.tolist(), hi.tolist()))
    return ranges[:n_in], ranges[n_in:]


def _share_ranges(plain: keras.Model, ranges: Dict[int, Tuple[float, float]],
                  fixed: Optional[set] = None) -> None:
    """Gives pooling/reshape/concatenation outputs and their inputs one range, in place.

    TFLite runs these ops with the same scale on every input and the output, and the converter
    rejects a file where the FakeQuant ranges differ ("same scale constraint"). Layers linked by
    such ops form groups (union-find; DenseNet chains concatenations through its blocks); each
    group gets the union of its members' ranges; of the ``fixed`` members' only (the student's
    own ranges) where the group has any, so that the file rounds as the student does.
    """
    fixed = fixed or set()
    parent: Dict[int, int] = {}

    def find(a: int) -> int:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for layer in plain.layers:
        if not isinstance(layer, _SAME_SCALE_LAYERS + (keras.layers.Concatenate,)) or \
                id(layer) not in ranges:
            continue
        for node in layer._inbound_nodes:  # noqa: SLF001
            for inbound in tf.nest.flatten(node.inbound_layers):
                if id(inbound) in ranges:
                    parent[find(id(inbound))] = find(id(layer))
    groups: Dict[int, List[int]] = {}
    for key in ranges:
        if key in parent:
            groups.setdefault(find(key), []).append(key)
    for members in groups.values():
        chosen = [m for m in members if m in fixed] or members
        lo = min(ranges[m][0] for m in chosen)
        hi = max(ranges[m][1] for m in chosen)
        for m in members:
            ranges[m] = (lo, hi)


def _fakequant_model(plain: keras.Model, bits_by_layer: Dict[str, Optional[int]],
                     samples: Iterable[np.ndarray], low_bit: bool,
                     fixed_ranges: Optional[Dict[str, Tuple[float, float]]] = None,
                     source: Optional[keras.Model] = None,
                     input_ranges: Optional[Sequence[Optional[Tuple[float, float]]]] = None,
                     weight_levels: Optional[Dict[str, Tuple[np.ndarray, np.ndarray, bool]]]
                     = None, pre_activation_ranges: Optional[Dict[str, Tuple[float, float]]] = None,
                     ) -> Tuple[keras.Model, Dict[str, int]]:
    """The plain model as a QAT-style graph the converter turns into a full-integer file.

    Batch norm is folded into the preceding kernel; kernels get a per-channel FakeQuant whose
    range puts the trained levels exactly on the integer grid (4-bit grid for kernels trained at
    <= 4 bits when ``low_bit``, else 8-bit); activations get an 8-bit FakeQuant, with the
    student's own range where its activation quantizer has one (``fixed_ranges``, by layer
    name) and the calibrated min/max elsewhere. ``input_ranges`` (per model input, None =
    calibrate) likewise fixes the input's range to that of the student's input quantizer.
    ``weight_levels`` (by layer name, :func:`_student_weight_levels`) are the kernels' integer
    levels and steps as the student's quantizers state them; ``pre_activation_ranges`` the
    student's ranges before fused softmax / sigmoid / tanh activations (else calibrated).
    """
    fixed_ranges = dict(fixed_ranges or {})
    weight_levels = dict(weight_levels or {})
    plan = _fold_plan(plain)
    folded_bns = {id(bn) for bn in plan.values()}
    consumers = _consumers(plain)
    # Tensors that get an activation FakeQuant: every layer output, except a kernel layer's raw
    # output whose BN is folded (the BN's output takes its place) and outputs feeding only a plain
    # ReLU that the converter fuses into the producing conv/add.
    fq_layers = []
    for layer in plain.layers:
        if isinstance(layer, keras.layers.InputLayer) or id(layer) in plan:
            continue
        users = consumers.get(id(layer), [])
        fusable = isinstance(layer, _KERNEL_LAYERS + (keras.layers.Add,)) or id(layer) in folded_bns
        if fusable and len(users) == 1 and _is_plain_relu(users[0]):
            continue
        fq_layers.append(layer)
    # A fused conv(+BN)+ReLU output is quantized with the ReLU's range: keep the student's.
    # Kernel layers ending in softmax/sigmoid/swish...: their pre-activation output gets a range.
    split = [layer for layer in plain.layers if isinstance(layer, _KERNEL_LAYERS)
             and activation_name(layer) in _SPLIT_ACTIVATIONS]
    in_ranges, out_ranges = _calibrate_ranges(
        source or plain, [layer.name for layer in fq_layers], samples,
        pre=[(layer.name, _linear_clone(layer)) for layer in split])
    in_ranges = [fixed or r for fixed, r in zip(list(input_ranges or []) + [None] * len(in_ranges),
                                               in_ranges)]
    pre_fixed = dict(pre_activation_ranges or {})
    pre_ranges = {id(layer): pre_fixed.get(layer.name, r)
                  for layer, r in zip(split, out_ranges[len(fq_layers):])}
    ranges = {id(layer): fixed_ranges.get(layer.name, r) for layer, r in zip(fq_layers, out_ranges)}
    for layer in fq_layers:
        if activation_name(layer) in PINNED_OUTPUT_RANGES:
            ranges[id(layer)] = PINNED_OUTPUT_RANGES[activation_name(layer)]
    _share_ranges(plain, ranges, fixed={id(layer) for layer in fq_layers
                                        if layer.name in fixed_ranges
                                        or activation_name(layer) in PINNED_OUTPUT_RANGES})
    used_bits: Dict[str, int] = {}
    affine = {}
    for layer in plain.layers:
        if id(layer) in folded_bns or isinstance(layer, _KERNEL_LAYERS) or \
                len(layer._inbound_nodes) != 1:  # noqa: SLF001
            continue
        shape = layer.input_shape if not isinstance(layer.input_shape, list) else None
        if shape is None or len(shape) != 4 or shape[-1] is None:
            continue
        found = _channel_affine(layer, int(shape[-1]))
        if found is not None:
            affine[id(layer)] = found

    def input_fn(x):
        lo, hi = in_ranges.pop(0)
        return _FakeQuantActivation(lo, hi, name="input_fq")(x)

    def layer_fn(layer, args, kwargs):
        if isinstance(layer, _KERNEL_LAYERS):
            bn = plan.get(id(layer))
            kernel, bias, g = _fold(layer, bn)
            want = bits_by_layer.get(layer.name) or 8
            want = 4 if (low_bit and want <= 4) else 8
            fq_max, used = _weight_grid(layer.get_weights()[0], g, want,
                                        isinstance(layer, keras.layers.DepthwiseConv2D),
                                        per_tensor=isinstance(layer, keras.layers.Dense),
                                        levels=weight_levels.get(layer.name))
            used_bits[layer.name] = used
            out = _FakeQuantKernelLayer(layer, kernel, bias, fq_max.astype(np.float32), used,
                                        name=layer.name, linear=id(layer) in pre_ranges)(*args)
            if id(layer) in pre_ranges:
                lo, hi = pre_ranges[id(layer)]
                out = _FakeQuantActivation(lo, hi, name=layer.name + "_pre_fq")(out)
                out = _IntegerActivation(activation_name(layer), name=layer.name + "_act")(out)
        elif isinstance(layer, keras.layers.Activation) and \
                activation_name(layer) in _SPLIT_ACTIVATIONS:
            out = _IntegerActivation(activation_name(layer), name=layer.name)(args[0])
        elif id(layer) in folded_bns:
            out = args[0]  # folded into the kernel layer; its output range applies here
        elif id(layer) in affine:
            a, b = affine[id(layer)]
            # 8-bit per-channel grid with level 127 at |a_c|: the multiplier is exact.
            out = _FakeQuantKernelLayer(
                keras.layers.DepthwiseConv2D(1), a.reshape(1, 1, -1, 1).astype(np.float32),
                b.astype(np.float32), np.maximum(np.abs(a), 1e-12).astype(np.float32), 8,
                name=layer.name)(args[0])
        else:
            out = _clone_plain_layer(layer)(*args, **kwargs)
        if id(layer) in ranges:
            lo, hi = ranges[id(layer)]
            out = _FakeQuantActivation(lo, hi, name=layer.name + "_fq")(out)
        return out

    rebuilt = _rebuild(plain, layer_fn, input_fn)
    # Copy weights of layers rebuilt by cloning (everything but kernel layers and folded BNs).
    for layer in plain.layers:
        if isinstance(layer, _KERNEL_LAYERS) or id(layer) in folded_bns or \
                id(layer) in affine or not layer.weights:
            continue
        rebuilt.get_layer(layer.name).set_weights(layer.get_weights())
    from tfqkd.quantize import finalize_layer_states

    finalize_layer_states(rebuilt)
    return rebuilt, used_bits


# --------------------------------------------------------------------------------------------
# Parity: the student's biases on the file's int32 grid, inputs rounded as the student rounds
# --------------------------------------------------------------------------------------------
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
    names = _op_names(model_obj)
    plan = _fold_plan(plain)
    layer_names = [layer.name for layer in plain.layers]
    student = {_inner(layer).name: layer for layer in model.layers if not _is_quantize_layer(layer)}
    updates = []
    max_shift = 0.0
    for sg in model_obj.subgraphs:
        for op in sg.operators:
            if names.get(op.opcodeIndex) not in _WEIGHT_OPS or len(op.inputs) < 3 or \
                    op.inputs[2] < 0:
                continue
            w_t, b_t = sg.tensors[op.inputs[1]], sg.tensors[op.inputs[2]]
            buf = model_obj.buffers[b_t.buffer]
            if b_t.type != 2 or buf.data is None or not len(buf.data) or \
                    b_t.quantization is None or b_t.quantization.scale is None:  # 2 = INT32
                continue
            name = _layer_of(w_t.name.decode() if isinstance(w_t.name, bytes) else str(w_t.name),
                             layer_names)
            if name is None:
                continue
            layer = plain.get_layer(name)
            bn = plan.get(id(layer))
            _, bias, g = _fold(layer, bn)
            stored = np.frombuffer(bytes(np.asarray(buf.data, np.uint8)), np.int32) * \
                np.asarray(b_t.quantization.scale, np.float64)
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


# --------------------------------------------------------------------------------------------
# Public export
# --------------------------------------------------------------------------------------------
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
    space_to_depth: bool = False,
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
            at <= 4 bits stored as INT4).
        num_calibration: At most this many images are used for calibration (``None``: all).
        int8_io: Full-integer modes only: int8 input and output tensors instead of float32.
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
        align_student: Full-integer modes: after writing, shift ``model``'s folded biases (batch
            norm ``beta``) *in place* onto the int32 grid the file stores them on, by at most
            half a bias step (about 1e-3 output steps), so that the student computes what the
            file computes; without it, accumulators within that distance of a rounding tie
            round differently and the difference spreads through the network (see
            docs/export.md, Parity).
        space_to_depth: ``"int8"`` only: run every 3x3 stride-1 convolution with <= 16 output
            channels on a 2x2 space-to-depth view (``tflite_layout.space_to_depth_convs``):
            bit-identical outputs, but those kernels take 16x the bytes (ResNet20: 0.47 x
            instead of 0.27 x the float file) and 4x the multiply-adds. Faster only on CPUs
            whose int8 kernels cost the same for 16 as for 64 channels (ResNet20 on an AMX
            Xeon: 1.4-1.8x faster; on an AMD EPYC: 1.8x slower); measure on the target with
            ``tools/benchmark_tflite.py`` (``faster_int8_layout``).

    Returns:
        ``{"path", "mode", "bytes", "snapped_channels", "weight_bits", "aligned_biases",
        "space_to_depth_convs"}`` (``aligned_biases``: ``{"channels", "max_shift_steps"}`` with
        ``align_student``, else None; ``space_to_depth_convs``: how many convolutions were
        rewritten).

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
    if num_calibration is not None and num_calibration < 1:
        raise ValueError(f"num_calibration must be >= 1 or None, got {num_calibration!r}.")
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a tf_keras Model (from tfqkd._keras import keras), got "
                        f"{type(model).__name__}.")
    path = _check_writable(path)
    input_rank = len(model.inputs[0].shape)

    bits_by_layer: Dict[str, Optional[int]] = {}
    for layer in model.layers:
        if _is_wrapper(layer):
            bits = _quantized_weight_bits(layer)
            if "kernel" in bits or "depthwise_kernel" in bits:
                bits_by_layer[layer.layer.name] = bits.get("kernel", bits.get("depthwise_kernel"))
    try:
        plain = forward_model(model)
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 (an unusual layer: say which)
        raise ExportError(f"could not rebuild model {model.name!r} as a plain float model for "
                          f"export: {err}") from err
    # Kernels whose bit-width the quantizer does not state: infer it from their levels.
    for layer in plain.layers:
        if isinstance(layer, _KERNEL_LAYERS) and bits_by_layer.get(layer.name) is None:
            levels = _integer_levels(layer.get_weights()[0])
            if levels is not None:
                bits_by_layer[layer.name] = _level_bits(int(np.abs(levels[0]).max()))

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
    fakequant = mode == "int4" or (mode == "int8" and method == "fakequant")
    if fakequant:
        # Calibration runs here, in Python: an error of the data propagates as it is.
        to_convert, used_bits = _fakequant_model(
            plain, bits_by_layer,
            _iter_samples(representative_data, input_rank, num_calibration),
            low_bit=mode == "int4", fixed_ranges=_student_activation_ranges(model), source=model,
            input_ranges=_student_input_ranges(model),
            weight_levels=_student_weight_levels(model),
            pre_activation_ranges=_student_pre_activation_ranges(model))
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
    if mode == "int8" and method == "ptq" and snap_levels:
        content, snapped = _snap_int8_levels(content, _tflite_layout_levels(plain))
    written, rewritten = content, 0
    if space_to_depth:
        written, rewritten = space_to_depth_convs(content)
    _atomic_write(path, written)
    aligned = None
    if align_student and mode in ("int8", "int4"):
        # The rewrite only tiles biases: align on the compact file's one copy per channel.
        aligned = _align_student_biases(model, plain, content)
    return {"path": path, "mode": mode, "bytes": len(written), "snapped_channels": snapped,
            "weight_bits": used_bits or {k: v for k, v in bits_by_layer.items() if v},
            "aligned_biases": aligned, "space_to_depth_convs": rewritten}


# --------------------------------------------------------------------------------------------
# Reading files back
# --------------------------------------------------------------------------------------------
_TYPE_BITS = {0: 32, 1: 16, 2: 32, 3: 8, 4: 64, 7: 16, 9: 8, 10: 64, 16: 64, 17: 4}
_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16",
               9: "int8", 10: "float64", 17: "int4"}


def _layer_of(tensor_name: str, layer_names: Sequence[str]) -> Optional[str]:
    """The Keras layer a (possibly fused, ';'-joined) TFLite tensor name comes from."""
    parts = re.split(r"[;/]", tensor_name)
    for part in parts:
        if part in layer_names:
            return part
        if part.startswith("quant_") and part[6:] in layer_names:
            return part[6:]
    return None


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
        tname = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
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

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of every figure."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"TFLite parity report for {self.path}",
            f"  examples            {self.num_examples}",
            f"  Keras top-1         {self.keras_top1:.4f}",
            f"  TFLite top-1        {self.tflite_top1:.4f}",
            f"  top-1 agreement     {self.top1_agreement:.4f}",
            f"  max |logit diff|    {self.max_logit_diff:.5f}",
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

    Example:
        >>> import numpy as np, os, tempfile, tfqkd
        >>> m = tfqkd.models.tiny_resnet(seed=0)
        >>> p = os.path.join(tempfile.mkdtemp(), "m.tflite")
        >>> _ = export_tflite(m, p, mode="float")
        >>> x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
        >>> verify_tflite(p, m, (x, np.zeros(4, "int32"))).top1_agreement
        1.0
    """
    path = os.fspath(path)
    interpreter = _open_interpreter(path, num_threads=num_threads)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    current_batch = None
    one_by_one = False
    n = agree = keras_ok = tfl_ok = 0
    max_diff = 0.0
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
        p_ref, p_tfl = ref.argmax(-1), logits.argmax(-1)
        agree += int((p_ref == p_tfl).sum())
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
        input_dtype=np.dtype(inp["dtype"]).name, weight_storage=storage)
    if print_report:
        print(report)
    return report


# --------------------------------------------------------------------------------------------
# Packed archive at the true bit-width
# --------------------------------------------------------------------------------------------
def _pack_trits(levels: np.ndarray) -> bytes:
    """5 ternary digits per byte (3^5 = 243 <= 256): 1.6 bits per weight."""
    t = (levels.reshape(-1) + 1).astype(np.uint16)
    pad = (-t.size) % 5
    t = np.concatenate([t, np.zeros(pad, np.uint16)]).reshape(-1, 5)
    return (t * np.array([1, 3, 9, 27, 81], np.uint16)).sum(axis=1).astype(np.uint8).tobytes()


def _unpack_trits(data: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(data, np.uint8).astype(np.int32)
    digits = (b[:, None] // np.array([1, 3, 9, 27, 81])) % 3
    return digits.reshape(-1)[:count] - 1


def _pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned ``bits``-bit codes, bit-packed (little-endian bit order)."""
    c = codes.reshape(-1).astype(np.uint32)
    planes = ((c[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:count * bits]
    planes = planes.reshape(count, bits).astype(np.uint32)
    return (planes << np.arange(bits, dtype=np.uint32)).sum(axis=1)


def _archive_entries(model: keras.Model) -> List[Tuple[str, int, str, np.ndarray]]:
    """(layer name, weight index, short weight name, forward value) for every weight."""
    out = []
    for layer in model.layers:
        if _is_quantize_layer(layer):
            continue
        for i, (short, v) in enumerate(_layer_forward_weights(layer).items()):
            out.append((_inner(layer).name, i, short, np.asarray(v)))
    return out


def pack_weights(model: keras.Model, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Writes the model's forward weights at their true bit-width (atomically).

    Every weight that is exactly ``k * step`` with a step per tensor or per output channel (what
    tfqkd's quantizers produce) is stored as integer levels plus float32 steps: ternary kernels as
    base-3 digits, 5 per byte (1.6 bits/weight), binary kernels as 1 bit, b-bit kernels as b-bit
    codes. Everything else (batch norm, biases, float layers) is stored as float32. The layout: the
    magic ``TFQKDPW1``, a little-endian uint32 header length, a compact JSON header (one entry per
    tensor: layer, index, name, shape, encoding, bits, offsets), then the raw payload.

    Returns :func:`packed_archive_stats` of the written file.

    Example:
        >>> import os, tempfile, tfqkd
        >>> p = os.path.join(tempfile.mkdtemp(), "w.tfqkdpw")
        >>> pack_weights(tfqkd.models.tiny_resnet(seed=0), p)["num_weights"] > 0
        True
    """
    path = _check_writable(path)
    payload = io.BytesIO()
    entries = []
    for layer_name, index, short, value in _archive_entries(model):
        entry: Dict[str, Any] = {"layer": layer_name, "index": index, "name": short,
                                 "shape": list(value.shape), "dtype": str(value.dtype)}
        levels = None
        if value.dtype == np.float32 and value.ndim >= 2 and value.size >= 16:
            levels = _integer_levels(value)
        if levels is not None:
            k, step, per_channel = levels
            kmax = int(np.abs(k).max())
            if kmax <= 1 and np.all(k != 0):
                encoding, bits, data = "binary", 1, _pack_bits((k > 0).astype(np.uint32), 1)
            elif kmax <= 1:
                encoding, bits, data = "ternary", 2, _pack_trits(k)
            else:
                bits = _level_bits(kmax)
                encoding, data = "int", _pack_bits((k + kmax).astype(np.uint32), bits)
            steps = np.asarray(step, np.float32).reshape(-1).tobytes()
            entry.update(encoding=encoding, bits=bits, kmax=kmax, per_channel=bool(per_channel),
                         offset=payload.tell(), nbytes=len(data))
            payload.write(data)
            entry.update(step_offset=payload.tell(), step_nbytes=len(steps))
            payload.write(steps)
        else:
            data = np.ascontiguousarray(value).tobytes()
            entry.update(encoding="raw", bits=8 * value.dtype.itemsize, offset=payload.tell(),
                         nbytes=len(data))
            payload.write(data)
        entries.append(entry)
    header = json.dumps({"format": "tfqkd-packed-weights", "version": 1, "model": model.name,
                         "tensors": entries}, separators=(",", ":")).encode()
    _atomic_write(path, _PACK_MAGIC + struct.pack("<I", len(header)) + header + payload.getvalue())
    return packed_archive_stats(path)


def _read_archive(path) -> Tuple[Dict[str, Any], bytes, int]:
    path = os.fspath(path)
    with open(path, "rb") as f:
        content = f.read()
    if content[:8] != _PACK_MAGIC:
        raise ValueError(f"{path!r} is not a tfqkd packed-weights archive (bad magic "
                         f"{content[:8]!r}); write one with tfqkd.export.pack_weights().")
    (length,) = struct.unpack("<I", content[8:12])
    header = json.loads(content[12:12 + length].decode())
    return header, content[12 + length:], 12 + length


def _decode_entry(entry: Dict[str, Any], payload: bytes) -> np.ndarray:
    shape = tuple(entry["shape"])
    count = int(np.prod(shape)) if shape else 1
    data = payload[entry["offset"]:entry["offset"] + entry["nbytes"]]
    if entry["encoding"] == "raw":
        return np.frombuffer(data, np.dtype(entry["dtype"])).reshape(shape).copy()
    if entry["encoding"] == "ternary":
        k = _unpack_trits(data, count)
    elif entry["encoding"] == "binary":
        k = _unpack_bits(data, count, 1).astype(np.int32) * 2 - 1
    else:
        k = _unpack_bits(data, count, entry["bits"]).astype(np.int32) - entry["kmax"]
    steps = np.frombuffer(payload[entry["step_offset"]:entry["step_offset"] +
                                  entry["step_nbytes"]], np.float32)
    k = k.reshape(shape).astype(np.float32)
    step = steps if entry["per_channel"] else steps[0]
    return (np.float32(1) * step * k).astype(np.float32) if entry["per_channel"] else \
        (np.float32(step) * k).astype(np.float32)


def packed_archive_stats(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Sizes of a packed archive: bytes, weights per encoding, bits per weight.

    ``bits_per_ternary_weight`` counts the ternary tensors' packed levels *and* their steps;
    ``bits_per_weight`` is the whole file (header, batch norm, float layers) over all weights.

    Example:
        >>> import os, tempfile, tfqkd
        >>> p = os.path.join(tempfile.mkdtemp(), "w.tfqkdpw")
        >>> _ = pack_weights(tfqkd.models.tiny_resnet(seed=0), p)
        >>> packed_archive_stats(p)["encodings"]["raw"] > 0
        True
    """
    header, payload, header_bytes = _read_archive(path)
    size = os.path.getsize(path)
    counts: Dict[str, int] = {}
    ternary_bits = 0
    quantized_bits = 0
    for e in header["tensors"]:
        n = int(np.prod(e["shape"])) if e["shape"] else 1
        counts[e["encoding"]] = counts.get(e["encoding"], 0) + n
        if e["encoding"] != "raw":
            bits = 8 * (e["nbytes"] + e["step_nbytes"])
            quantized_bits += bits
            if e["encoding"] == "ternary":
                ternary_bits += bits
    total = sum(counts.values())
    n_quant = total - counts.get("raw", 0)
    return {
        "path": os.fspath(path), "bytes": size, "header_bytes": header_bytes,
        "num_weights": total, "encodings": counts,
        "bits_per_weight": 8.0 * size / max(total, 1),
        "bits_per_quantized_weight": quantized_bits / n_quant if n_quant else None,
        "bits_per_ternary_weight": ternary_bits / counts["ternary"] if counts.get("ternary")
        else None,
    }


def load_packed_weights(model: keras.Model, path: Union[str, os.PathLike]) -> keras.Model:
    """Restores weights written by :func:`pack_weights` into ``model`` (bit-exact forward values).

    ``model`` is typically a plain model of the same architecture (e.g. :func:`forward_model` of
    the student, or the float architecture before quantization); weights are matched by layer name
    and index. Into a QAT model the values go to the float shadow weights of the wrapped layers;
    its forward kernels then equal the archive only if its quantizer maps ``Q(w)`` to itself (a
    warning says when they do not).

    Example:
        >>> import numpy as np, os, tempfile, tfqkd
        >>> m = tfqkd.models.tiny_resnet(seed=0)
        >>> p = os.path.join(tempfile.mkdtemp(), "w.tfqkdpw")
        >>> _ = pack_weights(m, p)
        >>> m2 = load_packed_weights(tfqkd.models.tiny_resnet(seed=1), p)
        >>> bool(np.array_equal(m2.get_weights()[0], m.get_weights()[0]))
        True
    """
    header, payload, _ = _read_archive(path)
    by_name = {}
    for layer in model.layers:
        if not _is_quantize_layer(layer):
            by_name[_inner(layer).name] = layer
    grouped: Dict[str, Dict[str, np.ndarray]] = {}
    for entry in header["tensors"]:
        grouped.setdefault(entry["layer"], {})[entry["name"]] = _decode_entry(entry, payload)
    missing = [name for name in grouped if name not in by_name]
    if missing:
        raise ValueError(f"the archive has weights for layers {missing} that model "
                         f"{model.name!r} does not have; load into the same architecture.")
    assignments = []
    for name, values in grouped.items():
        variables = _layer_variables(by_name[name])
        if set(variables) != set(values):
            raise ValueError(f"layer {name!r} has weights {sorted(variables)}, the archive "
                             f"{sorted(values)}; is this the same architecture?")
        for short, var in variables.items():
            if tuple(var.shape) != values[short].shape:
                raise ValueError(f"weight {short!r} of layer {name!r} has shape "
                                 f"{tuple(var.shape)}, the archive {values[short].shape}; is "
                                 "this the same architecture?")
            assignments.append((var, values[short]))
    for var, value in assignments:  # only after every check passed: all or nothing
        var.assign(value)
    from tfqkd.quantize import finalize_layer_states

    finalize_layer_states(model)  # Normalization derives its statistics from its weights
    for layer in model.layers:
        if _is_wrapper(layer) and layer.layer.name in grouped:
            forward = _layer_forward_weights(layer)
            stored = grouped[layer.layer.name]
            if not all(np.array_equal(forward[k], stored[k]) for k in forward):
                warnings.warn(
                    f"layer {layer.name!r}: the quantizer does not map the restored Q(w) to "
                    "itself, so the forward kernel differs from the archive; load into "
                    "forward_model(student) for exact forward weights.", stacklevel=2)
    return model
