"""Accuracy of the Distiller's teacher inference copies (float32 / bfloat16) on real CIFAR-10 images.

Trains a WideResNet20xN teacher briefly on a class-balanced CIFAR-10 subset (or loads
``--teacher_weights``), then runs it over the test set three ways: the model itself
(``teacher(x, training=False)``, the reference), its batch-norm-folded float32 copy and its
bfloat16 copy (:class:`tfqkd.teacher_inference.InferenceTeacher`, what
``Distiller(teacher_dtype=...)`` runs). Per copy: top-1 accuracy, top-1 agreement with the
reference, max / mean |delta logit|, and at tau = 1 and 4 the max |delta p| and mean
KL(p_reference || p_copy) of the softened targets the student learns from. The last line of output
is one JSON object.

Example:
    CUDA_VISIBLE_DEVICES= python tools/check_teacher_dtype.py --data_dir=../shared/data \\
        --epochs=6 --subset=10000
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "CIFAR-10 source (default: $TFQKD_DATA_DIR).")
flags.DEFINE_string("teacher_weights", None, "Load these weights instead of training.")
flags.DEFINE_string("save_weights", None, "Save the trained teacher's weights here.")
flags.DEFINE_float("teacher_width", 2, "Teacher WideResNet20xN width.")
flags.DEFINE_integer("epochs", 6, "Teacher training epochs (SGD 0.1, momentum 0.9, cosine).")
flags.DEFINE_integer("subset", 10_000, "Class-balanced training images.")
flags.DEFINE_integer("seed", 0, "Seed.")


def _softmax(z, tau):
    import numpy as np

    z = z / tau
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def main(argv):
    del argv
    import numpy as np

    from tfqkd import data, models
    from tfqkd._keras import keras, tf
    from tfqkd.teacher_inference import InferenceTeacher, native_bfloat16

    tf.random.set_seed(FLAGS.seed)
    teacher = models.wide_resnet20(FLAGS.teacher_width, 10, seed=FLAGS.seed + 1)
    start = time.time()
    if FLAGS.teacher_weights:
        teacher.load_weights(FLAGS.teacher_weights)
    else:
        train = data.load_dataset("cifar10", "train", data_dir=FLAGS.data_dir, batch_size=128,
                                  subset=FLAGS.subset, seed=FLAGS.seed)
        steps = FLAGS.epochs * int(train.cardinality())
        teacher.compile(
            keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, steps), momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        teacher.fit(train, epochs=FLAGS.epochs, verbose=2)
        if FLAGS.save_weights:
            teacher.save_weights(FLAGS.save_weights)
    train_s = time.time() - start

    test = data.load_dataset("cifar10", "test", data_dir=FLAGS.data_dir, batch_size=500)
    runs = {"reference": tf.function(lambda x: teacher(x, training=False)),
            "folded_float32": tf.function(InferenceTeacher(teacher, "float32").__call__),
            "folded_bfloat16": tf.function(InferenceTeacher(teacher, "bfloat16").__call__)}
    outs = {k: [] for k in runs}
    labels = []
    for x, y in test:
        labels.append(y.numpy())
        for k, fn in runs.items():
            outs[k].append(fn(x).numpy().astype(np.float64))
    y = np.concatenate(labels)
    outs = {k: np.concatenate(v) for k, v in outs.items()}
    ref = outs["reference"]
    result = {"benchmark": "teacher_dtype", "teacher": teacher.name, "epochs": FLAGS.epochs,
              "subset": FLAGS.subset, "teacher_weights": FLAGS.teacher_weights,
              "train_seconds": round(train_s, 1), "test_images": int(len(y)),
              "native_bfloat16": native_bfloat16(), "reference_logit_std": float(ref.std())}
    for k, z in outs.items():
        row = {"top1": float((z.argmax(1) == y).mean()),
               "top1_agreement": float((z.argmax(1) == ref.argmax(1)).mean()),
               "max_abs_dlogit": float(np.abs(z - ref).max()),
               "mean_abs_dlogit": float(np.abs(z - ref).mean())}
        for tau in (1.0, 4.0):
            p, q = _softmax(ref, tau), _softmax(z, tau)
            row[f"max_abs_dp_tau{tau:g}"] = float(np.abs(p - q).max())
            row[f"mean_kl_tau{tau:g}"] = float((p * (np.log(p) - np.log(q))).sum(1).mean())
        result[k] = row
        print(f"{k}: top-1 {100 * row['top1']:.2f} %, agreement {100 * row['top1_agreement']:.2f} "
              f"%, max |dz| {row['max_abs_dlogit']:.3g}, KL(tau=4) {row['mean_kl_tau4']:.2g}",
              flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
