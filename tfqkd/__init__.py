"""tfqkd: low-bit quantized networks trained with knowledge distillation, exported to TFLite.

Keras 2 (``tf_keras``) is selected in :mod:`tfqkd._keras` before anything else is imported;
``tfqkd.keras`` is that module, use it to build models that tfqkd can quantize and distill.
"""

from tfqkd._keras import keras  # noqa: F401  (must come first: selects Keras 2)

import importlib as _importlib

__version__ = "0.1.0"

# Submodules load on first use so that `import tfqkd` stays fast and light-weight tools
# (data loading, plotting) do not pay for tfmot or keras-tuner.
_SUBMODULES = (
    "batch_norm", "callbacks", "costudying", "data", "distiller", "export", "finite", "losses",
    "models", "qat_weights", "qkd", "quantize", "quantize_configs", "quantize_registry",
    "quantize_scheme", "quantizers", "speq", "teacher_inference", "teachers", "tflite_layout",
    "training", "tuning",
)
_LAZY_ATTRS = {
    "Distiller": "distiller",
    "quantize_model": "quantize",
    "quantize_scope": "quantize",
}

__all__ = ["keras", "__version__", *_SUBMODULES, *_LAZY_ATTRS]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"tfqkd.{name}")
    if name in _LAZY_ATTRS:
        return getattr(_importlib.import_module(f"tfqkd.{_LAZY_ATTRS[name]}"), name)
    raise AttributeError(f"module 'tfqkd' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
