"""Input pipelines: CIFAR-10/100 from offline files or tensorflow-datasets, and a built-in ``digits``.

:func:`load_dataset` returns a ``tf.data.Dataset`` of ``(images, labels)`` batches, images
``float32 (B, H, W, C)`` normalised per channel, labels ``int32 (B,)``; :func:`load_arrays` returns
the raw ``uint8`` images and ``int64`` labels of one split; :func:`dataset_info` describes a data
set without loading it.

Data sets:

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

JPEG images are decoded with one decoder, ``tf.io.decode_jpeg`` (decoders disagree by a few grey
levels), once: the decoded arrays are cached as ``<name>-<key>.npz`` in ``TFQKD_CACHE_DIR``
(default ``~/.cache/tfqkd``), the key hashing the source's path, size and modification time, so a
changed archive is decoded again. The arrays of the last source loaded are also kept in memory, so
loading the other split or building a second pipeline costs nothing. The arrays returned by
:func:`load_arrays` are therefore read-only; copy them to modify them.

Normalisation: CIFAR uses the canonical per-channel training mean/std of the original (lossless)
data sets, so that the same constants serve every source and a model trained on one source works on
another. Decoded with ``tf.io.decode_jpeg``, the offline JPEG copy of CIFAR-10 has training means
(0.4868, 0.4822, 0.4414) and stds (0.2451, 0.2425, 0.2605): normalised, its channels have means
within 0.02 of 0 and stds 0.99..1.0. ``digits`` uses the mean/std of its training split.

Augmentation (training split by default): CIFAR pads 4 black pixels on each side, crops a random
32x32 window and flips horizontally with probability 1/2; ``digits`` pads 1 pixel and crops, with
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

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import pathlib
import tarfile
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._io import atomic_open
from tfqkd._keras import tf

__all__ = ["load_dataset", "load_arrays", "balanced_subset", "dataset_info", "DatasetInfo",
           "DataNotFoundError"]

PathLike = Union[str, os.PathLike]

SPLITS: Tuple[str, ...] = ("train", "test")
DATA_DIR_ENV = "TFQKD_DATA_DIR"
CACHE_DIR_ENV = "TFQKD_CACHE_DIR"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_IMAGE_SUFFIXES = (".jpg", ".jpeg")
# Bump when the decoded layout changes so that stale caches are ignored rather than misread.
_CACHE_FORMAT = 1
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

# (padding in pixels, horizontal flip) of the standard training augmentation.
_AUGMENTATION = {"cifar10": (4, True), "cifar100": (4, True), "digits": (1, False)}
KNOWN_DATASETS: Tuple[str, ...] = tuple(_AUGMENTATION)


class DataNotFoundError(FileNotFoundError):
    """No source holds the requested data set; the message lists the sources tried and the fixes.

    Example:
        >>> try:
        ...     load_arrays("cifar10", "train", data_dir="/no/such/folder")
        ... except DataNotFoundError as e:
        ...     print("TFQKD_DATA_DIR" in str(e))
        True
    """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set (no data is loaded).

    Attributes:
        name: The data set's name, as passed to :func:`load_dataset`.
        num_classes: Number of classes (labels are ``0 .. num_classes - 1``).
        input_shape: Shape of one image, ``(height, width, channels)``.
        mean: Per-channel mean of the training images scaled to [0, 1], used to normalise.
        std: Per-channel standard deviation, idem.
        class_names: Class names in label order.
        train_size: Number of training images.
        test_size: Number of test images.

    Example:
        >>> dataset_info("cifar10").class_names[:3]
        ('airplane', 'automobile', 'bird')
    """

    name: str
    num_classes: int
    input_shape: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    class_names: Tuple[str, ...]
    train_size: int
    test_size: int


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in KNOWN_DATASETS:
        raise ValueError(
            f"Unknown data set {name!r}: choose one of {', '.join(KNOWN_DATASETS)}."
        )
    return name.lower()


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: choose one of {', '.join(SPLITS)}.")
    return split


