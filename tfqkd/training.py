"""Training helpers shared by the library, the recipes and the tools, each written once.

- :func:`evaluate_accuracy`: top-1 accuracy of a logits (or probabilities) model on a data set;
- :func:`load_model`: a saved model from any form the docs show (run dir, ``model/`` dir, ``.h5``,
  ``.keras``, SavedModel), inside :func:`tfqkd.quantize_scope`, with errors that name the fix;
- :func:`write_history` / :func:`read_history`: a per-epoch history CSV, rewritten atomically;
- :func:`make_optimizer`: ``"adam"`` / ``"sgd"`` by name, or a ``factory(steps_per_epoch, epochs)``;
- :func:`global_batch_size`: the examples of one step over all replicas (exact for a short last
  batch), the divisor of a distribution-correct mean loss.

Example:
    >>> model = keras.Sequential([keras.layers.Dense(2, input_shape=(2,), use_bias=False,
    ...                                              kernel_initializer="identity")])
    >>> data = tf.data.Dataset.from_tensor_slices(([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
    ...                                            [0, 1, 1])).batch(2)
    >>> evaluate_accuracy(model, data)  # 2 of 3 predictions are right
    0.6666666666666666
    >>> type(make_optimizer("sgd", 0.1)).__name__
    'SGD'
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from tfqkd._io import atomic_write
from tfqkd._keras import keras, tf

__all__ = [
    "evaluate_accuracy",
    "load_model",
    "find_model_file",
    "write_history",
    "read_history",
    "make_optimizer",
    "OptimizerArg",
    "global_batch_size",
]


# --------------------------------------------------------------------------------------------
# Accuracy


def evaluate_accuracy(model: keras.Model, dataset: tf.data.Dataset,
                      steps: Optional[int] = None) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels[, sample_weight])`` batches.

    The model runs locally in inference mode (``training=False``, no collectives), so every
    worker of a multi-worker run computes the same figure on the full set. Labels are class ids
    or one-hot rows (the argmax is taken when their rank equals the outputs'); outputs are logits
    or probabilities (the argmax is the same); sample weights are ignored (every example counts
    once). ``steps`` limits the batches read. Called inside a Python context that changes how a
    model is traced (e.g. :func:`tfqkd.speq.stochastic_precision`), the context applies: the graph
    is traced on the first batch, inside it.

    Raises:
        ValueError: the data set has no example.

    Example:
            >>> model = keras.Sequential([keras.layers.Lambda(lambda x: x, input_shape=(3,))])
        >>> x = [[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]
        >>> evaluate_accuracy(model, tf.data.Dataset.from_tensor_slices((x, [1, 0, 0, 0])).batch(3))
        0.5
        >>> evaluate_accuracy(model, tf.data.Dataset.from_tensor_slices((x, [1, 0, 0, 0])).batch(3),
        ...                   steps=1)  # first batch only: 2 of 3
        0.6666666666666666
    """
    # One graph for every batch size (the smaller last batch must not trace a second one).
    @tf.function(reduce_retracing=True)
    def correct(x, y):
        outputs = model(x, training=False)
        predicted = tf.argmax(outputs, axis=-1, output_type=tf.int32)
        if y.shape.rank is not None and y.shape.rank == outputs.shape.rank:
            labels = tf.argmax(y, axis=-1, output_type=tf.int32)
        else:
            labels = tf.cast(tf.reshape(y, [-1]), tf.int32)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.int64))

    # Each call traces its own graph once by design (the model, and any context the trace must
    # see, differ between calls); TF's "frequent retracing" warning would be a false alarm.
    correct._omit_frequent_tracing_warning = True
    hits = total = 0
    for batch in (dataset.take(steps) if steps else dataset):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
        y = tf.convert_to_tensor(y)
        hits += int(correct(x, y))
        total += int(tf.shape(y)[0])
    if total == 0:
        raise ValueError("cannot measure accuracy on an empty data set.")
    return hits / total


# --------------------------------------------------------------------------------------------
# Loading a saved model

_WHERE = ("pass the output_dir of a completed recipe run, its model/ folder, a .h5 / .keras file "
          "or a SavedModel folder")


