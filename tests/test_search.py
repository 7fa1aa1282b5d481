"""Bit-width search: the budget as a hard constraint, a tiny keras-tuner search on digits with
KD in the loop, and resuming from the tuner's directory."""

import csv
import json
import os

import numpy as np
import pytest

import tfqkd
from tfqkd import data as data_lib
from tfqkd import keras
from tfqkd._keras import tf
from tfqkd.budget import kernel_bytes
from tfqkd.search import BitWidthSpace, BitWidthTuner, fit_to_budget, pareto_front


def test_fit_to_budget_narrows_the_biggest_saving_first_and_refuses_the_impossible():
    model = tfqkd.models.tiny_resnet(seed=0)
    all8 = {layer.name: 8 for layer in tfqkd.layer_bits.weighted_layers(model)}
    # int4 bytes at 8 bits: 4,968. Narrowing stage2_block1_conv2 (2,304 weights) to 4 bits saves
    # 1,152 -> 3,816; then stage2_block1_conv1 (1,152 -> 576) -> 3,240; then the first of the two
    # 576-weight stage-1 convs (288) -> 2,952 <= 3,000.
    fitted = fit_to_budget(model, all8, 3000, "int4", (2, 4, 8))
    assert fitted == dict(all8, stage2_block1_conv2=4, stage2_block1_conv1=4,
                          stage1_block1_conv1=4)
    assert kernel_bytes(model, fitted, "int4") == 2952
    # Already within budget: unchanged.
    assert fit_to_budget(model, all8, 4968, "int4", (2, 4, 8)) == all8
    # The 8-bit stem and classifier alone take 232 bytes.
    with pytest.raises(ValueError, match="raise max_bytes"):
        fit_to_budget(model, all8, 1000, "int4", (2, 4, 8), frozen=["stem_conv", "classifier"])
    with pytest.raises(ValueError, match="raise max_bytes"):
        BitWidthSpace(model, max_bytes=200, storage="int4")


def test_pareto_front_keeps_only_undominated_records():
    records = [{"kernel_bytes": b, "val_accuracy": a} for b, a in
               [(30, 0.7), (10, 0.5), (20, 0.4), (20, 0.6), (40, 0.7)]]
    assert [(r["kernel_bytes"], r["val_accuracy"]) for r in pareto_front(records)] == [
        (10, 0.5), (20, 0.6), (30, 0.7)]


def _digits():
    x, y = data_lib.load_arrays("digits", "train")
    info = data_lib.dataset_info("digits")
    x = ((x / 255.0 - np.array(info.mean)) / np.array(info.std)).astype("float32")
    # Validation carved from the training images: the search never sees the test split.
    return (x[:600], y[:600].astype("int32")), (x[600:900], y[600:900].astype("int32"))


def _trained(model, x, y, epochs):
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=50, epochs=epochs, verbose=0)
    return model


def test_tiny_search_on_digits_respects_the_budget_and_resumes(tmp_path):
    import keras_tuner

    keras.utils.set_random_seed(0)
    (xt, yt), (xv, yv) = _digits()
    student = _trained(tfqkd.models.tiny_resnet(seed=0), xt, yt, epochs=3)
    teacher = _trained(tfqkd.models.tiny_resnet(width=2, seed=1), xt, yt, epochs=3)
    train = tf.data.Dataset.from_tensor_slices((xt, yt)).batch(100)
    validation = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(300)
    space = BitWidthSpace(student, max_bytes=3500, storage="int4", choices=(2, 4, 8))

    def tuner(max_trials):
        return BitWidthTuner(
            space, student, teacher, train, validation, proxy_epochs=1, kd=True,
            oracle=keras_tuner.oracles.RandomSearchOracle(
                objective=keras_tuner.Objective("val_accuracy", "max"), max_trials=max_trials,
                seed=0),
            directory=str(tmp_path), project_name="bits", overwrite=False)

    first = tuner(3)
    first.search()
    records = first.trial_records()
    assert len(records) == 3
    for r in records:
        assert r["kernel_bytes"] == kernel_bytes(student, r["widths"], "int4") <= 3500
        assert r["widths"]["stem_conv"] == 8 and r["widths"]["classifier"] == 8
        assert set(r["widths"].values()) <= {2, 4, 8}
    best = max(records, key=lambda r: r["val_accuracy"])
    assert best["val_accuracy"] > 0.3  # 10 classes, chance 0.1; measured best 0.59-0.74, seeds 0-2
    stamps = {n: os.path.getmtime(os.path.join(first.project_dir, n))
              for n in os.listdir(first.project_dir) if n.endswith("_widths.json")}
    # A rerun with a larger budget of trials continues: the 3 finished trials are not rerun.
    again = tuner(4)
    again.search()
    records = again.trial_records()
    assert len(records) == 4
    for name, stamp in stamps.items():
        assert os.path.getmtime(os.path.join(again.project_dir, name)) == stamp, name
    assert json.load(open(os.path.join(again.project_dir, sorted(stamps)[0])))["kd"] is True


