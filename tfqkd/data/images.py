"""Image files → ``uint8`` arrays, with one decoder (TensorFlow's) everywhere.

* :func:`collect_tree` lists the images of a ``<split>/<class>/<file>`` tree, in a folder or in a
  ``.tar`` / ``.tar.gz`` archive (read without extracting);
* :func:`decode_images` decodes them with ``tf.io.decode_image`` (JPEG, PNG; also BMP, GIF's first
  frame, WebP; decoders disagree by a few grey levels, so tfqkd never mixes them), to RGB (or grey
  when every image is grey), resized to ``image_size`` when given; a file that does not decode is
  reported by name;
* :func:`resize_uint8` is the one resize (bilinear, antialiased, rounded back to ``uint8``) used
  for files at decode time and for arrays in the pipelines, so both give the same pixels;
* :func:`report_corrupt` turns undecodable files into an error naming them, or, when skipping
  was asked for, into one warning with their count and the first few names.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import tarfile
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._keras import tf

__all__ = ["IMAGE_SUFFIXES", "ARCHIVE_SUFFIXES", "Item", "collect_tree", "decode_images",
           "resize_uint8", "report_corrupt", "is_archive"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
#: Folder names accepted for each split.
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "validation",
                 "validation": "validation"}
_SHOWN = 5  # names listed in a message
# Warnings already given in this process: a source loaded for its info, then for each split,
# warns once.
_WARNED: set = set()

#: ``(class folder name, file name relative to the root, bytes or path)`` of one image.
Item = Tuple[str, str, Union[bytes, str]]


def is_archive(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def collect_tree(path: pathlib.Path, splits: Sequence[str] = ("train", "validation", "test"),
                 ) -> Tuple[Dict[str, List[Item]], List[str]]:
    """The images of ``path/<split>/<class>/<file>`` (a folder or an archive of one).

    Returns ``({split: [items]}, ignored)``: ``ignored`` names the files directly in a split folder
    and the files and folders inside class folders that are not images tfqkd reads (hidden files
    aside), so that none is dropped silently.
    Archive members may sit below a common prefix (``cifar10/train/cat/1.jpg``).
    """
    files: Dict[str, List[Item]] = {s: [] for s in splits}
    ignored: List[str] = []
    if is_archive(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    parts = [p for p in member.name.split("/") if p not in ("", ".")]
                    if not member.isfile() or len(parts) < 3:
                        continue
                    split = SPLIT_FOLDERS.get(parts[-3])
                    if split not in files or parts[-1].startswith("."):
                        continue
                    if not _is_image(parts[-1]):
                        ignored.append(member.name)
                        continue
                    files[split].append((parts[-2], member.name, tar.extractfile(member).read()))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"Cannot read {path} as a tar archive: {e}") from e
        return files, ignored
    for folder in sorted(path.iterdir()) if path.is_dir() else []:
        split = SPLIT_FOLDERS.get(folder.name)
        if split not in files or not folder.is_dir():
            continue
        ignored += [str(f.relative_to(path)) for f in sorted(folder.iterdir())
                    if f.is_file() and not f.name.startswith(".")]  # images outside a class
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for f in sorted(class_dir.iterdir()):
                if f.name.startswith("."):
                    continue
                rel = str(f.relative_to(path))
                if f.is_file() and _is_image(f.name):
                    files[split].append((class_dir.name, rel, str(f)))
                else:
                    ignored.append(rel + ("/" if f.is_dir() else ""))
    return files, ignored


def resize_uint8(images: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """Bilinear, antialiased resize of ``uint8`` images (one or a batch), rounded to ``uint8``.

    Example:
        >>> x = np.full((2, 4, 4, 3), 200, np.uint8)
        >>> resize_uint8(x, (2, 3)).numpy()[0, :, :, 0].tolist()
        [[200, 200, 200], [200, 200, 200]]
    """
    out = tf.image.resize(tf.cast(images, tf.float32), tuple(size), method="bilinear",
                          antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _decode_rgb(blob: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """``(RGB uint8 image, native channel count)``; grey is replicated and alpha dropped, as
    ``tf.io.decode_image(..., channels=3)`` would."""
    img = tf.io.decode_image(blob, channels=0, expand_animations=False)
    n = tf.shape(img)[2]
    rgb = tf.cond(n >= 3, lambda: img[..., :3], lambda: tf.tile(img[..., :1], [1, 1, 3]))
    return rgb, n


def _decode_alone(payload: Union[bytes, str]) -> Tuple[Optional[Tuple[int, int]], str]:
    """``(size, "")`` of a file that decodes when decoded alone (eagerly), else ``(None, the
    decoder's own message)``."""
    try:
        blob = tf.io.read_file(payload) if isinstance(payload, str) else tf.constant(payload)
        return tuple(int(d) for d in _decode_rgb(blob)[0].shape[:2]), ""
    except (tf.errors.OpError, ValueError) as e:
        message = getattr(e, "message", str(e)).strip().splitlines()
        # "{{function_node ...}} Unknown image file format. ... [Op:DecodeImage] name:" -> the
        # decoder's sentence alone.
        text = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:.*$", "", message[0]) if message else ""
        return None, text or type(e).__name__


def decode_images(payloads: Sequence[Union[bytes, str]], names: Sequence[str], *, origin: str,
                  image_size: Optional[Tuple[int, int]] = None,
                  channels: Optional[int] = None,
                  ) -> Tuple[np.ndarray, np.ndarray, List[Tuple[str, str]]]:
    """Decodes images (bytes, or paths of files) into one ``uint8 (N, H, W, C)`` array.

    Args:
        payloads: Encoded images, or paths of image files.
        names: A name per image, for messages.
        origin: The source, for messages.
        image_size: ``(height, width)`` to resize every image to; ``None``: every image must
            already share one size (else a ``ValueError`` asking for ``image_size``).
        channels: 3 (RGB) or 1 (grey); ``None``: grey when every image is grey, else RGB.

    Returns:
        ``(images, kept, bad)``: ``kept`` are the indices of the decoded images (in order),
        ``bad`` the ``(name, reason)`` of the images that did not decode.
    """
    empty = np.zeros((0, 1, 1, channels or 3), np.uint8), np.zeros(0, np.int64)
    if not len(payloads):
        return empty + ([],)
    from_files = isinstance(payloads[0], str)
    target = None if image_size is None else tuple(int(s) for s in image_size)
    if target is None:
        # The first image that decodes sets the size every other must have.
        target = next(filter(None, (_decode_alone(p)[0] for p in payloads)), None)
    if target is None:  # nothing decodes: every file is bad
        return empty + ([(n, _decode_alone(p)[1]) for n, p in zip(names, payloads)],)
    h, w = target
    depth = 3 if channels is None else channels

    def decode(i, payload):
        blob = tf.io.read_file(payload) if from_files else payload
        if channels is None:
            img, n = _decode_rgb(blob)
        else:  # the decoder converts (grey <-> RGB, alpha dropped) itself
            img, n = tf.io.decode_image(blob, channels=channels, expand_animations=False), depth
        if image_size is not None:
            same = tf.reduce_all(tf.shape(img)[:2] == target)
            img = tf.cond(same, lambda: img, lambda: resize_uint8(img, target))
        # A wrong-sized image fails here; like an undecodable one it is then missing from the
        # output, which names it exactly (decoding it alone tells which of the two it was).
        return i, tf.ensure_shape(img, (h, w, depth)), n

    # tf.constant converts a list of bytes 20x faster than from_tensor_slices does by itself.
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(payloads)), tf.constant(list(payloads))))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(1024)
    x = np.empty((len(payloads), h, w, depth), np.uint8)
    kept, native = [], []
    start = 0
    for idx, batch, n in ds.as_numpy_iterator():
        x[start:start + len(idx)] = batch
        start += len(idx)
        kept.append(idx)
        native.append(n)
    kept_idx = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    x = x[:start]
    bad, wrong = [], {}
    for i in np.setdiff1d(np.arange(len(payloads)), kept_idx):
        size, reason = _decode_alone(payloads[i])
        if size is None:
            bad.append((names[i], reason))
        else:
            wrong.setdefault(size, []).append(names[i])
    if wrong:
        count = sum(len(v) for v in wrong.values())
        listed = "; ".join(f"{hh}x{ww}: e.g. {files[0]}" for (hh, ww), files in wrong.items())
        raise ValueError(
            f"{origin}: the images do not all have one size ({count} of {len(payloads)} differ "
            f"from {h}x{w}, the size of {names[int(kept_idx[0])] if start else names[0]}; "
            f"{listed}). Pass image_size=(height, width) (recipes: --image_size=N) to resize "
            "them all to one size.")
    if channels is None and start and (np.concatenate(native) == 1).all():
        x = x[..., :1]
    return x, kept_idx, bad


