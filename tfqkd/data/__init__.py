"""Input pipelines for image classification: the built-in ``cifar10``, ``cifar100`` and ``digits``,
and your own data as an image folder, an ``.npz`` of arrays or a tensorflow-datasets name.

:func:`load_dataset` returns a ``tf.data.Dataset`` of ``(images, labels)`` batches, images
``float32 (B, H, W, C)`` normalised per channel, labels ``int32 (B,)``; :func:`load_arrays` returns
the raw ``uint8`` images and ``int64`` labels of one split; :func:`dataset_info` describes a data
set without loading it.

Data sets (the ``name`` argument):

* ``folder:PATH``: your images in ``PATH/train/<class>/*.jpg|png`` and ``PATH/test/<class>/...``
  (``PATH/val/<class>/`` optional), any number of classes (labels: sorted class folder names),
  any size (resized to ``image_size``); see :mod:`tfqkd.data.folder`;
* ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test`` (``x_val, y_val``, ``class_names``
  optional); see :mod:`tfqkd.data.npz`;
* ``tfds:NAME`` (``tfds:NAME:VERSION``): a tensorflow-datasets data set prepared on disk
  (``data_dir``); see :mod:`tfqkd.data.tfds_source`;
* ``digits``: scikit-learn's 8x8 handwritten digits (ships with scikit-learn, no download), split
  once and for all into 1,437 training and 360 test images (stratified, ``random_state=0``),
  grey levels 0..16 scaled to 0..255. The quick start and the fast tests use it.
* ``cifar10`` / ``cifar100``: 32x32 RGB, 50,000 training and 10,000 test images.

Where CIFAR comes from, tried in order (the first that has the data wins):

1. An offline source at ``data_dir`` (argument) or, when ``data_dir`` is not given, at the
   environment variable ``TFQKD_DATA_DIR``. The path may be

   * a folder holding ``<name>.npz`` (arrays ``x_train, y_train, x_test, y_test``, images
     ``uint8`` NHWC), ``<name>-jpg.tar.gz`` (an archive of ``train/<class>/*.jpg`` and
     ``test/<class>/*.jpg``), or those extracted ``train/`` and ``test/`` class folders (also looked
     for in ``<folder>/<name>/`` and ``<folder>/<name>-jpg/``), or tensorflow-datasets' prepared
     ``<folder>/<name>/<version>/`` files;
   * the ``.npz`` file or the ``.tar.gz`` / ``.tgz`` / ``.tar`` archive itself.

   A path that was given but does not exist raises :class:`DataNotFoundError` at once.
2. tensorflow-datasets data already prepared in tfds' default directory (``TFDS_DATA_DIR`` or
   ``~/tensorflow_datasets``).
3. A tensorflow-datasets download, only when asked for with ``download=True``: without internet a
   download can stall for minutes, so it is never attempted behind the user's back.

If none has the data, :class:`DataNotFoundError` lists every source tried and how to provide each.

Images are decoded with one decoder, TensorFlow's ``tf.io.decode_image`` (decoders disagree by a few
grey levels), once: the decoded arrays are cached as ``<key>.npz`` in ``TFQKD_CACHE_DIR``
(default ``~/.cache/tfqkd``), the key hashing the source's path, size and modification time, so a
changed archive is decoded again. The arrays of the last source loaded are also kept in memory, so
loading the other split or building a second pipeline costs nothing. The arrays returned by
:func:`load_arrays` are therefore read-only; copy them to modify them.

A file that does not decode is an error naming it; with ``skip_corrupt=True`` such files are left
out, with one warning giving their number and the first few names.

Splits: ``train``, ``test``, and ``validation``: the source's own validation images, or, with
``validation=0.1``, 10% of the training images held out class by class (always the same images)
and left out of ``train``. Choose on ``validation``; report ``test`` once, at the end.

Normalisation (``normalization=None``): your own data uses the per-channel mean/std of its
training split (cached beside the arrays); ``normalization="imagenet:<family>"`` uses an
Applications model's own ``preprocess_input`` instead (see :mod:`tfqkd.data.normalization`). CIFAR
uses the canonical per-channel training mean/std of the original (lossless)
data sets, so that the same constants serve every source and a model trained on one source works on
another. Decoded with ``tf.io.decode_jpeg``, the offline JPEG copy of CIFAR-10 has training means
(0.4868, 0.4822, 0.4414) and stds (0.2451, 0.2425, 0.2605): normalised, its channels have means
within 0.02 of 0 and stds 0.99..1.0, at any ``image_size``. ``digits`` uses the mean/std of its
training split.

Augmentation (training split by default): CIFAR and your own data pad 4 black pixels on each
side (an eighth of the height at other sizes), crop a random window of the image's size and flip
horizontally with probability 1/2; ``digits`` pads 1 pixel and crops, with
no flip (a mirrored digit is a different symbol or none). The randomness is drawn with stateless
ops from seeds that a ``tf.data.Dataset.random(seed)`` stream provides, so the same ``seed`` (under
the same TensorFlow global seed) gives the same batches, augmentation included, and each epoch
draws new crops.

Example:
    >>> import tfqkd.data
    >>> ds = tfqkd.data.load_dataset("digits", "train", batch_size=32, seed=0)
    >>> images, labels = next(iter(ds))
    >>> images.shape, images.dtype.name, labels.dtype.name
    (TensorShape([32, 8, 8, 1]), 'float32', 'int32')
"""

# DATA_DIR_ENV, KNOWN_DATASETS, CACHE_DIR_ENV and SPLITS stay importable from here as before.
from tfqkd.data.builtin import DATA_DIR_ENV, KNOWN_DATASETS  # noqa: F401
from tfqkd.data.cache import CACHE_DIR_ENV  # noqa: F401
from tfqkd.data.info import SPLITS, DataNotFoundError, DatasetInfo  # noqa: F401
from tfqkd.data.pipeline import balanced_subset, load_dataset
from tfqkd.data.sources import dataset_info, load_arrays

__all__ = ["load_dataset", "load_arrays", "balanced_subset", "dataset_info", "DatasetInfo",
           "DataNotFoundError"]
