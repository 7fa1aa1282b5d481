"""Tests of tfqkd.data: digits, the offline CIFAR-10 archive, folder/npz/tfds sources, errors.

The CIFAR-10 archive is decoded once per test session (``cifar10_arrays``); every other CIFAR test
re-installs those arrays in the loader's memory and forbids decoding, so a second decode fails the
test instead of silently costing 10 s.
"""

import io
import json
import os
import sys
import tarfile
import types

import numpy as np
import pytest

from tfqkd import data
from tfqkd._keras import tf

DIGITS = data.dataset_info("digits")


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch, tmp_path_factory):
    """No test sees the user's data/cache/tfds folders."""
    monkeypatch.delenv("TFQKD_DATA_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "no_tfds_here"))
    monkeypatch.setenv("TFQKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tfqkd_cache"))


def _batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def _unnormalise(images, info):
    return images * np.asarray(info.std, np.float32) + np.asarray(info.mean, np.float32)


def _assert_are_shifted_crops(augmented, originals, info, padding, flip):
    """Every augmented image is some pad-and-crop (and maybe mirror) of its original."""
    h, w = info.input_shape[:2]
    raw = originals.astype(np.float32) / 255.0
    padded = np.pad(raw, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    aug = _unnormalise(augmented, info)
    changed = 0
    for i in range(len(aug)):
        best = np.inf
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                crop = padded[i, dy:dy + h, dx:dx + w]
                for candidate in ([crop, crop[:, ::-1]] if flip else [crop]):
                    best = min(best, float(np.abs(candidate - aug[i]).max()))
        assert best < 1e-4, f"image {i} is not a shifted crop of its original (error {best})"
        changed += not np.allclose(aug[i], raw[i], atol=1e-4)
    assert changed > len(aug) // 2, "augmentation left most images unchanged"


# ------------------------------------------------------------------------------------------------
# digits


def test_digits_info_and_arrays():
    assert DIGITS.num_classes == 10 and DIGITS.input_shape == (8, 8, 1)
    assert (DIGITS.train_size, DIGITS.test_size) == (1437, 360)
    x, y = data.load_arrays("digits", "train")
    xt, yt = data.load_arrays("digits", "test")
    assert x.shape == (1437, 8, 8, 1) and x.dtype == np.uint8 and y.dtype == np.int64
    assert xt.shape == (360, 8, 8, 1) and yt.shape == (360,)
    assert x.max() == 255 and x.min() == 0
    # Stratified split: every class in both splits in about the same proportion.
    assert np.bincount(yt, minlength=10).min() >= 35 and np.bincount(y, minlength=10).min() >= 139
    # The split is fixed: train and test are disjoint images of the 1,797.
    train_rows = {r.tobytes() + bytes([l]) for r, l in zip(x, y)}
    assert sum(r.tobytes() + bytes([l]) in train_rows for r, l in zip(xt, yt)) < 10
    with pytest.raises(ValueError, match="read-only"):
        x[0, 0, 0, 0] = 1


def test_digits_batches_shapes_dtypes_and_labels():
    ds = data.load_dataset("digits", "train", batch_size=64, seed=0)
    batches = _batches(ds)
    assert sum(len(y) for _, y in batches) == 1437
    x, y = batches[0]
    assert x.shape == (64, 8, 8, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert all(0 <= y.min() and y.max() < 10 for _, y in batches)
    assert batches[-1][0].shape[0] == 1437 % 64
    dropped = _batches(data.load_dataset("digits", "train", batch_size=64, drop_remainder=True))
    assert len(dropped) == 1437 // 64 and all(len(y) == 64 for _, y in dropped)


def test_digits_normalisation_of_training_split():
    (x, _), = _batches(data.load_dataset(
        "digits", "train", batch_size=5000, augment=False, shuffle=False))
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), [0.0], atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), [1.0], atol=1e-5)
    raw, _ = data.load_arrays("digits", "train")
    np.testing.assert_allclose(_unnormalise(x, DIGITS), raw / 255.0, atol=1e-5)


def test_split_defaults_test_split_is_ordered_and_unaugmented():
    xt, yt = data.load_arrays("digits", "test")
    (x, y), = _batches(data.load_dataset("digits", "test", batch_size=1000))
    np.testing.assert_array_equal(y, yt)
    np.testing.assert_allclose(_unnormalise(x, DIGITS), xt / 255.0, atol=1e-5)


def test_train_split_shuffles_by_default():
    _, y_raw = data.load_arrays("digits", "train")
    (_, y), = _batches(data.load_dataset("digits", "train", batch_size=5000, seed=0))
    assert not np.array_equal(y, y_raw)
    np.testing.assert_array_equal(np.sort(y), np.sort(y_raw))


def test_digits_augmentation_keeps_shapes_and_labels_and_only_shifts():
    plain = _batches(data.load_dataset("digits", "train", batch_size=500, augment=False, seed=1))
    aug = _batches(data.load_dataset(
        "digits", "train", batch_size=500, augment=True, shuffle=False, seed=1))
    raw, y_raw = data.load_arrays("digits", "train")
    assert [b[0].shape for b in aug] == [b[0].shape for b in plain]
    np.testing.assert_array_equal(np.concatenate([y for _, y in aug]), y_raw)
    # Digits are padded by one pixel and cropped, never mirrored.
    _assert_are_shifted_crops(aug[0][0], raw[:500], DIGITS, padding=1, flip=False)
    with pytest.raises(AssertionError):  # the check itself can fail: mirrored digits are not crops
        _assert_are_shifted_crops(aug[0][0][:, :, ::-1], raw[:500], DIGITS, padding=1, flip=False)


def test_same_seed_same_batches_different_seed_different():
    def first_two_epochs(seed):
        ds = data.load_dataset("digits", "train", batch_size=128, seed=seed)
        return [next(iter(ds)) for _ in range(2)]

    a, b, c = first_two_epochs(7), first_two_epochs(7), first_two_epochs(8)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    assert not np.array_equal(a[0][1].numpy(), c[0][1].numpy())
    # Each epoch reshuffles and draws new crops, reproducibly.
    assert not np.array_equal(a[0][1].numpy(), a[1][1].numpy())
    # Same order, different augmentation: seeds also drive the crops, not just the order.
    ua = data.load_dataset("digits", "train", batch_size=256, shuffle=False, augment=True, seed=1)
    ub = data.load_dataset("digits", "train", batch_size=256, shuffle=False, augment=True, seed=2)
    assert not np.array_equal(next(iter(ua))[0].numpy(), next(iter(ub))[0].numpy())