@functools.lru_cache(maxsize=None)
def dataset_info(name: str) -> DatasetInfo:
    """Describes data set ``name`` (``cifar10``, ``cifar100`` or ``digits``) without loading it.

    CIFAR statistics are the canonical ones of the original data sets (whatever the source);
    ``digits`` statistics are computed from its training split (instantaneous).

    Example:
        >>> info = dataset_info("digits")
        >>> info.num_classes, info.input_shape, info.train_size
        (10, (8, 8, 1), 1437)
    """
    name = _check_name(name)
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


# --------------------------------------------------------------------------------------------
# digits


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
    return _read_only({
        "x_train": images[train_idx], "y_train": labels[train_idx],
        "x_test": images[test_idx], "y_test": labels[test_idx],
    })


# --------------------------------------------------------------------------------------------
# Offline sources


def _read_only(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    # Shared by every caller (memo, lru_cache): an accidental in-place edit must fail loudly.
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


def _is_archive(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(_ARCHIVE_SUFFIXES)


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
    info = dataset_info(name)
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
        if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
            raise ValueError(
                f"{origin}: y_{split} has labels in [{y.min()}, {y.max()}], expected "
                f"0..{info.num_classes - 1} for {name}."
            )
        out[f"x_{split}"] = x
        out[f"y_{split}"] = y.astype(np.int64)
    return out


def _load_npz(name: str, path: pathlib.Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read {path} as a .npz file of arrays: {e}") from e
    return _validate_arrays(name, arrays, str(path))


def _member_parts(name: str) -> Optional[Tuple[str, str, str]]:
    """``(split, class, file)`` of an image at ``[prefix/]split/class/file``, else ``None``."""
    parts = pathlib.PurePosixPath(name).parts
    if len(parts) < 3 or parts[-3] not in SPLITS:
        return None
    if not parts[-1].lower().endswith(_IMAGE_SUFFIXES) or parts[-1].startswith("."):
        return None
    return parts[-3], parts[-2], parts[-1]


def _collect_archive(name: str, path: pathlib.Path) -> Dict[str, List[Tuple[int, str, bytes]]]:
    """Reads every image's bytes from the archive in one pass, without extracting to disk."""
    index = {c: i for i, c in enumerate(dataset_info(name).class_names)}
    files: Dict[str, List[Tuple[int, str, bytes]]] = {s: [] for s in SPLITS}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = _member_parts(member.name) if member.isfile() else None
                if parts is None:
                    continue
                split, cls, fname = parts
                if cls not in index:
                    raise ValueError(
                        f"{path} holds class folder {cls!r} ({member.name}), which is not a "
                        f"{name} class ({', '.join(index)[:200]}...): is this the right archive?"
                    )
                files[split].append((index[cls], fname, tar.extractfile(member).read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"Cannot read {path} as a tar archive: {e}") from e
    return files


def _collect_folder(name: str, folder: pathlib.Path) -> Dict[str, List[Tuple[int, str, bytes]]]:
    index = {c: i for i, c in enumerate(dataset_info(name).class_names)}
    files: Dict[str, List[Tuple[int, str, bytes]]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        for class_dir in sorted(p for p in (folder / split).iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise ValueError(
                    f"{class_dir} is not a {name} class folder (expected names like "
                    f"{', '.join(list(index)[:5])}, ...): is {folder} the right folder?"
                )
            for f in class_dir.iterdir():
                if f.is_file() and f.name.lower().endswith(_IMAGE_SUFFIXES):
                    files[split].append((index[class_dir.name], f.name, f.read_bytes()))
    return files


def _decode(name: str, files: Dict[str, List[Tuple[int, str, bytes]]], origin: str) -> Dict[str, np.ndarray]:
    info = dataset_info(name)
    h, w, c = info.input_shape
    out = {}
    for split in SPLITS:
        # Sorted by (label, file name): a deterministic order whatever the archive's member order.
        items = sorted(files[split], key=lambda t: (t[0], t[1]))
        if not items:
            raise ValueError(
                f"{origin} holds no {split}/<class>/*.jpg images: expected train/<class>/*.jpg and "
                "test/<class>/*.jpg."
            )
        x = np.empty((len(items), h, w, c), np.uint8)
        blobs = tf.data.Dataset.from_tensor_slices(tf.constant([t[2] for t in items]))
        images = blobs.map(
            lambda b: tf.io.decode_jpeg(b, channels=c), num_parallel_calls=tf.data.AUTOTUNE
        ).batch(1024)
        start = 0
        try:
            for batch in images:
                batch = batch.numpy()
                if batch.shape[1:] != (h, w, c):
                    raise ValueError(
                        f"{origin}: {split} images are {batch.shape[1:]}, expected {(h, w, c)}."
                    )
                x[start:start + len(batch)] = batch
                start += len(batch)
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(
                f"{origin}: cannot decode the {split} images as {h}x{w}x{c} JPEGs "
                f"(corrupt file or mixed sizes): {e.message.splitlines()[0]}"
            ) from None
        out[f"x_{split}"] = x
        out[f"y_{split}"] = np.array([t[0] for t in items], np.int64)
    return out


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tfqkd")
    )


def _source_key(name: str, path: pathlib.Path) -> str:
    """Identifies a source's content cheaply: path, sizes and modification times."""
    path = path.resolve()
    if path.is_file():
        st = path.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    else:
        stats = [
            (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
            for split in SPLITS for p in sorted((path / split).rglob("*")) if p.is_file()
        ]
        stamp = hashlib.sha256(repr(stats).encode()).hexdigest()
    raw = f"{_CACHE_FORMAT}|{name}|{path}|{stamp}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def _write_npz_atomically(path: pathlib.Path, arrays: Dict[str, np.ndarray]) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)  # uncompressed: reading it back takes about a second


# The arrays of the most recently loaded source: switching splits or building a second pipeline
# must not re-read 180 MB. One entry only, so memory stays bounded.
_MEMO: Dict[str, Dict[str, np.ndarray]] = {}


def _remember(key: str, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    _MEMO.clear()
    _MEMO[key] = _read_only(arrays)
    return _MEMO[key]


def _load_images(name: str, path: pathlib.Path, kind: str) -> Dict[str, np.ndarray]:
    """Decoded arrays of a JPEG archive or folder tree: memory, then disk cache, then decode."""
    key = f"{name}-{_source_key(name, path)}"
    if key in _MEMO:
        return _MEMO[key]
    cache = _cache_dir() / f"{key}.npz"
    if cache.exists():
        try:
            return _remember(key, _load_npz(name, cache))
        except ValueError as e:
            warnings.warn(f"Ignoring unreadable cache {cache} ({e}); decoding {path} again.")
    files = _collect_archive(name, path) if kind == "archive" else _collect_folder(name, path)
    arrays = _validate_arrays(name, _decode(name, files, str(path)), str(path))
    try:
        _write_npz_atomically(cache, arrays)
    except OSError as e:
        warnings.warn(
            f"Could not cache the decoded {name} arrays at {cache} ({e}); set {CACHE_DIR_ENV} to "
            "a writable folder to avoid decoding the images on every run."
        )
    return _remember(key, arrays)


def _load_npz_source(name: str, path: pathlib.Path) -> Dict[str, np.ndarray]:
    key = f"npz-{name}-{_source_key(name, path)}"
    if key not in _MEMO:
        _remember(key, _load_npz(name, path))
    return _MEMO[key]


def _load_tfds(name: str, root: Optional[pathlib.Path], download: bool) -> Dict[str, np.ndarray]:
    key = f"tfds-{name}-{root}"
    if key in _MEMO:
        return _MEMO[key]
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
    return _remember(key, _validate_arrays(name, arrays, f"tensorflow-datasets {name!r}"))


def _try_path(name: str, path: pathlib.Path, origin: str, tried: List[str]) -> Optional[Dict[str, np.ndarray]]:
    """Loads from one user-given path, or records what was looked for and returns ``None``."""
    if path.is_file():
        if path.name.lower().endswith(".npz"):
            return _load_npz_source(name, path)
        if _is_archive(path):
            return _load_images(name, path, "archive")
        raise ValueError(
            f"{origin}={str(path)!r} is a file but neither a .npz nor a .tar.gz/.tgz/.tar archive: "
            f"point it at {name}.npz, {name}-jpg.tar.gz or the folder holding them."
        )
    npz = path / f"{name}.npz"
    if npz.is_file():
        return _load_npz_source(name, npz)
    for suffix in _ARCHIVE_SUFFIXES:
        archive = path / f"{name}-jpg{suffix}"
        if archive.is_file():
            return _load_images(name, archive, "archive")
    folders = [path, path / name, path / f"{name}-jpg"]
    for folder in folders:
        if _has_split_folders(folder):
            try:
                return _load_images(name, folder, "folder")
            except ValueError as e:
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


def _load_all(name: str, data_dir: Optional[PathLike], download: bool) -> Dict[str, np.ndarray]:
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
        arrays = _try_path(name, given, origin, tried)
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


def load_arrays(
    name: str,
    split: str,
    *,
    data_dir: Optional[PathLike] = None,
    download: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """Raw images and labels of one split: ``(x uint8 (N, H, W, C), y int64 (N,))``.

    Args:
        name: ``cifar10``, ``cifar100`` or ``digits``.
        split: ``train`` or ``test``.
        data_dir: An offline source (folder, ``.tar.gz`` archive or ``.npz`` file; see the module
            docstring); defaults to ``$TFQKD_DATA_DIR``. Ignored by ``digits``.
        download: Let tensorflow-datasets download the data if no local source has it (needs
            internet; off by default so that an offline machine fails fast instead of hanging).

    Returns:
        Read-only NumPy arrays (shared with later calls; copy before modifying).

    Raises:
        DataNotFoundError: no source holds the data (the message lists the sources and fixes).
        ValueError: bad ``name`` / ``split``, or a source that exists but is malformed.

    Example:
        >>> x, y = load_arrays("digits", "test")
        >>> x.shape, x.dtype.name, y.dtype.name
        ((360, 8, 8, 1), 'uint8', 'int64')
    """
    name = _check_name(name)
    split = _check_split(split)
    arrays = _load_all(name, data_dir, bool(download))
    return arrays[f"x_{split}"], arrays[f"y_{split}"]


# --------------------------------------------------------------------------------------------
# Pipelines


def balanced_subset(y: np.ndarray, subset: int, num_classes: int,
                    seed: Optional[int]) -> np.ndarray:
    """Sorted indices of ``subset`` images, ``subset / num_classes`` drawn from every class.

    The choice :func:`load_dataset` makes for its ``subset`` argument (with ``subset_seed``, else
    ``seed``): use it to find the images a subset-trained model saw, or, with
    ``numpy.setdiff1d``, the ones it never saw.

    Args:
        y: Integer labels ``(N,)`` in ``0..num_classes - 1``.
        subset: Images to pick, a multiple of ``num_classes``.
        num_classes: Number of classes.
        seed: Seed of the choice (``None``: a fixed choice, the one of seed 0).

    Raises:
        ValueError: ``subset`` is not a multiple of ``num_classes``, or needs more images of a
            class than ``y`` holds.

    Example:
        >>> idx = balanced_subset(np.array([0, 1, 0, 1, 0, 1]), 4, 2, seed=0)
        >>> len(idx), np.bincount(np.array([0, 1, 0, 1, 0, 1])[idx]).tolist()
        (4, [2, 2])
    """
    counts = np.bincount(y, minlength=num_classes)
    largest = int(counts.min()) * num_classes
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < num_classes:
        raise ValueError(
            f"subset must be an integer number of images, a multiple of the {num_classes} classes "
            f"between {num_classes} and {largest}, got {subset!r}."
        )
    if subset % num_classes:
        lower = subset // num_classes * num_classes
        raise ValueError(
            f"subset={subset} is not divisible by the {num_classes} classes, so it cannot be "
            f"class-balanced: use a multiple of {num_classes}, e.g. {lower} or "
            f"{lower + num_classes}."
        )
    if subset > largest:
        raise ValueError(
            f"subset={subset} is larger than the split allows: a class-balanced subset holds at "
            f"most {largest} images ({int(counts.min())} per class x {num_classes} classes)."
        )
    # The subset is a choice of data, not training noise: seed None still picks a fixed subset.
    rng = np.random.default_rng(0 if seed is None else seed)
    per_class = subset // num_classes
    picks = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(picks))


def _augment(images: tf.Tensor, seed: tf.Tensor, padding: int, flip: bool) -> tf.Tensor:
    """Pad + random crop (+ horizontal flip) of a batch, each image its own draw."""
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    top = tf.random.stateless_uniform([batch], seeds[0], 0, 2 * padding + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([batch], seeds[1], 0, 2 * padding + 1, dtype=tf.int32)
    rows = top[:, None] + tf.range(height)[None, :]
    cols = left[:, None] + tf.range(width)[None, :]
    # Two batched gathers crop every image at its own offset in one vectorised op.
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    if flip:
        mirror = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
        out = tf.where(mirror[:, None, None, None], tf.reverse(out, axis=[2]), out)
    return out


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: Optional[PathLike] = None,
    batch_size: int = 128,
    augment: Optional[bool] = None,
    subset: Optional[int] = None,
    seed: Optional[int] = None,
    shuffle: Optional[bool] = None,
    drop_remainder: bool = False,
    download: bool = False,
    subset_seed: Optional[int] = None,
) -> tf.data.Dataset:
    """A batched, normalised, optionally augmented and shuffled ``tf.data`` pipeline.

    Args:
        name: ``cifar10``, ``cifar100`` or ``digits``.
        split: ``train`` or ``test``.
        data_dir: Offline source (see the module docstring); defaults to ``$TFQKD_DATA_DIR``.
        batch_size: Images per batch (>= 1).
        augment: Standard augmentation; ``None`` means "on for the training split".
        subset: Use only this many images, the same number from every class (must be a multiple
            of the number of classes); chosen by ``subset_seed``, default ``seed`` (``None``:
            a fixed choice).
        seed: Makes shuffling, augmentation and the subset reproducible: the same seed gives the
            same batches. Like every TensorFlow op seed, the shuffle order and augmentation
            draws combine it with TensorFlow's global seed (``tf.random.set_seed``,
            ``keras.utils.set_random_seed``): the same pair gives the same batches (the subset
            depends on ``subset_seed``, else ``seed``, alone). ``None`` draws them at random.
        subset_seed: Seed of the subset choice only, when it must stay fixed while ``seed``
            varies (runs with different seeds on the same images); default ``seed``.
        shuffle: Shuffle every epoch; ``None`` means "on for the training split".
        drop_remainder: Drop the last, smaller batch.
        download: Let tensorflow-datasets download CIFAR if no local source has it.

    Returns:
        A dataset of ``(images float32 (B, H, W, C), labels int32 (B,))``, images normalised with
        :func:`dataset_info`'s per-channel mean and std.

    Example:
        >>> ds = load_dataset("digits", "test", batch_size=100)
        >>> [int(y.shape[0]) for _, y in ds]
        [100, 100, 100, 60]
    """
    name = _check_name(name)
    split = _check_split(split)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    for flag, value in (("augment", augment), ("shuffle", shuffle)):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{flag} must be True, False or None (split default), got {value!r}.")
    for flag, value in (("seed", seed), ("subset_seed", subset_seed)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, np.integer))):
            raise ValueError(f"{flag} must be an integer or None, got {value!r}.")
    info = dataset_info(name)
    augment = split == "train" if augment is None else bool(augment)
    shuffle = split == "train" if shuffle is None else bool(shuffle)

    x, y = load_arrays(name, split, data_dir=data_dir, download=download)
    if subset is not None:
        keep = balanced_subset(y, subset, info.num_classes,
                               seed if subset_seed is None else subset_seed)
        x, y = x[keep], y[keep]

    images = tf.constant(x)
    labels = tf.constant(y.astype(np.int32))
    mean = tf.constant(info.mean, tf.float32)
    std = tf.constant(info.std, tf.float32)
    padding, flip = _AUGMENTATION[name]

    # Shuffle and batch indices, then gather: the shuffle buffer holds integers, not images.
    ds = tf.data.Dataset.range(len(y))
    if shuffle:
        ds = ds.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(int(batch_size), drop_remainder=bool(drop_remainder))

    def prepare(idx, aug_seed=None):
        batch = tf.cast(tf.gather(images, idx), tf.float32) / 255.0
        if aug_seed is not None:
            batch = _augment(batch, aug_seed, padding, flip)
        return (batch - mean) / std, tf.gather(labels, idx)

    if augment:
        # One stateless seed pair per batch from a seeded stream: reproducible for a given seed,
        # fresh draws every epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
