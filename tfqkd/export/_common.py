"""What every part of the exporter shares (private): the error type, modes, path checks, samples.

Example:
    >>> [s.shape for s in _iter_samples(np.zeros((2, 4, 4, 1), "float32"), 4, None)]
    [(1, 4, 4, 1), (1, 4, 4, 1)]
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._keras import tf

__all__ = ["ExportError", "MODES", "RUNTIMES", "check_runtime"]


#: Export modes understood by :func:`export_tflite`.
MODES: Tuple[str, ...] = ("float", "dynamic", "int8", "int4")


class ExportError(RuntimeError):
    """The TFLite converter (or the rebuild before it) rejected the model; the message says why."""


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


#: The kernels a file may run on, as ``export_tflite(runtime=...)`` and ``verify_tflite`` take
#: them: ``"xnnpack"``, LiteRT's default (its XNNPACK delegate takes the int8 kernels and rounds
#: once; an ``int4`` file's INT4 convolutions fall back to the built-in kernels), or
#: ``"builtin"``, LiteRT without its default delegates, where every kernel rounds twice.
RUNTIMES: Tuple[str, ...] = ("xnnpack", "builtin")


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES`, else a ValueError naming them.

    Example:
        >>> check_runtime("builtin")
        'builtin'
    """
    if runtime not in RUNTIMES:
        raise ValueError(
            f"unknown runtime {runtime!r}; choose 'xnnpack' (LiteRT's default, its XNNPACK "
            "delegate) or 'builtin' (LiteRT's built-in kernels without the default delegates, "
            "OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES).")
    return runtime


def _open_interpreter(path: str, runtime: str = "xnnpack", **kwargs):
    """A LiteRT interpreter for ``path`` running on ``runtime``'s kernels (:data:`RUNTIMES`),
    with an error naming the file when it is not a model."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if check_runtime(runtime) == "builtin":
        kwargs["experimental_op_resolver_type"] = \
            OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
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


def _layer_of(tensor_name: str, layer_names: Sequence[str]) -> Optional[str]:
    """The Keras layer a (possibly fused, ';'-joined) TFLite tensor name comes from.

    Keras Applications names hold slashes (MobileNetV3's ``expanded_conv_9/squeeze_excite/Conv_1``,
    ``expanded_conv/depthwise``), so a name is matched as a run of ``/``-separated parts, the
    longest run first: one part alone would take the squeeze-excite convolution for the head
    ``Conv_1`` and miss ``expanded_conv/depthwise`` entirely.

    Example:
        >>> _layer_of("M/expanded_conv_9/squeeze_excite/Conv_1/Conv2D",
        ...           ["Conv_1", "expanded_conv_9/squeeze_excite/Conv_1"])
        'expanded_conv_9/squeeze_excite/Conv_1'
        >>> _layer_of("M/quant_conv1/BiasAdd;M/conv1/Relu", ["conv1"])
        'conv1'
    """
    names = set(layer_names)
    for segment in tensor_name.split(";"):
        parts = segment.split("/")
        for length in range(len(parts), 0, -1):
            for start in range(len(parts) - length + 1):
                candidate = "/".join(parts[start:start + length])
                if candidate in names:
                    return candidate
                if candidate.startswith("quant_") and candidate[6:] in names:
                    return candidate[6:]
    return None
