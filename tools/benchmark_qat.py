"""Benchmark: training-step time and peak memory of float vs tfqkd 2-bit QAT vs tfmot 8-bit QAT.

On ResNet20 (CIFAR shapes, random data) it times compiled training steps of

  (a) the float model,
  (b) ``tfqkd.quantize_model(model, weight_bits=2)`` (first/last layers 8-bit, L2 step),
  (c) ``tfmot.quantization.keras.quantize_model(model)`` (tfmot's default 8-bit scheme),

interleaved step by step in one process after warm-up (the order rotates every round so that no
configuration always runs right after another), and prints medians and the ratios b/a and b/c.
Besides wall-clock time it records the process CPU time of every step (``time.process_time``,
all threads): on a shared machine other processes stretch wall-clock steps at random, while the
CPU time a step needs is what the configuration itself costs. Ratios are reported for both.

Peak memory is measured in a fresh subprocess per configuration (this script re-invoked with
``--child=<config>``), launched before this process imports TensorFlow: Linux carries
``getrusage``'s ``ru_maxrss`` over from the parent across fork/exec, so a child started by a
big parent reports the parent's peak. Each child reports ``ru_maxrss`` and its own ``VmHWM``
(``/proc/self/status``). It also times the weight quantizers alone (all kernels of (b)
quantized in one ``tf.function``), the first thing to look at when (b) is slow.

Targets: b/a <= 1.15, b/c <= 1.0, memory b/a <= 1.25. The last line of output is one JSON
object with every figure.

Example:
    CUDA_VISIBLE_DEVICES= python tools/benchmark_qat.py --steps=10 --warmup=3
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("steps", 20, "Timed training steps per configuration.")
flags.DEFINE_integer("warmup", 3, "Untimed warm-up steps per configuration (after tracing).")
flags.DEFINE_enum("model", "resnet20", ["resnet20", "tiny_resnet"], "Network to benchmark.")
flags.DEFINE_integer("weight_bits", 2, "tfqkd weight bit-width of configuration (b).")
flags.DEFINE_enum("step", "l2", ["l2", "std", "learned"], "tfqkd step rule of configuration (b).")
flags.DEFINE_bool("memory", True, "Also measure peak RSS of each configuration in a subprocess.")
flags.DEFINE_integer("memory_steps", 3, "Training steps run by each memory subprocess.")
flags.DEFINE_bool("json_only", False, "Print only the final JSON line.")
flags.DEFINE_integer("seed", 0, "Seed of the model and the random data.")
flags.DEFINE_string("child", None, "Internal: measure peak memory of this configuration only.")

CONFIGS = ("float", "tfqkd_w2", "tfmot_8bit")


def _log(msg: str) -> None:
    if not FLAGS.json_only:
        print(msg, flush=True)


def _build(config: str):
    import tensorflow_model_optimization as tfmot

    import tfqkd
    from tfqkd._keras import keras, tf

    input_shape = (32, 32, 3) if FLAGS.model == "resnet20" else (8, 8, 1)
    if FLAGS.model == "resnet20":
        model = tfqkd.models.resnet20(10, input_shape, seed=FLAGS.seed)
    else:
        model = tfqkd.models.tiny_resnet(10, input_shape, seed=FLAGS.seed)
    if config == "tfqkd_w2":
        model = tfqkd.quantize_model(model, weight_bits=FLAGS.weight_bits, step=FLAGS.step)
    elif config == "tfmot_8bit":
        model = tfmot.quantization.keras.quantize_model(model)
    elif config != "float":
        raise ValueError(f"unknown configuration {config!r}; one of {CONFIGS}")

    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits) + tf.add_n(model.losses or [tf.constant(0.0)])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = tf.random.Generator.from_seed(FLAGS.seed)
    x = rng.normal((FLAGS.batch_size,) + input_shape)
    y = rng.uniform((FLAGS.batch_size,), 0, 10, dtype=tf.int32)
    return model, train_step, x, y


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def _current_rss_mib() -> float:
    return _proc_status_mib("VmRSS")


def _child(config: str) -> None:
    """Peak RSS (MiB) of building + training one configuration; prints one JSON line.

    ``max_rss_mib`` is the process's peak (ru_maxrss), which includes TensorFlow's own
    footprint; ``rss_growth_mib`` is the resident memory added by building and training the
    model (current RSS after training minus current RSS after the imports).
    """
    import tensorflow_model_optimization  # noqa: F401  (import cost is not the model's)

    import tfqkd.quantize  # noqa: F401

    rss_imported = _current_rss_mib()
    model, step, x, y = _build(config)
    rss_built = _current_rss_mib()
    for _ in range(max(1, FLAGS.memory_steps)):
        float(step(x, y))
    rss_trained = _current_rss_mib()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"config": config, "rss_imported_mib": rss_imported,
                      "rss_built_mib": rss_built, "rss_trained_mib": rss_trained,
                      "rss_growth_mib": rss_trained - rss_imported, "max_rss_mib": rss_peak,
                      "vm_hwm_mib": _proc_status_mib("VmHWM")}))


def _memory(config: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={config}",
           f"--batch_size={FLAGS.batch_size}", f"--model={FLAGS.model}",
           f"--weight_bits={FLAGS.weight_bits}", f"--step={FLAGS.step}",
           f"--memory_steps={FLAGS.memory_steps}", f"--seed={FLAGS.seed}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _quantizer_time(model, repeats: int) -> float:
    """Median seconds to quantize every kernel of ``model`` once (forward only, training mode)."""
    import tensorflow_model_optimization as tfmot

    from tfqkd._keras import tf

    entries = [(w, q, v) for layer in model.layers
               if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)
               for (w, q, v) in layer._weight_vars]

    @tf.function
    def quantize_all():
        return tf.add_n([tf.reduce_sum(q(w, True, v)) for w, q, v in entries])

    float(quantize_all())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(quantize_all())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv):
    del argv
    if FLAGS.child:
        _child(FLAGS.child)
        return

    results = {}
    if FLAGS.memory:  # first, while this process is small (see the module docstring)
        for config in CONFIGS:
            mem = _memory(config)
            results[f"max_rss_mib_{config}"] = mem["max_rss_mib"]
            results[f"vm_hwm_mib_{config}"] = mem["vm_hwm_mib"]
            results[f"rss_growth_mib_{config}"] = mem["rss_growth_mib"]
            _log(f"{config}: peak RSS {mem['max_rss_mib']:.0f} MiB (VmHWM {mem['vm_hwm_mib']:.0f}); "
                 f"build + training added {mem['rss_growth_mib']:.0f} MiB to the imported runtime")
        results["ratio_memory_tfqkd_over_float"] = (
            results["max_rss_mib_tfqkd_w2"] / results["max_rss_mib_float"])
        results["ratio_memory_growth_tfqkd_over_float"] = (
            results["rss_growth_mib_tfqkd_w2"] / max(1e-9, results["rss_growth_mib_float"]))
        results["ratio_memory_tfqkd_over_tfmot"] = (
            results["max_rss_mib_tfqkd_w2"] / results["max_rss_mib_tfmot_8bit"])
        _log(f"memory b/a = {results['ratio_memory_tfqkd_over_float']:.3f}  (target <= 1.25)")

    import tensorflow as tf

    built = {}
    for config in CONFIGS:
        t0 = time.perf_counter()
        built[config] = _build(config)
        model, step, x, y = built[config]
        float(step(x, y))  # trace + first step
        for _ in range(FLAGS.warmup):
            float(step(x, y))
        _log(f"{config}: built, traced and warmed up in {time.perf_counter() - t0:.1f} s")

    times = {c: [] for c in CONFIGS}
    cpu = {c: [] for c in CONFIGS}
    for i in range(FLAGS.steps):
        order = CONFIGS[i % 3:] + CONFIGS[:i % 3]
        for config in order:
            _, step, x, y = built[config]
            t0, c0 = time.perf_counter(), time.process_time()
            float(step(x, y))  # float() waits for the step to finish
            times[config].append(time.perf_counter() - t0)
            cpu[config].append(time.process_time() - c0)

    med = {c: statistics.median(times[c]) for c in CONFIGS}
    med_cpu = {c: statistics.median(cpu[c]) for c in CONFIGS}
    results.update({
        "model": FLAGS.model, "batch_size": FLAGS.batch_size, "steps": FLAGS.steps,
        "warmup": FLAGS.warmup, "weight_bits": FLAGS.weight_bits, "step": FLAGS.step,
        "tf_version": tf.__version__, "cpu_count": os.cpu_count(),
        **{f"median_step_s_{c}": med[c] for c in CONFIGS},
        **{f"min_step_s_{c}": min(times[c]) for c in CONFIGS},
        "ratio_time_tfqkd_over_float": med["tfqkd_w2"] / med["float"],
        "ratio_time_tfqkd_over_tfmot": med["tfqkd_w2"] / med["tfmot_8bit"],
        "ratio_time_tfmot_over_float": med["tfmot_8bit"] / med["float"],
        **{f"median_cpu_s_{c}": med_cpu[c] for c in CONFIGS},
        "ratio_cpu_tfqkd_over_float": med_cpu["tfqkd_w2"] / med_cpu["float"],
        "ratio_cpu_tfqkd_over_tfmot": med_cpu["tfqkd_w2"] / med_cpu["tfmot_8bit"],
        "load_average_1min": os.getloadavg()[0],
    })
    _log("median step time (s): " + ", ".join(f"{c}={med[c]:.4f}" for c in CONFIGS))
    _log(f"ratio b/a (tfqkd/float) = {results['ratio_time_tfqkd_over_float']:.3f}  (target <= 1.15)")
    _log(f"ratio b/c (tfqkd/tfmot) = {results['ratio_time_tfqkd_over_tfmot']:.3f}  (target <= 1.0)")
    _log("median CPU time per step (s): " + ", ".join(f"{c}={med_cpu[c]:.4f}" for c in CONFIGS)
         + f"; CPU ratios b/a = {results['ratio_cpu_tfqkd_over_float']:.3f}, "
         f"b/c = {results['ratio_cpu_tfqkd_over_tfmot']:.3f} (load average "
         f"{results['load_average_1min']:.1f} on {os.cpu_count()} CPUs)")

    qtime = _quantizer_time(built["tfqkd_w2"][0], repeats=max(5, FLAGS.steps))
    results["quantizer_forward_s_tfqkd"] = qtime
    results["quantizer_share_of_step_tfqkd"] = qtime / med["tfqkd_w2"]
    _log(f"tfqkd weight quantizers alone (all kernels, forward): {qtime * 1e3:.2f} ms "
         f"= {100 * qtime / med['tfqkd_w2']:.1f} % of its step")

    results["targets_met"] = {
        "time_b_over_a<=1.15": results["ratio_time_tfqkd_over_float"] <= 1.15,
        "time_b_over_c<=1.0": results["ratio_time_tfqkd_over_tfmot"] <= 1.0,
        "cpu_b_over_a<=1.15": results["ratio_cpu_tfqkd_over_float"] <= 1.15,
        "cpu_b_over_c<=1.0": results["ratio_cpu_tfqkd_over_tfmot"] <= 1.0,
        **({"memory_b_over_a<=1.25": results["ratio_memory_tfqkd_over_float"] <= 1.25}
           if FLAGS.memory else {}),
    }
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    app.run(main)
