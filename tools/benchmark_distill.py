"""Benchmark: the Distiller's training step vs. the bare work it must do, and precomputed teachers.

ResNet20 student (2-bit via ``tfqkd.quantize_model`` when that module imports, else float; the JSON
says which) and a WideResNet20x2 teacher, CIFAR shapes, random data, batch 128. Per round, after
tracing and warm-up, it times one step of each configuration, rotating their order every round:

  distiller      ``Distiller.train_function`` (what ``fit`` runs): teacher forward + student
                 train step + loss bookkeeping + metrics;
  baseline       a hand-written ``tf.function``: teacher forward (``training=False``) + the
                 student's hard-label train step with the same optimizer type;
  precomputed    ``Distiller.train_function`` fed ``(x, y, teacher_logits)``: no teacher forward;
  unchecked      ``Distiller.train_function`` with ``check_finite = False``: without the per-step
                 NaN/inf checks of inputs, loss, gradients and weights (``tfqkd.finite``);
  kd_by_hand     a hand-written ``tf.function`` KD step with the same loss (teacher forward,
                 softened targets, (1-l)*CE + l*KL, student update): separates the Distiller's own
                 overhead from the cost inherent to distillation (the student's backward pass
                 waits for the teacher, where the baseline may overlap the two);
  student_only   the student's hard-label train step alone;
  teacher_fwd    the teacher forward alone.

Figures: medians (ms), ``overhead_ratio = distiller / baseline`` (target <= 1.05),
``framework_ratio = distiller / kd_by_hand`` and
``precompute_speedup = distiller / precomputed``, ``finite_check_ratio = distiller / unchecked``
(the cost of the non-finite checks, paired per round). The last line of output is one JSON object.

Example:
    CUDA_VISIBLE_DEVICES= python tools/benchmark_distill.py --steps=10 --warmup=2
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
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("steps", 20, "Timed rounds (one step of every configuration per round).")
flags.DEFINE_integer("warmup", 3, "Untimed rounds after tracing.")
flags.DEFINE_integer("weight_bits", 2, "Student weight bit-width (if tfqkd.quantize imports).")
flags.DEFINE_float("teacher_width", 2, "Teacher WideResNet20xN width.")
flags.DEFINE_enum("soft_loss", "kl", ["kl", "ce", "cosine"], "Distiller soft loss.")
flags.DEFINE_bool("quantize", True, "Quantize the student (falls back to float if unavailable).")
flags.DEFINE_integer("seed", 0, "Seed of the models and the random data.")
flags.DEFINE_bool("json_only", False, "Print only the final JSON line.")

TARGET_RATIO = 1.05


def _log(msg: str) -> None:
    if not FLAGS.json_only:
        print(msg, flush=True)


def main(argv):
    del argv
    import numpy as np

    import tfqkd
    from tfqkd import models
    from tfqkd._keras import keras, tf
    from tfqkd.distiller import Distiller

    tf.random.set_seed(FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed)
    b = FLAGS.batch_size
    x = tf.constant(rng.normal(size=(b, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=b).astype("int32"))

    student = models.resnet20(10, seed=FLAGS.seed)
    quantized, why_float = False, None
    if FLAGS.quantize:
        try:
            from tfqkd.quantize import quantize_model

            student = quantize_model(student, weight_bits=FLAGS.weight_bits)
            quantized = True
        except ImportError as err:  # the module is optional for this benchmark
            why_float = f"tfqkd.quantize not importable: {err}"
    teacher = models.wide_resnet20(FLAGS.teacher_width, 10, seed=FLAGS.seed + 1)
    _log(f"student: resnet20 {'W%d' % FLAGS.weight_bits if quantized else 'float'} "
         f"({student.count_params()} params), teacher: {teacher.name} "
         f"({teacher.count_params()} params), batch {b}")

    def optimizer():
        return keras.optimizers.SGD(0.01, momentum=0.9)

    distiller = Distiller(student, teacher, temperature=4.0, coefficient=0.5,
                          soft_loss=FLAGS.soft_loss)
    distiller.compile(optimizer(), metrics=["accuracy"])
    live_fn = distiller.make_train_function()
    live_it = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

    unchecked = Distiller(student, teacher, temperature=4.0, coefficient=0.5,
                          soft_loss=FLAGS.soft_loss)
    unchecked.check_finite = False
    unchecked.compile(optimizer(), metrics=["accuracy"])
    unchecked_fn = unchecked.make_train_function()
    unchecked_it = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

    teacher_logits = teacher(x, training=False)
    pre = Distiller(student, None, temperature=4.0, coefficient=0.5, soft_loss=FLAGS.soft_loss)
    pre.compile(optimizer(), metrics=["accuracy"])
    pre_fn = pre.make_train_function()
    pre_it = iter(tf.data.Dataset.from_tensors((x, y, teacher_logits)).repeat())

    hard = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    base_opt, solo_opt = optimizer(), optimizer()
    acc = keras.metrics.SparseCategoricalAccuracy()
    base_it = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

    def student_step(opt, xb, yb):
        with tf.GradientTape() as tape:
            logits = student(xb, training=True)
            loss = hard(yb, logits) + tf.add_n(student.losses)
        opt.minimize(loss, student.trainable_variables, tape=tape)
        acc.update_state(yb, logits)
        return loss

    @tf.function
    def baseline_fn(iterator):
        xb, yb = next(iterator)
        t = teacher(xb, training=False)
        loss = student_step(base_opt, xb, yb)
        return loss + 0.0 * tf.reduce_sum(t)  # keeps the teacher forward in the graph

    kd_opt = optimizer()
    tau, lam = 4.0, 0.5
    soft_fn = tfqkd.losses.get(FLAGS.soft_loss)

    @tf.function
    def kd_by_hand_fn(iterator):
        xb, yb = next(iterator)
        p_t = tf.nn.softmax(teacher(xb, training=False) / tau)
        with tf.GradientTape() as tape:
            logits = student(xb, training=True)
            per_example = (1 - lam) * hard.call(yb, logits) + lam * soft_fn(p_t, logits, tau)
            loss = tf.reduce_mean(per_example) + tf.add_n(student.losses)
        kd_opt.minimize(loss, student.trainable_variables, tape=tape)
        acc.update_state(yb, logits)
        return loss

    @tf.function
    def student_only_fn(iterator):
        xb, yb = next(iterator)
        return student_step(solo_opt, xb, yb)

    @tf.function
    def teacher_fn(iterator):
        xb, _ = next(iterator)
        return tf.reduce_sum(teacher(xb, training=False))

    def sync(out):
        # Fetch a value so the step has really finished (TF runs ops asynchronously).
        tf.nest.map_structure(lambda t: t.numpy(), out)

    configs = {
        "distiller": lambda: sync(live_fn(live_it)),
        "baseline": lambda: sync(baseline_fn(base_it)),
        "precomputed": lambda: sync(pre_fn(pre_it)),
        "unchecked": lambda: sync(unchecked_fn(unchecked_it)),
        "kd_by_hand": lambda: sync(kd_by_hand_fn(base_it)),
        "student_only": lambda: sync(student_only_fn(base_it)),
        "teacher_fwd": lambda: sync(teacher_fn(base_it)),
    }
    names = list(configs)
    t0 = time.perf_counter()
    for name in names:  # tracing
        configs[name]()
    _log(f"traced in {time.perf_counter() - t0:.1f} s")
    times = {n: [] for n in names}
    for r in range(FLAGS.warmup + FLAGS.steps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            configs[name]()
            if r >= FLAGS.warmup:
                times[name].append(time.perf_counter() - start)
        if r >= FLAGS.warmup:
            _log(f"round {r - FLAGS.warmup + 1}/{FLAGS.steps}: "
                 + ", ".join(f"{n} {1e3 * times[n][-1]:.0f} ms" for n in names))

    med = {n: 1e3 * statistics.median(v) for n, v in times.items()}
    ratio = med["distiller"] / med["baseline"]
    # Per-round ratios: each pair ran in the same round, so load changes mostly cancel.
    paired = statistics.median(a / b for a, b in zip(times["distiller"], times["baseline"]))
    result = {
        "benchmark": "distill",
        "student": "resnet20",
        "student_quantized": quantized,
        "student_weight_bits": FLAGS.weight_bits if quantized else 32,
        "student_float_reason": why_float,
        "teacher": teacher.name,
        "batch_size": b,
        "steps": FLAGS.steps,
        "warmup": FLAGS.warmup,
        "soft_loss": FLAGS.soft_loss,
        "median_ms": {n: round(v, 2) for n, v in med.items()},
        "overhead_ratio": round(ratio, 4),
        "overhead_ratio_paired_median": round(paired, 4),
        "framework_ratio": round(med["distiller"] / med["kd_by_hand"], 4),
        "inherent_kd_ratio": round(med["kd_by_hand"] / med["baseline"], 4),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio <= TARGET_RATIO,
        "precompute_speedup": round(med["distiller"] / med["precomputed"], 4),
        "finite_check_ratio": round(med["distiller"] / med["unchecked"], 4),
        "finite_check_ratio_paired_median": round(statistics.median(
            a / b for a, b in zip(times["distiller"], times["unchecked"])), 4),
        "teacher_share_of_step": round(med["teacher_fwd"] / med["distiller"], 4),
        "tf_version": tf.__version__,
        "tfqkd_version": tfqkd.__version__,
        "cpu_count": os.cpu_count(),
    }
    _log(f"distiller/baseline = {ratio:.3f} (target <= {TARGET_RATIO}); precomputed teacher "
         f"outputs: {result['precompute_speedup']:.2f}x faster")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
