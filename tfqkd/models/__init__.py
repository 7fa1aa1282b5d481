"""Models: CIFAR ResNets (logits out), ``tf_keras.applications`` CNNs by name, softmax heads.

* :mod:`tfqkd.models.resnet`: ResNet20, WideResNet20xN and a tiny family (logits out);
* :mod:`tfqkd.models.applications`: :func:`get` builds any of :func:`names` (Applications
  families and the CIFAR ResNets) at any input size and width, weights from local files only;
  :func:`preprocess_input` is the family's input preprocessing (the one owner:
  ``tfqkd.data``'s ``normalization="imagenet:<family>"`` uses it);
* :mod:`tfqkd.models.heads`: :func:`logits_model` (the logits of a softmax-ended model, sharing
  its variables), :func:`softmax_layer`.

Example:
    >>> import tfqkd
    >>> tfqkd.models.get("mobilenet_v2", 10, (32, 32, 3), alpha=0.35).output_shape
    (None, 10)
"""

from tfqkd.models.resnet import (  # noqa: F401
    PAPER_WIDTHS, cifar_resnet, resnet20, tiny_resnet, wide_resnet20)
from tfqkd.models.applications import (  # noqa: F401
    expects_raw_pixels, get, has_alpha, input_adapter, min_input_size, names, preprocess_input,
    smallest_alpha, takes_raw_pixels)
from tfqkd.models.heads import logits_model, softmax_layer  # noqa: F401

__all__ = [
    "resnet20", "wide_resnet20", "tiny_resnet", "cifar_resnet", "PAPER_WIDTHS",
    "get", "names", "has_alpha", "smallest_alpha", "preprocess_input", "min_input_size", "takes_raw_pixels", "expects_raw_pixels",
    "input_adapter",
    "logits_model", "softmax_layer",
]
