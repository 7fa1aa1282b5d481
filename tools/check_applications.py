"""Check: Keras Applications models WITH their softmax heads through quantize -> distil -> int8.

For each family: the float model (``tfqkd.models.get``: ``weights=None``, 10 classes,
``--image_size`` input, smallest ``alpha``) ends in the softmax Keras builds. It is trained a
little on CIFAR-10 as the teacher (batch-norm statistics then re-estimated), its QAT copy
(``quantize_model``) is distilled from it by ``tfqkd.Distiller`` (which trains both through their
logits), saved and loaded under ``tfqkd.quantize_scope``, exported with
``export_tflite(mode=...)`` and compared with :func:`tfqkd.export.verify_tflite` on CIFAR-10 test
images (real images, resized to ``--image_size``, normalised with the family's own
``preprocess_input``). The softmax stays in the student and in the file (an int8 SOFTMAX on
TFLite's 1/256 grid).

The last line is one JSON object: ``{"families": {family: {"ok", "agreement", "keras_top1",
"teacher_top1", "tflite_top1", "max_prob_diff", "relative_output_error", "file_bytes",
"median_top2_margin", "seconds", "error"}}, ...}``.

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
flags.DEFINE_integer("train_images", 0, "CIFAR-10 training images the teacher and student see "
                     "(0: 64 per step of the longer stage, between 640 and 6,400). A teacher "
                     "with real margins needs many more (e.g. 20,000 and 3,000 steps).")
flags.DEFINE_string("mode", "int8", "Export mode: int8 or int4.")
flags.DEFINE_bool("align_student", True, "export_tflite(align_student=...): the student takes the "
                  "file's int32-rounded biases before the parity check (docs/export.md).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_float("target_agreement", 0.995, "Top-1 agreement a family must reach.")

#: The families checked ("all"); each at its smallest width (tfqkd.models.smallest_alpha).
FAMILIES = ("mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
            "efficientnet_b0", "efficientnet_v2_b0", "resnet50", "resnet50_v2", "densenet121",
            "nasnet_mobile")


def _batches(x, y, batch_size=64):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def _check(family, data, tmp):
    import numpy as np

    import tfqkd
    from tfqkd import export, models
    from tfqkd._keras import keras
    from tfqkd.batch_norm import recalibrate_batch_norm
    from tfqkd.quantize import quantize_model

    xt, yt, xv, yv = data
    size = FLAGS.image_size
    # The Applications model as Keras builds it: softmax head on.
    teacher = models.get(family, 10, (size, size, 3), alpha=models.smallest_alpha(family))
    teacher.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(),
                    metrics=["accuracy"])
    teacher.fit(xt, yt, batch_size=64, epochs=max(1, FLAGS.teacher_steps * 64 // len(xt)),
                verbose=0)
    # A few hundred steps leave the moving statistics far from the data (momentum 0.99).
    recalibrate_batch_norm(teacher, _batches(xt, yt), batches=20)
    teacher_top1 = float(np.mean(np.argmax(teacher.predict(xv, verbose=0), -1) == yv))
    q = quantize_model(teacher, weight_bits=FLAGS.weight_bits,
                       activation_bits=FLAGS.activation_bits, per_channel=FLAGS.per_channel)
    # Both end in a softmax: the Distiller trains the student through its logits.
    d = tfqkd.Distiller(q, teacher, temperature=2.0, coefficient=0.5)
    d.compile(keras.optimizers.Adam(1e-4))
    d.fit(xt, yt, batch_size=64, epochs=max(1, FLAGS.train_steps * 64 // len(xt)), verbose=0)
    recalibrate_batch_norm(q, _batches(xt, yt), batches=20)
    path = os.path.join(tmp, f"{family}.h5")
    q.save(path)
    with tfqkd.quantize_scope():
        q = keras.models.load_model(path, compile=False)
    out = os.path.join(tmp, f"{family}_{FLAGS.mode}.tflite")
    info = export.export_tflite(q, out, xt[:200], mode=FLAGS.mode,
                                align_student=FLAGS.align_student)
    r = export.verify_tflite(out, q, (xv, yv))
    probs = q(xv[:64], training=False).numpy()
    top2 = np.sort(probs, -1)[:, -2:]
    return {"ok": r.top1_agreement >= FLAGS.target_agreement, "agreement": r.top1_agreement,
            "teacher_top1": teacher_top1, "keras_top1": r.keras_top1,
            "tflite_top1": r.tflite_top1, "max_prob_diff": r.max_logit_diff,
            "relative_output_error": r.relative_output_error,
            "tied_disagreements": r.tied_disagreements,
            "file_bytes": r.file_bytes, "align_student": FLAGS.align_student,
            "aligned_biases": info["aligned_biases"], "aligned_ranges": info["aligned_ranges"],
            # The student rounds its probabilities on the head's grid (int16 steps of 1/32768 by
            # default, 1/256 at 8 bits): a sum within 10 half-steps of 1 either way.
            "softmax_output": bool(np.allclose(probs.sum(-1), 1.0, atol=0.02)),
            "softmax_head_bits": info["softmax_head_bits"],
            "median_top2_margin": float(np.median(top2[:, 1] - top2[:, 0]))}


def main(argv):
    del argv
    import tfqkd
    from tfqkd._keras import keras

    keras.utils.set_random_seed(FLAGS.seed)
    names = list(FAMILIES) if FLAGS.families == "all" else FLAGS.families.split(",")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"error: unknown families {unknown}; choose from {sorted(FAMILIES)}")
    n_train = FLAGS.train_images or max(640, min(6400, max(FLAGS.train_steps,
                                                            FLAGS.teacher_steps) * 64))

    def data(family):
        import numpy as np

        # Each family gets the input range it expects (its own preprocess_input).
        kw = dict(data_dir=FLAGS.data_dir, augment=False, shuffle=False,
                  image_size=FLAGS.image_size, normalization=f"imagenet:{family}")
        train = tfqkd.data.load_dataset("cifar10", "train", batch_size=n_train, subset=n_train,
                                        **kw)
        test = tfqkd.data.load_dataset("cifar10", "test", batch_size=FLAGS.num_test,
                                       subset=FLAGS.num_test, **kw)
        (xt, yt), = train.take(1).as_numpy_iterator()
        (xv, yv), = test.take(1).as_numpy_iterator()
        # Unshuffled, the subset comes class by class: the batch-norm re-estimation's first
        # batches and the first calibration images would all be airplanes (until 2026-12-06
        # they were). One seeded permutation mixes them; training shuffles on its own.
        order = np.random.default_rng(FLAGS.seed).permutation(len(xt))
        return xt[order], yt[order].astype("int32"), xv, yv.astype("int32")

    results = {}
    tmp = tempfile.mkdtemp(prefix="tfqkd_apps_")
    for family in names:
        t0 = time.time()
        try:
            results[family] = _check(family, data(family), tmp)
        except Exception as err:  # noqa: BLE001 (report every family)
            results[family] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:400]}"}
        results[family]["seconds"] = round(time.time() - t0, 1)
        print(family, json.dumps(results[family]), flush=True)
    print(json.dumps({"families": results, "mode": FLAGS.mode, "weight_bits": FLAGS.weight_bits,
                      "activation_bits": FLAGS.activation_bits, "image_size": FLAGS.image_size,
                      "num_test": FLAGS.num_test, "target_agreement": FLAGS.target_agreement,
                      "all_ok": all(r["ok"] for r in results.values())}))


if __name__ == "__main__":
    app.run(main)
