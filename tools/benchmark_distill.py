"""Benchmark: the Distiller's training step vs. the bare work it must do, and precomputed teachers.

ResNet20 student (2-bit via ``tfqkd.quantize_model`` when that module imports, else float; the JSON
says which) and a WideResNet20x2 teacher, CIFAR shapes, random data, batch 128. Per round, after
tracing and warm-up, it times one step of each configuration, rotating their order every round:

  distiller      ``Distiller.train_function`` (what ``fit`` runs, default settings): teacher
                 forward (its float32 inference copy, batch norm folded) + student train step +
                 loss bookkeeping + metrics;
  distiller_bf16 the same with ``teacher_dtype="bfloat16"``;
  live_teacher   the same with ``teacher_inference=False`` (the teacher model itself runs);
  keras_io       the keras.io "Knowledge Distillation" example's Distiller, re-implemented on
                 tf_keras: ``teacher(x, training=False)`` outside the tape, the student forward
                 in it, ``alpha * CE + (1 - alpha) * KL(softmax(t/T), softmax(s/T)) * T**2``,
                 ``apply_gradients``, compiled metrics; same models, optimizer, alpha, T. As in
                 the example, it does not add the student's weight decay to the loss (a little
                 less work than the Distiller);
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
  teacher_fwd    the teacher forward alone; ``teacher_fwd_folded`` / ``teacher_fwd_bf16`` its
                 float32 / bfloat16 inference copies (the Distiller's ``teacher_dtype``).

Figures: medians (ms), ``keras_io_ratio = distiller / keras_io`` (target <= 1.0; also paired per
round and for ``distiller_bf16``), ``floor_ratio = distiller / (student_only + teacher_fwd_folded)``
(the bare work of a KD step), ``overhead_ratio = distiller / baseline`` (target <= 1.05),
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
KERAS_IO_TARGET = 1.0


def _log(msg: str) -> None:
    if not FLAGS.json_only:
        print(msg, flush=True)


def main(argv):
    del argv
    import numpy as np

    from peers.kerasio import KerasIODistiller

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

    bf16 = Distiller(student, teacher, temperature=4.0, coefficient=0.5,
                     soft_loss=FLAGS.soft_loss, teacher_dtype="bfloat16")
    bf16.compile(optimizer(), metrics=["accuracy"])
    bf16_fn = bf16.make_train_function()
    bf16_it = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

    live = Distiller(student, teacher, temperature=4.0, coefficient=0.5,
                     soft_loss=FLAGS.soft_loss, teacher_inference=False)
    live.compile(optimizer(), metrics=["accuracy"])
    live_teacher_fn = live.make_train_function()
    live_teacher_it = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

    peer = KerasIODistiller(student, teacher)
    peer.compile(optimizer(), metrics=["accuracy"],
                 student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 distillation_loss_fn=keras.losses.KLDivergence(), alpha=0.5, temperature=4.0)
    peer_fn = peer.make_train_function()
    peer_it = iter(tf.data.Dataset.from_tensors((x, y)).repeat())

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

    folded_teacher = distiller._teacher_runners[0]  # noqa: SLF001
    bf16_teacher = bf16._teacher_runners[0]  # noqa: SLF001
    spec = [tf.TensorSpec([None, *x.shape[1:]], tf.float32)]
    folded_fwd = tf.function(lambda xb: tf.reduce_sum(folded_teacher(xb)), input_signature=spec)
    bf16_fwd = tf.function(lambda xb: tf.reduce_sum(bf16_teacher(xb)), input_signature=spec)

    def sync(out):
        # Fetch a value so the step has really finished (TF runs ops asynchronously).
        tf.nest.map_structure(lambda t: t.numpy(), out)

    configs = {
        "distiller": lambda: sync(live_fn(live_it)),
        "distiller_bf16": lambda: sync(bf16_fn(bf16_it)),
        "live_teacher": lambda: sync(live_teacher_fn(live_teacher_it)),
        "keras_io": lambda: sync(peer_fn(peer_it)),
        "baseline": lambda: sync(baseline_fn(base_it)),
        "precomputed": lambda: sync(pre_fn(pre_it)),
        "unchecked": lambda: sync(unchecked_fn(unchecked_it)),
        "kd_by_hand": lambda: sync(kd_by_hand_fn(base_it)),
        "student_only": lambda: sync(student_only_fn(base_it)),
        "teacher_fwd": lambda: sync(teacher_fn(base_it)),
        "teacher_fwd_folded": lambda: sync(folded_fwd(x)),
        "teacher_fwd_bf16": lambda: sync(bf16_fwd(x)),
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
    def paired_median(a, b):
        return round(statistics.median(u / v for u, v in zip(times[a], times[b])), 4)

    keras_io_ratio = med["distiller"] / med["keras_io"]
    floor = med["student_only"] + med["teacher_fwd_folded"]
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
        "keras_io_ratio": round(keras_io_ratio, 4),
        "keras_io_ratio_paired_median": paired_median("distiller", "keras_io"),
        "keras_io_ratio_bf16": round(med["distiller_bf16"] / med["keras_io"], 4),
        "keras_io_ratio_bf16_paired_median": paired_median("distiller_bf16", "keras_io"),
        "keras_io_target": KERAS_IO_TARGET,
        "keras_io_target_met": keras_io_ratio <= KERAS_IO_TARGET,
        "keras_io_target_met_bf16": med["distiller_bf16"] / med["keras_io"] <= KERAS_IO_TARGET,
        "live_teacher_ratio": round(med["live_teacher"] / med["keras_io"], 4),
        "floor_ms": round(floor, 2),
        "floor_ratio": round(med["distiller"] / floor, 4),
        "floor_ratio_bf16": round(med["distiller_bf16"] / (
            med["student_only"] + med["teacher_fwd_bf16"]), 4),
        "teacher_inference": {"folded_batch_norms": folded_teacher.folded,
                              "float32_reason": folded_teacher.reason,
                              "bfloat16_reason": bf16_teacher.reason},
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
    _log(f"distiller/keras_io = {keras_io_ratio:.3f} (target <= {KERAS_IO_TARGET}), bfloat16 "
         f"teacher: {result['keras_io_ratio_bf16']:.3f}; distiller/floor = "
         f"{result['floor_ratio']:.3f}")
    _log(f"distiller/baseline = {ratio:.3f} (target <= {TARGET_RATIO}); precomputed teacher "
         f"outputs: {result['precompute_speedup']:.2f}x faster")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
