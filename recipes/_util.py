"""Small utilities of the recipes: timestamped log lines, quiet logs, atomic JSON/text writes,
version stamps and seeding (part of :mod:`recipes.common`, which re-exports every public name).

Example:
    >>> _jsonable({"a": (1, float("nan"))})
    {'a': [1, None]}
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Any, Dict, Optional

# Before TensorFlow loads (every recipes module imports this one first): no C++ INFO chatter.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfqkd._keras import keras, tf  # noqa: E402  (selects Keras 2 before anything else)
from tfqkd._io import atomic_write  # noqa: E402

__all__ = ["log", "quiet_logs", "atomic_write_text", "atomic_write_json", "versions", "set_seed"]


def log(msg: str) -> None:
    """Prints one timestamped line (flushed, so logs of killed runs are complete)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)




def quiet_logs() -> None:
    """Silences TensorFlow/absl INFO chatter and Keras' HDF5 'legacy format' warning.

    Recipes print their own concise lines; absl's ``app.run`` would otherwise route TensorFlow's
    per-checkpoint INFO messages to stderr.
    """
    import logging
    import warnings

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    tf.get_logger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*HDF5 file via `model.save\\(\\)`.*")
    warnings.filterwarnings("ignore", message=".*saving your model as an HDF5 file.*")


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` via a temporary file in the same directory + ``os.replace``."""
    atomic_write(path, text)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # NumPy / TF scalars
        try:
            return x.item()
        except (TypeError, ValueError):
            pass
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def atomic_write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def versions() -> Dict[str, str]:
    """Versions of python, tensorflow, tf_keras, tfmot and tfqkd (for results.json)."""
    import tfqkd

    out = {"python": platform.python_version(), "tensorflow": tf.__version__,
           "tf_keras": getattr(keras, "__version__", "?"), "tfqkd": tfqkd.__version__}
    try:
        import tensorflow_model_optimization as tfmot

        out["tfmot"] = tfmot.__version__
    except Exception as e:  # pragma: no cover - tfmot is a hard dependency
        out["tfmot"] = f"unavailable ({type(e).__name__})"
    return out


def set_seed(seed: Optional[int]) -> None:
    """Seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``); None: no-op."""
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