def test_subset_is_class_balanced_and_deterministic():
    def labels(seed):
        ds = data.load_dataset("digits", "train", batch_size=1000, subset=100, seed=seed,
                               shuffle=False, augment=False)
        return _batches(ds)[0]

    x1, y1 = labels(0)
    x2, y2 = labels(0)
    x3, _ = labels(1)
    assert len(y1) == 100
    np.testing.assert_array_equal(np.bincount(y1, minlength=10), np.full(10, 10))
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, x3)


def test_subset_seed_fixes_the_images_while_seed_changes_the_order():
    def images(**kw):
        ds = data.load_dataset("digits", "train", batch_size=1000, subset=100, augment=False, **kw)
        x, _ = _batches(ds)[0]
        return x

    base, other, fixed = images(seed=0), images(seed=1), images(seed=1, subset_seed=0)
    key = lambda x: np.sort(x.reshape(len(x), -1).sum(1))  # noqa: E731  order-free image key
    assert not np.array_equal(key(base), key(other))  # another seed, other images
    np.testing.assert_array_equal(key(base), key(fixed))  # same images...
    assert not np.array_equal(base, fixed)  # ...in another order
    with pytest.raises(ValueError, match="subset_seed must be an integer"):
        data.load_dataset("digits", "train", subset=100, subset_seed=1.5)


@pytest.mark.parametrize("subset, match", [
    (105, "divisible by the 10 classes.*100 or 110"),
    (5000, "at most 1390"),
    (5, "between 10 and 1390"),
    (True, "integer"),
])
def test_bad_subset(subset, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset("digits", "train", subset=subset)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="mnist"), "cifar10, cifar100, digits"),
    (dict(split="valid"), "train, validation, test"),
    (dict(split="validation"), "no validation split of its own: pass validation=0.1"),
    (dict(validation=1.0), "validation must be a fraction"),
    (dict(normalization="imagenet:alexnet"), "unknown Applications family 'alexnet'"),
    (dict(image_size=(32,)), "image_size must be"),
    (dict(image_size="big"), "image_size must be"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(augment="yes"), "augment must be"),
    (dict(seed=1.5), "seed must be"),
])
def test_bad_arguments(kwargs, match):
    args = dict(name="digits", split="train")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        data.load_dataset(args.pop("name"), args.pop("split"), **args)


def test_dataset_info_unknown_name_lists_known():
    with pytest.raises(ValueError, match="cifar10, cifar100, digits"):
        data.dataset_info("imagenet")
    with pytest.raises(ValueError, match="train, validation, test"):
        data.load_arrays("digits", "val")


def test_cifar_info_without_data():
    c10, c100 = data.dataset_info("cifar10"), data.dataset_info("cifar100")
    assert c10.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                               "horse", "ship", "truck")
    assert len(c100.class_names) == len(set(c100.class_names)) == 100 == c100.num_classes
    assert list(c100.class_names) == sorted(c100.class_names)
    assert c10.input_shape == c100.input_shape == (32, 32, 3)


# ------------------------------------------------------------------------------------------------
# Missing data


def test_missing_data_lists_every_source_and_never_touches_tfds(monkeypatch):
    # tfds must not even be imported (let alone download) without prepared data or download=True.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_dataset("cifar10", "train")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    for needle in ("data_dir", "TFQKD_DATA_DIR", "cifar10-jpg.tar.gz", "cifar10.npz",
                   "train/<class>/*.jpg", "tensorflow-datasets", "no_tfds_here", "download=True"):
        assert needle in msg, f"{needle!r} missing from the error:\n{msg}"


def test_missing_explicit_path_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "cifar10-jpg.tar.gz"
    with pytest.raises(data.DataNotFoundError, match="does not exist") as e:
        data.load_arrays("cifar10", "test", data_dir=missing)
    assert str(missing) in str(e.value) and "TFQKD_DATA_DIR" in str(e.value)
    monkeypatch.setenv("TFQKD_DATA_DIR", str(missing))
    with pytest.raises(data.DataNotFoundError, match="TFQKD_DATA_DIR=.*does not exist"):
        data.load_dataset("cifar10", "test")


