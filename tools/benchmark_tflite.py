"""Benchmark: ResNet20 TFLite files (float / int8 / int4) -- size, LiteRT latency, packed archive.

Builds a W2A8 tfqkd student (``quantize_model(resnet20, weight_bits=2, activation_bits=8)``,
first/last layers 8-bit), exports it with :func:`tfqkd.export.export_tflite` in the ``float``,
``int8`` and ``int4`` modes and as ``int8_s2d`` (``mode="int8", space_to_depth=True``: the same
integer arithmetic with the narrow convolutions on a space-to-depth view: bigger, and faster only
on CPUs whose int8 kernels tile 64 channels) and packs its weights with
:func:`tfqkd.export.pack_weights`. Then it times batch-1 inference of every file with the
LiteRT interpreter at 1 and 2 threads, interleaved: each round runs every (file, threads)
configuration for ``--inner`` invocations in a rotating order, after ``--warmup`` untimed
invocations each; the figure per configuration is the median of the per-round mean latencies.

The JSON names the CPU (``host``) and the faster int8 layout there (``faster_int8_layout``).
``--layer_breakdown`` adds per-stage timings of stacked convolutions (float vs int8, ns per
output pixel): where int8 gains and where it does not.

Targets (on the compact ``int8`` file): int8 file <= 0.27 x float file; int8 latency <= 0.6 x float
latency; int4 file weights <= 4 bits/weight; packed archive <= 1.61 bits per ternary weight
(5 trits per byte is 1.6, log2(3) = 1.585 the floor; ResNet20's 20 float32 steps add 0.0026). The
last line of output is one JSON object with every figure, including ``int8_file_breakdown``: where
the int8 file's bytes go (weight buffers, int32 biases, other buffers, distinct quantization
vectors, tensor names, and the rest of the FlatBuffer: tables, shapes, operator lists, alignment).

All files keep float32 input and output (the int8 ones quantize/dequantize inside): the same
interface as the float file, so the latencies compare like for like. ``int8_io=True`` would save
two QUANTIZE/DEQUANTIZE ops and their two float tensors (under 100 bytes).

``--model=<Applications name>`` (with ``--image_size``, ``--alpha``, ``--num_classes``) does the
same for a W``--weight_bits``A8 Applications student (float / int8 / int4);
``--converter_int8`` adds, side by side, the TFLite converter's own post-training int8 file of
the same float model: what a user without tfqkd gets, so a latency ratio can be read as this
CPU's int8 kernels or as tfqkd's file. Several names (``--model=mobilenet,mobilenet_v2,...``) are
benchmarked one after the other, each model's files timed side by side with its own float file,
and the last line is then one JSON object ``{"host", "models": {tag: figures},
"targets_met": {tag: ...}}`` with each model's figures as a single-model run reports them.

Example:
    CUDA_VISIBLE_DEVICES= python tools/benchmark_tflite.py --rounds=15 --inner=20
    CUDA_VISIBLE_DEVICES= python tools/benchmark_tflite.py --model=mobilenet_v2 --alpha=1.0 \\
        --image_size=224 --num_classes=1000 --weight_bits=8 --per_channel --converter_int8
    CUDA_VISIBLE_DEVICES= python tools/benchmark_tflite.py --weight_bits=8 --per_channel \
        --model=mobilenet,mobilenet_v2,mobilenet_v3_small,efficientnet_b0 --image_size=96
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
flags.DEFINE_integer("rounds", 15, "Timed rounds (each runs every configuration once).")
flags.DEFINE_integer("inner", 20, "Invocations per configuration per round.")
flags.DEFINE_integer("warmup", 10, "Untimed invocations per configuration before timing.")
flags.DEFINE_string("threads", "1,2", "Comma-separated interpreter thread counts.")
flags.DEFINE_integer("train_steps", 0, "Optional QAT steps on random data before export.")
flags.DEFINE_integer("num_calibration", 100, "Calibration images (random normal, CIFAR shape).")
flags.DEFINE_string("output_dir", None, "Keep the files here (default: a temporary directory).")
flags.DEFINE_integer("seed", 0, "Seed of the model and the random data.")
flags.DEFINE_bool("json_only", False, "Print only the final JSON line.")
flags.DEFINE_list("model", ["resnet20"], "resnet20 (tfqkd's CIFAR ResNet20) or a Keras "
                  "Applications model by name (tfqkd.models.names(): mobilenet_v2, ...); several, "
                  "comma-separated, are benchmarked one after the other into one JSON.")
flags.DEFINE_integer("image_size", 32, "Input size of an Applications model.")
flags.DEFINE_integer("num_classes", 10, "Classes of the model's head (1000: the "
                     "ImageNet head the published MobileNet file sizes refer to).")
flags.DEFINE_float("alpha", None, "Width of an Applications model (default: its smallest).")
flags.DEFINE_integer("weight_bits", 2, "Student weight bits (8 for the W8A8 targets).")
flags.DEFINE_bool("per_channel", False, "Per-channel weight steps.")
flags.DEFINE_bool("converter_int8", False, "Also time the TFLite converter's own post-training "
                  "int8 quantization of the same float model (per-channel, the same calibration "
                  "images): separates what tfqkd's file costs from what this CPU's int8 kernels "
                  "give.")
flags.DEFINE_bool("layer_breakdown", False, "Also time six stacked 3x3 convolutions at each "
                  "ResNet20 stage shape, float vs int8, and report ns per output pixel.")

MODES = ("float", "int8", "int4", "int8_s2d")
# int8_s2d: the int8 export with ``space_to_depth=True`` (same arithmetic, wider kernels).
EXPORT_ARGS = {"float": {"mode": "float"}, "int8": {"mode": "int8"}, "int4": {"mode": "int4"},
               "int8_s2d": {"mode": "int8", "space_to_depth": True}}
# Stage shapes of ResNet20 for --layer_breakdown: (height = width, channels).
STAGES = ((32, 16), (16, 32), (8, 64))


def _log(msg: str) -> None:
    if not FLAGS.json_only:
        print(msg, flush=True)


def host_cpu() -> dict:
    """The CPU the figures were measured on: int8 kernel speed depends on its instruction set."""
    import platform

    model, flags_ = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags_ = set(value.split())
    except OSError:  # not Linux: the processor string is all we have
        pass
    # The extensions XNNPACK's int8 and float kernels choose between on x86 and ARM.
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp",
              "i8mm", "sve")
    return {"cpu": model, "cores": os.cpu_count(),
            "isa": [f for f in wanted if f in flags_]}


def file_breakdown(path: str) -> dict:
    """Bytes of a .tflite file by what they hold (buffers by use, quantization vectors, names)."""
    import numpy as np

    # The exporter's own FlatBuffer reader and kernel-op names: one definition of "weight op".
    from tfqkd._flatbuffer import WEIGHT_OPS, op_names, read

    with open(path, "rb") as f:
        content = f.read()
    model = read(content)
    names = op_names(model)
    weight_inputs, bias_inputs = set(), set()
    for sg in model.subgraphs:
        for op in sg.operators:
            if names.get(op.opcodeIndex) in WEIGHT_OPS and len(op.inputs) > 1:
                weight_inputs.add(int(op.inputs[1]))
                if len(op.inputs) > 2 and op.inputs[2] >= 0:
                    bias_inputs.add(int(op.inputs[2]))
    out = {"weight_buffers": 0, "bias_buffers": 0, "other_buffers": 0,
           "quantization_vectors_unique": 0, "quantization_vectors_listed": 0, "tensor_names": 0}
    stored = set()
    for sg in model.subgraphs:
        for i, t in enumerate(sg.tensors):
            data = model.buffers[t.buffer].data
            n = 0 if data is None else len(data)
            key = ("weight_buffers" if i in weight_inputs else
                   "bias_buffers" if i in bias_inputs else "other_buffers")
            out[key] += n
            out["tensor_names"] += len(t.name or b"")
            q = t.quantization
            for values, dtype in ((q and q.scale, np.float32), (q and q.zeroPoint, np.int64),
                                  (q and q.min, np.float32), (q and q.max, np.float32)):
                if values is not None and len(values):
                    raw = np.asarray(values, dtype).tobytes()
                    out["quantization_vectors_listed"] += len(raw)
                    if (dtype, raw) not in stored:  # export_tflite stores identical vectors once
                        stored.add((dtype, raw))
                        out["quantization_vectors_unique"] += len(raw)
    out["total"] = len(content)
    out["flatbuffer_rest"] = len(content) - sum(
        out[k] for k in ("weight_buffers", "bias_buffers", "other_buffers",
                         "quantization_vectors_unique", "tensor_names"))
    return out


def _interleaved_medians(interpreters: dict) -> dict:
    """{key: median ms per invoke} of interpreters whose inputs are set, timed side by side
    (``tfqkd.latency.median_latency_ms`` with ``--warmup``, ``--rounds``, ``--inner``)."""
    from tfqkd.latency import median_latency_ms

    return median_latency_ms(interpreters, warmup=FLAGS.warmup, rounds=FLAGS.rounds,
                             inner=FLAGS.inner)


def layer_breakdown() -> dict:
    """ns per output pixel of six stacked 3x3 stride-1 convolutions at each ResNet20 stage shape.

    Float vs int8 (the converter's post-training quantization of a plain model; per-channel
    int8 like the exported files) at 1 thread, timed side by side: shows where int8 gains and
    where it does not.
    """
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from tfqkd._keras import keras, tf

    out = {}
    for hw, c in STAGES:
        keras.utils.set_random_seed(FLAGS.seed)
        x = inp = keras.Input((hw, hw, c), batch_size=1)
        for _ in range(6):
            x = keras.layers.Conv2D(c, 3, padding="same", activation="relu")(x)
        model = keras.Model(inp, x)
        files = {}
        for quantized in (False, True):
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            if quantized:
                rng = np.random.default_rng(FLAGS.seed)
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = lambda: (
                    [rng.normal(size=(1, hw, hw, c)).astype("float32")] for _ in range(16))
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            files["int8" if quantized else "float"] = converter.convert()
        interpreters = {}
        for name, content in files.items():
            it = Interpreter(model_content=content, num_threads=1)
            it.allocate_tensors()
            inp = it.get_input_details()[0]
            it.set_tensor(inp["index"], np.random.default_rng(FLAGS.seed).normal(
                size=inp["shape"]).astype("float32"))
            interpreters[name] = it
        ms = _interleaved_medians(interpreters)
        pixels = 6 * hw * hw
        out[f"{hw}x{hw}x{c}"] = {
            "float_ns_per_pixel": 1e6 * ms["float"] / pixels,
            "int8_ns_per_pixel": 1e6 * ms["int8"] / pixels,
            "int8_over_float": ms["int8"] / ms["float"]}
        _log(f"6 convs {hw}x{hw}x{c}: float {ms['float']:.3f} ms, int8 {ms['int8']:.3f} ms "
             f"({ms['int8'] / ms['float']:.2f} x)")
    return out


def _converter_int8(float_model, calib, path: str) -> str:
    """The TFLite converter's post-training int8 file of ``float_model`` (float32 interface)."""
    from tfqkd._keras import tf

    converter = tf.lite.TFLiteConverter.from_keras_model(float_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with open(path, "wb") as f:
        f.write(converter.convert())
    return path


def _faster_layout(latency: dict, threads: list) -> str:
    s2d_wins = [latency[f"int8_s2d_t{t}_ms"] < latency[f"int8_t{t}_ms"] for t in threads]
    return "space_to_depth" if all(s2d_wins) else "compact" if not any(s2d_wins) else "mixed"


def benchmark_model(model_name: str, out_dir: str) -> dict:
    """Every figure of one model: its files exported into ``out_dir``, timed side by side."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    import tfqkd
    from tfqkd import export
    from tfqkd._keras import keras
    from tfqkd.quantize import quantization_info, quantize_model

    rng = np.random.default_rng(FLAGS.seed)
    size = 32
    if model_name == "resnet20":
        float_model = tfqkd.models.resnet20(FLAGS.num_classes, seed=FLAGS.seed)
        modes = MODES
    else:
        if model_name not in tfqkd.models.names():
            raise SystemExit(f"error: unknown --model {model_name!r}; choose resnet20 or one of "
                             f"{tfqkd.models.names()}")
        size = FLAGS.image_size
        keras.utils.set_random_seed(FLAGS.seed)
        float_model = tfqkd.models.get(model_name, FLAGS.num_classes, (size, size, 3),
                                       alpha=FLAGS.alpha or tfqkd.models.smallest_alpha(model_name),
                                       include_softmax=False)
        for layer in float_model.layers:  # batch norm at the statistics of one batch
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.0
        float_model(rng.normal(size=(32, size, size, 3)).astype("float32"), training=True)
        modes = ("float", "int8", "int4")  # space-to-depth is for ResNet20's narrow convs
    tag = f"{model_name}_w{FLAGS.weight_bits}a8"
    student = quantize_model(float_model, weight_bits=FLAGS.weight_bits, activation_bits=8,
                             per_channel=FLAGS.per_channel)
    if FLAGS.train_steps:
        x = rng.normal(size=(64 * FLAGS.train_steps, size, size, 3)).astype("float32")
        y = rng.integers(0, FLAGS.num_classes, len(x)).astype("int32")
        student.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        student.fit(x, y, batch_size=64, epochs=1, verbose=0)
    # One forward pass in training mode sets the EMA activation clips, as training would.
    calib = rng.normal(size=(FLAGS.num_calibration, size, size, 3)).astype("float32")
    student(calib[:64], training=True)

    os.makedirs(out_dir, exist_ok=True)
    files, sizes, export_seconds, infos = {}, {}, {}, {}
    export_errors = {}
    for mode in modes:
        t0 = time.perf_counter()
        try:
            info = export.export_tflite(student, os.path.join(out_dir, f"{tag}_{mode}.tflite"),
                                        calib if mode != "float" else None, **EXPORT_ARGS[mode])
        except export.ExportError as err:  # reported in the JSON (e.g. MobileNetV3 int4)
            export_errors[mode] = str(err)[:300]
            _log(f"export {mode} failed: {err}")
            continue
        export_seconds[mode] = time.perf_counter() - t0
        files[mode], sizes[mode], infos[mode] = info["path"], info["bytes"], info
        _log(f"exported {mode}: {info['bytes']} bytes in {export_seconds[mode]:.1f} s")
    modes = tuple(m for m in modes if m in files)
    if FLAGS.converter_int8:
        # The reference a user without tfqkd has: the float model through the converter's
        # post-training int8 quantization. Not a student: timed and sized, not verified.
        files["converter_int8"] = _converter_int8(float_model, calib,
                                                  os.path.join(out_dir, f"{tag}_ptq.tflite"))
        sizes["converter_int8"] = os.path.getsize(files["converter_int8"])
        _log(f"converter int8 (post-training): {sizes['converter_int8']} bytes")
    levels = {mode: export.tflite_weight_levels(files[mode]) for mode in modes}
    weight_bits = {}
    for mode in modes:
        n = sum(e["size"] for e in levels[mode])
        weight_bits[mode] = sum(e["size"] * e["storage_bits"] for e in levels[mode]) / n
    ternary_int4 = [e for e in levels.get("int4", []) if e["dtype"] == "int4"]
    lowbit_kernels = sum(1 for v in quantization_info(student).values() if v["bits"] <= 4)
    packed = export.pack_weights(student, os.path.join(out_dir, f"{tag}.tfqkdpw"))
    _log(f"packed archive: {packed['bytes']} bytes, {packed['bits_per_weight']:.3f} bits/weight")

    threads = [int(t) for t in FLAGS.threads.split(",")]
    timed = modes + (("converter_int8",) if FLAGS.converter_int8 else ())
    configs = [(mode, t) for t in threads for mode in timed]
    interpreters = {}
    for mode, t in configs:
        it = Interpreter(model_path=files[mode], num_threads=t)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], calib[:1])
        interpreters[(mode, t)] = it
    medians = _interleaved_medians(interpreters)
    latency = {f"{m}_t{t}_ms": medians[(m, t)] for m, t in configs}
    lat = lambda mode, t: latency[f"{mode}_t{t}_ms"] / latency[f"float_t{t}_ms"]  # noqa: E731
    result = {
        "model": tag, "image_size": size, "rounds": FLAGS.rounds,
        "num_classes": FLAGS.num_classes,
        "alpha": None if model_name == "resnet20" else
        FLAGS.alpha or tfqkd.models.smallest_alpha(model_name),
        "inner": FLAGS.inner, "host": host_cpu(), "file_bytes": sizes, "io_dtype": "float32",
        "export_errors": export_errors,
        "latency_ms": latency,
        "weight_storage_bits_per_weight": weight_bits,
        "packed_bytes": packed["bytes"],
        "packed_bits_per_weight_whole_file": packed["bits_per_weight"],
        "export_seconds": export_seconds,
    }
    for mode in timed[1:]:  # side by side with the float file of the same run
        result[f"{mode}_over_float_size"] = sizes[mode] / sizes["float"]
        result[f"{mode}_over_float_latency"] = {f"t{t}": lat(mode, t) for t in threads}
    result["packed_over_float_size"] = packed["bytes"] / sizes["float"]
    if "int8" in modes:
        result["int8_file_breakdown"] = file_breakdown(files["int8"])
    if FLAGS.converter_int8:
        result["converter_int8_file_breakdown"] = file_breakdown(files["converter_int8"])
    if model_name == "resnet20":
        result.update({
            "int8_s2d_convs": infos["int8_s2d"]["space_to_depth_convs"],
            # Which int8 layout is faster here, at every thread count (else "mixed").
            "faster_int8_layout": _faster_layout(latency, threads),
            "int4_bits_per_lowbit_weight": sum(e["size"] * e["storage_bits"]
                                               for e in ternary_int4)
            / sum(e["size"] for e in ternary_int4),
            "int4_file_bits_per_weight_whole_file": 8.0 * sizes["int4"] / sum(
                e["size"] for e in levels["int4"]),
            "int4_tensors": len(ternary_int4), "lowbit_kernels": lowbit_kernels,
            "int4_max_levels_per_channel": max(e["max_levels_per_channel"] for e in ternary_int4),
            "int8_max_levels_per_channel_ternary_layers": max(
                e["max_levels_per_channel"] for e in levels["int8"][1:-1]),
            "packed_bits_per_ternary_weight": packed["bits_per_ternary_weight"],
            "targets_met": {
                "int8_size_le_0.27": sizes["int8"] / sizes["float"] <= 0.27,
                "int8_latency_le_0.6": all(lat("int8", t) <= 0.6 for t in threads),
                "int4_lowbit_weights_le_4_bits": len(ternary_int4) == lowbit_kernels and all(
                    e["storage_bits"] <= 4 for e in ternary_int4),
                "packed_le_1.61_bits_per_ternary": packed["bits_per_ternary_weight"] <= 1.61,
            },
        })
    elif "int8" in modes:
        # Issue 20's targets for MobileNetV2 W8A8: file <= 0.27 x, latency <= 0.5 x float.
        result["targets_met"] = {
            "int8_size_le_0.27": sizes["int8"] / sizes["float"] <= 0.27,
            "int8_latency_le_0.5": all(lat("int8", t) <= 0.5 for t in threads),
        }
    if FLAGS.layer_breakdown:
        result["layer_breakdown"] = layer_breakdown()
    for c in configs:
        _log(f"{tag} {c[0]:8s} threads={c[1]}: median {medians[c]:.3f} ms")
    return result


def main(argv):
    del argv
    out_dir = FLAGS.output_dir or tempfile.mkdtemp(prefix="tfqkd_bench_")
    if len(FLAGS.model) == 1:
        print(json.dumps(benchmark_model(FLAGS.model[0], out_dir)))
        return
    # Several models: each one's files are timed side by side with its own float file (the
    # ratios), one model after the other; one JSON holds them all, keyed by model tag.
    results = {}
    for name in FLAGS.model:
        result = benchmark_model(name, os.path.join(out_dir, name))
        results[result["model"]] = result
    print(json.dumps({"host": host_cpu(), "models": results,
                      "targets_met": {tag: r.get("targets_met") for tag, r in results.items()}}))


if __name__ == "__main__":
    app.run(main)
