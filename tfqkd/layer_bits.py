"""Per-layer bit-widths: a mapping or a callable, resolved against a model's layers.

:func:`tfqkd.quantize_model` takes ``layer_bits`` (kernels) and ``layer_activation_bits``
(ReLU outputs) in either form:

* a mapping ``{layer name: bits}``; every name must be a layer of that kind in the float model
  (a ``SeparableConv2D`` name covers both of its halves, ``<name>_depthwise`` and
  ``<name>_pointwise``);
* a callable ``layer -> bits or None`` called on each such layer (``None``: the default).

Example:
    >>> import tfqkd
    >>> model = tfqkd.models.tiny_resnet(seed=0)
    >>> resolve_layer_bits(model, {"stem_conv": 4}, weighted_layers(model), "layer_bits")
    {'stem_conv': 4}
    >>> resolve_layer_bits(model, lambda layer: 8 if "stage2" in layer.name else None,
    ...                    weighted_layers(model), "layer_bits")
    {'stage2_block1_conv1': 8, 'stage2_block1_conv2': 8, 'stage2_block1_proj_conv': 8}
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from tfqkd._keras import keras
from tfqkd.quantize_configs import is_quantizable_relu_layer, is_relu_activation
from tfqkd.quantize_registry import _is_weight_layer
from tfqkd.quantizers.symmetric import check_bits

__all__ = ["BitsSpec", "resolve_layer_bits", "weighted_layers", "activation_layers"]

#: What ``quantize_model`` accepts per layer: ``{name: bits}``, ``layer -> bits | None``, or None.
BitsSpec = Union[Mapping[str, int], Callable[[keras.layers.Layer], Optional[int]], None]


def weighted_layers(model: keras.Model) -> List[keras.layers.Layer]:
    """The layers whose kernels tfqkd quantizes (Conv2D, DepthwiseConv2D, Dense), in order."""
    return [layer for layer in model.layers if _is_weight_layer(layer)]


def activation_layers(model: keras.Model) -> List[keras.layers.Layer]:
    """The layers whose output an activation quantizer rounds at ``activation_bits``: ReLU
    layers and weighted layers with a fused ReLU activation."""
    return [layer for layer in model.layers
            if is_quantizable_relu_layer(layer) or
            (_is_weight_layer(layer) and is_relu_activation(getattr(layer, "activation", None)))]


def resolve_layer_bits(model: keras.Model, spec: BitsSpec,
                       candidates: Sequence[keras.layers.Layer], what: str) -> Dict[str, int]:
    """``spec`` as ``{layer name: bits}`` over ``candidates`` (layers of ``model``).

    Raises:
        ValueError: a name that is not a candidate (the candidates are listed), a bad bit-width,
            or a spec that is neither a mapping nor a callable.
    """
    if spec is None:
        return {}
    names = [layer.name for layer in candidates]
    if isinstance(spec, Mapping):
        out: Dict[str, int] = {}
        unknown = []
        for name, bits in spec.items():
            # A SeparableConv2D is split into two layers before quantization (quantize_model).
            halves = [n for n in (f"{name}_depthwise", f"{name}_pointwise") if n in names]
            targets = [name] if name in names else halves
            if not targets:
                unknown.append(name)
            for target in targets:
                out[target] = check_bits(bits, f"{what}[{name!r}]")
        if unknown:
            shown = ", ".join(repr(n) for n in names[:12]) + (" ..." if len(names) > 12 else "")
            raise ValueError(
                f"{what}: {', '.join(repr(n) for n in unknown)} not among the layers it can set "
                f"in model {model.name!r} ({shown}). Use those names, or a callable "
                "layer -> bits.")
        return out
    if callable(spec):
        out = {}
        for layer in candidates:
            bits = spec(layer)
            if bits is not None:
                out[layer.name] = check_bits(bits, f"{what}({layer.name!r})")
        return out
    raise ValueError(f"{what} must be a mapping {{layer name: bits}} or a callable layer -> bits, "
                     f"got {type(spec).__name__}.")
