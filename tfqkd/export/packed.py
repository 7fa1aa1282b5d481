"""The packed archive: a model's forward weights at their true bit-width, with exact round trip.

:func:`pack_weights` stores every weight that is ``k * step`` on an integer grid as its levels
(ternary: 5 trits per byte, 1.6 bits; binary: 1 bit; b-bit: b-bit codes) plus float32 steps, and
everything else as float32; :func:`load_packed_weights` restores them bit-exactly;
:func:`packed_archive_stats` reports sizes. The levels are read by the one reader of quantized
weights (:func:`tfqkd.qat_weights.read_layer_weights`), so the archive, the int8 / INT4 files
and :func:`tfqkd.quantize.quantization_info` hold the same integers.

Example:
    >>> import os, tempfile, tfqkd
    >>> q = tfqkd.quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2)
    >>> p = os.path.join(tempfile.mkdtemp(), "w.tfqkdpw")
    >>> pack_weights(q, p)["encodings"]["ternary"] > 0
    True
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from tfqkd._graph import finalize_layer_states
from tfqkd._io import atomic_write
from tfqkd._keras import keras
from tfqkd.export._common import _check_writable
from tfqkd.export.forward import _layer_forward_weights
from tfqkd.qat_weights import (
    QuantizedWeight,
    _inner,
    _is_quantize_layer,
    _is_wrapper,
    _layer_variables,
    level_bits,
    read_layer_weights,
)

__all__ = ["pack_weights", "load_packed_weights", "packed_archive_stats"]

_PACK_MAGIC = b"TFQKDPW1"


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


def _archive_entries(model: keras.Model) -> List[Tuple[str, int, QuantizedWeight]]:
    """(layer name, weight index, reading) for every weight (:func:`read_layer_weights`)."""
    out = []
    for layer in model.layers:
        if _is_quantize_layer(layer):
            continue
        for i, reading in enumerate(read_layer_weights(layer).values()):
            out.append((_inner(layer).name, i, reading))
    return out


def pack_weights(model: keras.Model, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Writes the model's forward weights at their true bit-width (atomically).

    Every weight that is exactly ``k * step`` with a step per tensor or per output channel (what
    tfqkd's quantizers produce; the levels and steps are the quantizer's own, read by
    :func:`tfqkd.qat_weights.read_layer_weights`, and inferred from the values for weights no
    quantizer states them for) is stored as integer levels plus float32 steps: ternary kernels as
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
    for layer_name, index, reading in _archive_entries(model):
        value = np.asarray(reading.value)
        entry: Dict[str, Any] = {"layer": layer_name, "index": index, "name": reading.name,
                                 "shape": list(value.shape), "dtype": str(value.dtype)}
        if reading.levels is not None and value.dtype == np.float32 and value.size >= 16:
            k, step, per_channel = reading.levels, reading.step, reading.per_channel
            kmax = int(np.abs(k).max())
            if kmax <= 1 and np.all(k != 0):
                encoding, bits, data = "binary", 1, _pack_bits((k > 0).astype(np.uint32), 1)
            elif kmax <= 1:
                encoding, bits, data = "ternary", 2, _pack_trits(k)
            else:
                bits = level_bits(kmax)
                encoding, data = "int", _pack_bits((k + kmax).astype(np.uint32), bits)
            step = np.asarray(step, np.float32)
            if step.ndim > 1:  # a depthwise kernel's (in, mult) steps: kept in that shape
                entry["step_shape"] = list(step.shape)
            steps = step.reshape(-1).tobytes()
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
    atomic_write(path, _PACK_MAGIC + struct.pack("<I", len(header)) + header + payload.getvalue())
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
    if "step_shape" in entry:
        steps = steps.reshape(entry["step_shape"])
    k = k.reshape(shape).astype(np.float32)
    step = steps if entry["per_channel"] else steps[0]
    return (np.float32(1) * step * k).astype(np.float32) if entry["per_channel"] else \
        (np.float32(step) * k).astype(np.float32)


def packed_archive_stats(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Sizes of a packed archive: bytes, weights per encoding, bits per weight.

    ``bits_per_ternary_weight`` counts the ternary tensors' packed levels *and* their steps;
    ``bits_per_weight`` is the whole file (header, batch norm, float layers) over all weights;
    ``quantized_bytes`` the quantized tensors' packed levels and steps (what
    :func:`tfqkd.budget.kernel_bytes` prices as ``"packed"``).

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
        "num_weights": total, "encodings": counts, "quantized_bytes": quantized_bits // 8,
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