def report_corrupt(bad: Sequence[str], origin: str, skip_corrupt: bool) -> None:
    """Raises (naming the files) for undecodable images, or warns once when skipping them.

    ``bad`` holds ``"<file>: <reason>"`` strings.
    """
    if not len(bad):
        return
    shown = "; ".join(bad[:_SHOWN]) + ("; ..." if len(bad) > _SHOWN else "")
    if not skip_corrupt:
        first = bad[0].split(": ", 1)[0]
        raise ValueError(
            f"{origin}: cannot decode the image {first} ({len(bad)} undecodable image"
            f"{'s' if len(bad) > 1 else ''} in all: {shown}). Replace or delete the file, or pass "
            "skip_corrupt=True (recipes: --skip_corrupt_images) to leave undecodable images out "
            "with a warning.")
    _warn_once(
        f"{origin}: skipped {len(bad)} undecodable image{'s' if len(bad) > 1 else ''} "
        f"(skip_corrupt=True): {shown}")


def ignored_warning(ignored: Sequence[str], origin: str) -> None:
    """One warning for the files that are not images of a class folder."""
    if ignored:
        shown = ", ".join(ignored[:_SHOWN]) + (", ..." if len(ignored) > _SHOWN else "")
        _warn_once(
            f"{origin}: ignored {len(ignored)} entr{'ies' if len(ignored) > 1 else 'y'} that "
            f"{'are' if len(ignored) > 1 else 'is'} not a {'/'.join(IMAGE_SUFFIXES)} image in a "
            f"<split>/<class>/ folder: {shown}")


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        # Attribute the warning to the first caller outside tfqkd.data (the user's line).
        package = os.path.dirname(os.path.abspath(__file__))
        frame, level = sys._getframe(0), 1
        while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
            frame, level = frame.f_back, level + 1
        warnings.warn(message, UserWarning, stacklevel=level)
