"""The one place where tfqkd chooses its Keras.

tensorflow-model-optimization (tfmot) 0.8 only works with Keras 2, which TensorFlow >= 2.16 ships
separately as the ``tf_keras`` package, while ``tf.keras`` and ``import keras`` give Keras 3.
Mixing the two (a Keras 3 layer inside a tf_keras model, a Keras 3 optimizer on a tfmot-wrapped
model) fails in obscure ways, so every tfqkd module imports Keras from here and nowhere else::

    from tfqkd._keras import keras

``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is first imported so that TensorFlow's own
lazily-loaded ``tf.keras`` and tfmot's internal Keras both resolve to tf_keras too. If the user has
already imported TensorFlow without it, ``tf_keras`` is still what tfqkd uses; only ``tf.keras``
in the user's own code may then be Keras 3 (a warning says so).
"""

from __future__ import annotations

import os
import sys
import warnings

_tf_already_imported = "tensorflow" in sys.modules
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

if _tf_already_imported and os.environ.get("TF_USE_LEGACY_KERAS") != "1":  # pragma: no cover
    warnings.warn(
        "TensorFlow was imported before tfqkd without TF_USE_LEGACY_KERAS=1, so `tf.keras` in your "
        "code is Keras 3. tfqkd and tfmot use Keras 2 (`tf_keras`): build models with "
        "`from tfqkd import keras` (or `import tf_keras`), or set TF_USE_LEGACY_KERAS=1 before "
        "importing TensorFlow.",
        stacklevel=2,
    )

__all__ = ["keras", "tf"]