# --------------------------------------------------------------------------------------------
# recipes/search_bits.py: budget by hand, kill during the search, resume, export, archive
# --------------------------------------------------------------------------------------------
#: tiny_resnet's packed bytes at uniform 3 bits, first/last at 8, one float32 step per tensor,
#: each tensor ceil(weights * bits / 8) + 4: stage1 convs 576 weights -> 216 + 4 (twice),
#: stage2_block1_conv1 1,152 -> 436, stage2_block1_conv2 2,304 -> 868, the projection 128 -> 52,
#: stem 72 at 8 bits -> 76, classifier 160 -> 164.
TINY_PACKED_AT_3_BITS = 220 + 220 + 436 + 868 + 52 + 76 + 164


def test_search_bits_recipe_resumes_after_a_kill_and_ships_the_budget(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, run_script, subprocess_env
    from recipes import _stages

    assert TINY_PACKED_AT_3_BITS == 2036
    base = dict(dataset="digits", subset=None, test_subset=None, epochs=3, progress="none")
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    _stages.train_student(_stages.student_config("smoke", **base, output_dir=str(student)))
    _stages.train_teacher(_stages.teacher_config("smoke", **base, output_dir=str(teacher)))
    out = tmp_path / "search"
    # Both budgets: the packed bytes, and a generous latency (the plumbing: each candidate's
    # int4 file and the shipped one measured with LiteRT; timings are never asserted against
    # each other in tests).
    args = ["--preset=smoke", f"--student={student}", f"--teacher={teacher}",
            "--max_bytes_at_bits=3", "--storage=packed", "--max_latency_ms=1000",
            "--max_trials=4", f"--output_dir={out}"]
    script = REPO / "recipes" / "search_bits.py"
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    project = out / "search" / "bits"
    try:
        # Killed once trial 1 has finished: trial 0 is then finished in the oracle too.
        end = time.time() + 240
        while not (project / "trial_1_widths.json").exists():
            assert proc.poll() is None and time.time() < end, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        first_log = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, first_log[-2000:]
    assert not (out / "results.json").exists()
    stamp = os.path.getmtime(project / "trial_0_widths.json")

    log = run_script(script, *args, timeout=300).stdout
    assert "Reloading Tuner" in log
    assert os.path.getmtime(project / "trial_0_widths.json") == stamp  # not trained again
    res = json.loads((out / "results.json").read_text())
    assert res["budget_bytes"] == TINY_PACKED_AT_3_BITS
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["trial_id"]) for r in rows) == [0, 1, 2, 3]
    assert all(int(r["kernel_bytes"]) <= TINY_PACKED_AT_3_BITS for r in rows)
    # The chosen trial is the best on validation, and the shipped archive holds exactly the
    # bytes the budget priced.
    best = max(rows, key=lambda r: float(r["val_accuracy"]))
    assert json.loads(best["widths"]) == res["widths"]
    assert res["packed"]["quantized_bytes"] == res["kernel_bytes"] == int(best["kernel_bytes"])
    assert res["widths"]["stem_conv"] == res["widths"]["classifier"] == 8
    assert (out / "pareto.png").is_file() and (out / "pareto.svg").is_file()
    assert all(float(r["latency_ms"]) > 0 for r in rows)
    assert res["latency"]["candidate_ms"] == float(best["latency_ms"])
    assert res["latency"]["budget_ms"] == 1000 and res["latency"]["shipped_file_ms"] > 0
    # The saved student holds each kernel at its chosen width; the int4 file matches it.
    from tfqkd.quantize import quantization_info

    info = quantization_info(tfqkd.training.load_model(str(out)))
    assert {name: info[name]["bits"] for name in res["widths"]} == res["widths"]
    assert res["export"]["weight_bits"] == {
        name: 4 if bits <= 4 else 8 for name, bits in res["widths"].items()}
    # Float activations calibrated by the converter and the INT4 kernels' double rounding keep
    # this from exact; measured 0.981 and 0.992 on the 360 test digits.
    assert res["parity"]["top1_agreement"] >= 0.95
    # A rerun of the finished search trains nothing.
    again = run_script(script, *args, timeout=120)
    assert "is already complete" in again.stdout + again.stderr
    from recipes import search_bits

    with pytest.raises(ValueError, match="--export=int4 or --export=int8"):
        search_bits.check_inputs(search_bits.make_config(
            "smoke", student=str(student), teacher=[str(teacher)], max_latency_ms=5.0,
            export="none"))


