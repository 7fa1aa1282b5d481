"""SPEQ versus hard labels versus KD from a float teacher, on the built-in digits set (minutes).

A float ``tiny_resnet`` is trained once; then, for every seed, the SAME stochastic-precision
quantized copy of it (W``--bits``A``--bits``) is retrained three ways, interleaved (seed by seed,
method by method), with the same optimizer, schedule and epochs:

* ``hard``: labels only (plain QAT of the same quantized model: no teacher pass);
* ``kd``: ``tfqkd.Distiller`` from the float model (a separate teacher), KL, constant λ;
* ``speq``: ``tfqkd.speq.SPEQ`` (the student at stochastic precision is the teacher), cosine,
  constant λ.

Reported: test accuracy of each run, medians over seeds, median differences to ``hard``, the
median accuracy of one stochastic teacher pass of the SPEQ students, and the median train time.
Last line: one JSON object with every figure.

Example::

    python tools/benchmark_speq.py --seeds=3 --bits=2
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("bits", 2, "Weight and activation bits of the quantized students.")
flags.DEFINE_integer("seeds", 3, "Repetitions (data order and quantized initial state).")
flags.DEFINE_integer("float_epochs", 30, "Epochs of the float model.")
flags.DEFINE_integer("epochs", 15, "Epochs of every quantized retraining.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate of the retraining (cosine decay).")
flags.DEFINE_float("coefficient", 0.5, "λ of kd and speq.")
flags.DEFINE_float("temperature", 2.0, "τ of kd and speq.")
flags.DEFINE_float("probability", 0.5, "SPEQ per-layer chance of the high precision.")
flags.DEFINE_string("high_bits", "8", "SPEQ teacher's high precision: bits or 'float'.")


def main(argv):
    del argv
    import tfqkd
    from tfqkd import data as tdata
    from tfqkd import speq
    from tfqkd._keras import keras
    from tfqkd.training import evaluate_accuracy
    from recipes.speq import parse_high_bits

    train = tdata.load_dataset("digits", "train", batch_size=FLAGS.batch_size, augment=False,
                               seed=0)
    test = tdata.load_dataset("digits", "test", batch_size=256)
    steps = int(train.cardinality())

    def adam(epochs):
        return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
            FLAGS.learning_rate, max(1, epochs * steps)))

    keras.utils.set_random_seed(0)
    float_model = tfqkd.models.tiny_resnet(10, seed=0)
    float_model.compile(adam(FLAGS.float_epochs),
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    float_model.fit(train, epochs=FLAGS.float_epochs, verbose=0)
    float_acc = evaluate_accuracy(float_model, test)
    print(f"float tiny_resnet: {float_acc:.4f}", flush=True)

    high = parse_high_bits(FLAGS.high_bits)
    runs = {m: [] for m in ("hard", "kd", "speq")}
    times = {m: [] for m in runs}
    teacher_acc = []
    for seed in range(FLAGS.seeds):
        for method in runs:
            keras.utils.set_random_seed(seed)
            student = speq.speq_quantize(float_model, FLAGS.bits, FLAGS.bits, high_bits=high,
                                         probability=FLAGS.probability)
            if method == "hard":
                model = student
                model.compile(adam(FLAGS.epochs),
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            elif method == "kd":
                model = tfqkd.Distiller(student, float_model, temperature=FLAGS.temperature,
                                        coefficient=FLAGS.coefficient, soft_loss="kl")
                model.compile(adam(FLAGS.epochs))
            else:
                model = speq.SPEQ(student, temperature=FLAGS.temperature,
                                  coefficient=FLAGS.coefficient)
                model.compile(adam(FLAGS.epochs))
            t0 = time.perf_counter()
            model.fit(train.shuffle(10_000, seed=seed), epochs=FLAGS.epochs, verbose=0)
            times[method].append(time.perf_counter() - t0)
            acc = evaluate_accuracy(student, test)
            runs[method].append(acc)
            line = f"seed {seed} {method:<5} {acc:.4f}  ({times[method][-1]:.1f} s)"
            if method == "speq":
                teacher_acc.append(speq.stochastic_teacher_accuracy(student, test))
                line += f"  stochastic teacher {teacher_acc[-1]:.4f}"
            print(line, flush=True)

    med = {m: statistics.median(v) for m, v in runs.items()}
    result = {
        "bits": FLAGS.bits, "seeds": FLAGS.seeds, "epochs": FLAGS.epochs,
        "float_epochs": FLAGS.float_epochs, "float_accuracy": round(float_acc, 4),
        "high_bits": FLAGS.high_bits, "probability": FLAGS.probability,
        "coefficient": FLAGS.coefficient, "temperature": FLAGS.temperature,
        "accuracy": {m: [round(a, 4) for a in v] for m, v in runs.items()},
        "median_accuracy": {m: round(v, 4) for m, v in med.items()},
        "median_points_vs_hard": {m: round(100 * (med[m] - med["hard"]), 2)
                                  for m in ("kd", "speq")},
        "median_stochastic_teacher_accuracy": round(statistics.median(teacher_acc), 4),
        "median_train_time_s": {m: round(statistics.median(v), 2) for m, v in times.items()},
        "train_time_ratio_speq_vs_hard": round(
            statistics.median(times["speq"]) / statistics.median(times["hard"]), 3),
    }
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    app.run(main)