def find_model_file(path: str, what: str = "model") -> str:
    """The file (or SavedModel folder) behind any form the docs show.

    Lookup order: ``path`` itself when it is a file; a SavedModel folder (``saved_model.pb``);
    then ``model.h5``, ``model.keras`` in ``path``, then in ``path/model/`` (a recipe's output
    directory). ``what`` names the argument in the error (e.g. ``"--teacher"``).

    Raises:
        FileNotFoundError: nothing loadable there; the message lists what was looked for.

    Example:
        >>> import os, tempfile
        >>> run = tempfile.mkdtemp(); os.makedirs(os.path.join(run, "model"))
        >>> open(os.path.join(run, "model", "model.h5"), "w").close()
        >>> os.path.relpath(find_model_file(run), run)
        'model/model.h5'
    """
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
            f"in its model/ folder); {_WHERE}.")
    raise FileNotFoundError(f"{what} {path!r} does not exist; {_WHERE}.")


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
            f"tfqkd load inside `tfqkd.quantize_scope()` (tfqkd.training.load_model enters it); "
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
    """Loads a model saved by a recipe or by tfqkd (quantized or float).

    ``path`` is any form :func:`find_model_file` accepts (run dir, ``model/`` dir, ``.h5``,
    ``.keras``, SavedModel). Loads inside :func:`tfqkd.quantize_scope`, so quantized models and
    tfqkd layers deserialize.

    Raises:
        FileNotFoundError: no model at ``path``.
        ValueError / TypeError: the file does not load; the message names ``what`` (e.g.
            ``"--teacher"``), the file and the fix (corrupt or empty file, a Keras 3 model, a
            layer of an unknown package).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "model.h5")
        >>> keras.Sequential([keras.layers.Dense(2, input_shape=(3,))]).save(path)
        >>> load_model(os.path.dirname(path)).output_shape
        (None, 2)
    """
    found = find_model_file(path, what)
    # Imported here: tfqkd.quantize pulls in tfmot, which plain training helpers do not need. An
    # import failure propagates (a fallback scope only hid it behind "Unknown layer" errors).
    from tfqkd.quantize import quantize_scope

    with quantize_scope():
        try:
            return keras.models.load_model(found, compile=compile)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise _model_load_error(found, e, what) from e


# --------------------------------------------------------------------------------------------
# History CSV


def write_history(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes ``rows`` (one per epoch) to the CSV ``path`` atomically (a kill leaves the old file).

    Columns are every key of every row, in first-seen order; a row without a column leaves it
    empty.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "history.csv")
        >>> write_history(path, [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "lr": 0.1}])
        >>> read_history(path)
        [{'epoch': '0', 'loss': '1.5', 'lr': ''}, {'epoch': '1', 'loss': '', 'lr': '0.1'}]
    """
    keys: List[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def read_history(path: str) -> List[Dict[str, str]]:
    """The rows of a history CSV (values as text); ``[]`` when the file does not exist.

    Example:
        >>> read_history("/no/such/history.csv")
        []
    """
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# Optimizers and the global batch

#: An optimizer by name (``"adam"``, ``"sgd"``) or a ``factory(steps_per_epoch, epochs)``.
OptimizerArg = Union[str, Callable[[int, int], Any]]


def make_optimizer(name: OptimizerArg, learning_rate: Any = 0.01, steps_per_epoch: int = 1,
                   epochs: int = 1, *, momentum: float = 0.9,
                   nesterov: bool = True) -> keras.optimizers.Optimizer:
    """A fresh optimizer: ``"adam"``, ``"sgd"`` (with ``momentum``, Nesterov by default), or
    ``name(steps_per_epoch, epochs)`` when ``name`` is a factory.

    ``learning_rate`` is a number or a ``keras.optimizers.schedules.LearningRateSchedule``.

    Example:
        >>> opt = make_optimizer("sgd", 0.1, momentum=0.5, nesterov=False)
        >>> type(opt).__name__, float(opt.momentum), opt.nesterov
        ('SGD', 0.5, False)
        >>> make_optimizer(lambda steps, epochs: f"{steps} x {epochs}", steps_per_epoch=3, epochs=2)
        '3 x 2'
    """
    if callable(name):
        return name(steps_per_epoch, epochs)
    name = str(name).lower()
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum, nesterov=nesterov)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}.")


def global_batch_size(per_example) -> tf.Tensor:
    """The number of examples in this step over ALL replicas (an int32 scalar).

    ``tf.nn.compute_average_loss``'s default (local batch x replicas) is wrong for a short last
    batch split unevenly (7 examples as 4 + 3 is not 2 x 4), so the replicas' counts are summed.

    Example:
        >>> int(global_batch_size(tf.zeros([5, 3])))  # no strategy: the local batch
        5
    """
    local = tf.shape(per_example)[0]
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return local
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(local, tf.float32))
    return tf.cast(tf.round(total), tf.int32)
