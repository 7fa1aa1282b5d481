"""The tfqkd ``QuantizeScheme`` and its layout transform (what tfmot's ``quantize_apply`` takes).

A scheme bundles a layout transform and a registry, like tfmot's own ``default_8bit``
package: :class:`TfqkdQuantizeScheme` pairs :class:`TfqkdQuantizeLayoutTransform` (with
``activation_bits``, only tfmot's input quantizer, here with a
:class:`~tfqkd.quantizers.RangeQuantizer`) and :class:`~tfqkd.quantize_registry.TfqkdQuantizeRegistry`.

Example:
    >>> scheme = TfqkdQuantizeScheme(weight_bits=2, activation_bits=4)
    >>> len(scheme.get_layout_transformer().transforms), scheme.get_quantize_registry().weight_bits
    (1, 2)
"""

from __future__ import annotations

from typing import Any, List, Optional

import tensorflow_model_optimization as tfmot

from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer

from tfqkd._keras import keras
from tfqkd.quantize_registry import TfqkdQuantizeRegistry
from tfqkd.quantizers import RangeQuantizer

__all__ = ["TfqkdQuantizeScheme", "TfqkdQuantizeLayoutTransform", "QuantizeLayer", "INPUT_RANGE_WIDEN"]

_tfmot_q = tfmot.quantization.keras


class TfqkdQuantizeLayoutTransform(_tfmot_q.QuantizeLayoutTransform):
    """tfqkd's layout transforms: of tfmot's default ones only the input quantizer.

    tfmot's default 8-bit scheme folds Conv+BN and inserts an input quantizer to mimic the
    TFLite kernels. tfqkd keeps the Keras graph as it is: the weight quantizer must see the
    convolution kernel itself (Eq. 1/2 is defined on it) and BN stays float; the exporter folds
    BN afterwards. With ``activation_bits`` the scheme passes tfmot's ``InputLayerQuantize``
    (a ``QuantizeLayer`` after each input, here with an 8-bit :class:`RangeQuantizer`: the
    integer file's input is int8 too). ``transforms`` (tfmot ``Transform`` objects) are applied with
    tfmot's ``ModelTransformer``. ``quantize_all_inputs`` makes every model input a candidate for
    them: tfmot's ``quantize_apply`` lists an input only when the layer right after it is
    annotated, so a model that starts with a ``ZeroPadding2D`` (ResNet50, ResNet50V2,
    DenseNet121) kept a float input that the integer file rounds to int8.

    Example:
        >>> TfqkdQuantizeLayoutTransform().transforms
        []
    """

    def __init__(self, transforms: Optional[List[Any]] = None, quantize_all_inputs: bool = False):
        self.transforms = list(transforms or [])
        self.quantize_all_inputs = quantize_all_inputs

    def apply(self, model, layer_quantize_map):
        if not self.transforms:
            return model, layer_quantize_map
        if self.quantize_all_inputs:
            inputs = {layer.name: {} for layer in model._input_layers}  # noqa: SLF001 (Keras API)
            layer_quantize_map = {**inputs, **layer_quantize_map}
        return _tfmot_q.graph_transformations.model_transformer.ModelTransformer(
            model, self.transforms, set(layer_quantize_map.keys()), layer_quantize_map
        ).transform()


#: The model input's range is widened by this fraction (see ``RangeQuantizer``'s ``widen``): no
#: regular pixel grid then falls on a rounding tie, where TensorFlow and TFLite round apart.
INPUT_RANGE_WIDEN = 1.0 / 1024


class QuantizeLayer(quantize_layer.QuantizeLayer):
    """tfmot's ``QuantizeLayer`` (the input quantizer) that marks itself built.

    tfmot's ``build`` never sets ``built``. Keras' zip-format loader first builds each layer from
    its saved input shape and then calls it, so a ``.keras`` file's input quantizer was built twice
    and refused its 3 saved variables ("expected 5 variables"; tensorflow/model-optimization PR
    #1123, unmerged). :func:`tfqkd.quantize_scope` maps ``"QuantizeLayer"`` to this class, so files
    written by tfmot's class load too.

    Example:
        >>> from tfqkd.quantizers import RangeQuantizer
        >>> layer = QuantizeLayer(RangeQuantizer(8))
        >>> layer.build((None, 4))
        >>> layer.built, len(layer.weights)
        (True, 3)
    """

    def build(self, input_shape):
        super().build(input_shape)
        self.built = True


def _input_layer_quantize():
    """tfmot's ``InputLayerQuantize`` transform with tfqkd's :class:`RangeQuantizer` in the layer.

    tfmot's own uses an ``AllValuesQuantizer`` whose range starts at [0, 0]: before the first
    training step it would map every input to 0. ``RangeQuantizer`` passes its input through
    until it has seen data.
    """
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_transforms)
    from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (
        transforms)

    class InputLayerRangeQuantize(default_8bit_transforms.InputLayerQuantize):
        def replacement(self, match_layer):
            layer = QuantizeLayer(RangeQuantizer(8, widen=INPUT_RANGE_WIDEN))
            config = keras.utils.legacy.serialize_keras_object(layer)
            config["name"] = layer.name
            return transforms.LayerNode(config, input_layers=[match_layer])

        def custom_objects(self):
            return {**super().custom_objects(), "QuantizeLayer": QuantizeLayer,
                    "RangeQuantizer": RangeQuantizer,
                    "tfqkd>RangeQuantizer": RangeQuantizer}

    return InputLayerRangeQuantize()


class TfqkdQuantizeScheme(_tfmot_q.QuantizeScheme):
    """The tfqkd ``QuantizeScheme``: pass it to ``tfmot.quantization.keras.quantize_apply``.

    Takes the :class:`TfqkdQuantizeRegistry` arguments. :func:`quantize_model` builds it for
    you; use it directly to quantize a model annotated by hand
    (``tfmot.quantization.keras.quantize_annotate_layer``).

    Example:
        >>> scheme = TfqkdQuantizeScheme(weight_bits=4)
        >>> scheme.get_quantize_registry().weight_bits
        4
    """

    def __init__(self, **registry_kwargs):
        self._registry = TfqkdQuantizeRegistry(**registry_kwargs)

    def get_layout_transformer(self):
        if self._registry.activation_bits is None:
            return TfqkdQuantizeLayoutTransform()
        return TfqkdQuantizeLayoutTransform([_input_layer_quantize()], quantize_all_inputs=True)

    def get_quantize_registry(self):
        return self._registry
