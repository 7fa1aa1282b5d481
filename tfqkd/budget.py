"""Size budgets: the bytes a model's kernels take at given per-layer bit-widths, computed exactly.

What a bit-width search constrains. The bytes that depend on the bit-widths are the kernels'
storage; everything else in a file (biases, per-channel scales, the graph) is the same for every
choice of widths. Storage by format:

* ``"int8"``: TFLite int8 kernels, 1 byte per weight at any width;
* ``"int4"``: TFLite ``mode="int4"``: kernels at <= 4 bits as INT4 (two per byte, rounded up per
  tensor), wider ones as int8;
* ``"packed"``: the packed archive's levels (:func:`tfqkd.export.pack_weights`): 1 bit per
  binary weight, 5 ternary weights per byte, ``b`` bits otherwise (rounded up per tensor), plus
  one float32 step per output channel (per tensor without ``per_channel``). A kernel whose levels
  do not reach its width's largest level is packed narrower, so this is an upper bound there.

Example:
    >>> import tfqkd
    >>> model = tfqkd.models.tiny_resnet(seed=0)
    >>> widths = layer_widths(model, weight_bits=2)          # first/last at 8 bits
    >>> widths["stem_conv"], widths["stage1_block1_conv1"]
    (8, 2)
    >>> kernel_bytes(model, widths, "int4")  # 8-bit stem 72 + classifier 160, 4,736 ternary / 2
    2600
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np

from tfqkd._keras import keras
from tfqkd.layer_bits import BitsSpec, resolve_layer_bits, weighted_layers
from tfqkd.quantize_registry import FLOAT, first_and_last_layers
from tfqkd.quantizers.symmetric import check_bits

__all__ = ["STORAGES", "layer_widths", "tensor_bytes", "kernel_shapes", "kernel_bytes"]

#: Storage formats :func:`kernel_bytes` knows.
STORAGES = ("int8", "int4", "packed")


def layer_widths(model: keras.Model, weight_bits: int, first_last_bits: Union[int, str, None] = 8,
                 layer_bits: BitsSpec = None) -> Dict[str, int]:
    """``{weighted layer name: kernel bits}`` as :func:`tfqkd.quantize_model` assigns them.

    ``first_last_bits="float"`` layers count as 8 bits (an integer file stores them at 8).
    """
    weight_bits = check_bits(weight_bits, "weight_bits")
    widths = {layer.name: weight_bits for layer in weighted_layers(model)}
    if first_last_bits is not None:
        first, last = first_and_last_layers(model)
        fl = 8 if first_last_bits == FLOAT else check_bits(first_last_bits, "first_last_bits")
        widths.update({name: fl for name in first + last})
    widths.update(resolve_layer_bits(model, layer_bits, weighted_layers(model), "layer_bits"))
    return widths


def tensor_bytes(num_weights: int, bits: int, storage: str, num_steps: int = 1) -> int:
    """Bytes of one kernel of ``num_weights`` weights at ``bits`` in ``storage``.

    Example:
        >>> [tensor_bytes(n, b, "int4") for n, b in ((1000, 4), (1001, 4), (1000, 8))]
        [500, 501, 1000]
        >>> tensor_bytes(1000, 2, "packed", num_steps=16)   # 200 bytes of trits + 16 float32 steps
        264
    """
    bits = check_bits(bits, "bits")
    if storage == "int8":
        return int(num_weights)
    if storage == "int4":
        return math.ceil(num_weights / 2) if bits <= 4 else int(num_weights)
    if storage == "packed":
        levels = math.ceil(num_weights / 5) if bits == 2 else math.ceil(num_weights * bits / 8)
        return levels + 4 * int(num_steps)
    raise ValueError(f"storage {storage!r} unknown; choose one of {', '.join(STORAGES)}.")


def kernel_shapes(model: keras.Model) -> Dict[str, Tuple[int, int]]:
    """``{weighted layer name: (weights, output channels)}`` of ``model``'s kernels, in order
    (a depthwise kernel ``(h, w, cin, mult)`` has ``cin * mult`` output channels)."""
    out = {}
    for layer in weighted_layers(model):
        kernel = np.asarray(layer.weights[0].shape)
        channels = int(kernel[-1] if not isinstance(layer, keras.layers.DepthwiseConv2D)
                       else kernel[-2] * kernel[-1])
        out[layer.name] = (int(np.prod(kernel)), channels)
    return out


def kernel_bytes(model: keras.Model, widths: Mapping[str, int], storage: str,
                 per_channel: Optional[bool] = None,
                 shapes: Optional[Mapping[str, Tuple[int, int]]] = None) -> int:
    """Total bytes of the kernels of ``model``'s weighted layers at ``widths`` (by layer name).

    ``per_channel`` only matters for ``"packed"`` (steps per output channel; default: per tensor,
    as ``quantize_model``'s default). Every weighted layer must have a width. ``shapes``:
    :func:`kernel_shapes` of ``model``, when the caller has it already.
    """
    shapes = kernel_shapes(model) if shapes is None else shapes
    missing = [name for name in shapes if name not in widths]
    if missing:
        raise ValueError(f"widths has no bit-width for layer(s) {missing}; build it with "
                         "layer_widths(model, weight_bits, ...).")
    return sum(tensor_bytes(n, widths[name], storage, num_steps=channels if per_channel else 1)
               for name, (n, channels) in shapes.items())
