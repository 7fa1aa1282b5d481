"""The built-in data sets: ``cifar10`` and ``cifar100`` (found in offline sources or
tensorflow-datasets) and ``digits`` (scikit-learn's 8x8 digits, no download).

See :mod:`tfqkd.data` for where CIFAR is looked for and in which order.
"""

from __future__ import annotations

import functools
import glob
import os
import pathlib
from typing import Dict, List, Optional, Sequence

import numpy as np

from tfqkd.data import cache, images
from tfqkd.data.info import DataNotFoundError, DatasetInfo, PathLike, SPLITS, check_labels

__all__ = ["KNOWN_DATASETS", "DATA_DIR_ENV", "builtin_info", "load_builtin"]

DATA_DIR_ENV = "TFQKD_DATA_DIR"
_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")

_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# CIFAR-100's fine labels in the data set's own (alphabetical) order.
_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
_DIGITS_TEST_SIZE = 360

#: (padding as a fraction of the height, horizontal flip) of the standard training augmentation.
AUGMENTATION = {"cifar10": (4 / 32, True), "cifar100": (4 / 32, True), "digits": (1 / 8, False)}
KNOWN_DATASETS = tuple(AUGMENTATION)


class _WrongClasses(ValueError):
    """Class folders of another data set (kept apart from decode errors, which are never a
    reason to look elsewhere)."""


@functools.lru_cache(maxsize=None)
def builtin_info(name: str) -> DatasetInfo:
    """Describes a built-in data set without loading it.

    CIFAR statistics are the canonical ones of the original data sets (whatever the source);
    ``digits`` statistics are computed from its training split (instantaneous).

    Example:
        >>> info = builtin_info("digits")
        >>> info.num_classes, info.input_shape, info.train_size
        (10, (8, 8, 1), 1437)
    """
    if name == "cifar10":
        return DatasetInfo(
            name, 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
            _CIFAR10_CLASSES, 50_000, 10_000,
        )
    if name == "cifar100":
        return DatasetInfo(
            name, 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
            _CIFAR100_CLASSES, 50_000, 10_000,
        )
    arrays = _digits_arrays()
    x = arrays["x_train"].astype(np.float64) / 255.0
    return DatasetInfo(
        name, 10, (8, 8, 1), (float(x.mean()),), (float(x.std()),),
        tuple(str(d) for d in range(10)), len(arrays["y_train"]), len(arrays["y_test"]),
    )


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> Dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Grey levels are 0..16; scale to 0..255 so that every data set has uint8 images.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=_DIGITS_TEST_SIZE, stratify=labels, random_state=0
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return cache.read_only({
        "x_train": images[train_idx], "y_train": labels[train_idx],
        "x_test": images[test_idx], "y_test": labels[test_idx],
    })


# --------------------------------------------------------------------------------------------
# Offline sources


def _has_split_folders(folder: pathlib.Path) -> bool:
    return all((folder / split).is_dir() for split in SPLITS)


def _tfds_prepared(name: str, root: pathlib.Path) -> bool:
    # Checked on the file system so that tfds (slow to import) is only touched when it has data.
    return bool(glob.glob(os.path.join(glob.escape(str(root)), name, "*", "dataset_info.json")))


def _default_tfds_dir() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def _how_to_provide(name: str) -> str:
    return (
        "Provide the data in one of these ways:\n"
        f"  - pass data_dir=... pointing at a folder that holds {name}-jpg.tar.gz, {name}.npz "
        "(arrays x_train, y_train, x_test, y_test; uint8 NHWC images) or the extracted "
        "train/<class>/*.jpg and test/<class>/*.jpg folders, or at the .tar.gz / .npz file "
        "itself;\n"
        f"  - or set the environment variable {DATA_DIR_ENV} to such a folder or file;\n"
        f"  - or prepare tensorflow-datasets' {name!r} where tfds looks for it "
        f"(`tfds.builder({name!r}, data_dir=DIR).download_and_prepare()` on a machine with "
        "internet, then pass data_dir=DIR or copy DIR to TFDS_DATA_DIR / ~/tensorflow_datasets);\n"
        "  - or pass download=True to let tensorflow-datasets download it (needs internet)."
    )


def _not_found(name: str, tried: Sequence[str], headline: Optional[str] = None) -> DataNotFoundError:
    lines = [headline or f"No source holds the {name!r} data set."]
    lines.append("Sources tried, in order:")
    lines += [f"  {i}. {t}" for i, t in enumerate(tried, 1)]
    lines.append(_how_to_provide(name))
    return DataNotFoundError("\n".join(lines))