# --------------------------------------------------------------------------------------------
# Latency budgets: measured per candidate, widened until they fit
# --------------------------------------------------------------------------------------------
def test_fit_to_latency_widens_the_largest_int4_kernel_first_within_the_bytes():
    from tfqkd.search import fit_to_latency

    model = tfqkd.models.tiny_resnet(seed=0)
    all2 = {layer.name: 2 for layer in tfqkd.layer_bits.weighted_layers(model)}
    all2.update(stem_conv=8, classifier=8)
    sizes = {"stage1_block1_conv1": 576, "stage1_block1_conv2": 576, "stage2_block1_conv1": 1152,
             "stage2_block1_conv2": 2304, "stage2_block1_proj_conv": 128}
    calls = []

    def fake_ms(widths):
        # A stand-in measurement: 1 ms plus 1 ms per 1,000 weights in INT4 kernels.
        calls.append(dict(widths))
        return 1.0 + sum(n for name, n in sizes.items() if widths[name] <= 4) / 1000

    # All ternary: 1 + 4.736 ms. Widening conv2 (2,304) straight to 8 (4 is INT4 too) -> 3.432,
    # then stage2 conv1 (1,152) -> 2.280, then the first 576-weight conv -> 1.704 <= 2.0.
    widths, ms = fit_to_latency(model, all2, 2.0, fake_ms, "int4", (2, 4, 8),
                                frozen=["stem_conv", "classifier"])
    assert widths == dict(all2, stage2_block1_conv2=8, stage2_block1_conv1=8,
                          stage1_block1_conv1=8)
    assert ms == pytest.approx(1.704) and len(calls) == 4
    # A bytes budget that the first widening would break: the next largest kernel is widened.
    budget = kernel_bytes(model, dict(all2, stage2_block1_conv2=8), "int4") - 1
    widths, _ = fit_to_latency(model, all2, 4.0, fake_ms, "int4", (2, 4, 8), max_bytes=budget,
                               storage="int4", frozen=["stem_conv", "classifier"])
    assert widths["stage2_block1_conv2"] == 2 and widths["stage2_block1_conv1"] == 8
    assert kernel_bytes(model, widths, "int4") <= budget
    # In an int8 file the width changes nothing: an unmet budget is an error naming the fix.
    with pytest.raises(ValueError, match="raise max_latency_ms"):
        fit_to_latency(model, all2, 2.0, fake_ms, "int8", (2, 4, 8))
    with pytest.raises(ValueError, match="latency_of"):
        BitWidthSpace(model, None, max_latency_ms=1.0)
