"""Reading and writing TFLite FlatBuffers (the schema's object API), shared by export and tools.

Private to tfqkd: :mod:`tfqkd.export` (its converter, layout and verify modules) and ``tools/``
read and rewrite ``.tflite`` files through these few functions, so there is one definition of
"weight op" and one serialiser (which stores identical quantization vectors once).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

__all__ = ["WEIGHT_OPS", "INT4", "INT8", "INT16", "INT32", "INT64", "read", "write", "op_names",
           "tensor_name", "buffer_values"]

# Kernel ops whose second input is a weight tensor.
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# The schema's TensorType values the exporter checks and writes.
INT4, INT8, INT16, INT32, INT64 = 17, 9, 7, 2, 4


def read(content: bytes):
    """A ``.tflite`` file's bytes -> its ``ModelT`` object tree."""
    from tensorflow.lite.tools import flatbuffer_utils
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(content))


class _SharedVectorQuantization:
    """Packs a ``QuantizationParametersT`` like the generated code, reusing identical vectors.

    A per-channel quantized kernel and its int32 bias each carry one int64 zero point per output
    channel, all 0: ResNet20's ~800 channels spend ~12.8 KB on them, 4% of its int8 file. A
    FlatBuffers table refers to its vectors by offset, so every tensor can point at the one
    stored copy of an identical vector (what the FlatBuffers builder does for shared strings):
    the file stays a standard, verifiable TFLite model with the same values in every field.
    """

    def __init__(self, params, cache: Dict[Tuple[str, bytes], int]):
        self.params = params
        self.cache = cache

    def _vector(self, builder, values, dtype) -> int:
        data = np.ascontiguousarray(np.asarray(values, dtype))
        key = (data.dtype.str, data.tobytes())
        if key not in self.cache:
            self.cache[key] = builder.CreateNumpyVector(data)
        return self.cache[key]

    def Pack(self, builder) -> int:  # noqa: N802 (the generated object API's name)
        from tensorflow.lite.python import schema_py_generated as schema
        q = self.params
        vectors = {name: self._vector(builder, getattr(q, name), dtype)
                   for name, dtype in (("min", np.float32), ("max", np.float32),
                                       ("scale", np.float32), ("zeroPoint", np.int64))
                   if getattr(q, name) is not None}
        details = q.details.Pack(builder) if q.details is not None else None
        schema.QuantizationParametersStart(builder)
        for name, add in (("min", schema.QuantizationParametersAddMin),
                          ("max", schema.QuantizationParametersAddMax),
                          ("scale", schema.QuantizationParametersAddScale),
                          ("zeroPoint", schema.QuantizationParametersAddZeroPoint)):
            if name in vectors:
                add(builder, vectors[name])
        schema.QuantizationParametersAddDetailsType(builder, q.detailsType)
        if details is not None:
            schema.QuantizationParametersAddDetails(builder, details)
        schema.QuantizationParametersAddQuantizedDimension(builder, q.quantizedDimension)
        return schema.QuantizationParametersEnd(builder)


def write(model_obj) -> bytes:
    """Serialises a TFLite object model, storing identical quantization vectors once."""
    from tensorflow.lite.tools import flatbuffer_utils
    cache: Dict[Tuple[str, bytes], int] = {}
    originals = []
    for sg in model_obj.subgraphs:
        for t in sg.tensors:
            if t.quantization is not None:
                originals.append((t, t.quantization))
                t.quantization = _SharedVectorQuantization(t.quantization, cache)
    try:
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model_obj))
    finally:
        for t, q in originals:
            t.quantization = q


def op_names(model_obj) -> Dict[int, str]:
    """{operator-code index: builtin operator name} of a ``ModelT``."""
    from tensorflow.lite.python import schema_py_generated as schema
    builtin = {v: k for k, v in schema.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    out = {}
    for i, code in enumerate(model_obj.operatorCodes):
        value = max(code.builtinCode, code.deprecatedBuiltinCode)
        out[i] = builtin.get(value, str(value))
    return out


def tensor_name(tensor) -> str:
    """A ``TensorT``'s name as text (the object API gives ``bytes``)."""
    name = tensor.name
    return name.decode() if isinstance(name, bytes) else str(name)


def buffer_values(buffer, dtype) -> np.ndarray:
    """A ``BufferT``'s bytes read as a flat, read-only array of ``dtype`` (the object API holds
    them as a uint8 array or a list of ints)."""
    return np.frombuffer(bytes(np.asarray(buffer.data, np.uint8)), dtype)
