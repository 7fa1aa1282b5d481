"""The command-line tools under tools/, run as users run them: subprocesses, last line JSON."""

import json
import pathlib

import numpy as np
import pytest

import tfqkd
from conftest import last_json_line, packed_ternary_bits, run_script, tflite_outputs
from tfqkd._keras import keras
from tfqkd.quantize import quantize_model, quantized_weights

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"


def _tool(script, *args, timeout=300, ok=True):
    return run_script(TOOLS / script, *args, timeout=timeout, cwd=REPO, ok=ok)


@pytest.fixture(scope="module")
def digits_w2_model(tmp_path_factory):
    """A W2A8 tiny ResNet for the 8x8 digits, a few training steps, saved as .h5."""
    from tfqkd import data

    keras.utils.set_random_seed(0)
    q = quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2, activation_bits=8)
    q.compile(keras.optimizers.Adam(1e-2),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    q.fit(data.load_dataset("digits", "train", batch_size=64, seed=0), epochs=2, verbose=0)
    path = tmp_path_factory.mktemp("model") / "student.h5"
    q.save(path)
    return path


def test_export_and_evaluate_tools(digits_w2_model, tmp_path):
    out = tmp_path / "student.tflite"
    p = _tool("export_tflite.py", f"--model={digits_w2_model}", f"--output={out}", "--mode=int8",
              "--dataset=digits", "--num_calibration=200", "--verify", "--num_eval=300",
              f"--pack={tmp_path / 'student.tfqkdpw'}")
    result = last_json_line(p.stdout)
    assert out.is_file() and result["export"]["bytes"] == out.stat().st_size
    assert result["report"]["num_examples"] == 300
    # Fixture seeds 0-7: agreement 0.9967-1.0 of the 300 test digits, max |logit diff| 0.027-0.045.
    assert result["report"]["top1_agreement"] >= 0.98
    assert result["report"]["max_logit_diff"] < 0.1
    # The packed archive takes what its format defines: 1.6 bits per level + a float32 step per
    # tensor for the 2-bit layers (stem and classifier are 8-bit): 1.64 bits here.
    with tfqkd.quantize_scope():
        kernels = quantized_weights(keras.models.load_model(digits_w2_model, compile=False))
    ternary = [v for k, v in kernels.items() if k not in ("stem_conv", "classifier")]
    assert result["packed"]["bits_per_ternary_weight"] == pytest.approx(
        packed_ternary_bits(ternary))
    assert "top-1 agreement" in p.stdout

    e = _tool("evaluate_tflite.py", f"--tflite={out}", f"--model={digits_w2_model}",
              "--dataset=digits", "--num_eval=300", "--batch_size=50")
    report = last_json_line(e.stdout)
    assert report["num_examples"] == 300
    assert report["top1_agreement"] == result["report"]["top1_agreement"]
    assert report["file_bytes"] == out.stat().st_size
    eight_bit = ("stem_conv", "classifier")  # first_last_bits=8
    ternary = [layer for layer in report["layers"] if layer["layer"] not in eight_bit]
    assert ternary and all(layer["max_levels_per_channel"] <= 3 for layer in ternary)


def test_export_tool_aligns_and_verifies_for_the_builtin_kernels(digits_w2_model, tmp_path):
    """--runtime=builtin: the student takes the rounding of every int8 kernel the file runs on
    LiteRT's built-in kernels, and of its global pooling's MEAN, and --verify runs the file on
    them (recomputed here)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from recipes import common

    out, aligned = tmp_path / "builtin.tflite", tmp_path / "aligned.h5"
    # --num_eval above the 360 test digits: every one of them, so the figures do not depend on
    # the order the tool's seeded shuffle gives them in its process.
    p = _tool("export_tflite.py", f"--model={digits_w2_model}", f"--output={out}", "--mode=int8",
              "--dataset=digits", "--num_calibration=200", "--align_student", "--runtime=builtin",
              f"--aligned_model={aligned}", "--verify", "--num_eval=1000")
    result = last_json_line(p.stdout)
    it = Interpreter(model_path=str(out),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    dtypes = {d["index"]: d["dtype"] for d in it.get_tensor_details()}
    rounding_twice = [op for op in it._get_ops_details()  # noqa: SLF001 (the op graph)
                      if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED",
                                           "MEAN") and dtypes[op["outputs"][0]] == np.int8]
    assert sum(op["op_name"] == "MEAN" for op in rounding_twice) == 1
    assert result["export"]["aligned_requantization"] == {"layers": len(rounding_twice),
                                                          "unmatched": []}
    # The report's figures are the file's on the built-in kernels against the aligned student.
    with tfqkd.quantize_scope():
        student = keras.models.load_model(aligned, compile=False)
    x = np.concatenate([b[0].numpy() for b in common.load_evaluation_split(
        "digits", "test", common.data_kwargs_for_model(student), batch_size=100,
        num_eval=None)])
    logits = tflite_outputs(it, x)
    ref = student(x, training=False).numpy()
    report = result["report"]
    assert report["num_examples"] == len(x) == 360
    assert report["top1_agreement"] == pytest.approx(np.mean(logits.argmax(-1) == ref.argmax(-1)))
    assert report["max_logit_diff"] == pytest.approx(float(np.abs(logits - ref).max()), abs=1e-6)


def test_export_tool_takes_a_recipe_runs_model_folder(tmp_path):
    """docs/export.md shows --model=RUN/model; recipes save RUN/model/model.h5."""
    from recipes import train_teacher

    run = tmp_path / "run"
    train_teacher.run(train_teacher.make_config(
        "smoke", dataset="digits", subset=None, test_subset=None, epochs=1, progress="none",
        output_dir=str(run)))
    out = tmp_path / "t.tflite"
    p = _tool("export_tflite.py", f"--model={run / 'model'}", f"--output={out}", "--mode=float",
              "--dataset=digits")
    assert last_json_line(p.stdout)["export"]["bytes"] == out.stat().st_size
    # The .tflite gets the permissions of every other output (tfqkd._io), not mkstemp's 0600.
    assert out.stat().st_mode & 0o777 == (run / "model" / "model.h5").stat().st_mode & 0o777
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_tool_bad_input(tmp_path):
    out = tmp_path / "never.tflite"
    p = _tool("export_tflite.py", f"--model={tmp_path / 'missing.h5'}", f"--output={out}", ok=False)
    assert p.returncode != 0 and "does not exist" in p.stderr
    assert not out.exists()


def test_benchmark_tflite_reports_every_figure():
    p = _tool("benchmark_tflite.py", "--rounds=2", "--inner=2", "--warmup=1", "--threads=1",
              "--num_calibration=20", "--json_only")
    r = last_json_line(p.stdout)
    assert set(r["file_bytes"]) == {"float", "int8", "int4", "int8_s2d"}
    assert r["int8_over_float_size"] == r["file_bytes"]["int8"] / r["file_bytes"]["float"]
    assert r["int8_over_float_size"] < 0.3 and r["int4_over_float_size"] < 0.2
    # ResNet20's 20 ternary kernels at 5 trits per byte + one float32 step each: 1.6026 bits.
    r20 = quantize_model(tfqkd.models.resnet20(seed=0), weight_bits=2, activation_bits=8)
    ternary = [v for k, v in quantized_weights(r20).items() if k not in ("stem_conv", "classifier")]
    assert r["packed_bits_per_ternary_weight"] == pytest.approx(packed_ternary_bits(ternary))
    assert r["packed_bits_per_ternary_weight"] < 1.61
    assert r["int8_max_levels_per_channel_ternary_layers"] <= 3
    assert r["faster_int8_layout"] in ("compact", "space_to_depth", "mixed")
    assert r["host"]["cores"] >= 1 and isinstance(r["host"]["isa"], list)
    assert set(r["latency_ms"]) == {f"{m}_t1_ms" for m in r["file_bytes"]}
    assert all(v > 0 for v in r["latency_ms"].values())
    assert set(r["targets_met"]) == {"int8_size_le_0.27", "int8_latency_le_0.6",
                                     "int4_lowbit_weights_le_4_bits",
                                     "packed_le_1.61_bits_per_ternary"}


def test_benchmark_tflite_applications_models_side_by_side():
    """--model=<Applications names>: float, int8 and int4 files of W8A8 models in one JSON."""
    p = _tool("benchmark_tflite.py", "--model=mobilenet,mobilenet_v3_small", "--weight_bits=8",
              "--per_channel", "--rounds=1", "--inner=1", "--warmup=1", "--threads=1",
              "--num_calibration=8", "--num_classes=7", "--converter_int8", "--json_only")
    both = last_json_line(p.stdout)
    assert set(both["models"]) == set(both["targets_met"]) == {"mobilenet_w8a8",
                                                               "mobilenet_v3_small_w8a8"}
    assert both["host"]["cores"] >= 1
    v3 = both["models"]["mobilenet_v3_small_w8a8"]
    assert v3["alpha"] == 0.75 and set(v3["file_bytes"]) == {"float", "int8", "int4",
                                                              "converter_int8"}
    # Each model is timed against its own float file: its ratios use its own latencies.
    assert v3["int8_over_float_latency"]["t1"] == \
        v3["latency_ms"]["int8_t1_ms"] / v3["latency_ms"]["float_t1_ms"]
    assert both["targets_met"]["mobilenet_v3_small_w8a8"] == v3["targets_met"]
    r = both["models"]["mobilenet_w8a8"]
    assert r["model"] == "mobilenet_w8a8" and r["alpha"] == 0.25 and r["export_errors"] == {}
    assert r["num_classes"] == 7
    assert set(r["file_bytes"]) == {"float", "int8", "int4", "converter_int8"}
    assert set(r["latency_ms"]) == {f"{m}_t1_ms" for m in r["file_bytes"]}
    # The converter's own post-training file holds the same kernels at one byte per weight.
    assert r["converter_int8_file_breakdown"]["weight_buffers"] == \
        r["int8_file_breakdown"]["weight_buffers"]
    assert set(r["converter_int8_over_float_latency"]) == {"t1"}
    # 8-bit weights: int8 and int4 files hold the same int8 kernels, about a quarter of float.
    assert r["file_bytes"]["int8"] == r["file_bytes"]["int4"]
    assert r["int8_over_float_size"] == r["file_bytes"]["int8"] / r["file_bytes"]["float"] < 0.35
    assert set(r["targets_met"]) == {"int8_size_le_0.27", "int8_latency_le_0.5"}


def test_reproduce_cpu_repeats_methods_over_seeds_on_fixed_images(cifar10_archive, tmp_path):
    out = tmp_path / "repro"
    args = (f"--data_dir={cifar10_archive.parent}", f"--output_dir={out}", "--subset=500",
            "--test_subset=200", "--epochs=1", "--batch_size=100", "--teacher_width=1",
            "--seeds=2", "--methods=hard,kd_cr")
    s = last_json_line(_tool("reproduce_cpu.py", *args, timeout=600).stdout)
    assert s["seeds"] == [0, 1] and s["budget"]["seeds"] == 2
    for name in ("hard", "kd_cr"):
        per_seed = s["accuracy_per_seed"][name]
        assert set(per_seed) == {"0", "1"}
        assert s["accuracy"][name] == pytest.approx(np.mean(list(per_seed.values())))
        for seed, directory in (("0", name), ("1", f"{name}_seed1")):
            res = json.loads((out / directory / "results.json").read_text())
            assert res["test_accuracy"] == per_seed[seed]
            cfg = json.loads((out / directory / "run_config.json").read_text())
            # Every run retrains on the teacher's and student's images; only the seed differs.
            assert (cfg.get("seed"), cfg.get("subset_seed"), cfg.get("subset")) == (
                int(seed), 0, 500)
    acc = s["accuracy"]
    assert s["cr_minus_hard_points"] == round(100 * (acc["kd_cr"] - acc["hard"]), 2)
    # A second start finds every stage complete and reports the same figures without training;
    # with --unseen_eval it evaluates the same models on training images no stage trained on.
    again = last_json_line(_tool("reproduce_cpu.py", *args, "--unseen_eval=300",
                                 timeout=600).stdout)
    assert again["accuracy"] == s["accuracy"] and "unseen" not in s
    _check_unseen(again, out, cifar10_archive, seeds=("0", "1"))


def _accuracy(run_dir, x_uint8, y):
    """Top-1 accuracy of the model saved in ``run_dir`` on raw CIFAR-10 images, computed here."""
    from recipes import common
    from tfqkd import data

    info = data.dataset_info("cifar10")
    images = ((x_uint8 / 255.0 - np.array(info.mean)) / np.array(info.std)).astype(np.float32)
    logits = common.load_model(str(run_dir)).predict(images, verbose=0)
    return np.mean(logits.argmax(-1) == y)


def _check_unseen(s, out, archive, seeds):
    from tfqkd import data

    unseen = s["unseen"]
    assert unseen["num_images"] == 300
    assert set(unseen["accuracy"]) == set(s["accuracy"]) == {"teacher", "student", "hard", "kd_cr"}
    assert set(unseen["accuracy_per_seed"]["kd_cr"]) == set(seeds)
    assert unseen["cr_minus_hard_points"] == round(
        100 * (unseen["accuracy"]["kd_cr"] - unseen["accuracy"]["hard"]), 2)

    # The unseen images: 30 per class, none of them among the 500 the stages trained on.
    with np.load(out / "unseen300_subset500_seed0.npz") as f:
        x_unseen, y_unseen, x_seen = f["x_test"], f["y_test"], f["x_train"]
    assert np.bincount(y_unseen).tolist() == [30] * 10
    x, y = data.load_arrays("cifar10", "train", data_dir=archive)
    trained = x[data.balanced_subset(y, 500, 10, 0)]
    np.testing.assert_array_equal(x_seen, trained)
    assert not {a.tobytes() for a in trained} & {a.tobytes() for a in x_unseen}

    # Each figure is its own model's accuracy on those images, recomputed here independently.
    assert unseen["accuracy"]["student"] == pytest.approx(
        _accuracy(out / "student", x_unseen, y_unseen))
    assert unseen["accuracy_per_seed"]["kd_cr"]["1"] == pytest.approx(
        _accuracy(out / "kd_cr_seed1", x_unseen, y_unseen))


def test_reproduce_cpu_bad_counts_fail_before_training(cifar10_archive, tmp_path):
    out = tmp_path / "repro"
    args = [f"--data_dir={cifar10_archive.parent}", f"--output_dir={out}", "--subset=500",
            "--epochs=1", "--seeds=1"]
    # One case per check (each a Python start-up, ~10 s): the flag check in main(), and the
    # balanced-subset errors of the unseen and the holdout sources.
    for bad, says in ((["--unseen_eval=100", "--subset=0"], "training --subset"),
                      (["--unseen_eval=49600"], "smaller multiple of 10"),
                      (["--holdout=105"], "--holdout=105")):
        err = _tool("reproduce_cpu.py", *args, *bad, ok=False).stderr
        assert says in err and "Traceback" not in err, err
        assert not out.exists(), bad  # nothing written, not even the output directory


def test_reproduce_cpu_holdout_mode_never_trains_or_evaluates_on_its_images(cifar10_archive,
                                                                            tmp_path):
    from tfqkd import data

    out = tmp_path / "tune"
    s = last_json_line(_tool(
        "reproduce_cpu.py", f"--data_dir={cifar10_archive.parent}", f"--output_dir={out}",
        "--holdout=100", "--subset=300", "--unseen_eval=200", "--epochs=1", "--batch_size=100",
        "--teacher_width=1", "--seeds=1", "--methods=hard", timeout=600).stdout)
    assert s["evaluated_on"] == "holdout100" and s["num_test"] == 100
    assert s["budget"]["holdout"] == 100

    # Three disjoint sets of CIFAR-10 *training* images: held out (the evaluation), trained on,
    # and the unseen diagnostic; the archive's test split is not used.
    x, y = data.load_arrays("cifar10", "train", data_dir=cifar10_archive)
    with np.load(out / "holdout100.npz") as f:
        x_rest, y_rest, x_held, y_held = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    assert np.bincount(y_held).tolist() == [10] * 10 and len(x_rest) == len(x) - 100
    every = {a.tobytes() for a in x}
    held = {a.tobytes() for a in x_held}
    assert held <= every and not held & {a.tobytes() for a in x_rest}
    trained = x_rest[data.balanced_subset(y_rest, 300, 10, 0)]
    with np.load(out / "unseen200_subset300_seed0.npz") as f:
        np.testing.assert_array_equal(f["x_train"], trained)
        unseen = {a.tobytes() for a in f["x_test"]}
    trained = {a.tobytes() for a in trained}
    assert len(unseen) == 200 and not (held & trained or held & unseen or trained & unseen)

    # The reported figures are accuracies on the held-out images, recomputed here.
    for key in ("student", "hard"):
        assert s["accuracy"][key] == pytest.approx(_accuracy(out / key, x_held, y_held))


def test_compare_peers_smoke_contract_and_resume(tmp_path):
    """tools/compare_peers.py on the 8x8 digits with tiny ResNets, tfqkd-environment rows only
    (no Larq venv in CI; the KD rows are exercised by the --smoke run documented in docs/peers.md): the CSV and the JSON agree with accuracies recomputed here from the
    saved predictions and the saved split, and a second run skips every finished row."""
    import csv

    out = tmp_path / "peers"
    args = ("--smoke", "--dataset=digits", "--arch=tiny", "--train_images=500",
            "--test_images=0", "--rows=float,hard,larq_hard", "--max_steps=3",
            f"--output_dir={out}")
    first = last_json_line(_tool("compare_peers.py", *args).stdout)
    assert first["ran"] == ["float_seed0", "hard_seed0"]
    assert first["not_run"] == ["larq_hard_seed0"] and first["skipped"] == []

    data = np.load(out / "data.npz")
    idx = np.load(out / "data_indices.npz")
    # 500 class-balanced images: 450 train + 50 validation, disjoint; the whole test split.
    assert len(data["y_train"]) + len(data["y_validation"]) == 500
    assert np.bincount(data["y_validation"]).tolist() == [5] * 10
    assert not set(idx["train"]) & set(idx["validation"]) and len(data["y_test"]) == 360
    with open(out / "results.csv", newline="") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["float", "hard"]
    for name, r in rows.items():
        for split in ("validation", "test"):
            pred = np.load(out / "rows" / f"{name}_seed0" / f"{split}_predictions.npy")
            expected = float(np.mean(pred == data[f"y_{split}"]))
            assert float(r[f"{split}_accuracy"]) == pytest.approx(expected)
            assert first["rows"][name][f"{split}_accuracy"] == pytest.approx(expected)
            assert int(r[f"num_{split}"]) == len(pred) == len(data[f"y_{split}"])
        assert int(r["steps"]) == 3  # --max_steps x 1 epoch (--smoke)
    assert rows["hard"]["precise_bn"] == "1" and rows["float"]["precise_bn"] == "0"

    before = (out / "results.csv").read_bytes()
    again = last_json_line(_tool("compare_peers.py", *args).stdout)
    assert again["ran"] == [] and again["skipped"] == first["ran"]
    assert (out / "results.csv").read_bytes() == before
    assert again["rows"] == first["rows"]


def test_kerasio_peer_trains_on_the_keras_io_objective():
    """tools/peers/kerasio.py (the KD peer of benchmark_distill and compare_peers): its loss is
    alpha * CE + (1 - alpha) * tau^2 * KL(p_t || p_s), plus the student's L2 with
    regularization=True, written out here in NumPy."""
    from tools.peers.kerasio import KerasIODistiller

    from tfqkd._keras import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    student = keras.Sequential([keras.Input((5,)), keras.layers.Dense(
        3, kernel_regularizer=keras.regularizers.l2(0.1), kernel_initializer="glorot_normal")])
    teacher = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    s, t = student(x).numpy().astype(np.float64), teacher(x).numpy().astype(np.float64)
    kernel = student.layers[0].kernel.numpy().astype(np.float64)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    alpha, tau = 0.3, 4.0
    ce = -np.mean(np.log(softmax(s)[np.arange(6), y]))
    p_t, p_s = softmax(t / tau), softmax(s / tau)
    kl = np.mean(np.sum(p_t * np.log(p_t / p_s), -1))
    for regularization, reg in ((False, 0.0), (True, 0.1 * np.sum(kernel ** 2))):
        peer = KerasIODistiller(student, teacher, regularization=regularization)
        peer.compile(keras.optimizers.SGD(0.0), metrics=None,
                     student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     distillation_loss_fn=keras.losses.KLDivergence(), alpha=alpha,
                     temperature=tau)
        logs = peer.train_on_batch(x, y, return_dict=True)
        assert logs["loss"] == pytest.approx(alpha * ce + (1 - alpha) * tau ** 2 * kl + reg,
                                             rel=1e-5)
