"""Evaluates a ``.tflite`` file on a data set and prints the parity report against its Keras model.

Runs the file with LiteRT (:func:`tfqkd.export.verify_tflite`): top-1 of the Keras model and of
the file, their top-1 agreement, the largest logit difference, file size, bits per weight and
per-layer weight levels. The last line is the report as one JSON object.

Example:
    python tools/evaluate_tflite.py --tflite=w2_int8.tflite --model=runs/w2/model \\
        --dataset=cifar10 --data_dir=../shared/data/cifar10-jpg.tar.gz --num_eval=10000
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("tflite", None, "The .tflite file to evaluate.")
flags.DEFINE_string("model", None, "The saved Keras model it was exported from (a recipe "
                    "output_dir, its model/ directory, a .h5 or .keras file).")
flags.DEFINE_string("dataset", "cifar10", "Data set: cifar10, cifar100, digits, folder:PATH, npz:PATH or tfds:NAME (docs/data.md).")
flags.DEFINE_integer("image_size", None, "Resize images to this size (default: the model's "
                     "input size when the data set's differs).")
flags.DEFINE_bool("skip_corrupt_images", False, "Skip images that do not decode (counted "
                  "in one warning) instead of failing.")
flags.DEFINE_enum("split", "test", ["train", "test"], "Split to evaluate on.")
flags.DEFINE_string("data_dir", None, "Offline data source (default: $TFQKD_DATA_DIR).")
flags.DEFINE_integer("num_eval", None, "Evaluate only this many images (default: all).")
flags.DEFINE_integer("batch_size", 100, "Images per interpreter invocation.")
flags.DEFINE_integer("num_threads", None, "LiteRT interpreter threads.")
flags.mark_flags_as_required(["tflite", "model"])


def main(argv):
    del argv
    from tfqkd import export

    from recipes import common

    if not os.path.isfile(FLAGS.tflite):
        raise FileNotFoundError(f"--tflite {FLAGS.tflite!r} does not exist; export one with "
                                "tools/export_tflite.py.")
    model = common.load_model(FLAGS.model, what="--model")
    data_kw = common.data_kwargs_for_model(model, data_dir=FLAGS.data_dir,
                                           image_size=FLAGS.image_size,
                                           skip_corrupt=FLAGS.skip_corrupt_images)
    dataset = common.load_evaluation_split(FLAGS.dataset, FLAGS.split, data_kw,
                                           batch_size=FLAGS.batch_size, num_eval=FLAGS.num_eval)
    report = export.verify_tflite(FLAGS.tflite, model, dataset, max_examples=FLAGS.num_eval,
                                  num_threads=FLAGS.num_threads)
    print(report)
    print(json.dumps(report.to_dict(), default=str))


if __name__ == "__main__":
    app.run(main)
