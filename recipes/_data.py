"""A run's data: :func:`load_data` (train/test pipelines of ``--dataset`` as :class:`Data`), the
``tfqkd.data`` arguments a run shares (:func:`data_source_kwargs`, :func:`data_kwargs_for_model`),
a tool's evaluation images (:func:`load_evaluation_split`), the input normalisation a model
expects (:func:`input_normalization`, ``RAW_PIXELS``) and telling a model name from a saved
model's path (:func:`is_model_name`). Part of :mod:`recipes.common`.

Example:
    >>> from recipes._options import Config
    >>> data_source_kwargs(Config(data_dir=None))
    {'data_dir': None, 'image_size': None, 'skip_corrupt': False}
    >>> is_model_name("mobilenet_v2"), is_model_name("runs/teacher")
    (True, False)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional

from recipes._options import Config

from tfqkd._keras import keras, tf
from tfqkd.training import load_model

__all__ = ["Data", "load_data", "data_source_kwargs", "data_kwargs_for_model",
           "load_evaluation_split", "RAW_PIXELS", "input_normalization", "is_model_name"]

# --------------------------------------------------------------------------------------------
# Data, models, optimizers
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
    """Train/test pipelines of a run plus their facts."""

    train: tf.data.Dataset
    test: tf.data.Dataset
    info: Any
    steps_per_epoch: int
    num_train: int
    num_test: int
    #: Held-out training images (``load_data(validation=f)``), else None.
    validation: Optional[tf.data.Dataset] = None


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n < 0:
        n = sum(1 for _ in ds)
    return n


def data_source_kwargs(cfg: Config) -> Dict[str, Any]:
    """Where ``cfg.dataset`` is read from and how: the arguments every ``tfqkd.data`` call of a
    run shares (``data_dir``, ``image_size``, ``skip_corrupt``)."""
    image_size = getattr(cfg, "image_size", None)
    return dict(data_dir=cfg.data_dir, image_size=image_size or None,
                skip_corrupt=bool(getattr(cfg, "skip_corrupt_images", False)))


def data_kwargs_for_model(model: keras.Model, *, data_dir: Optional[str] = None,
                          image_size: Optional[int] = None,
                          skip_corrupt: bool = False) -> Dict[str, Any]:
    """``tfqkd.data`` arguments that feed ``model`` its own input size and normalisation (raw
    pixels for a model that preprocesses itself, see :func:`input_normalization`; for the tools).

    ``image_size`` wins when given; else the images are brought to the model's input height and
    width (a no-op where they already have it; a model trained with ``--image_size`` gets the
    size it was trained at).
    """
    kw: Dict[str, Any] = dict(data_dir=data_dir, skip_corrupt=bool(skip_corrupt))
    wanted = tuple(model.input_shape[1:3])
    if image_size:
        kw["image_size"] = int(image_size)
    elif None not in wanted:
        kw["image_size"] = tuple(int(d) for d in wanted)
    from tfqkd import models

    if models.expects_raw_pixels(model):  # the recipes trained it on raw pixels too
        kw["normalization"] = RAW_PIXELS
    return kw


def load_evaluation_split(dataset: str, split: str, data_kw: Mapping[str, Any], *,
                          batch_size: int, num_eval: Optional[int]) -> tf.data.Dataset:
    """``split`` of ``dataset`` for a tool's parity or accuracy check on its first ``num_eval``
    images (every image when ``None``); ``data_kw`` from :func:`data_kwargs_for_model`.

    With ``num_eval``, the split is shuffled first, seeded: a folder or archive lists its images
    class by class, so the first images of an unshuffled split can all be one class (CIFAR-10's
    first 1,000 test images are airplanes). The fixed seed lets two tools check the same images.
    """
    from tfqkd import data as tdata

    return tdata.load_dataset(dataset, split, **data_kw, batch_size=batch_size, augment=False,
                              shuffle=num_eval is not None, seed=0)


def load_data(cfg: Config, *, augment: Optional[bool] = None,
              validation: Optional[float] = None) -> Data:
    """Loads ``cfg.dataset`` train/test pipelines via ``tfqkd.data.load_dataset``.

    Training batches drop the remainder (stable batch-norm statistics and equal replica shares);
    test batches keep every image. ``validation=f`` holds out that fraction of the training
    images, class by class (``tfqkd.data.load_dataset(validation=f)``), as ``Data.validation``
    (every held-out image, also with ``cfg.subset``, which then picks among the rest; no
    augmentation) and leaves them out of ``train``.
    """
    from tfqkd import data as tdata

    info = tdata.dataset_info(cfg.dataset, **data_source_kwargs(cfg))
    common_kw = _pipeline_kwargs(cfg)
    train = tdata.load_dataset(cfg.dataset, "train", augment=augment, subset=cfg.subset,
                               drop_remainder=True, validation=validation, **common_kw)
    held_out = None
    if validation is not None:
        # Every held-out image: ``subset`` chooses among the images left for training.
        held_out = tdata.load_dataset(cfg.dataset, "validation", validation=validation,
                                      augment=False, shuffle=False, **common_kw)
    test = tdata.load_dataset(cfg.dataset, "test", subset=getattr(cfg, "test_subset", None),
                              **common_kw)
    steps = _count(train)
    if steps == 0:
        raise ValueError(
            f"The training set of {cfg.dataset!r} (subset={cfg.subset}) has fewer images than "
            f"one batch (batch_size={cfg.batch_size}); lower --batch_size or raise --subset.")
    num_train = steps * cfg.batch_size
    num_test = sum(int(y.shape[0]) for _, y in test)
    return Data(train, test, info, steps, num_train, num_test, held_out)


def _pipeline_kwargs(cfg: Config) -> Dict[str, Any]:
    """``tfqkd.data.load_dataset`` arguments every split of a run shares."""
    return dict(batch_size=cfg.batch_size, seed=cfg.seed,
                subset_seed=getattr(cfg, "subset_seed", None),
                normalization=input_normalization(cfg), **data_source_kwargs(cfg))


def clean_training_set(cfg: Config, *, validation: Optional[float] = None) -> tf.data.Dataset:
    """The images a run trained on (the same ``subset``, and without the ``validation``
    hold-out), every one, without augmentation or shuffling: what training accuracy is measured
    on (the paper's over-fitting analysis compares it with test accuracy)."""
    from tfqkd import data as tdata

    return tdata.load_dataset(cfg.dataset, "train", augment=False, shuffle=False,
                              subset=cfg.subset, validation=validation, **_pipeline_kwargs(cfg))


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


#: The data normalisation of a model that preprocesses itself: raw 0..255 pixels (an
#: ``imagenet:<family>`` whose preprocess_input is the identity).
RAW_PIXELS = "imagenet:efficientnet"


def input_normalization(cfg: Config) -> Optional[str]:
    """How the recipes normalise images for the model they train (``normalization=`` of
    ``tfqkd.data.load_dataset``): raw 0..255 pixels for a model that preprocesses inside itself
    (EfficientNet/V2, MobileNetV3: ``tfqkd.models.expects_raw_pixels``), else the per-channel
    mean/std of the training split (``None``), as for the CIFAR ResNets: the recipes train from
    random weights, where the ImageNet preprocessing has no advantage, and one convention for
    every other family keeps teachers and students of different families comparable."""
    from tfqkd import models

    spec = getattr(cfg, "student", None) or getattr(cfg, "arch", None)
    if is_model_name(spec):
        return RAW_PIXELS if models.takes_raw_pixels(spec) else None
    if isinstance(spec, str) and os.path.exists(spec):
        return RAW_PIXELS if models.expects_raw_pixels(load_model(spec, what="--student")) \
            else None
    return None


def _info_get(info: Any, key: str) -> Any:
    return info[key] if isinstance(info, Mapping) else getattr(info, key)