def _validate_arrays(name: str, arrays: Dict[str, np.ndarray], origin: str) -> Dict[str, np.ndarray]:
    info = builtin_info(name)
    missing = [k for k in _ARRAY_KEYS if k not in arrays]
    if missing:
        raise ValueError(
            f"{origin} lacks the arrays {missing}: a data file needs x_train, y_train, x_test and "
            "y_test."
        )
    out = {}
    for split in SPLITS:
        x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
        if x.ndim != 4 or tuple(x.shape[1:]) != info.input_shape:
            raise ValueError(
                f"{origin}: x_{split} has shape {x.shape}, expected (N, {', '.join(map(str, info.input_shape))}) "
                f"for {name} (images as uint8 NHWC; transpose NCHW data with x.transpose(0, 2, 3, 1))."
            )
        if x.dtype != np.uint8:
            raise ValueError(
                f"{origin}: x_{split} has dtype {x.dtype}, expected uint8 pixel values 0..255."
            )
        y = y.reshape(-1)
        if len(y) != len(x):
            raise ValueError(
                f"{origin}: x_{split} holds {len(x)} images but y_{split} {len(y)} labels."
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{origin}: y_{split} has dtype {y.dtype}, expected integer labels.")
        out[f"x_{split}"] = x
        out[f"y_{split}"] = y.astype(np.int64)
    check_labels(out, info.num_classes, origin, f"{name} has {info.num_classes} classes")
    return out




def _load_npz(name: str, path: pathlib.Path) -> Dict[str, np.ndarray]:
    return _validate_arrays(name, cache.read_npz(path), str(path))


def _validate_cache(name: str, arrays: Dict[str, np.ndarray], origin: str) -> Dict[str, np.ndarray]:
    skipped = arrays.get("skipped", np.zeros(0, str))
    out = _validate_arrays(name, arrays, origin)
    out["skipped"] = skipped
    return out


def _decode_tree(name: str, path: pathlib.Path) -> Dict[str, np.ndarray]:
    """Decodes a ``train/<class>/*.jpg`` + ``test/<class>/*.jpg`` tree (folder or archive)."""
    index = {c: i for i, c in enumerate(builtin_info(name).class_names)}
    files, _ = images.collect_tree(path, SPLITS)
    out: Dict[str, np.ndarray] = {}
    skipped: List[str] = []
    for split in SPLITS:
        unknown = next((t for t in files[split] if t[0] not in index), None)
        if unknown is not None:
            cls, member = unknown[:2]
            raise _WrongClasses(
                f"{path} holds class folder {cls!r} ({member}), which is not a {name} class "
                f"({', '.join(index)[:200]}...): is this the right archive or folder?")
        # Sorted by (label, file name): a deterministic order whatever the archive's member order.
        items = sorted(files[split], key=lambda t: (index[t[0]], t[1].rsplit("/", 1)[-1]))
        if not items:
            raise ValueError(
                f"{path} holds no {split}/<class>/*.jpg images: expected train/<class>/*.jpg and "
                "test/<class>/*.jpg.")
        x, kept, bad = images.decode_images(
            [t[2] for t in items], [t[1] for t in items], origin=str(path), channels=3)
        skipped += [f"{n}: {r}" for n, r in bad]
        if not len(x):  # every image undecodable: reported by name in _load_images
            x = np.zeros((0,) + builtin_info(name).input_shape, np.uint8)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = np.array([index[items[i][0]] for i in kept], np.int64)
    out = _validate_arrays(name, out, str(path))
    out["skipped"] = np.array(skipped, str)
    return out


def _load_images(name: str, path: pathlib.Path, skip_corrupt: bool) -> Dict[str, np.ndarray]:
    """Decoded arrays of a JPEG archive or folder tree: memory, then disk cache, then decode."""
    files = None if path.is_file() else [p for s in SPLITS for p in (path / s).rglob("*")]
    key = f"{name}-{cache.source_key(path, name, files=files)}"
    arrays = cache.cached_arrays(key, lambda: _decode_tree(name, path),
                                 lambda a, origin: _validate_cache(name, a, origin), str(path))
    images.report_corrupt(list(arrays["skipped"]), str(path), skip_corrupt)
    return arrays


def _load_npz_source(name: str, path: pathlib.Path) -> Dict[str, np.ndarray]:
    key = f"npz-{name}-{cache.source_key(path, name)}"
    arrays = cache.memo_get(key)
    return arrays if arrays is not None else cache.remember(key, _load_npz(name, path))


def _load_tfds(name: str, root: Optional[pathlib.Path], download: bool) -> Dict[str, np.ndarray]:
    key = f"tfds-{name}-{root}"
    if cache.memo_get(key) is not None:
        return cache.memo_get(key)
    import tensorflow_datasets as tfds  # slow import: only when this source is used

    arrays = {}
    for split in SPLITS:
        ds = tfds.load(
            name, split=split, data_dir=None if root is None else str(root), as_supervised=True,
            download=download,
        )
        # Fixed-size batches rather than batch_size=-1: same result, bounded temporaries.
        batches = list(tfds.as_numpy(ds.batch(4096)))
        arrays[f"x_{split}"] = np.concatenate([x for x, _ in batches])
        arrays[f"y_{split}"] = np.concatenate([y for _, y in batches])
    return cache.remember(key, _validate_arrays(name, arrays, f"tensorflow-datasets {name!r}"))


def _try_path(name: str, path: pathlib.Path, origin: str, tried: List[str],
              skip_corrupt: bool) -> Optional[Dict[str, np.ndarray]]:
    """Loads from one user-given path, or records what was looked for and returns ``None``."""
    if path.is_file():
        if path.name.lower().endswith(".npz"):
            return _load_npz_source(name, path)
        if images.is_archive(path):
            return _load_images(name, path, skip_corrupt)
        raise ValueError(
            f"{origin}={str(path)!r} is a file but neither a .npz nor a .tar.gz/.tgz/.tar archive: "
            f"point it at {name}.npz, {name}-jpg.tar.gz or the folder holding them."
        )
    npz = path / f"{name}.npz"
    if npz.is_file():
        return _load_npz_source(name, npz)
    for suffix in images.ARCHIVE_SUFFIXES:
        archive = path / f"{name}-jpg{suffix}"
        if archive.is_file():
            return _load_images(name, archive, skip_corrupt)
    folders = [path, path / name, path / f"{name}-jpg"]
    for folder in folders:
        if _has_split_folders(folder):
            try:
                return _load_images(name, folder, skip_corrupt)
            except _WrongClasses as e:
                if folder == path:
                    # Plain train/test folders of another data set (e.g. CIFAR-10 when CIFAR-100
                    # is asked for) are not this one's: keep looking rather than fail.
                    tried.append(f"{origin}: {folder}/train, test/ not usable for {name}: {e}")
                    continue
                raise
    if _tfds_prepared(name, path):
        return _load_tfds(name, path, download=False)
    tried.append(
        f"{origin}={str(path)!r}: no {npz.name}, no {name}-jpg.tar.gz, no train/ + test/ class "
        f"folders (also looked in {name}/ and {name}-jpg/), no prepared tensorflow-datasets "
        f"{name}/<version>/"
    )
    return None


def load_builtin(name: str, data_dir: Optional[PathLike], download: bool,
                 skip_corrupt: bool = False) -> Dict[str, np.ndarray]:
    """The arrays of built-in data set ``name`` from the first source that has them."""
    if name == "digits":
        return _digits_arrays()
    tried: List[str] = []
    env = os.environ.get(DATA_DIR_ENV)
    if data_dir is not None:
        origin, given = "data_dir", pathlib.Path(os.fspath(data_dir)).expanduser()
    elif env:
        origin, given = DATA_DIR_ENV, pathlib.Path(env).expanduser()
    else:
        origin, given = None, None
        tried.append(f"data_dir argument: not given; {DATA_DIR_ENV}: not set")
    if given is not None:
        skipped_env = (
            [f"{DATA_DIR_ENV}: not consulted because data_dir was given"] if origin == "data_dir" else []
        )
        if not given.exists():
            tried += [f"{origin}={str(given)!r}: this path does not exist"] + skipped_env
            raise _not_found(
                name, tried,
                f"{origin}={str(given)!r} does not exist, so {name!r} cannot be loaded from it.",
            )
        arrays = _try_path(name, given, origin, tried, skip_corrupt)
        if arrays is not None:
            return arrays
        tried += skipped_env
    tfds_dir = _default_tfds_dir()
    if _tfds_prepared(name, tfds_dir):
        return _load_tfds(name, tfds_dir, download=False)
    tried.append(f"tensorflow-datasets prepared data: none in {tfds_dir / name}")
    if download:
        return _load_tfds(name, None if given is None or given.is_file() else given, download=True)
    tried.append(
        "tensorflow-datasets download: not attempted (download=False; it needs internet)"
    )
    raise _not_found(name, tried)


