"""``tfds:NAME`` (or ``tfds:NAME:VERSION``, ``tfds:NAME/CONFIG``): a tensorflow-datasets data set
prepared on disk.

The data is read from ``data_dir`` (else tfds' default, ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``); a data set tfds knows by name or one prepared elsewhere (its folder
holds ``dataset_info.json``, no code needed) both work. Nothing is downloaded unless
``download=True``: an unprepared data set is a :class:`~tfqkd.data.DataNotFoundError` saying how
to prepare it. The image and label features are found in the builder's info (its supervised keys,
else its one ``Image`` and one ``ClassLabel`` feature). The encoded images are decoded by the same
TensorFlow decoder as image folders and cached the same way.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Dict, Optional, Tuple

import numpy as np

from tfqkd.data import cache, images
from tfqkd.data.info import DataNotFoundError, PathLike, Source, check_labels

__all__ = ["load_tfds"]

_SPLIT_NAMES = {"train": ("train",), "test": ("test",), "validation": ("validation", "val")}


def _features(builder: Any, origin: str) -> Tuple[str, str]:
    import tensorflow_datasets as tfds

    features = builder.info.features
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image, label = keys
        if isinstance(features[image], tfds.features.Image) and isinstance(
                features[label], tfds.features.ClassLabel):
            return image, label
    flat = dict(features.items()) if hasattr(features, "items") else {}
    imgs = [k for k, f in flat.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in flat.items() if isinstance(f, tfds.features.ClassLabel)]
    if len(imgs) != 1 or len(labels) != 1:
        raise ValueError(
            f"{origin}: cannot tell the image and label features apart (Image features: "
            f"{imgs or 'none'}; ClassLabel features: {labels or 'none'}); tfqkd needs an "
            "image-classification data set with one of each (or supervised_keys naming them).")
    return imgs[0], labels[0]


def _builder(name: str, data_dir: Optional[PathLike], download: bool, origin: str) -> Any:
    import tensorflow_datasets as tfds

    root = None if data_dir is None else os.fspath(data_dir)
    where = root or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    how = (f"prepare it on a machine with internet (`tfds.builder({name!r}, data_dir=DIR)"
           f".download_and_prepare()`), copy DIR here and pass data_dir=DIR (recipes: "
           "--data_dir), or pass download=True")
    try:
        builder = tfds.builder(name, data_dir=root)
    except Exception as e:  # tfds raises DatasetNotFoundError and others with long messages
        if "DatasetNotFound" not in type(e).__name__:
            raise ValueError(f"{origin}: tensorflow-datasets cannot open {name!r}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        raise DataNotFoundError(
            f"{origin}: tensorflow-datasets has no data set {name!r}, neither by name nor "
            f"prepared in {where}: check the name, or {how}.") from None
    if not builder.is_prepared():
        if not download:
            raise DataNotFoundError(
                f"{origin}: {name!r} is not prepared in {where} (looked for {builder.data_dir}); "
                f"tfqkd does not download without download=True. To use it, {how}.")
        builder.download_and_prepare()
    return builder


def _decode(builder: Any, origin: str, image_size: Optional[Tuple[int, int]]
            ) -> Dict[str, np.ndarray]:
    import tensorflow_datasets as tfds

    image_key, label_key = _features(builder, origin)
    features = builder.info.features
    splits = builder.info.splits
    names = {}
    for split, aliases in _SPLIT_NAMES.items():
        found = [a for a in aliases if a in splits]
        if found:
            names[split] = found[0]
        elif split != "validation":
            raise ValueError(f"{origin} has the splits {sorted(splits)} but no {split!r} split; "
                             "tfqkd needs train and test (save it as a folder: or npz: data set "
                             "with your own test split).")
    payloads, labels, split_of, ids = [], [], [], []
    for split, tfds_split in names.items():
        ds = builder.as_dataset(split=tfds_split, shuffle_files=False,
                                decoders={image_key: tfds.decode.SkipDecoding()})
        for i, ex in enumerate(tfds.as_numpy(ds)):
            payloads.append(ex[image_key])
            labels.append(int(ex[label_key]))
            split_of.append(split)
            ids.append(f"{tfds_split}[{i}]")
    x, kept, bad = images.decode_images(payloads, ids, origin=origin, image_size=image_size,
                                        channels=1 if features[image_key].shape[-1] == 1 else 3)
    kept_splits = np.array(split_of)[kept]
    y = np.array(labels, np.int64)[kept]
    out = {"skipped": np.array([f"{n}: {r}" for n, r in bad], str)}
    for split in names:
        out[f"x_{split}"] = x[kept_splits == split]
        out[f"y_{split}"] = y[kept_splits == split]
    return out


def _check_cached(arrays: Dict[str, np.ndarray], origin: str) -> Dict[str, np.ndarray]:
    if any(k not in arrays for k in ("x_train", "y_train", "x_test", "y_test", "skipped")):
        raise ValueError(f"{origin} is not a tfqkd tfds cache")
    return arrays


def load_tfds(name: str, *, data_dir: Optional[PathLike], image_size: Optional[Tuple[int, int]],
              download: bool, skip_corrupt: bool) -> Source:
    """The arrays of a prepared tensorflow-datasets data set, decoded once and cached.

    Nothing is downloaded unless ``download=True``: a data set not prepared in ``data_dir`` is an
    error that says how to prepare it.

    Example:
        >>> import tempfile
        >>> try:
        ...     load_tfds("mnist", data_dir=tempfile.mkdtemp(), image_size=None, download=False,
        ...               skip_corrupt=False)
        ... except DataNotFoundError as e:
        ...     print("is not prepared" in str(e), "download=True" in str(e))
        True True
    """
    origin = f"tfds:{name}"
    builder = _builder(name, data_dir, download, origin)
    folder = pathlib.Path(os.fspath(builder.data_dir))
    key = f"tfds-{cache.source_key(folder, 'tfds', name, image_size)}"
    arrays = cache.cached_arrays(key, lambda: _decode(builder, origin, image_size),
                                 _check_cached, origin)
    images.report_corrupt(list(arrays["skipped"]), origin, skip_corrupt)
    label = builder.info.features[_features(builder, origin)[1]]
    names = tuple(str(n) for n in label.names)
    data = {k: v for k, v in arrays.items() if k != "skipped"}
    why = f"its ClassLabel feature has {len(names)} classes"
    check_labels(data, len(names), origin, why)
    return Source(origin, data, names, key, why)
