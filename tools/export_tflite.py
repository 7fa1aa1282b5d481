"""Exports a saved (quantized) Keras model to ``.tflite`` in any mode of :func:`tfqkd.export.export_tflite`.

The model is loaded within :func:`tfqkd.quantize_scope` (so tfqkd/tfmot QAT models load), the
representative images for calibration come from :func:`tfqkd.data.load_dataset` (training split,
no augmentation), and the file is written atomically. With ``--verify`` the file is then checked
against the Keras model on the test split and the parity report printed. ``--pack`` additionally
writes the packed weight archive (true bit-width). ``--align_student`` moves the student's folded
biases onto the file's int32 grid first (so that ``--verify`` compares the student that computes
what the file computes), and ``--aligned_model`` saves that student. ``--runtime=builtin`` is
for a file that will run without XNNPACK: the student takes the built-in kernels' rounding, and
``--verify`` runs the file on those kernels.

Example:
    python tools/export_tflite.py --model=runs/w2/model --output=w2_int8.tflite \\
        --mode=int8 --dataset=cifar10 --data_dir=../shared/data/cifar10-jpg.tar.gz \\
        --num_calibration=500 --verify --num_eval=1000
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Saved Keras model: a recipe output_dir, its model/ "
                    "directory, a .h5 or .keras file, or a SavedModel directory.")
flags.DEFINE_string("output", None, "Output .tflite path.")
flags.DEFINE_enum("mode", "int8", ["float", "dynamic", "int8", "int4"], "Export mode.")
flags.DEFINE_enum("method", "fakequant", ["fakequant", "ptq"], "How int8 fixes ranges.")
flags.DEFINE_string("dataset", "cifar10", "Data set: cifar10, cifar100, digits, folder:PATH, npz:PATH or tfds:NAME (docs/data.md).")
flags.DEFINE_integer("image_size", None, "Resize images to this size (default: the model's "
                     "input size when the data set's differs).")
flags.DEFINE_bool("skip_corrupt_images", False, "Skip images that do not decode (counted "
                  "in one warning) instead of failing.")
flags.DEFINE_string("data_dir", None, "Offline data source (default: $TFQKD_DATA_DIR).")
flags.DEFINE_integer("num_calibration", 500, "Calibration images (int8 / int4).")
flags.DEFINE_bool("int8_io", False, "int8 input/output tensors (int8 / int4 modes).")
flags.DEFINE_enum("softmax_head_bits", None, ["8", "16"],
                  "int8 / int4: width of a softmax head's logits and probabilities in the file "
                  "(default: the student's; 8 for runtimes that take int8 tensors only).")
flags.DEFINE_bool("verify", False, "Run the file on the test split and print the parity report.")
flags.DEFINE_integer("num_eval", 1000, "Test images used by --verify.")
flags.DEFINE_string("pack", None, "Also write the packed weight archive to this path.")
flags.DEFINE_bool("align_student", False,
                  "int8 / int4: move the loaded student's folded biases onto the file's int32 "
                  "grid (export_tflite(align_student=True)) before --verify and --pack.")
flags.DEFINE_enum("runtime", "xnnpack", ["xnnpack", "builtin"],
                  "Kernels the file will run on (export_tflite(runtime=...)): --align_student "
                  "gives the student their rounding and --verify runs them ('builtin': LiteRT "
                  "without XNNPACK).")
flags.DEFINE_string("aligned_model", None,
                    "With --align_student: save the aligned student here (.h5 or .keras).")
flags.DEFINE_bool("space_to_depth", False,
                  "int8: run 3x3 convolutions with <= 16 output channels on a 2x2 space-to-depth "
                  "view (same outputs, 1.75x the file size; faster only where int8 kernels tile 64 "
                  "channels, e.g. AMX Xeons: see tools/benchmark_tflite.py).")
flags.mark_flags_as_required(["model", "output"])


def load_model(path: str):
    """Loads a model saved by tfqkd (QAT or float) inside tfqkd.quantize_scope().

    Accepts every form the docs show: a recipe's output directory, its ``model/`` directory, a
    ``.h5`` or ``.keras`` file, or a SavedModel directory (``tfqkd.training.load_model``).
    """
    from tfqkd.training import load_model as load

    return load(path, what="--model")


def main(argv):
    del argv
    if FLAGS.aligned_model and not FLAGS.align_student:
        raise app.UsageError("--aligned_model needs --align_student.")
    import tfqkd
    from tfqkd import data, export

    model = load_model(FLAGS.model)
    from recipes import common

    data_kw = common.data_kwargs_for_model(model, data_dir=FLAGS.data_dir,
                                           image_size=FLAGS.image_size,
                                           skip_corrupt=FLAGS.skip_corrupt_images)
    calibration = None
    if FLAGS.mode in ("int8", "int4"):
        n = FLAGS.num_calibration
        calibration = data.load_dataset(FLAGS.dataset, "train", **data_kw,
                                        batch_size=min(100, n), augment=False, shuffle=True,
                                        seed=0).take((n + 99) // 100 if n >= 100 else 1)
    info = export.export_tflite(model, FLAGS.output, calibration, mode=FLAGS.mode,
                                num_calibration=FLAGS.num_calibration, int8_io=FLAGS.int8_io,
                                method=FLAGS.method, align_student=FLAGS.align_student,
                                runtime=FLAGS.runtime, space_to_depth=FLAGS.space_to_depth,
                                softmax_head_bits=(int(FLAGS.softmax_head_bits)
                                                   if FLAGS.softmax_head_bits else None))
    result = {"export": {k: v for k, v in info.items() if k != "weight_bits"}}
    print(f"wrote {info['path']} ({info['bytes']} bytes, mode {info['mode']})")
    if FLAGS.aligned_model and info["aligned_biases"] is not None:
        from tfqkd._io import atomic_path

        with atomic_path(FLAGS.aligned_model) as tmp:
            model.save(tmp)
        print(f"wrote {FLAGS.aligned_model} (student with the file's biases: "
              f"{info['aligned_biases']})")
    if FLAGS.pack:
        stats = export.pack_weights(model, FLAGS.pack)
        print(f"wrote {stats['path']} ({stats['bytes']} bytes, "
              f"{stats['bits_per_weight']:.3f} bits/weight overall)")
        result["packed"] = stats
    if FLAGS.verify:
        test = common.load_evaluation_split(FLAGS.dataset, "test", data_kw, batch_size=100,
                                            num_eval=FLAGS.num_eval)
        report = export.verify_tflite(FLAGS.output, model, test, max_examples=FLAGS.num_eval,
                                      runtime=FLAGS.runtime)
        print(report)
        result["report"] = {k: v for k, v in report.to_dict().items() if k != "layers"}
    print(json.dumps(result, default=str))
    del tfqkd


if __name__ == "__main__":
    app.run(main)
