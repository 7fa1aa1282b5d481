"""The student's activation ranges as the integer file must see them.

Reading and setting the range of each activation quantizer of a QAT student
(:func:`_quantizer_range`, :func:`_set_quantizer_range`, the ``_student_*`` readers that
:mod:`tfqkd.export.fakequant` builds its graph from), the groups of tensors the file gives one
range (:func:`_share_ranges`: the inputs and output of a same-scale op, and twins, the same
weightless layer applied twice to one tensor, which the converter merges into one op), and
``align_student``'s move of the student's quantizers onto the file's ranges
(:func:`_align_student_ranges`).

Example:
    >>> from tfqkd.quantizers import ActivationQuantizer
    >>> q, qvars = ActivationQuantizer(8), {"clip": tf.Variable(1.0)}
    >>> _set_quantizer_range(q, qvars, 0.0, 4.0), _quantizer_range(q, qvars)
    (True, (0.0, 4.0))
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from tfqkd._keras import keras, tf
from tfqkd.export.forward import _layer_calls
from tfqkd.qat_weights import QuantizedWeight, _is_quantize_layer, _is_wrapper

__all__: List[str] = []

#: Layers TFLite runs with the same scale on input and output (the converter rejects others).
_SAME_SCALE_LAYERS = (keras.layers.AveragePooling2D, keras.layers.MaxPooling2D,
                      keras.layers.Reshape, keras.layers.Flatten, keras.layers.ZeroPadding2D,
                      keras.layers.Cropping2D)


def _quantizer_range(quantizer, qvars) -> Optional[Tuple[float, float]]:
    """The fixed range an activation quantizer uses at inference, if it has one."""
    try:
        if hasattr(quantizer, "range_of"):  # tfqkd RangeQuantizer (its widened range)
            return quantizer.range_of(qvars)
        if hasattr(quantizer, "clip_of"):  # tfqkd ActivationQuantizer (and subclasses): [0, c]
            clip = float(np.asarray(quantizer.clip_of(qvars)))
            grid = getattr(quantizer, "signed_range", None)
            if grid is not None and np.isclose(clip, grid[1] - grid[0], rtol=1e-6, atol=0.0):
                # Set by _set_quantizer_range and not trained since: the signed range whose
                # grid it holds (kept in the config, so it survives save / load), so that
                # exporting again gives the group the same range.
                return grid
            return 0.0, clip
        if isinstance(qvars, dict) and "min_var" in qvars and "max_var" in qvars:  # tfmot
            return float(np.asarray(qvars["min_var"])), float(np.asarray(qvars["max_var"]))
    except Exception:  # noqa: BLE001 (an unusual quantizer: calibrate instead)
        return None
    return None


def _usable_range(quantizer, qvars) -> Optional[Tuple[float, float]]:
    """:func:`_quantizer_range` where it is finite and not empty (else None: calibrate instead)."""
    r = _quantizer_range(quantizer, qvars)
    return r if r is not None and np.isfinite(r).all() and r[1] > r[0] else None


def _set_quantizer_range(quantizer, qvars, lo: float, hi: float) -> bool:
    """Makes an 8-bit activation quantizer round on ``[lo, hi]`` at inference; False if it cannot.

    The inverse of :func:`_quantizer_range`: a tfqkd ``RangeQuantizer`` (through its widening)
    or tfmot ``min_var``/``max_var`` take any range; an unsigned ``ActivationQuantizer`` takes
    ``[0, hi]`` through its EMA clip or PACT alpha (and the grid of a signed ``[lo, hi]`` on its
    non-negative values, clipped at ``hi - lo``); fixed ranges and low-bit grids cannot move.
    """
    if not isinstance(qvars, dict):
        return False
    if hasattr(quantizer, "range_of") and "min_var" in qvars and "max_var" in qvars:
        limits = getattr(quantizer, "limits", None)
        if limits is not None and not limits[0] <= lo <= hi <= limits[1]:
            return False  # it would round on the range clipped to its limits, not on [lo, hi]
        scale = 1.0 + float(getattr(quantizer, "widen", 0.0))
        qvars["min_var"].assign(lo / scale)
        qvars["max_var"].assign(hi / scale)
        return True
    if hasattr(quantizer, "clip_of"):
        if lo > 0.0 or getattr(quantizer, "bits", 8) != 8 or "clip" not in qvars:
            return False
        # [0, c] rounds on multiples of c/255. A signed file range [lo, hi] rounds on multiples
        # of (hi - lo)/255 (zero is a grid point), so c = hi - lo gives the same grid on the
        # ReLU's non-negative values; only values above hi, which the file clips, differ.
        qvars["clip"].assign(hi - lo)
        # Read by _quantizer_range. Cleared for an unsigned range: a stale signed range would be
        # read back whenever the new clip happened to equal its span.
        quantizer.signed_range = (float(lo), float(hi)) if lo < 0.0 else None
        return True
    if "min_var" in qvars and "max_var" in qvars:  # tfmot's quantizers
        qvars["min_var"].assign(lo)
        qvars["max_var"].assign(hi)
        return True
    return False


def _align_student_ranges(model: keras.Model, final: Dict[str, Tuple[float, float]]
                          ) -> Dict[str, Any]:
    """Sets the student's output quantizers to the ranges the file rounds on, in place.

    TFLite runs a concatenation, a pooling or a reshape with one scale on every input and the
    output, so the file gives such a group of tensors the union of the student's ranges
    (:func:`_share_ranges`): a DenseNet block's concatenations, its convolutions' outputs and
    its pooling share one. The student trained each with its own range, so it rounds most of
    those values on another grid than the file. Here each quantizer whose range the file
    changed is set to the file's. Returns ``{"tensors": moved, "unaligned": [names]}`` (a
    quantizer that cannot take the range: a fixed or low-bit range). An unsigned ReLU
    quantizer in a group with signed members (DenseNet's stem ReLU, whose max pooling feeds
    the first block's concatenations) takes the file's grid; values above the file's maximum,
    which the file clips and the student does not, are the one difference left.
    """
    moved, unaligned = 0, []
    for name, quantizer, qvars in _output_quantizers(model):
        want, have = final.get(name), _quantizer_range(quantizer, qvars)
        if want is None or have is None or np.allclose(want, have, rtol=1e-6, atol=0.0):
            continue
        if _set_quantizer_range(quantizer, qvars, *want):
            moved += 1
        else:
            unaligned.append(name)
    means = _round_pooled_means_as_the_file(model, final)
    if moved or means:
        # Keras traced predict/evaluate with the old quantizer attributes: trace again.
        model.predict_function = model.test_function = None
    return {"tensors": moved, "unaligned": unaligned, "integer_means": means}


def _round_pooled_means_as_the_file(model: keras.Model,
                                    final: Dict[str, Tuple[float, float]]) -> int:
    """Gives each average pooling's 8-bit output quantizer the file's rounding of a mean.

    Where the file runs ``AVERAGE_POOL_2D`` with one range for its input and output (a
    same-scale group, above), it rounds the mean of the window's int8 values half away from
    zero; the student's FakeQuant rounds the float mean half up. With the ranges aligned the
    two differ only on exact halves, which are frequent: at a 3x3 "same" pooling the edge
    windows average 4 or 6 values (15 % of NASNetMobile's pooled values at 32x32).
    ``RangeQuantizer.mean_window`` makes the student round those as the file does. A pooling
    whose output range differs from its input's is requantized by the file after the mean and
    keeps FakeQuant's rounding. Returns the number of quantizers set.
    """
    from tfqkd.quantizers.activations import RangeQuantizer

    count = 0
    for layer in model.layers:
        inner = getattr(layer, "layer", None)
        if not (_is_wrapper(layer) and isinstance(inner, keras.layers.AveragePooling2D)):
            continue
        sources = [src for node in layer._inbound_nodes  # noqa: SLF001 (Keras API)
                   for src in tf.nest.flatten(node.inbound_layers)]
        source_range = None
        if len(sources) == 1 and _is_quantize_layer(sources[0]):  # the model input's quantizer
            source_range = _usable_range(sources[0].quantizer,
                                         getattr(sources[0], "quantizer_vars", {}))
        elif len(sources) == 1:
            source_range = final.get(getattr(sources[0], "layer", sources[0]).name)
        same_range = source_range is not None and inner.name in final and \
            np.allclose(source_range, final[inner.name], rtol=1e-6, atol=0.0)
        quantizers = getattr(layer, "_output_quantizers", None) or []  # noqa: SLF001 (tfmot API)
        if same_range and len(quantizers) == 1 and type(quantizers[0]) is RangeQuantizer and \
                quantizers[0].bits == 8:
            quantizers[0].mean_window = int(np.prod(inner.pool_size))
            count += 1
    return count


def _activation_quantizers(model: keras.Model) -> Iterable[Tuple[str, str, Any, Any]]:
    """(inner layer name, where, quantizer, its variables) of every activation quantizer of every
    wrapped layer, in layer order: ``where`` is ``"pre_activation"`` (before a fused softmax /
    sigmoid / tanh), ``"post_activation"`` (after a fused ReLU: a ``Conv2D(activation="relu")``)
    or ``"output"`` (the wrapper's output quantizer, which rounds last). The one walk over
    tfmot's wrapper attributes that the export's readers filter."""
    for layer in model.layers:
        if not _is_wrapper(layer):
            continue
        for act in getattr(layer, "_quantize_activations", None) or []:
            if getattr(act, "quantizer", None) is None:
                continue
            for where, should in (("pre_activation", "_should_pre_quantize"),
                                  ("post_activation", "_should_post_quantize")):
                qvars = getattr(act, f"_{where}_vars", None)
                if getattr(act, should, lambda: False)() and qvars is not None:
                    yield layer.layer.name, where, act.quantizer, qvars
        for quantizer in getattr(layer, "_output_quantizers", None) or []:
            yield (layer.layer.name, "output", quantizer,
                   getattr(layer, "_output_quantizer_vars", {}))


def _output_quantizers(model: keras.Model) -> Iterable[Tuple[str, Any, Any]]:
    """(inner layer name, the quantizer that rounds its output, its variables) of every wrapped
    layer with one: its output quantizer, else the quantizer after a fused activation (a
    ``Conv2D(activation="relu")``'s ReLU rounding), which then rounds the layer's output.

    Without the fused ones, the file calibrated its own 8-bit range for a fused ReLU's output
    and never took a 4-bit grid: a W4A4 ``Conv2D(activation="relu")`` was up to 8 file steps
    off its student on 44 % of values (seed 0; its own ``ReLU`` layer: every value equal).
    """
    rank = {"output": 0, "post_activation": 1}  # the output quantizer rounds last
    chosen: Dict[str, Tuple[int, Any, Any]] = {}
    for name, where, quantizer, qvars in _activation_quantizers(model):
        if where in rank and (name not in chosen or rank[where] < chosen[name][0]):
            chosen[name] = (rank[where], quantizer, qvars)
    return [(name, quantizer, qvars) for name, (_, quantizer, qvars) in chosen.items()]


def _student_activation_ranges(model: keras.Model) -> Dict[str, Tuple[float, float]]:
    """{inner layer name: (min, max) of its output quantizer} for every wrapped layer with one."""
    out = {}
    for name, quantizer, qvars in _output_quantizers(model):
        r = _usable_range(quantizer, qvars)
        if r is not None:
            out[name] = r
    return out


def _student_activation_bits(model: keras.Model) -> Dict[str, int]:
    """{inner layer name: bits} of every wrapped layer whose output quantizer rounds at < 8 bits.

    Those are :class:`~tfqkd.quantizers.ActivationQuantizer` outputs (ReLUs at
    ``activation_bits``); the file must round them on the same coarse grid
    (:class:`_LowBitActivation`).
    """
    out = {}
    for name, quantizer, _ in _output_quantizers(model):
        bits = getattr(quantizer, "bits", None)
        if hasattr(quantizer, "clip_of") and isinstance(bits, int) and bits < 8:
            out[name] = bits
    return out


def _student_pre_activation_ranges(model: keras.Model) -> Dict[str, Tuple[float, float]]:
    """{inner layer name: (min, max)} of the quantizer before a fused softmax / sigmoid / tanh."""
    out = {}
    for name, where, quantizer, qvars in _activation_quantizers(model):
        r = _usable_range(quantizer, qvars) if where == "pre_activation" else None
        if r is not None:
            out[name] = r
    return out


def _student_weight_levels(kernels: Dict[str, QuantizedWeight]
                           ) -> Dict[str, Tuple[np.ndarray, np.ndarray, bool]]:
    """{layer name: (integer levels, step, per_channel)} of every kernel that has levels.

    ``kernels`` is the student's reading (:func:`tfqkd.qat_weights.kernel_weights`): the
    quantizer's own levels where it states them (an 8-bit kernel's smallest used level is often
    not 1, so they cannot be inferred from the rounded kernel), else inferred from the values.
    """
    out = {}
    for name, w in kernels.items():
        if w.levels is None:
            continue
        step = np.asarray(w.step, np.float32)
        out[name] = (w.levels.astype(np.int32), step if w.per_channel else step.reshape(()),
                     bool(w.per_channel))
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
                r = _usable_range(layer.quantizer, getattr(layer, "quantizer_vars", {}))
                if r is not None:
                    found = r
        out.append(found)
    return out


def _twin_layers(plain: keras.Model) -> List[Tuple[int, int]]:
    """``(id, id)`` of weightless layers with the same class and config called on the same inputs.

    The converter merges such twins into one op (NASNet applies ``Activation("relu")`` twice to a
    cell's output: once for the next cell, once for the cell after it), and one op has one
    output range. Two different ranges leave the merged op float: an ``ExportError`` that came
    and went with the training run, as the two student quantizers' ranges happened to match.
    """
    seen: Dict[Tuple[Any, ...], int] = {}
    pairs = []
    for layer_id, nodes in _layer_calls(plain).items():
        if len(nodes) != 1 or nodes[0].layer.weights:
            continue
        node, layer = nodes[0], nodes[0].layer
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        key = (type(layer), repr(sorted(config.items())),
               tuple(id(t) for t in tf.nest.flatten(node.keras_inputs)),
               repr(sorted(node.call_kwargs.items())))
        if key in seen:
            pairs.append((seen[key], layer_id))
        else:
            seen[key] = layer_id
    return pairs


def _pools_one_position(layer, node) -> bool:
    """A global pooling over a 1x1 map (MobileNet's head, EfficientNet's squeeze-excite in the
    last stage, at 32x32 inputs): an identity, which the converter removes, so the next op reads
    the pooling's input tensor and its range. One range for both makes the student's rounding of
    the pooled value a no-op, as in the file."""
    if not isinstance(layer, (keras.layers.GlobalAveragePooling2D,
                              keras.layers.GlobalMaxPooling2D)):
        return False
    shape = tuple(tf.nest.flatten(node.keras_inputs)[0].shape)
    spatial = shape[1:-1] if getattr(layer, "data_format", "channels_last") == "channels_last" \
        else shape[2:]
    return len(spatial) == 2 and all(d == 1 for d in spatial)


def _share_ranges(plain: keras.Model, ranges: Dict[int, Tuple[float, float]],
                  twins: List[Tuple[int, int]], fixed: Optional[set] = None) -> None:
    """Gives pooling/reshape/concatenation outputs and their inputs one range, in place.

    A global pooling over a 1x1 map (:func:`_pools_one_position`) is linked as these are.
    Twin layers (``twins``, from :func:`_twin_layers`, which the caller needs too) join one
    group too: the converter merges them.

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

    # This graph's calls only (as for the twins): a layer reused from another model also lists
    # that model's calls among its `_inbound_nodes`.
    calls = _layer_calls(plain)
    for layer in plain.layers:
        if id(layer) not in ranges:
            continue
        same_scale = isinstance(layer, _SAME_SCALE_LAYERS + (keras.layers.Concatenate,))
        for node in calls.get(id(layer), []):
            if not (same_scale or _pools_one_position(layer, node)):
                continue
            for inbound in tf.nest.flatten(node.inbound_layers):
                if id(inbound) in ranges:
                    parent[find(id(inbound))] = find(id(layer))
    for first, twin in twins:
        if first in ranges and twin in ranges:
            parent[find(twin)] = find(first)
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
