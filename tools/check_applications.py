"""Check: Keras Applications models WITH their softmax heads through quantize -> distil -> int8.

For each family: the float model (``weights=None``, 10 classes, ``--image_size`` input, smallest
``alpha``) with ``classifier_activation="softmax"`` (the Applications default) is first trained
a little on CIFAR-10 as the teacher; its QAT copy (``quantize_model``) is then distilled from
it, saved and loaded under ``tfqkd.quantize_scope``, exported with ``export_tflite(mode=...)``
and compared with :func:`tfqkd.export.verify_tflite` on CIFAR-10 test images (real images,
resized to ``--image_size``). The softmax stays in the student and in the file (an int8 SOFTMAX
on TFLite's 1/256 grid); distillation runs on the logits of a softmax-free view of both models
(``keras.Model(m.input, <softmax input>)``, the same weights).

The last line is one JSON object: ``{"families": {family: {"ok", "agreement", "keras_top1",
"tflite_top1", "max_prob_diff", "file_bytes", "seconds", "error"}}, ...}``.

Example:
    CUDA_VISIBLE_DEVICES= python tools/check_applications.py --families=mobilenet_v2 \\
        --data_dir=../shared/data --train_steps=30 --num_test=500
"""

from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("families", "all", "Comma-separated families (see FAMILIES) or 'all'.")
flags.DEFINE_string("data_dir", "../shared/data", "Where the offline CIFAR-10 archive is.")
flags.DEFINE_integer("image_size", 32, "Input size (CIFAR images are resized to it).")
flags.DEFINE_integer("weight_bits", 8, "Student weight bits.")
flags.DEFINE_integer("activation_bits", 8, "Student activation bits.")
flags.DEFINE_bool("per_channel", True, "Per-channel weight steps.")
flags.DEFINE_integer("teacher_steps", 100, "Teacher training steps (batch 64).")
flags.DEFINE_integer("train_steps", 100, "Distillation steps (batch 64).")
flags.DEFINE_integer("num_test", 500, "CIFAR-10 test images for the parity check.")
flags.DEFINE_string("mode", "int8", "Export mode: int8 or int4.")
flags.DEFINE_integer("seed", 0, "Seed.")

#: family -> (builder name in keras.applications, keyword arguments: the smallest width).
FAMILIES = {
    "mobilenet": ("MobileNet", {"alpha": 0.25}),
    "mobilenet_v2": ("MobileNetV2", {"alpha": 0.35}),
    "mobilenet_v3_small": ("MobileNetV3Small", {"alpha": 0.75}),
    "mobilenet_v3_large": ("MobileNetV3Large", {"alpha": 0.75}),
    "efficientnet_b0": ("EfficientNetB0", {}),
    "efficientnet_v2_b0": ("EfficientNetV2B0", {}),
    "resnet50": ("ResNet50", {}),
    "resnet50_v2": ("ResNet50V2", {}),
    "densenet121": ("DenseNet121", {}),
    "nasnet_mobile": ("NASNetMobile", {}),
}


def build(family: str, image_size: int, alpha=None, classifier_activation="softmax"):
    """``keras.applications.<family>(weights=None, classes=10)`` at ``image_size``."""
    from tfqkd._keras import keras

    name, kwargs = FAMILIES[family]
    kwargs = dict(kwargs)
    if alpha is not None and "alpha" in kwargs:
        kwargs["alpha"] = alpha
    return getattr(keras.applications, name)(
        weights=None, classes=10, input_shape=(image_size, image_size, 3),
        classifier_activation=classifier_activation, **kwargs)


def logits_view(model):
    """The same model (shared weights) ending before its softmax: KD needs logits."""
    from tfqkd._keras import keras

    last = model.layers[-1]
    inner = getattr(last, "layer", last)  # a tfmot wrapper holds the Dense
    if getattr(inner, "activation", None) is not None and \
            getattr(inner.activation, "__name__", "") == "softmax":
        if isinstance(inner, keras.layers.Activation):
            return keras.Model(model.input, last.input)
        raise ValueError(f"{model.name}: the softmax sits inside layer {inner.name!r}; use "
                         "tfqkd.models.logits_model.")
    return model