def test_empty_folder_lists_what_was_looked_for(tmp_path):
    with pytest.raises(data.DataNotFoundError) as e:
        data.load_arrays("cifar100", "train", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "cifar100.npz" in msg and "cifar100-jpg.tar.gz" in msg


def test_unrecognised_file_is_rejected(tmp_path):
    bogus = tmp_path / "cifar10.zip"
    bogus.write_bytes(b"PK")
    with pytest.raises(ValueError, match="neither a .npz nor"):
        data.load_arrays("cifar10", "train", data_dir=bogus)


# ------------------------------------------------------------------------------------------------
# npz, folder, archive and tfds sources on small synthetic data


def _fake_cifar(n_train, n_test, classes, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": (np.arange(n_test) % classes).reshape(-1, 1),  # keras-style (N, 1) labels
    }


def test_npz_source_file_and_folder(tmp_path, monkeypatch):
    arrays = _fake_cifar(200, 100, 100)
    np.savez(tmp_path / "cifar100.npz", **arrays)
    for source in (tmp_path, tmp_path / "cifar100.npz"):
        x, y = data.load_arrays("cifar100", "test", data_dir=source)
        np.testing.assert_array_equal(x, arrays["x_test"])
        np.testing.assert_array_equal(y, arrays["y_test"].ravel())
        assert y.dtype == np.int64
    # A rewritten file is read again, not served from memory.
    newer = _fake_cifar(200, 100, 100, seed=1)
    np.savez(tmp_path / "cifar100.npz", **newer)
    os.utime(tmp_path / "cifar100.npz", (2_000_000_000, 2_000_000_000))
    x, _ = data.load_arrays("cifar100", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(x, newer["x_test"])
    monkeypatch.setenv("TFQKD_DATA_DIR", str(tmp_path))
    batches = _batches(data.load_dataset("cifar100", "train", batch_size=64, subset=100, seed=0))
    assert [b[0].shape for b in batches] == [(64, 32, 32, 3), (36, 32, 32, 3)]
    np.testing.assert_array_equal(np.bincount(np.concatenate([y for _, y in batches])), np.ones(100))


@pytest.mark.parametrize("change, match", [
    (dict(x_train=np.zeros((4, 3, 32, 32), np.uint8)), r"NCHW.*transpose"),
    (dict(x_test=np.zeros((100, 32, 32, 3), np.float32)), "uint8"),
    (dict(y_train=np.full(200, 10)), r"labels in \[10, 10\].*0\.\.9"),
    (dict(y_test=np.zeros(5, np.int64)), "100 images but y_test 5 labels"),
])
def test_malformed_npz(tmp_path, change, match):
    arrays = _fake_cifar(200, 100, 10)
    arrays.update(change)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        data.load_arrays("cifar10", "train", data_dir=tmp_path / "bad.npz")
    del arrays["x_test"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="lacks the arrays"):
        data.load_arrays("cifar10", "train", data_dir=tmp_path / "bad.npz")


@pytest.fixture
def small_jpeg_tree(tmp_path):
    """train/<class>/*.jpg (3 per class) and test/<class>/*.jpg (1 per class), 32x32 RGB."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    blobs = {}
    for split, per_class in (("train", 3), ("test", 1)):
        for c, cls in enumerate(data.dataset_info("cifar10").class_names):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                blob = tf.io.encode_jpeg(img, quality=90).numpy()
                (root / split / cls / f"{i:04d}.jpg").write_bytes(blob)
                blobs[f"{split}/{cls}/{i:04d}.jpg"] = (c, blob)
    return root, blobs


def _expected(blobs, split):
    items = sorted((c, path) for path, (c, _) in blobs.items() if path.startswith(split + "/"))
    x = np.stack([tf.io.decode_jpeg(blobs[p][1], channels=3).numpy() for _, p in items])
    return x, np.array([c for c, _ in items])


def test_folder_and_archive_sources_decode_with_tf_and_cache(small_jpeg_tree, tmp_path, monkeypatch):
    root, blobs = small_jpeg_tree
    cache = tmp_path / "cache"
    monkeypatch.setenv("TFQKD_CACHE_DIR", str(cache))
    want_x, want_y = _expected(blobs, "train")

    x, y = data.load_arrays("cifar10", "train", data_dir=root)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)

    archive = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
    data.cache._MEMO.clear()
    for source in (archive, tmp_path):  # the archive itself, then the folder holding it
        x, y = data.load_arrays("cifar10", "train", data_dir=source)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    xt, yt = data.load_arrays("cifar10", "test", data_dir=archive)
    np.testing.assert_array_equal(yt, np.arange(10))
    np.testing.assert_array_equal(xt, _expected(blobs, "test")[0])
    assert len(list(cache.glob("cifar10-*.npz"))) == 2  # the folder's and the archive's
    assert not list(cache.glob("*.tmp"))

    # A second process (empty memory) reads the cache instead of decoding.
    data.cache._MEMO.clear()
    monkeypatch.setattr(data.images, "decode_images", _forbidden_decode)
    x2, _ = data.load_arrays("cifar10", "train", data_dir=archive)
    np.testing.assert_array_equal(x2, want_x)

    # A changed archive (new mtime) is decoded again into a new cache entry.
    monkeypatch.undo()
    monkeypatch.setenv("TFQKD_CACHE_DIR", str(cache))
    os.utime(archive, (1_000_000_000, 1_000_000_000))
    data.cache._MEMO.clear()
    data.load_arrays("cifar10", "train", data_dir=archive)
    assert len(list(cache.glob("cifar10-*.npz"))) == 3


def _forbidden_decode(*args, **kwargs):
    raise AssertionError("decoded JPEGs although a cache should have been used")


def test_unwritable_cache_warns_but_loads(small_jpeg_tree, tmp_path, monkeypatch):
    root, blobs = small_jpeg_tree
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("")
    monkeypatch.setenv("TFQKD_CACHE_DIR", str(blocker / "cache"))
    data.cache._MEMO.clear()
    with pytest.warns(UserWarning, match="TFQKD_CACHE_DIR"):
        _, y = data.load_arrays("cifar10", "test", data_dir=root)
    np.testing.assert_array_equal(y, np.arange(10))


def test_wrong_classes_in_archive_and_folder(small_jpeg_tree, tmp_path):
    root, _ = small_jpeg_tree
    archive = tmp_path / "some.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root / "train", arcname="train")
    with pytest.raises(ValueError, match="'airplane'.*not a cifar100 class"):
        data.load_arrays("cifar100", "train", data_dir=archive)
    # CIFAR-10 folders in a folder asked for CIFAR-100: not found, with the reason.
    with pytest.raises(data.DataNotFoundError, match="not usable for cifar100"):
        data.load_arrays("cifar100", "train", data_dir=root)


def test_archive_with_missing_split_and_corrupt_jpeg(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in (("train/cat/0.jpg", b"not a jpeg"), ("test/cat/0.jpg", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match=r"a.tar.gz: cannot decode the image train/cat/0.jpg \(2 "
                       r"undecodable images in all: train/cat/0.jpg: Unknown image file format"):
        data.load_arrays("cifar10", "train", data_dir=archive)
    only_train = tmp_path / "b.tar"
    with tarfile.open(only_train, "w") as tar:
        info = tarfile.TarInfo("train/cat/0.jpg")
        payload = tf.io.encode_jpeg(np.zeros((32, 32, 3), np.uint8)).numpy()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match="no test/<class>/"):
        data.load_arrays("cifar10", "train", data_dir=only_train)
    truncated = tmp_path / "c.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:40])
    with pytest.raises(ValueError, match="Cannot read .* as a tar archive"):
        data.load_arrays("cifar10", "train", data_dir=truncated)


def test_tfds_source_is_used_only_when_prepared_or_download_requested(tmp_path, monkeypatch):
    calls = []
    fake = _fake_cifar(20, 10, 10)

    def fake_load_tfds(name, root, download):
        calls.append((name, root, download))
        return data.builtin._validate_arrays(name, fake, "fake tfds")

    monkeypatch.setattr(data.builtin, "_load_tfds", fake_load_tfds)
    prepared = tmp_path / "tfds"
    (prepared / "cifar10" / "3.0.2").mkdir(parents=True)
    (prepared / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")

    data.load_arrays("cifar10", "train", data_dir=prepared)
    assert calls[-1] == ("cifar10", prepared, False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared))
    x, _ = data.load_arrays("cifar10", "test")
    assert calls[-1] == ("cifar10", prepared, False) and len(x) == 10
    with pytest.raises(data.DataNotFoundError):  # prepared cifar10 is not cifar100
        data.load_arrays("cifar100", "test")
    assert len(calls) == 2
    data.load_arrays("cifar100", "test", download=True)
    assert calls[-1] == ("cifar100", None, True)


def test_tfds_source_end_to_end_with_mock_data(tmp_path):
    # tfds' own mock replaces the prepared files: this runs the real tfds.load call path offline.
    import tensorflow_datasets as tfds  # a hard dependency of tfqkd
    prepared = tmp_path / "tfds"
    (prepared / "cifar10" / "3.0.2").mkdir(parents=True)
    (prepared / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
    with tfds.testing.mock_data(num_examples=20):
        x, y = data.load_arrays("cifar10", "train", data_dir=prepared)
        assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
        ds = data.load_dataset("cifar100", "test", batch_size=8, download=True)
        assert [int(b[1].shape[0]) for b in ds] == [8, 8, 4]


# ------------------------------------------------------------------------------------------------
# The real offline CIFAR-10 archive


@pytest.fixture(scope="session")
def cifar10_arrays(cifar10_archive, tmp_path_factory):
    """Decodes the archive once per session, into a session cache folder."""
    cache = tmp_path_factory.mktemp("cifar10_cache")
    previous = os.environ.get("TFQKD_CACHE_DIR")
    os.environ["TFQKD_CACHE_DIR"] = str(cache)
    try:
        data.cache._MEMO.clear()
        arrays = {s: data.load_arrays("cifar10", s, data_dir=cifar10_archive) for s in data.SPLITS}
    finally:
        if previous is None:
            os.environ.pop("TFQKD_CACHE_DIR")
        else:
            os.environ["TFQKD_CACHE_DIR"] = previous
    return types.SimpleNamespace(archive=cifar10_archive, cache=cache, arrays=arrays,
                                 memo=dict(data.cache._MEMO))


@pytest.fixture
def cifar10(cifar10_arrays, monkeypatch):
    """The decoded arrays back in memory, the session cache in use, and decoding forbidden."""
    data.cache._MEMO.clear()
    data.cache._MEMO.update(cifar10_arrays.memo)
    monkeypatch.setenv("TFQKD_CACHE_DIR", str(cifar10_arrays.cache))
    monkeypatch.setattr(data.images, "decode_images", _forbidden_decode)
    return cifar10_arrays


def test_cifar10_archive_contents(cifar10):
    (x, y), (xt, yt) = cifar10.arrays["train"], cifar10.arrays["test"]
    assert x.shape == (50_000, 32, 32, 3) and xt.shape == (10_000, 32, 32, 3)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 5000))
    np.testing.assert_array_equal(np.bincount(yt), np.full(10, 1000))
    assert list(cifar10.cache.glob("cifar10-*.npz")), "decoded arrays were not cached"


def test_cifar10_disk_cache_gives_the_same_arrays(cifar10):
    data.cache._MEMO.clear()  # as in a new process: only the disk cache is left
    x, y = data.load_arrays("cifar10", "test", data_dir=cifar10.archive)
    np.testing.assert_array_equal(x, cifar10.arrays["test"][0])
    np.testing.assert_array_equal(y, cifar10.arrays["test"][1])


@pytest.mark.parametrize("how", ["folder", "archive", "env"])
def test_cifar10_sources(cifar10, how, monkeypatch):
    data_dir = {"folder": cifar10.archive.parent, "archive": cifar10.archive, "env": None}[how]
    if how == "env":
        monkeypatch.setenv("TFQKD_DATA_DIR", str(cifar10.archive.parent))
    ds = data.load_dataset("cifar10", "train", data_dir=data_dir, batch_size=32, seed=0)
    x, y = next(iter(ds))
    assert x.shape == (32, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    assert 0 <= int(tf.reduce_min(y)) and int(tf.reduce_max(y)) < 10


def test_cifar10_normalisation_and_augmentation(cifar10):
    info = data.dataset_info("cifar10")
    # The test split is sorted by class: a class-balanced subset gives representative statistics.
    ds = data.load_dataset("cifar10", "test", data_dir=cifar10.archive, batch_size=3000,
                           subset=3000, seed=0)
    x, y = next(iter(ds))
    x = x.numpy()
    assert np.abs(x.mean(axis=(0, 1, 2))).max() < 0.05
    assert np.abs(x.std(axis=(0, 1, 2)) - 1).max() < 0.05
    np.testing.assert_array_equal(np.bincount(y.numpy()), np.full(10, 300))

    (x, y), = _batches(data.load_dataset("cifar10", "test", data_dir=cifar10.archive,
                                         batch_size=64).take(1))
    np.testing.assert_array_equal(y, cifar10.arrays["test"][1][:64])
    np.testing.assert_allclose(_unnormalise(x, info), cifar10.arrays["test"][0][:64] / 255.0,
                               atol=1e-5)

    aug = data.load_dataset("cifar10", "test", data_dir=cifar10.archive, batch_size=64,
                            augment=True, seed=3)
    xa, ya = next(iter(aug))
    np.testing.assert_array_equal(ya.numpy(), cifar10.arrays["test"][1][:64])
    _assert_are_shifted_crops(xa.numpy(), cifar10.arrays["test"][0][:64], info, padding=4, flip=True)


def test_cifar10_same_seed_same_first_batch(cifar10):
    def first(seed):
        x, y = next(iter(data.load_dataset("cifar10", "train", data_dir=cifar10.archive,
                                           batch_size=16, seed=seed)))
        return x.numpy(), y.numpy()

    a, b, c = first(5), first(5), first(6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_cifar10_subset(cifar10):
    ds = data.load_dataset("cifar10", "train", data_dir=cifar10.archive, batch_size=1000,
                           subset=500, seed=0)
    y = np.concatenate([y.numpy() for _, y in ds])
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 50))
    with pytest.raises(ValueError, match="at most 50000"):
        data.load_dataset("cifar10", "train", data_dir=cifar10.archive, subset=60_000)


# ------------------------------------------------------------------------------------------------
# Your own data: folder:, npz:, tfds: specs, built from real CIFAR-10 JPEGs


_CLASSES = ("truck", "airplane", "cat")  # written in this order; labels follow sorted names


@pytest.fixture(scope="session")
def cifar_jpegs(cifar10_archive):
    """Raw JPEG bytes of a few CIFAR-10 images: {(split, class): [bytes, ...]}."""
    want = {("train", c): 5 for c in _CLASSES}
    want.update({("test", c): 2 for c in _CLASSES})
    got = {k: [] for k in want}
    with tarfile.open(cifar10_archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            key = tuple(parts[-3:-1])
            if member.isfile() and key in got and len(got[key]) < want[key]:
                got[key].append(tar.extractfile(member).read())
                if all(len(got[k]) == n for k, n in want.items()):
                    break
    assert all(len(got[k]) == n for k, n in want.items())
    return got


def _decode(blob):
    """The test's own decode of a file's bytes (TensorFlow's decoder, as tfqkd promises)."""
    return tf.io.decode_image(blob, channels=3, expand_animations=False).numpy()


def _resized(img, size):
    """The documented resize: bilinear, antialiased, rounded to uint8."""
    out = tf.image.resize(tf.cast(img, tf.float32), size, method="bilinear", antialias=True)
    return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)


def _write_folder(root, cifar_jpegs, sizes=None):
    """root/<split>/<class>/ with JPEGs (raw CIFAR bytes) and PNGs (re-encoded, maybe resized).

    Returns {split: [(class, relative path, bytes)]} in the order tfqkd promises (class index =
    sorted class name, then file name).
    """
    written = {"train": [], "test": []}
    for (split, cls), blobs in cifar_jpegs.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i, blob in enumerate(blobs):
            if i % 2:  # every other image a PNG, at another size when asked
                img = _decode(blob)
                if sizes:
                    img = _resized(img, sizes[(i // 2) % len(sizes)])
                blob, name = tf.io.encode_png(img).numpy(), f"{i:02d}.png"
            else:
                name = f"{i:02d}.jpg"
            (root / split / cls / name).write_bytes(blob)
            written[split].append((cls, f"{split}/{cls}/{name}", blob))
    order = sorted(_CLASSES)
    return {s: sorted(v, key=lambda t: (order.index(t[0]), t[1])) for s, v in written.items()}


def test_folder_labels_pixels_and_class_order(tmp_path, cifar_jpegs):
    written = _write_folder(tmp_path / "imgs", cifar_jpegs)
    spec = f"folder:{tmp_path / 'imgs'}"
    info = data.dataset_info(spec)
    assert info.class_names == ("airplane", "cat", "truck")  # sorted folder names
    assert (info.num_classes, info.input_shape, info.train_size, info.test_size) == \
        (3, (32, 32, 3), 15, 6)
    for split in ("train", "test"):
        x, y = data.load_arrays(spec, split)
        np.testing.assert_array_equal(y, [info.class_names.index(c) for c, _, _ in written[split]])
        np.testing.assert_array_equal(x, np.stack([_decode(b) for _, _, b in written[split]]))
    # The JPEGs are the archive's own files: the same pixels as the CIFAR-10 loader gives.
    x_jpg = _decode(cifar_jpegs[("train", "cat")][0])
    x, _ = data.load_arrays(spec, "train")
    np.testing.assert_array_equal(x[5], x_jpg)  # airplane 0..4, then cat/00.jpg
    # A relative path is taken relative to data_dir.
    x2, _ = data.load_arrays("folder:imgs", "train", data_dir=tmp_path)
    np.testing.assert_array_equal(x2, x)
    # The same tree in a .tar.gz archive (below a prefix folder) gives the same arrays.
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "imgs", arcname="flowers")
    x3, y3 = data.load_arrays(f"folder:{tmp_path / 'imgs.tar.gz'}", "train")
    np.testing.assert_array_equal(x3, x)
    np.testing.assert_array_equal(y3, data.load_arrays(spec, "train")[1])
    # Batches: labels as loaded, images normalised with the training statistics.
    (xb, yb), = _batches(data.load_dataset(spec, "test", batch_size=6))
    np.testing.assert_array_equal(yb, data.load_arrays(spec, "test")[1])
    np.testing.assert_allclose(_unnormalise(xb, info), data.load_arrays(spec, "test")[0] / 255.0,
                               atol=1e-5)


def test_folder_of_mixed_sizes_needs_image_size_then_resizes(tmp_path, cifar_jpegs):
    written = _write_folder(tmp_path / "imgs", cifar_jpegs, sizes=[(48, 40), (20, 28)])
    spec = f"folder:{tmp_path / 'imgs'}"
    with pytest.raises(ValueError, match=r"do not all have one size .*48x40.*image_size"):
        data.load_arrays(spec, "train")
    info = data.dataset_info(spec, image_size=(24, 20))
    assert info.input_shape == (24, 20, 3)
    x, y = data.load_arrays(spec, "train", image_size=(24, 20))
    want = np.stack([_resized(_decode(b), (24, 20)) for _, _, b in written["train"]])
    np.testing.assert_array_equal(x, want)
    # The pipeline gives the same pixels, augmentation aside.
    (xb, _), = _batches(data.load_dataset(spec, "train", image_size=(24, 20), batch_size=32,
                                          shuffle=False, augment=False))
    np.testing.assert_allclose(_unnormalise(xb, info), want / 255.0, atol=1e-5)
    aug, = _batches(data.load_dataset(spec, "train", image_size=(24, 20), batch_size=32,
                                      shuffle=False, augment=True, seed=0))
    _assert_are_shifted_crops(aug[0], want, info, padding=3, flip=True)  # 24 / 8 = 3 pixels


def test_folder_class_only_in_test_is_an_error(tmp_path, cifar_jpegs):
    _write_folder(tmp_path, cifar_jpegs)
    (tmp_path / "test" / "zebra").mkdir()
    (tmp_path / "test" / "zebra" / "1.jpg").write_bytes(cifar_jpegs[("test", "cat")][0])
    with pytest.raises(ValueError, match=r"test holds class folder zebra .* train/ lacks"):
        data.dataset_info(f"folder:{tmp_path}")


def test_files_that_are_not_class_images_are_named_in_a_warning(tmp_path, cifar_jpegs):
    _write_folder(tmp_path, cifar_jpegs)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "loose.jpg").write_bytes(cifar_jpegs[("train", "cat")][0])
    (tmp_path / "train" / "cat" / ".DS_Store").write_text("hidden: ignored quietly")
    with pytest.warns(UserWarning, match=r"ignored 2 entries .*: train/loose.jpg, "
                                         r"train/cat/notes.txt$"):
        x, _ = data.load_arrays(f"folder:{tmp_path}", "train")
    assert len(x) == 15


def test_folder_layout_errors_say_what_is_expected(tmp_path, cifar_jpegs):
    for cls in ("cat", "dog"):  # class folders without train/ and test/
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "1.jpg").write_bytes(cifar_jpegs[("test", "cat")][0])
    with pytest.raises(ValueError, match=r"no train/<class>/ and no test/<class>/ .*folders cat, "
                                         r"dog: if these are classes, move them into"):
        data.load_arrays(f"folder:{tmp_path}", "train")
    with pytest.raises(data.DataNotFoundError, match="does not exist"):
        data.load_arrays(f"folder:{tmp_path / 'nope'}", "train")
    with pytest.raises(ValueError, match=f"is a path: pass folder:{tmp_path}"):
        data.load_arrays(str(tmp_path), "train")


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, cifar_jpegs, monkeypatch):
    monkeypatch.setenv("TFQKD_CACHE_DIR", str(tmp_path / "cache"))
    written = _write_folder(tmp_path / "imgs", cifar_jpegs)
    bad = tmp_path / "imgs" / "train" / "cat" / "03a.jpg"  # sorts between two good cat images
    bad.write_bytes(cifar_jpegs[("train", "cat")][0][:100])  # a truncated JPEG
    (tmp_path / "imgs" / "test" / "truck" / "x.png").write_bytes(b"")  # an empty file
    spec = f"folder:{tmp_path / 'imgs'}"
    for attempt in ("decoded", "from the cache"):
        data.cache._MEMO.clear()
        with pytest.raises(ValueError) as e:
            data.load_arrays(spec, "train")
        message = str(e.value)
        assert "cannot decode the image train/cat/03a.jpg" in message, attempt
        assert "2 undecodable images" in message and "test/truck/x.png" in message
        assert "skip_corrupt=True" in message and "--skip_corrupt_images" in message
        assert "no class folders" not in message and "no train/" not in message
    assert len(list((tmp_path / "cache").glob("folder-*.npz"))) == 1  # decoded once
    data.images._WARNED.clear()
    with pytest.warns(UserWarning, match=r"skipped 2 undecodable images .*train/cat/03a.jpg"):
        x, y = data.load_arrays(spec, "train", skip_corrupt=True)
    # The good images keep their own labels and pixels: nothing shifted onto the wrong label.
    np.testing.assert_array_equal(x, np.stack([_decode(b) for _, _, b in written["train"]]))
    np.testing.assert_array_equal(y, [sorted(_CLASSES).index(c) for c, _, _ in written["train"]])
    assert len(data.load_arrays(spec, "test", skip_corrupt=True)[0]) == 6


def test_corrupt_image_in_a_cifar_folder_is_named(tmp_path, small_jpeg_tree):
    root, _ = small_jpeg_tree
    (root / "train" / "cat" / "9999.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match=r"cannot decode the image train/cat/9999.jpg"):
        data.load_arrays("cifar10", "train", data_dir=root)


def test_validation_split_is_carved_from_train_disjoint_and_fixed(tmp_path, cifar_jpegs):
    _write_folder(tmp_path / "imgs", cifar_jpegs)
    for spec in ("digits", f"folder:{tmp_path / 'imgs'}"):
        x_all, y_all = data.load_arrays(spec, "train")
        xv, yv = data.load_arrays(spec, "validation", validation=0.2)
        xt, yt = data.load_arrays(spec, "train", validation=0.2)
        assert len(xv) + len(xt) == len(x_all)
        flat = {bytes(img) for img in x_all}
        assert {bytes(i) for i in xv} | {bytes(i) for i in xt} <= flat
        assert not {bytes(i) for i in xv} & {bytes(i) for i in xt}, "an image in both splits"
        counts, all_counts = np.bincount(yv), np.bincount(y_all)
        np.testing.assert_array_equal(counts, np.round(0.2 * all_counts))  # class by class
        again = data.load_dataset(spec, "validation", validation=0.2, batch_size=1000, seed=7)
        (xb, yb), = _batches(again)  # another seed, the same images, in order
        np.testing.assert_array_equal(yb, yv)
        np.testing.assert_allclose(_unnormalise(xb, data.dataset_info(spec)), xv / 255.0,
                                   atol=1e-5)
    # A folder's own val/ split is the validation split; carving another is refused.
    (tmp_path / "imgs" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "val" / "cat" / "v.jpg").write_bytes(cifar_jpegs[("test", "cat")][1])
    spec = f"folder:{tmp_path / 'imgs'}"
    xv, yv = data.load_arrays(spec, "validation")
    np.testing.assert_array_equal(xv[0], _decode(cifar_jpegs[("test", "cat")][1]))
    assert yv.tolist() == [1] and data.dataset_info(spec).validation_size == 1
    with pytest.raises(ValueError, match="has its own validation split"):
        data.load_arrays(spec, "train", validation=0.1)


def test_statistics_come_from_the_training_split_only(tmp_path, cifar_jpegs, monkeypatch):
    monkeypatch.setenv("TFQKD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    _write_folder(root, cifar_jpegs)
    white = tf.io.encode_png(np.full((32, 32, 3), 255, np.uint8)).numpy()
    for i in range(20):  # a test split far brighter than the training one
        (root / "test" / "cat" / f"w{i}.png").write_bytes(white)
    spec = f"folder:{root}"
    x, _ = data.load_arrays(spec, "train")
    pixels = x.astype(np.float64) / 255.0
    info = data.dataset_info(spec)
    np.testing.assert_allclose(info.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(info.std, pixels.std(axis=(0, 1, 2)), rtol=1e-6)
    stats = list((tmp_path / "cache").glob("*-stats-*.json"))
    assert len(stats) == 1  # cached beside the arrays
    # At another size, statistics of the resized training images.
    xs, _ = data.load_arrays(spec, "train", image_size=16)
    np.testing.assert_allclose(data.dataset_info(spec, image_size=16).mean,
                               (xs.astype(np.float64) / 255).mean(axis=(0, 1, 2)), rtol=1e-9)


def test_applications_preprocess_input_and_callable_normalization(tmp_path, cifar_jpegs):
    _write_folder(tmp_path, cifar_jpegs)
    spec = f"folder:{tmp_path}"
    x, _ = data.load_arrays(spec, "test")
    (xb, _), = _batches(data.load_dataset(spec, "test", normalization="imagenet:mobilenet_v2"))
    np.testing.assert_allclose(xb, x / 127.5 - 1.0, atol=1e-5)  # MobileNetV2's own scaling
    (xr, _), = _batches(data.load_dataset(spec, "test", normalization="imagenet:resnet50"))
    bgr = x[..., ::-1].astype(np.float32) - np.array([103.939, 116.779, 123.68], np.float32)
    np.testing.assert_allclose(xr, bgr, atol=1e-3)  # caffe style: BGR, ImageNet means
    (xc, _), = _batches(data.load_dataset(spec, "test", normalization=lambda p: p - 100.0))
    np.testing.assert_allclose(xc, x - 100.0, atol=1e-4)


def test_builtin_image_size_resizes_arrays_and_batches_alike():
    x, y = data.load_arrays("digits", "test", image_size=(12, 10))
    x8, y8 = data.load_arrays("digits", "test")
    np.testing.assert_array_equal(x, _resized(x8, (12, 10)))
    np.testing.assert_array_equal(y, y8)
    info = data.dataset_info("digits", image_size=(12, 10))
    (xb, yb), = _batches(data.load_dataset("digits", "test", image_size=(12, 10),
                                           batch_size=360))
    assert info.input_shape == (12, 10, 1) and xb.shape == (360, 12, 10, 1)
    np.testing.assert_allclose(_unnormalise(xb, info), x / 255.0, atol=1e-5)


def _npz(path, **arrays):
    base = dict(x_train=np.zeros((6, 4, 4, 3), np.uint8), y_train=np.array([0, 1, 2, 0, 1, 2]),
                x_test=np.zeros((3, 4, 4, 3), np.uint8), y_test=np.array([2, 1, 0]))
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return f"npz:{path}"


def test_npz_source_arrays_class_names_and_validation(tmp_path, cifar_jpegs):
    xtr = np.stack([_decode(b) for b in cifar_jpegs[("train", "cat")]])
    xte = np.stack([_decode(b) for b in cifar_jpegs[("test", "cat")]])
    spec = _npz(tmp_path / "d.npz", x_train=xtr, y_train=np.array([0, 1, 0, 1, 0]), x_test=xte,
                y_test=np.array([[1], [0]]), x_val=xte[:1], y_val=np.array([1]),
                class_names=np.array(["cat", "not_cat"]))
    info = data.dataset_info(spec)
    assert info.class_names == ("cat", "not_cat") and info.validation_size == 1
    assert info.input_shape == (32, 32, 3) and (info.train_size, info.test_size) == (5, 2)
    np.testing.assert_allclose(info.mean, (xtr / 255.0).mean(axis=(0, 1, 2)), rtol=1e-9)
    x, y = data.load_arrays(spec, "test")
    np.testing.assert_array_equal(x, xte)
    np.testing.assert_array_equal(y, [1, 0])
    np.testing.assert_array_equal(data.load_arrays(spec, "validation")[0], xte[:1])
    # Grey (N, H, W) images and no class names: classes 0..max(y_train).
    grey = _npz(tmp_path / "g.npz", x_train=np.zeros((6, 5, 5), np.uint8),
                x_test=np.zeros((3, 5, 5), np.uint8))
    info = data.dataset_info(grey)
    assert info.input_shape == (5, 5, 1) and info.class_names == ("0", "1", "2")


def test_random_bytes_npz_is_refused_without_pickle_advice(tmp_path):
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(ValueError) as e:
        data.load_arrays(f"npz:{path}", "train")
    assert str(path) in str(e.value) and "not a .npz archive" in str(e.value)
    assert "pickle" not in str(e.value).lower()
    with pytest.raises(ValueError) as e:  # the same for a built-in set's .npz
        data.load_arrays("cifar10", "train", data_dir=path)
    assert "not a .npz archive" in str(e.value) and "pickle" not in str(e.value).lower()
    # An object array (pickled) is refused as unsafe, never unpickled.
    spec = _npz(tmp_path / "obj.npz", class_names=np.array(["a", {"b": 1}, "c"], dtype=object))
    with pytest.raises(ValueError, match=r"'class_names' holds Python objects .* never loads"):
        data.load_arrays(spec, "train")
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes((tmp_path / "obj.npz").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut.npz is a damaged .npz archive"):
        data.load_arrays(f"npz:{truncated}", "train")


@pytest.mark.parametrize("change, match", [
    (dict(y_test=np.array([2, 5, 0])), r"y_test has labels in \[0, 5\]: label 5 \(index 1, one "
                                       r"of 1 out of range\) is not one of the 3 classes 0\.\.2 "
                                       r"\(one more than y_train's largest label, 2"),
    (dict(y_train=np.array([0, 1, 2, 0, 1, 3]), class_names=np.array(["a", "b", "c"])),
     r"y_train has labels in \[0, 3\]: label 3 .*3 classes 0\.\.2 \(the 3 entries of its "
     r"class_names array\)"),
    (dict(y_train=np.array([0, -1, 2, 0, 1, 2])), r"label -1 \(index 1"),
    (dict(y_train=np.eye(3)[[0, 1, 2, 0, 1, 2]]), r"looks one-hot: .*argmax"),
    (dict(x_test=np.zeros((3, 4, 4, 3), np.float32)), r"x_test has dtype float32, expected uint8"),
    (dict(x_test=np.zeros((3, 5, 5, 3), np.uint8)), r"differ in shape"),
    (dict(x_test=None, y_test=None), r"lacks x_test and y_test"),
])
def test_npz_bad_contents_name_the_file_split_and_label(tmp_path, change, match):
    spec = _npz(tmp_path / "bad.npz", **change)
    with pytest.raises(ValueError, match=match) as e:
        data.dataset_info(spec)
    assert str(tmp_path / "bad.npz") in str(e.value)


def test_tfds_spec_reads_a_data_set_prepared_offline(tmp_path, cifar_jpegs):
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict({
        "picture": tfds.features.Image(shape=(None, None, 3)),
        "kind": tfds.features.ClassLabel(names=["cat", "truck"]),
        "note": tfds.features.Text(),
    })
    raw = {s: [(_decode(b), 0) for b in cifar_jpegs[(s, "cat")]]
           + [(_decode(b), 1) for b in cifar_jpegs[(s, "truck")]] for s in ("train", "test")}
    split_data = {s: [(i, {"picture": img, "kind": k, "note": "x"})
                      for i, (img, k) in enumerate(items)] for s, items in raw.items()}
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_cifar_shapes", version="1.0.0", features=features, split_datasets=split_data,
        data_dir=str(tmp_path / "tfds"), disable_shuffling=True)
    spec = "tfds:tiny_cifar_shapes"
    info = data.dataset_info(spec, data_dir=tmp_path / "tfds")
    assert info.class_names == ("cat", "truck") and (info.train_size, info.test_size) == (10, 4)
    x, y = data.load_arrays(spec, "test", data_dir=tmp_path / "tfds")
    np.testing.assert_array_equal(x, np.stack([img for img, _ in raw["test"]]))  # PNG: lossless
    np.testing.assert_array_equal(y, [k for _, k in raw["test"]])
    x, _ = data.load_arrays("tfds:tiny_cifar_shapes:1.0.0", "train", data_dir=tmp_path / "tfds",
                            image_size=16)
    assert x.shape == (10, 16, 16, 3)
    # Not prepared where it is looked for: a clear error, and no download attempted.
    with pytest.raises(data.DataNotFoundError, match=r"tfds:tiny_cifar_shapes.*download=True"):
        data.load_arrays(spec, "train", data_dir=tmp_path / "empty")
    with pytest.raises(data.DataNotFoundError, match=r"'mnist' is not prepared in .*empty.*"
                                                     r"does not download"):
        data.load_arrays("tfds:mnist", "train", data_dir=tmp_path / "empty")


def test_the_tools_evaluation_images_span_the_classes_of_a_class_sorted_folder(tmp_path,
                                                                               cifar_jpegs):
    """export_tflite --verify and evaluate_tflite --num_eval check the first images of a split;
    a folder lists them class by class, so those must come from a seeded shuffle."""
    from recipes import common

    _write_folder(tmp_path / "imgs", cifar_jpegs)
    spec = f"folder:{tmp_path / 'imgs'}"
    sorted_labels = data.load_arrays(spec, "train")[1]
    assert list(sorted_labels) == [0] * 5 + [1] * 5 + [2] * 5  # the folder's own order

    def labels(num_eval):
        split = common.load_evaluation_split(spec, "train", {}, batch_size=5, num_eval=num_eval)
        return np.concatenate([y.numpy() for _, y in split])

    first = labels(num_eval=5)
    # A permutation of all 15 images, the same one every call, whose first 5 are not one class.
    assert sorted(first) == sorted(sorted_labels)
    np.testing.assert_array_equal(labels(num_eval=5), first)
    assert len(set(first[:5])) > 1, first
    # Every image, in the folder's order, when the whole split is evaluated.
    np.testing.assert_array_equal(labels(num_eval=None), sorted_labels)


def test_recipe_runs_on_an_image_folder(tmp_path, cifar_jpegs):
    from conftest import REPO, run_script, subprocess_env

    _write_folder(tmp_path / "imgs", cifar_jpegs, sizes=[(40, 40)])
    out = tmp_path / "run"
    env = subprocess_env(PYTHONPATH=str(REPO), TFQKD_CACHE_DIR=str(tmp_path / "cache"))
    args = ["--preset=smoke", f"--dataset=folder:{tmp_path / 'imgs'}", "--image_size=24",
            "--subset=0", "--test_subset=0", "--batch_size=5", "--epochs=1",
            f"--output_dir={out}"]
    run_script(REPO / "recipes" / "train_teacher.py", *args, env=env)
    res = json.loads((out / "results.json").read_text())
    assert res["flags"]["dataset"] == f"folder:{tmp_path / 'imgs'}"
    assert res["num_train"] == 15 and res["num_test"] == 6  # 3 batches of 5; every test image
    from recipes import common

    model = common.load_model(str(out))
    assert model.input_shape == (None, 24, 24, 3) and model.output_shape == (None, 3)
    # The tools feed the model its own input size: no --image_size needed after training with it.
    tflite = tmp_path / "teacher.tflite"
    exported = run_script(REPO / "tools" / "export_tflite.py", f"--model={out}",
                          f"--output={tflite}", "--mode=int8", "--num_calibration=15",
                          f"--dataset=folder:{tmp_path / 'imgs'}", "--verify", "--num_eval=6",
                          env=env)
    report = json.loads(exported.stdout.strip().splitlines()[-1])["report"]
    # Seeds 0-7 of this run: 6/6 agree every time, max |logit diff| 0.022-0.058, while some
    # images are near-ties (top-2 margins down to 0.002): one flip is allowed, the logits must match.
    assert report["num_examples"] == 6 and report["top1_agreement"] >= 5 / 6
    assert report["max_logit_diff"] < 0.15, report
    evaluated = run_script(REPO / "tools" / "evaluate_tflite.py", f"--tflite={tflite}",
                           f"--model={out}", f"--dataset=folder:{tmp_path / 'imgs'}", env=env)
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["num_examples"] == 6
