"""Loading the models recipes take (:func:`load_model`: a run directory, its ``model/`` folder,
an .h5 or .keras file, inside ``tfqkd.quantize_scope()``, with errors that name the fix) and
telling a model name from a path (:func:`is_model_name`). Part of :mod:`recipes.common`.

Example:
    >>> is_model_name("mobilenet_v2"), is_model_name("runs/teacher")
    (True, False)
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Optional

from tfqkd._keras import keras

__all__ = ["load_model", "is_model_name"]


def _find_model_file(path: str, what: str = "model") -> str:
    """The file (or SavedModel folder) behind any form the docs show: run dir, model dir, file."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return path  # a SavedModel directory
        for sub in ("", "model"):
            for name in ("model.h5", "model.keras"):
                candidate = os.path.join(path, sub, name)
                if os.path.isfile(candidate):
                    return candidate
        raise FileNotFoundError(
            f"{what} {path!r} holds no saved model (looked for model.h5 / model.keras in it and "
            f"in its model/ folder); pass the output_dir of a completed recipe run, its model/ "
            f"folder, or a .h5 / .keras file.")
    raise FileNotFoundError(
        f"{what} {path!r} does not exist; pass the output_dir of a completed recipe run, its "
        f"model/ folder, or a .h5 / .keras file.")


def _saved_keras_version(path: str) -> Optional[str]:
    """The Keras version recorded in a saved model file, when it can be read cheaply."""
    try:
        if path.endswith(".keras") or (os.path.isfile(path) and zipfile.is_zipfile(path)):
            with zipfile.ZipFile(path) as z:
                return str(json.loads(z.read("metadata.json")).get("keras_version"))
        import h5py

        with h5py.File(path, "r") as f:
            v = f.attrs.get("keras_version")
            return v.decode() if isinstance(v, bytes) else (str(v) if v is not None else None)
    except Exception:  # unreadable: the caller reports the loader's own error
        return None


def _model_load_error(path: str, err: BaseException, what: str) -> Exception:
    """A message for a model file that does not load: which file, for what, and the fix."""
    text = str(err).split("\n")[0][:300]
    version = _saved_keras_version(path) if os.path.isfile(path) else None
    if version and version.startswith("3"):
        return TypeError(
            f"{what} {path!r} was saved by Keras {version} (Keras 3); tfqkd uses Keras 2 "
            f"(tf_keras). Re-create and save the model with `from tfqkd import keras` (or "
            f"`import tf_keras as keras`), or rebuild it in Keras 2 and copy the weights "
            f"(`model.set_weights(...)`). Loader said: {text}")
    if "Unknown layer" in text or "Unknown object" in text:
        return ValueError(
            f"{what} {path!r} uses a layer this process cannot rebuild ({text}). Models saved by "
            f"tfqkd load inside `tfqkd.quantize_scope()` (recipes.common.load_model enters it); "
            f"a layer of another package must be registered with "
            f"`keras.utils.register_keras_serializable` before loading.")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return ValueError(f"{what} {path!r} is empty (0 bytes): the save did not finish. "
                          f"Save the model again or point to another file.")
    if isinstance(err, OSError) or "signature" in text or "not a zip" in text.lower():
        return ValueError(
            f"{what} {path!r} is not a readable Keras model file ({text}); it is corrupt or "
            f"not a model. Save the model again (model.save('model.h5')) or point to another "
            f"file.")
    return ValueError(f"{what} {path!r} could not be loaded: {type(err).__name__}: {text}")


def load_model(path: str, compile: bool = False, *, what: str = "model") -> keras.Model:
    """Loads a model saved by a recipe or by tfqkd: a run dir, its ``model/`` dir, .h5, .keras.

    Enters ``tfqkd.quantize_scope()`` so quantized models and tfqkd layers deserialize. A file
    that does not load raises an error naming ``what`` (e.g. ``"--teacher"``), the file and the
    fix (corrupt or empty file, a Keras 3 model, a layer of an unknown package).
    """
    found = _find_model_file(path, what)
    import tfqkd  # an import failure propagates (a fallback scope only hid it behind load errors)

    with tfqkd.quantize_scope():
        try:
            return keras.models.load_model(found, compile=compile)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise _model_load_error(found, e, what) from e


def is_model_name(spec: Any) -> bool:
    """True when ``spec`` (a --student / --teacher / --arch value) names a model that
    ``tfqkd.models.get`` builds, rather than a saved model's path."""
    from tfqkd import models

    if not isinstance(spec, str) or os.path.exists(spec):
        return False
    try:
        models.min_input_size(spec)  # raises ValueError for a name models.get does not know
        return True
    except ValueError:
        return False