def _check(family, data, tmp):
    import numpy as np

    import tfqkd
    from tfqkd import export
    from tfqkd._keras import keras
    from tfqkd.quantize import quantize_model

    xt, yt, xv, yv = data
    teacher = build(family, FLAGS.image_size)
    # Dense softmax heads (MobileNetV2, EfficientNet, ResNet, DenseNet): train the logits by
    # splitting Dense(softmax) into Dense + Activation (same weights, same function).
    teacher = split_softmax(teacher)
    teacher.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy())
    teacher.fit(xt, yt, batch_size=64, epochs=max(1, FLAGS.teacher_steps * 64 // len(xt)),
                verbose=0)
    q = quantize_model(teacher, weight_bits=FLAGS.weight_bits,
                       activation_bits=FLAGS.activation_bits, per_channel=FLAGS.per_channel)
    d = tfqkd.Distiller(logits_view(q), logits_view(teacher), temperature=2.0, coefficient=0.5)
    d.compile(keras.optimizers.Adam(1e-4))
    d.fit(xt, yt, batch_size=64, epochs=max(1, FLAGS.train_steps * 64 // len(xt)), verbose=0)
    path = os.path.join(tmp, f"{family}.h5")
    q.save(path)
    with tfqkd.quantize_scope():
        q = keras.models.load_model(path, compile=False)
    out = os.path.join(tmp, f"{family}_{FLAGS.mode}.tflite")
    export.export_tflite(q, out, xt[:200], mode=FLAGS.mode)
    r = export.verify_tflite(out, q, (xv, yv))
    return {"ok": r.top1_agreement >= 0.995, "agreement": r.top1_agreement,
            "keras_top1": r.keras_top1, "tflite_top1": r.tflite_top1,
            "max_prob_diff": r.max_logit_diff, "file_bytes": r.file_bytes,
            "softmax_output": bool(np.allclose(q(xv[:4]).numpy().sum(-1), 1.0, atol=1e-3))}


def split_softmax(model):
    """``model`` with a ``Dense(activation="softmax")`` head as Dense + Activation("softmax")."""
    from tfqkd._keras import keras

    last = model.layers[-1]
    if not isinstance(last, keras.layers.Dense) or \
            getattr(last.activation, "__name__", "") != "softmax":
        return model
    config = last.get_config()
    config["activation"] = "linear"
    dense = keras.layers.Dense.from_config(config)
    logits = dense(last.input)
    dense.set_weights(last.get_weights())
    out = keras.layers.Activation("softmax", name="predictions_softmax")(logits)
    return keras.Model(model.input, out, name=model.name)


def main(argv):
    del argv
    import numpy as np

    import tfqkd
    from tfqkd._keras import keras

    keras.utils.set_random_seed(FLAGS.seed)
    names = list(FAMILIES) if FLAGS.families == "all" else FLAGS.families.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"error: unknown families {unknown}; choose from {sorted(FAMILIES)}")
    n_train = max(640, min(6400, FLAGS.train_steps * 64))
    train = tfqkd.data.load_dataset("cifar10", "train", data_dir=FLAGS.data_dir,
                                    batch_size=n_train, subset=n_train, augment=False,
                                    shuffle=False, image_size=FLAGS.image_size)
    test = tfqkd.data.load_dataset("cifar10", "test", data_dir=FLAGS.data_dir,
                                   batch_size=FLAGS.num_test, subset=FLAGS.num_test,
                                   augment=False, shuffle=False, image_size=FLAGS.image_size)
    (xt, yt), = train.take(1).as_numpy_iterator()
    (xv, yv), = test.take(1).as_numpy_iterator()
    data = (xt, yt.astype("int32"), xv, yv.astype("int32"))
    results = {}
    tmp = tempfile.mkdtemp(prefix="tfqkd_apps_")
    for family in names:
        t0 = time.time()
        try:
            results[family] = _check(family, data, tmp)
        except Exception as err:  # noqa: BLE001 (report every family)
            results[family] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:400]}"}
        results[family]["seconds"] = round(time.time() - t0, 1)
        print(family, json.dumps(results[family]), flush=True)
    print(json.dumps({"families": results, "mode": FLAGS.mode, "weight_bits": FLAGS.weight_bits,
                      "activation_bits": FLAGS.activation_bits, "image_size": FLAGS.image_size,
                      "num_test": int(len(yv)), "target_agreement": 0.995,
                      "all_ok": all(r["ok"] for r in results.values())}))


if __name__ == "__main__":
    app.run(main)
