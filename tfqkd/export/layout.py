"""Integer-exact layout rewrites of full-integer TFLite files, for speed on wide int8 kernels.

(``tfqkd.tflite_layout``, its earlier home, re-exports this module.)

On some x86 CPUs (measured on a Xeon with AVX-512 VNNI and AMX) LiteRT's XNNPACK int8
convolutions cost about the same per output pixel for 8 to 64 output channels (~85-110 ns,
1 thread; see ``tools/benchmark_tflite.py --layer_breakdown``), as if they always computed a
64-channel tile. ResNet20's first stage (32x32 pixels, 16 channels) is then as slow in int8 as in
float and dominates the int8 file's latency. Elsewhere (measured on an AMD EPYC with AVX-512
VNNI, no AMX) int8 cost scales with the width and this rewrite, which does 4x the
multiply-adds, is 1.8x *slower*: it is opt-in, for CPUs where the benchmark says it wins.

:func:`space_to_depth_convs` runs such a convolution on a 2x2 space-to-depth view instead::

    SPACE_TO_DEPTH(2) -> CONV_2D 3x3 on (H/2, W/2, 4*C_in) -> 4*C_out channels -> DEPTH_TO_SPACE(2)

Output pixel ``(2i+a, 2j+b)`` of a 3x3 stride-1 ``SAME`` convolution reads input rows
``2i+a-1 .. 2i+a+1``, which lie in block rows ``i-1 .. i+1``: a 3x3 ``SAME`` convolution in block
space whose kernel holds each original weight once per output sub-position (zeros elsewhere).
Every integer product and bias of the original accumulator appears exactly once and the
per-channel scales are repeated, so the rewritten file computes bit-identical outputs (checked in
``tests/test_tflite_layout.py``). The price: the block kernel has 16x the entries (file size)
and the convolution 4x the multiply-adds, so use it where latency matters more than file size,
on a CPU where it is faster. :func:`space_to_depth_convs` has a runnable example.
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import numpy as np

from tfqkd.export._flatbuffer import buffer_values, op_names, read, write

__all__ = ["space_to_depth_convs"]

_INT8 = 9
_INT32 = 2
_SAME = 0


def _opcode_index(model_obj, schema, builtin: int) -> int:
    for i, code in enumerate(model_obj.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 2  # the int8 kernels of SPACE_TO_DEPTH / DEPTH_TO_SPACE
    model_obj.operatorCodes.append(code)
    return len(model_obj.operatorCodes) - 1


def _block_kernel(w: np.ndarray) -> np.ndarray:
    """[O, 3, 3, I] kernel -> [4*O, 3, 3, 4*I] kernel of the 2x2 space-to-depth view."""
    o_n, _, _, i_n = w.shape
    out = np.zeros((4 * o_n, 3, 3, 4 * i_n), w.dtype)
    for a in range(2):
        for b in range(2):
            for ky in range(3):
                for kx in range(3):
                    ty, tx = a + ky - 1, b + kx - 1
                    # floor division/modulo place row -1 in block -1 (sub-row 1).
                    by, dy = ty // 2 + 1, ty % 2
                    bx, dx = tx // 2 + 1, tx % 2
                    out[(a * 2 + b) * o_n:(a * 2 + b + 1) * o_n, by, bx,
                        (dy * 2 + dx) * i_n:(dy * 2 + dx + 1) * i_n] = w[:, ky, kx, :]
    return out


def _tile_quantization(q, times: int):
    q = copy.deepcopy(q)
    for name in ("scale", "zeroPoint", "min", "max"):
        values = getattr(q, name)
        if values is not None and len(values) > 1:
            setattr(q, name, np.tile(np.asarray(values), times))
    return q


def _new_tensor(schema, sg, like, shape, name: bytes) -> int:
    t = schema.TensorT()
    t.shape = np.asarray(shape, np.int32)
    t.type = like.type
    t.buffer = 0
    t.name = name
    t.quantization = copy.deepcopy(like.quantization)
    if like.shapeSignature is not None and len(like.shapeSignature):
        # Keep a resizable batch dimension resizable (verify_tflite batches its inputs).
        t.shapeSignature = np.asarray([like.shapeSignature[0], *shape[1:]], np.int32)
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _block_op(schema, code: int, source: int, target: int, options_type: int, options):
    """A SPACE_TO_DEPTH / DEPTH_TO_SPACE operator with block size 2."""
    op = schema.OperatorT()
    op.opcodeIndex = code
    op.inputs, op.outputs = np.asarray([source], np.int32), np.asarray([target], np.int32)
    options.blockSize = 2
    op.builtinOptionsType, op.builtinOptions = options_type, options
    return op


def space_to_depth_convs(content: bytes, max_out_channels: int = 16) -> Tuple[bytes, int]:
    """Rewrites narrow int8 3x3 stride-1 convolutions onto a 2x2 space-to-depth view.

    Applies to every ``CONV_2D`` of the main subgraph with int8 input, a static int8 ``[O, 3, 3,
    I]`` kernel and an int32 bias used by no other op or tensor, ``O <= max_out_channels``, stride 1, no dilation, ``SAME``
    padding and even height and width. The file computes bit-identical outputs (see the module
    docstring); only those kernels grow (16x entries).

    Args:
        content: A full-integer ``.tflite`` file's bytes (e.g. from ``export_tflite(...,
            mode="int8")``).
        max_out_channels: Rewrite convolutions with at most this many output channels (16: the
            width at which XNNPACK's 64-channel int8 tile is a quarter used).

    Returns:
        ``(new_content, rewritten_convolutions)``.

    Example:
        >>> import numpy as np, os, tempfile, tfqkd
        >>> from tfqkd import export
        >>> m = tfqkd.models.tiny_resnet(seed=0)
        >>> p = os.path.join(tempfile.mkdtemp(), "m.tflite")
        >>> x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32")
        >>> _ = export.export_tflite(m, p, x, mode="int8")
        >>> space_to_depth_convs(open(p, "rb").read())[1] > 0
        True
    """
    from tensorflow.lite.python import schema_py_generated as schema

    if max_out_channels < 1:
        raise ValueError(f"max_out_channels must be >= 1, got {max_out_channels!r}.")
    model_obj = read(content)
    names = op_names(model_obj)
    sg = model_obj.subgraphs[0]
    uses = np.zeros(len(sg.tensors), np.int64)
    for op in sg.operators:
        for i in op.inputs:
            if i >= 0:
                uses[i] += 1
    # The converter lets tensors with identical constants (e.g. the zero biases of an untrained
    # model) share one buffer: a rewritten tensor gets a private copy, the others keep theirs.
    buffer_users = np.bincount([t.buffer for g in model_obj.subgraphs for t in g.tensors],
                               minlength=len(model_obj.buffers))

    def own_buffer(tensor) -> None:
        if buffer_users[tensor.buffer] > 1:
            buffer_users[tensor.buffer] -= 1
            private = schema.BufferT()
            private.data = model_obj.buffers[tensor.buffer].data
            model_obj.buffers.append(private)
            tensor.buffer = len(model_obj.buffers) - 1

    def eligible(op) -> bool:
        if names.get(op.opcodeIndex) != "CONV_2D" or len(op.inputs) < 3 or op.inputs[2] < 0:
            return False
        opt = op.builtinOptions
        if (opt.strideH, opt.strideW, opt.dilationHFactor, opt.dilationWFactor) != (1, 1, 1, 1) \
                or opt.padding != _SAME:
            return False
        x, w, b = (sg.tensors[i] for i in op.inputs[:3])
        y = sg.tensors[op.outputs[0]]
        data = model_obj.buffers[w.buffer].data
        return (x.type == _INT8 and w.type == _INT8 and y.type == _INT8 and b.type == _INT32
                and data is not None and len(data) and len(x.shape) == 4
                and x.shape[0] == 1 and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0
                and tuple(w.shape[1:3]) == (3, 3) and w.shape[0] <= max_out_channels
                and uses[op.inputs[1]] == 1 and uses[op.inputs[2]] == 1
                and len(op.outputs) == 1
                and w.quantization is not None and w.quantization.quantizedDimension == 0)

    s2d_code = _opcode_index(model_obj, schema, schema.BuiltinOperator.SPACE_TO_DEPTH)
    d2s_code = _opcode_index(model_obj, schema, schema.BuiltinOperator.DEPTH_TO_SPACE)
    new_ops: List = []
    rewritten = 0
    for op in sg.operators:
        if not eligible(op):
            new_ops.append(op)
            continue
        x_i, w_i, b_i = (int(i) for i in op.inputs[:3])
        y_i = int(op.outputs[0])
        x, w, b, y = sg.tensors[x_i], sg.tensors[w_i], sg.tensors[b_i], sg.tensors[y_i]
        _, h, wd, c_in = (int(v) for v in x.shape)
        c_out = int(w.shape[0])
        own_buffer(w)
        own_buffer(b)
        kernel = buffer_values(model_obj.buffers[w.buffer], np.int8).reshape(c_out, 3, 3, c_in)
        model_obj.buffers[w.buffer].data = np.frombuffer(_block_kernel(kernel).tobytes(), np.uint8)
        w.shape = np.asarray([4 * c_out, 3, 3, 4 * c_in], np.int32)
        w.quantization = _tile_quantization(w.quantization, 4)
        bias = buffer_values(model_obj.buffers[b.buffer], np.int32)
        model_obj.buffers[b.buffer].data = np.frombuffer(np.tile(bias, 4).tobytes(), np.uint8)
        b.shape = np.asarray([4 * c_out], np.int32)
        b.quantization = _tile_quantization(b.quantization, 4)
        base = (y.name or b"conv") + b"/s2d"
        xs = _new_tensor(schema, sg, x, [1, h // 2, wd // 2, 4 * c_in], base + b"_in")
        ys = _new_tensor(schema, sg, y, [1, h // 2, wd // 2, 4 * c_out], base + b"_out")

        s2d = _block_op(schema, s2d_code, x_i, xs, schema.BuiltinOptions.SpaceToDepthOptions,
                        schema.SpaceToDepthOptionsT())
        op.inputs = np.asarray([xs, w_i, b_i], np.int32)
        op.outputs = np.asarray([ys], np.int32)
        d2s = _block_op(schema, d2s_code, ys, y_i, schema.BuiltinOptions.DepthToSpaceOptions,
                        schema.DepthToSpaceOptionsT())
        new_ops.extend([s2d, op, d2s])
        rewritten += 1
    if not rewritten:
        return content, 0
    sg.operators = new_ops
    return write(model_obj), rewritten
