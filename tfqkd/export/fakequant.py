"""The fake-quant graph: the student as a QAT-style graph the converter makes integer (int8, INT4).

``_fakequant_model`` folds batch norm into the kernels, puts each kernel behind a per-channel
``FakeQuantWithMinMaxVarsPerChannel`` whose grid holds the trained levels exactly (4-bit for
kernels trained at <= 4 bits in ``int4`` mode, whose weights the converter's low-bit path then
stores as INT4), and each activation behind an 8-bit ``FakeQuantWithMinMaxVars`` at the
student's own range where it has a quantizer (calibrated elsewhere; pooling / reshape /
concatenation groups share one range; softmax / sigmoid / tanh outputs are pinned to TFLite's
grids). Activations the student rounds at fewer bits (``activation_bits=4``: its ReLU outputs on
``[0, c]``) are int8 tensors whose step is the student's, ``c / (2^b - 1)``, clamped at ``c``
by a MINIMUM (:class:`_LowBitActivation`): TFLite's kernels take no 4-bit activations. The
student's ranges and levels are read, and groups of tensors given one range, in
:mod:`tfqkd.export.ranges`; the levels come from the one reader of quantized weights,
:mod:`tfqkd.qat_weights`.

Example:
    >>> fq = _FakeQuantActivation(0.0, 1.0, name="fq")
    >>> round(float(fq(tf.constant([0.3]))[0]) * 255, 3)
    77.0
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from tfqkd._graph import finalize_layer_states
from tfqkd._keras import keras, tf
from tfqkd.export.forward import (
    _clone_plain_layer,
    _consumers,
    _fold,
    _fold_plan,
    _layer_calls,
    _rebuild,
)
from tfqkd.export.ranges import _share_ranges, _twin_layers
from tfqkd.qat_weights import KERNEL_LAYERS as _KERNEL_LAYERS
from tfqkd.qat_weights import _inner, _weight_short_name
from tfqkd.quantize_configs import PINNED_OUTPUT_RANGES, activation_name

__all__: List[str] = []


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


def _low_bit_range(clip: float, bits: int) -> Tuple[Tuple[float, float], float]:
    """The 8-bit range whose step is that of ``bits``-bit rounding on ``[0, clip]``, and the
    clamp value: ``((0, clip * 255 / (2^bits - 1)), clip)``.

    TFLite's integer kernels take int8 tensors only (the converter refuses a 4-bit activation
    FakeQuant: "must be tensor of ... QI8"), so a 4-bit activation is an int8 tensor whose step is
    ``clip / 15``, zero point -128, with its values clamped at level 15 by a MINIMUM.

    Example:
        >>> _low_bit_range(3.0, 4)
        ((0.0, 51.0), 3.0)
    """
    return (0.0, float(clip) * 255.0 / (2 ** bits - 1)), float(clip)


class _LowBitActivation(keras.layers.Layer):
    """``bits``-bit rounding on ``[0, clip]`` as int8 ops: FakeQuant on the coarse grid (the
    producing kernel's output rounding), MINIMUM at ``clip`` (exact: ``clip`` is a grid level),
    FakeQuant again (the MINIMUM's output, same scale). Equals ``s * round(clip(x, 0, c) / s)``
    with ``s = c / (2^bits - 1)`` for ``x >= 0`` (a fused ReLU's output), but for ties."""

    def __init__(self, lo, hi, clip, name):
        super().__init__(name=name)
        self._fq = _FakeQuantActivation(lo, hi, name=name + "_grid")
        self._clip = float(clip)

    def call(self, inputs):
        return self._fq(tf.minimum(self._fq(inputs), self._clip))


#: Activations that are not a ReLU the converter fuses: they get an input FakeQuant of their own.
_SPLIT_ACTIVATIONS = ("softmax", "sigmoid", "tanh", "swish", "silu")
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


def _weight_grid(q: np.ndarray, g: np.ndarray, bits: int, depthwise: bool,
                 per_tensor: bool = False, levels=None) -> Tuple[np.ndarray, int]:
    """Per-channel FakeQuant range that puts ``k * d_c * g_c`` exactly on a ``bits`` grid.

    Returns (max_c, bits actually used: ``bits`` if the levels fit, else 8). With
    ``per_tensor`` (dense kernels) the grid is shared by all channels, exact when the step is.
    ``levels`` is ``(k, step, per_channel)`` as the student's reading states it
    (:func:`_student_weight_levels`); without them the grid is the channel's range at 8 bits.
    """
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


#: TFOpLambda symbols of ``x op c`` that are per-channel affine maps: (a, b) for a constant c,
#: tensor first / constant first.
_SCALAR_OPS = {
    "__operators__.add": (lambda c: (1.0, c), lambda c: (1.0, c)),
    "math.add": (lambda c: (1.0, c), lambda c: (1.0, c)),
    "math.subtract": (lambda c: (1.0, -c), lambda c: (-1.0, c)),
    "math.multiply": (lambda c: (c, 0.0), lambda c: (c, 0.0)),
    "math.truediv": (lambda c: (1.0 / c, 0.0), None),
    "math.divide": (lambda c: (1.0 / c, 0.0), None),
}


def _scalar_constant(value) -> Optional[float]:
    """``value`` as a float if it is a scalar constant (a Python or NumPy number, or an eager
    scalar tensor: ``2.0 - x`` passes ``tf.constant(2.0)``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if tf.is_tensor(value) and not keras.backend.is_keras_tensor(value) and \
            hasattr(value, "numpy") and value.shape.rank == 0 and value.dtype.is_floating:
        return float(value.numpy())
    return None


def _scalar_op_affine(layer, node) -> Optional[Tuple[float, float]]:
    """``(a, b)`` for a TensorFlow-op layer ``x + c``, ``x * c``, ``x - c``, ``x / c`` (or
    ``c + x``...) with one tensor and one scalar constant (MobileNetV3's hard-swish: ``x + 3.0``,
    ``x * (1/6)``), else None. ``node`` is the layer's call in the graph at hand.
    """
    if type(layer).__name__ != "TFOpLambda" or layer.symbol not in _SCALAR_OPS:
        return None
    # The operands (x, y), given by position or by keyword (a rebuilt graph passes y=3.0).
    kwargs = node.call_kwargs
    args = ([kwargs["x"]] if "x" in kwargs else []) + list(node.call_args) + \
        ([kwargs["y"]] if "y" in kwargs else [])
    if set(kwargs) - {"name", "x", "y"} or len(args) != 2:
        return None
    numbers = [_scalar_constant(a) for a in args]
    is_number = [n is not None for n in numbers]
    operand = args[is_number.index(False)] if sorted(is_number) == [False, True] else None
    if not (tf.is_tensor(operand) and keras.backend.is_keras_tensor(operand)):
        return None
    constant = numbers[is_number.index(True)]
    rule = _SCALAR_OPS[layer.symbol][0 if is_number[1] else 1]
    if rule is None or (layer.symbol in ("math.truediv", "math.divide") and constant == 0.0):
        return None
    return rule(constant)


def _scalar_op_ranges(plain: keras.Model, fq_layers: Sequence[Any],
                      ranges: Dict[int, Tuple[float, float]],
                      fixed_ranges: Dict[str, Tuple[float, float]]
                      ) -> Dict[int, Tuple[float, float]]:
    """{id(layer): range} of scalar ops ``x * c``, ``x + c``... whose input the student rounds on
    a fixed range: ``a * range + b``, the exact image of the input's grid.

    MobileNetV3's hard sigmoid is ``ReLU6(x + 3) * (1/6)``: the student rounds the ReLU6 and
    leaves the product unrounded, on the ReLU6's grid divided by 6. Calibrated, the product's
    range stopped at the largest value the calibration images reached, and the file clipped
    larger ones (up to 216 steps off on 0.1-0.5 % of the products of a MobileNetV3Small, test
    images, 2026-12-06). The image of the input's range holds every value the student makes.
    """
    calls = _layer_calls(plain)
    out: Dict[int, Tuple[float, float]] = {}
    for layer in fq_layers:
        nodes = calls.get(id(layer), [])
        if layer.name in fixed_ranges or len(nodes) != 1:
            continue
        affine = _scalar_op_affine(layer, nodes[0])
        inbound = tf.nest.flatten(nodes[0].inbound_layers)
        if affine is None or len(inbound) != 1 or inbound[0].name not in fixed_ranges or \
                id(inbound[0]) not in ranges:
            continue
        a, b = affine
        lo, hi = ranges[id(inbound[0])]
        out[id(layer)] = (min(a * lo + b, a * hi + b), max(a * lo + b, a * hi + b))
    return out


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


def _fakequant_model(plain: keras.Model, bits_by_layer: Dict[str, Optional[int]],
                     samples: Iterable[np.ndarray], low_bit: bool,
                     fixed_ranges: Optional[Dict[str, Tuple[float, float]]] = None,
                     source: Optional[keras.Model] = None,
                     input_ranges: Optional[Sequence[Optional[Tuple[float, float]]]] = None,
                     weight_levels: Optional[Dict[str, Tuple[np.ndarray, np.ndarray, bool]]]
                     = None, pre_activation_ranges: Optional[Dict[str, Tuple[float, float]]] = None,
                     activation_bits: Optional[Dict[str, int]] = None,
                     ) -> Tuple[keras.Model, Dict[str, int], Dict[str, Tuple[float, float]]]:
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
    ``activation_bits`` (by layer name, :func:`_student_activation_bits`): outputs the student
    rounds at fewer than 8 bits on its fixed ``[0, c]``; the file rounds them on that grid
    (:class:`_LowBitActivation`).

    Returns ``(graph, bits used per kernel layer, {layer name: (min, max)} of every 8-bit
    output FakeQuant)``: the ranges after same-scale groups were merged (:func:`_share_ranges`).
    """
    fixed_ranges = dict(fixed_ranges or {})
    weight_levels = dict(weight_levels or {})
    plan = _fold_plan(plain)
    folded_bns = {id(bn) for bn in plan.values()}
    consumers = _consumers(plain)
    # Per-channel affine layers (an unfolded batch norm...) become 1x1 depthwise kernels.
    affine = {}
    calls = _layer_calls(plain)  # this graph's calls only (see _layer_calls)
    for layer in plain.layers:
        nodes = calls.get(id(layer), [])
        if id(layer) in folded_bns or isinstance(layer, _KERNEL_LAYERS) or len(nodes) != 1:
            continue
        shape = tuple(tf.nest.flatten(nodes[0].outputs)[0].shape)
        if len(shape) != 4 or shape[-1] is None:
            continue
        found = _channel_affine(layer, int(shape[-1]))
        scalar = _scalar_op_affine(layer, nodes[0]) if low_bit else None
        if scalar is not None:
            # The converter's low-bit path leaves a MUL/ADD by a Python constant float (no int4
            # file); as a 1x1 depthwise convolution it is an integer kernel. The int8 path keeps
            # TFLite's integer ADD/MUL (elementwise, cheaper than a depthwise kernel).
            found = (np.full(int(shape[-1]), scalar[0]), np.full(int(shape[-1]), scalar[1]))
        if found is not None:
            affine[id(layer)] = found

    # Tensors that get an activation FakeQuant: every layer output, except a kernel layer's raw
    # output whose BN is folded (the BN's output takes its place) and outputs feeding only a plain
    # ReLU that the converter fuses into the producing conv/add.
    # Twin ReLUs count as one: the converter merges them into one op (see _twin_layers), which
    # it then fuses too (NASNet's stem: one batch norm output read by five identical ReLUs).
    twins = _twin_layers(plain)
    twin_first = {twin: first for first, twin in twins}
    fq_layers, fused_relu = [], {}
    for layer in plain.layers:
        if isinstance(layer, keras.layers.InputLayer) or id(layer) in plan:
            continue
        users = consumers.get(id(layer), [])
        # A kernel (an affine layer's 1x1 depthwise kernel included) or an add fuses a ReLU.
        fusable = isinstance(layer, _KERNEL_LAYERS + (keras.layers.Add,)) or \
            id(layer) in folded_bns or id(layer) in affine
        if fusable and users and all(_is_plain_relu(u) for u in users) and \
                len({twin_first.get(id(u), id(u)) for u in users}) == 1:
            fused_relu[id(layer)] = users[0]
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
    low_bit_clips = {}  # id(layer) -> clip: outputs on a coarse grid (see _low_bit_range)
    for layer in fq_layers:
        if activation_name(layer) in PINNED_OUTPUT_RANGES:
            ranges[id(layer)] = PINNED_OUTPUT_RANGES[activation_name(layer)]
        bits = (activation_bits or {}).get(layer.name)
        if bits and layer.name in fixed_ranges and fixed_ranges[layer.name][0] == 0.0:
            ranges[id(layer)], low_bit_clips[id(layer)] = _low_bit_range(
                fixed_ranges[layer.name][1], bits)
    derived = _scalar_op_ranges(plain, fq_layers, ranges, fixed_ranges)
    ranges.update(derived)
    # A same-scale group (pooling, concatenation...) of coarse members shares their grid; where
    # it mixes grids the union range applies and the coarse member is rounded on it (not exact).
    # The model inputs join the groups with their own (fixed) ranges: a padding or pooling of
    # the input (ResNet50V2's conv1_pad) then keeps the input's grid, where a calibrated range
    # of its own made the file requantize the input once more (68 % of its values moved).
    input_layers = list(plain._input_layers)  # noqa: SLF001 (Keras API: one per model input)
    for layer, r in zip(input_layers, in_ranges):
        ranges[id(layer)] = r
    fixed_ids = {id(layer) for layer in fq_layers
                 if layer.name in fixed_ranges or id(layer) in derived
                 or activation_name(layer) in PINNED_OUTPUT_RANGES}
    _share_ranges(plain, ranges, twins, fixed=fixed_ids | {id(layer) for layer in input_layers})
    in_ranges = [ranges.pop(id(layer)) for layer in input_layers]
    used_bits: Dict[str, int] = {}
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
            tensor = next(t for t in tf.nest.flatten((args, kwargs))
                          if tf.is_tensor(t) and keras.backend.is_keras_tensor(t))
            out = _FakeQuantKernelLayer(
                keras.layers.DepthwiseConv2D(1), a.reshape(1, 1, -1, 1).astype(np.float32),
                b.astype(np.float32), np.maximum(np.abs(a), 1e-12).astype(np.float32), 8,
                name=layer.name)(tensor)
        else:
            out = _clone_plain_layer(layer)(*args, **kwargs)
        if id(layer) in low_bit_clips:
            lo, hi = ranges[id(layer)]
            out = _LowBitActivation(lo, hi, low_bit_clips[id(layer)], name=layer.name + "_fq")(out)
        elif id(layer) in ranges:
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
    finalize_layer_states(rebuilt)
    by_id = {id(layer): layer.name for layer in plain.layers}
    final = {by_id[key]: r for key, r in ranges.items() if key not in low_bit_clips}
    # A fused output has no tensor of its own in the file: the conv rounds straight onto the
    # ReLU's range. A student that rounds it too (a batch norm read by twin ReLUs gets an
    # output quantizer) is aligned onto that range, on which its rounding and the ReLU's
    # rounding together give the file's one rounding.
    for key, relu in fused_relu.items():
        if id(relu) in ranges and id(relu) not in low_bit_clips:
            final.setdefault(by_id[key], ranges[id(relu)])
    return rebuilt, used_bits, final
