"""Command-line recipes: quick start, CIFAR-10 smoke run, kill/resume, mirrored and multi-worker.

Recipes run as subprocesses (as users run them) except the quick start, which runs in-process to
save a TensorFlow start-up. Everything uses the smoke preset: tiny models, few steps.
"""

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import tfqkd
from conftest import (last_json_line, run_script, run_test_set, saved_model_accuracy,
                      subprocess_env, tflite_outputs)
from recipes import common

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

#: Every complete output directory holds these.
OUTPUT_FILES = ("model/model.h5", "history.csv", "results.json", "run_config.json")


def _run(script, *args, timeout=240, env=None):
    return run_script(RECIPES / script, *args, timeout=timeout, env=env).stdout


def _history(run_dir):
    with open(pathlib.Path(run_dir) / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_complete(run_dir):
    run_dir = pathlib.Path(run_dir)
    for name in OUTPUT_FILES:
        assert (run_dir / name).is_file(), f"{run_dir / name} missing"
    assert (run_dir / "checkpoints" / "backup").is_dir()
    assert any((run_dir / "logs").rglob("events.out.tfevents*")), "no TensorBoard events"
    leftovers = [p for p in run_dir.rglob(".tmp-*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    res = json.loads((run_dir / "results.json").read_text())
    for key in ("test_accuracy", "train_accuracy", "flags", "versions", "wall_time_s"):
        assert key in res
    assert set(res["versions"]) == {"python", "tensorflow", "tf_keras", "tfmot", "tfqkd"}
    # The reported accuracies are the saved model's: recomputed here from its predictions, on
    # the test images and on the (unaugmented) images it trained on.
    assert res["test_accuracy"] == pytest.approx(saved_model_accuracy(run_dir), abs=1e-9)
    assert res["train_accuracy"] == pytest.approx(
        saved_model_accuracy(run_dir, split="train"), abs=1e-9)
    return res


#: The recipes (command lines); recipes/common.py and the private recipes/_*.py are their shared
#: layer.
RECIPE_NAMES = ("train_teacher", "train_student", "quantize_distill", "qkd", "speq", "sweep",
                "search_bits", "quickstart")


def test_recipes_are_leaves_installed_as_commands_without_sys_path_edits():
    import ast

    on_disk = {p.stem for p in RECIPES.glob("*.py")
               if not p.stem.startswith("_") and p.stem != "common"}
    assert on_disk == set(RECIPE_NAMES)
    for name in RECIPE_NAMES:
        tree = ast.parse((RECIPES / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module:
                imported |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
        siblings = {m for m in imported
                    if m.startswith("recipes.") and m.split(".")[1] in RECIPE_NAMES}
        assert not siblings, f"recipes/{name}.py imports a sibling recipe: {siblings}"
        assert not any(m == "tools" or m.startswith(("tools.", "reproduce")) for m in imported)
    # One console script per recipe, each a main() that parses its flags (setup.py).
    setup = (REPO / "setup.py").read_text()
    for name in RECIPE_NAMES:
        assert f'"{name}"' in setup, f"setup.py has no console script for recipes/{name}.py"
        assert "\ndef main() -> None:" in (RECIPES / f"{name}.py").read_text()
    # Scripts import the installed packages; no file edits sys.path to find them.
    edit = "sys.path." + "insert"
    offenders = [str(p.relative_to(REPO)) for d in ("recipes", "tools", "tests")
                 for p in (REPO / d).rglob("*.py") if edit in p.read_text()]
    assert not offenders, f"{edit} in {offenders}"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A float tiny teacher on digits, trained in-process for two epochs."""
    from recipes import train_teacher

    out = tmp_path_factory.mktemp("teacher")
    cfg = train_teacher.make_config("smoke", dataset="digits", subset=None, test_subset=None,
                                    epochs=2, output_dir=str(out), progress="none")
    res = train_teacher.run(cfg)
    assert res["test_accuracy"] > 0.5  # seeds 0-4 measured 0.72-0.80 (chance 0.1)
    return out


def test_presets_and_explicit_flags_override():
    from absl import flags

    from recipes import quantize_distill

    fv = flags.FlagValues()
    common.define_flags(quantize_distill.OPTIONS, fv)
    fv(["prog", "--preset=cpu", "--epochs=3", "--teacher=a", "--teacher=b"])
    cfg = common.config_from_flags(quantize_distill.OPTIONS, quantize_distill.PRESETS, fv)
    assert cfg.epochs == 3  # explicit flag beats the preset's 10
    assert cfg.subset == 10_000 and cfg.learning_rate == 0.01  # from the cpu preset
    assert cfg.teacher == ["a", "b"]
    paper = quantize_distill.make_config("paper")
    assert (paper.epochs, paper.batch_size, paper.momentum, paper.weight_decay) == \
        (200, 128, 0.9, 1e-4)
    from tfqkd import models as tfqkd_models

    # Every step rule of quantize_model, LSQ included, is selectable and reaches the quantizers.
    from recipes._build import quantize

    fv = flags.FlagValues()
    common.define_flags(quantize_distill.OPTIONS, fv)
    fv(["prog", "--preset=smoke", "--step=learned"])
    cfg = common.config_from_flags(quantize_distill.OPTIONS, quantize_distill.PRESETS, fv)
    q = quantize(tfqkd_models.tiny_resnet(seed=0), cfg)
    # One trainable step per quantized kernel (e.g. quant_stem_conv/kernel_step).
    names = [v.name.split("/")[-1] for v in q.trainable_variables]
    assert names.count("kernel_step:0") == names.count("kernel:0") > 0, names
    with pytest.raises(ValueError, match="save_freq"):
        quantize_distill.make_config("smoke", save_freq="often")
    with pytest.raises(ValueError, match="preset"):
        quantize_distill.make_config("huge")
    with pytest.raises(ValueError, match="--softmax_head_bits must be 8 .* or 16"):
        quantize_distill.make_config("smoke", softmax_head_bits=12)
    # The head width reaches quantize_model: an int8 head on a softmax-ended student.
    from tfqkd._keras import keras

    inputs = tfqkd_models.tiny_resnet(seed=0).inputs
    softmax_net = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(
        keras.layers.Flatten()(inputs[0])))
    for bits in (8, 16):
        head_q = quantize(softmax_net, quantize_distill.make_config(
            "smoke", activation_bits=8, softmax_head_bits=bits)).get_layer("quant_head")
        assert head_q._output_quantizers[0].bits == bits
    # KD options reach the Distiller (Hinton's τ² factor: on by default, the measured best with
    # τ = 4; off is the paper's Eq. 3).
    import tfqkd
    from recipes.train_student import make_distiller

    for flag, want in (([], True), (["--notemperature_squared"], False)):
        fv = flags.FlagValues()
        common.define_flags(quantize_distill.OPTIONS, fv)
        fv(["prog", "--preset=smoke", "--temperature=3", *flag])
        cfg = common.config_from_flags(quantize_distill.OPTIONS, quantize_distill.PRESETS, fv)
        d = make_distiller(tfqkd.models.tiny_resnet(seed=0), [tfqkd.models.tiny_resnet(seed=1)],
                           cfg)
        assert d.temperature_squared is want and float(d.temperature.numpy()) == 3.0


def test_history_records_the_scheduled_learning_rate(tmp_path):
    # Every row carries ``lr``: the schedule's rate at the row's optimizer step (a failure to read
    # it used to drop the column silently).
    import numpy as np
    from tfqkd._keras import keras

    cfg = common.make_config(common.COMMON_OPTIONS, preset="smoke", epochs=3,
                             learning_rate=0.1, lr_schedule="cosine")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(common.make_optimizer(cfg, steps_per_epoch=5),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = np.ones((20, 4), "float32"), np.zeros(20, "int32")
    model.fit(x, y, batch_size=4, epochs=3, verbose=0,
              callbacks=[common.HistoryLogger(str(tmp_path / "history.csv"))])
    rows = _history(tmp_path)
    sched = common.make_lr_schedule(cfg, steps_per_epoch=5)
    assert [int(r["iterations"]) for r in rows] == [5, 10, 15]
    assert [float(r["lr"]) for r in rows] == pytest.approx([float(sched(s)) for s in (5, 10, 15)])
    assert float(rows[0]["lr"]) > float(rows[1]["lr"]) > float(rows[2]["lr"]) >= 0


def test_common_helpers(tmp_path, monkeypatch):
    # Learning-rate schedules are functions of the optimizer step: resume-safe by construction.
    cfg = common.make_config(common.COMMON_OPTIONS, preset="smoke", epochs=4,
                             learning_rate=0.1, lr_schedule="step")
    sched = common.make_lr_schedule(cfg, steps_per_epoch=10)
    assert [round(float(sched(s)), 6) for s in (0, 19, 20, 29, 30, 39)] == \
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    cos = common.make_lr_schedule(cfg.replace(lr_schedule="cosine"), 10)
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(40)) == pytest.approx(0.0, abs=1e-7)
    # Chief election from TF_CONFIG before any strategy exists (used by --overwrite).
    cluster = {"worker": ["localhost:1", "localhost:2"]}
    for index, chief in ((0, True), (1, False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                    "task": {"type": "worker", "index": index}}))
        assert common.is_chief() is chief
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": dict(cluster, chief=["localhost:3"]),
                                                "task": {"type": "worker", "index": 0}}))
    assert common.is_chief() is False
    monkeypatch.delenv("TF_CONFIG")
    assert common.is_chief() is True
    # Atomic JSON writes leave no temporary file; a missing model names the fix.
    common.atomic_write_json(str(tmp_path / "a" / "x.json"), {"v": float("nan"), "t": (1, 2)})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"v": None, "t": [1, 2]}
    assert os.listdir(tmp_path / "a") == ["x.json"]
    with pytest.raises(FileNotFoundError, match="completed recipe run"):
        common.load_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="Unknown option"):
        common.make_config(common.COMMON_OPTIONS, preset="smoke", epoch=3)


def test_resume_refuses_changed_options_and_completed_run_is_reported(teacher_dir, capsys):
    from recipes import train_teacher

    cfg = common.Config(**json.loads((teacher_dir / "run_config.json").read_text()))
    res = train_teacher.run(cfg)  # complete: nothing trained, stored result returned
    assert res == json.loads((teacher_dir / "results.json").read_text())
    assert "already complete" in capsys.readouterr().out
    (teacher_dir / "results.json").rename(teacher_dir / "results.json.bak")
    try:
        with pytest.raises(ValueError, match="learning_rate"):
            train_teacher.run(cfg.replace(learning_rate=0.5))
    finally:
        (teacher_dir / "results.json.bak").rename(teacher_dir / "results.json")


def test_quickstart_prints_table_and_writes_tflite(tmp_path, capsys):
    from recipes import quickstart

    summary = quickstart.run(str(tmp_path / "qs"), epochs=1)
    out = capsys.readouterr().out
    for row in ("float teacher", "float student", "2-bit student, hard labels",
                "2-bit student, KD + CR", "int8 TFLite"):
        assert row in out
    last = last_json_line(out)
    assert last == json.loads(json.dumps(summary))
    tflite = pathlib.Path(summary["tflite_path"])
    assert tflite.is_file() and tflite.suffix == ".tflite"
    assert summary["tflite_bytes"] == tflite.stat().st_size
    # The file's figures, recomputed: LiteRT on the run's test images against the saved student.
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    x, y = run_test_set(tmp_path / "qs" / "q2_kd_cr")
    it = Interpreter(model_path=str(tflite))
    inp = it.get_input_details()[0]
    assert inp["dtype"] == np.float32  # float I/O: the file quantizes its input itself
    file_pred = tflite_outputs(it, x).argmax(-1)
    keras_pred = common.load_model(str(tmp_path / "qs" / "q2_kd_cr"))(x).numpy().argmax(-1)
    # one image of slack: a near-tie may round either way in a different batching
    assert summary["tflite_keras_agreement"] == pytest.approx(
        np.mean(file_pred == keras_pred), abs=1.01 / len(y))
    assert summary["tflite_top1"] == pytest.approx(np.mean(file_pred == y), abs=1.01 / len(y))
    for stage in ("teacher", "student", "q2_hard", "q2_kd_cr"):
        _assert_complete(tmp_path / "qs" / stage)
    # The 2-bit KD + CR stage really ran the CR schedule from 0.5 down.
    rows = _history(tmp_path / "qs" / "q2_kd_cr")
    assert float(rows[-1]["end_coefficient"]) == pytest.approx(0.0, abs=1e-6)
    # The demo runs the recipes' KD defaults, which are the benchmark's KD settings (defined
    # once, common.KD_DEFAULTS; tools/reproduce/rows.py's BENCHMARK_KD is the same mapping).
    flags = json.loads((tmp_path / "qs" / "q2_kd_cr" / "results.json").read_text())["flags"]
    assert {k: flags[k] for k in common.KD_DEFAULTS} == common.KD_DEFAULTS
    assert float(rows[-1]["end_temperature"]) == common.KD_DEFAULTS["temperature"]


def test_quantize_distill_smoke_on_cifar10_archive(tmp_path, cifar10_archive):
    out = tmp_path / "q"
    log = _run("quantize_distill.py", "--preset=smoke", "--dataset=cifar10",
               f"--data_dir={cifar10_archive.parent}", f"--output_dir={out}")
    assert "no --student" in log  # a fresh float ResNet, said so in the log
    res = _assert_complete(out)
    assert res["mode"] == "hard" and res["num_train"] == 500
    assert res["flags"]["dataset"] == "cifar10"
    model = common.load_model(str(out))
    assert any("quantize" in type(layer).__name__.lower() for layer in model.layers)


def _wait_for(predicate, proc, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _checkpoint_number(ckpt_file):
    try:
        text = ckpt_file.read_text()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith("model_checkpoint_path:"):
            return int(line.split('"')[1].rsplit("-", 1)[1])
    return -1


def test_sigkill_mid_epoch_then_rerun_resumes(tmp_path, teacher_dir):
    out = tmp_path / "kd"
    # digits: 1,437 training images, batch 50 -> 28 steps per epoch (remainder dropped); a
    # checkpoint every 7 steps lands 3 times inside an epoch and once at its last step.
    epochs, steps, save_freq = 5, 1437 // 50, 7
    args = ["--preset=smoke", "--dataset=digits", "--subset=0", f"--epochs={epochs}",
            f"--teacher={teacher_dir}", "--coefficient_schedule=linear",
            f"--save_freq={save_freq}", "--validation_freq=0", "--progress=line",
            f"--output_dir={out}"]
    cmd = [sys.executable, str(RECIPES / "quantize_distill.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env())
    ckpt = out / "checkpoints" / "backup" / "chief" / "checkpoint"
    try:
        # Wait for the first epoch's row (its last-step checkpoint is written before the row),
        # then for the next checkpoint, which is mid-way through the second epoch: kill there.
        assert _wait_for(lambda: (out / "history.csv").is_file() and len(_history(out)) >= 1,
                         proc, 180), "no epoch completed"
        first = _checkpoint_number(ckpt)
        assert first >= 1
        assert _wait_for(lambda: _checkpoint_number(ckpt) > first, proc, 60)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        first_log = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, first_log[-2000:]
    assert not (out / "results.json").exists(), "the run finished before it was killed"
    done_before = len(_history(out))
    assert 1 <= done_before < epochs

    log = _run("quantize_distill.py", *args)
    assert "resuming" in log
    assert f"epoch {done_before + 1}, step" in log  # restored mid-epoch, after the first one
    assert f"epoch 1/{epochs} " not in log  # the first epoch was not trained again
    assert f"epoch {epochs}/{epochs} " in log
    res = _assert_complete(out)
    assert res["attempts"] == 2

    rows = _history(out)
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))  # each epoch exactly once
    total = epochs * steps
    for e, r in enumerate(rows):
        # The optimizer's step count (hence the lr and λ schedules) continued across the kill.
        assert int(r["iterations"]) == (e + 1) * steps
        # λ set before the last step of the epoch: linear 0.5 -> 0 over steps 0..total-1.
        expected = 0.5 * (1 - ((e + 1) * steps - 1) / (total - 1))
        assert float(r["end_coefficient"]) == pytest.approx(expected, abs=1e-5)
    assert float(rows[-1]["end_coefficient"]) == pytest.approx(0.0, abs=1e-6)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kd_args(teacher_dir, out, *extra):
    return ["--preset=smoke", "--dataset=digits", "--epochs=1", f"--teacher={teacher_dir}",
            "--coefficient_schedule=linear", "--validation_freq=0", f"--output_dir={out}", *extra]


def _re_estimated(run_dir):
    """Per saved batch-norm layer: is its moving mean unlike every one training ended with?"""
    import numpy as np
    from tfqkd._keras import tf
    from tfqkd.batch_norm import batch_norm_layers

    run_dir = pathlib.Path(run_dir)
    ckpt = tf.train.load_checkpoint(str(run_dir / "checkpoints" / "backup" / "chief"))
    at_end = [ckpt.get_tensor(k) for k in ckpt.get_variable_to_shape_map() if "moving_mean" in k]
    saved = [layer.moving_mean.numpy()
             for layer in batch_norm_layers(common.load_model(str(run_dir)))]
    assert saved, f"{run_dir}: the saved model has no batch-norm layer"
    return [not any(a.shape == m.shape and np.allclose(a, m) for a in at_end) for m in saved]


def test_mirrored_on_two_logical_cpus_matches_single_process_outputs(tmp_path, teacher_dir):
    from recipes import quantize_distill

    # The single-process reference runs in-process (saves a TensorFlow start-up).
    single = tmp_path / "single"
    quantize_distill.run(quantize_distill.make_config(
        "smoke", dataset="digits", epochs=1, teacher=[str(teacher_dir)],
        coefficient_schedule="linear", validation_freq=0, precise_bn_batches=3,
        output_dir=str(single), progress="none"))
    keys = set(_assert_complete(single))

    mirrored = tmp_path / "mirrored"
    log = _run("quantize_distill.py", *_kd_args(teacher_dir, mirrored, "--distribute=mirrored",
                                                "--cpu_devices=2", "--precise_bn_batches=3"))
    assert "2 replica(s)" in log
    res = _assert_complete(mirrored)
    assert set(res) == keys
    assert res["flags"]["distribute"] == "mirrored"
    # Precise BN ran on the replicated model (cross-replica context) and reached the saved file.
    assert res["precise_bn"]["layers"] == 6 and all(_re_estimated(mirrored))


def _two_workers(script, args, out):
    """Runs ``script`` as two MultiWorkerMirroredStrategy workers on localhost; their logs."""
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        cmd = [sys.executable, str(RECIPES / script), *args, f"--output_dir={out}",
               "--distribute=multi_worker"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=subprocess_env(TF_CONFIG=tf_config)))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, logs):
        assert p.returncode == 0, text[-4000:]
    assert "2 replica(s)" in logs[0]
    # Only the chief wrote: no worker temp directories remain in the shared output directory.
    assert not list(pathlib.Path(out).rglob("workertemp_*"))
    return logs


def _logged(logs, marker):
    """The set of values logged after ``marker`` by the workers (one value: they agree)."""
    return {line.rsplit(marker, 1)[1].split()[0].rstrip(")") for text in logs
            for line in text.splitlines() if marker in line}


def test_multi_worker_two_processes_match_single_process_outputs(tmp_path, teacher_dir):
    # Two worker processes on localhost run train_student with KD (the Distiller's cross-worker
    # loss reduction), compared with the same recipe in-process.
    from recipes import train_student

    single_student = tmp_path / "single_student"
    train_student.run(train_student.make_config(
        "smoke", dataset="digits", epochs=1, teacher=str(teacher_dir), validation_freq=0,
        output_dir=str(single_student), progress="none"))
    keys = set(_assert_complete(single_student))
    out = tmp_path / "multi"
    logs = _two_workers("train_student.py", ["--preset=smoke", "--dataset=digits", "--epochs=1",
                                             f"--teacher={teacher_dir}", "--validation_freq=0"],
                        out)
    res = _assert_complete(out)
    assert set(res) == keys
    assert res["flags"]["distribute"] == "multi_worker"
    # Both workers evaluated the same synchronised model.
    accs = _logged(logs, "student test accuracy ")
    assert len(accs) == 1, logs


def test_multi_worker_quantize_distill_with_precise_bn(tmp_path, teacher_dir):
    # Both workers re-estimate the statistics on the same batches (cross-replica reads are
    # collectives, so they must make the same calls) and end with the same model.
    out = tmp_path / "multi"
    logs = _two_workers("quantize_distill.py",
                        _kd_args(teacher_dir, out, "--precise_bn_batches=3"), out)
    res = _assert_complete(out)
    assert res["flags"]["distribute"] == "multi_worker" and res["precise_bn"]["layers"] == 6
    assert all(_re_estimated(out))
    assert len(_logged(logs, "test accuracy before: ")) == 1, logs
    assert len(_logged(logs, "quantized student test accuracy ")) == 1, logs


def test_quantize_distill_precise_bn_rewrites_the_saved_statistics(tmp_path):
    from recipes import quantize_distill

    def trained(name, batches=None):
        opts = {} if batches is None else {"precise_bn_batches": batches}
        return quantize_distill.run(quantize_distill.make_config(
            "smoke", dataset="digits", subset=None, test_subset=None, arch="tiny", epochs=1,
            output_dir=str(tmp_path / name), progress="none", **opts))

    # Off: the saved model carries the statistics training ended with (the last checkpoint's).
    res = trained("off", 0)
    assert "precise_bn" not in res and not any(_re_estimated(tmp_path / "off"))
    assert res["test_accuracy"] == pytest.approx(saved_model_accuracy(tmp_path / "off"), abs=1e-9)
    # On (the default, 100 batches): every layer's statistics were re-estimated before saving,
    # and the reported accuracy is the re-estimated model's; "before" counts the same test images.
    res = trained("on")
    assert res["precise_bn"]["batches"] == 100 and res["precise_bn"]["layers"] == 6
    assert res["test_accuracy"] == pytest.approx(saved_model_accuracy(tmp_path / "on"), abs=1e-9)
    hits_before = res["precise_bn"]["test_accuracy_before"] * res["num_test"]
    assert hits_before == pytest.approx(round(hits_before), abs=1e-6)
    assert all(_re_estimated(tmp_path / "on"))

    # A student without batch norm (a user's own model) is left as it is; 0 turns the step off.
    from types import SimpleNamespace
    from tfqkd._keras import keras

    no_bn = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    cfg = quantize_distill.make_config("smoke")
    unused = SimpleNamespace(train=None, test=None)  # neither is needed: nothing to re-estimate
    assert quantize_distill.precise_bn(cfg, no_bn, unused) == {
        "precise_bn": {"batches": 100, "layers": 0}}
    assert quantize_distill.precise_bn(cfg.replace(precise_bn_batches=0), no_bn, unused) == {}

    with pytest.raises(ValueError, match="--precise_bn_batches=-1"):
        trained("negative", -1)
    assert not (tmp_path / "negative").exists()


def test_quantize_distill_applications_student_and_teacher_by_name(tmp_path):
    """--student / --teacher as tfqkd.models.get names with --alpha and --image_size: a 4-bit
    MobileNetV2 (softmax head kept) distilled from a MobileNet on digits at 32x32
    (EfficientNet teachers are exercised in test_applications; a light one keeps this short)."""
    out = tmp_path / "mnv2"
    _run("quantize_distill.py", "--preset=smoke", "--dataset=digits", "--student=mobilenet_v2",
         "--alpha=0.35", "--image_size=32", "--teacher=mobilenet", "--weight_bits=4",
         "--epochs=1", "--subset=70", "--test_subset=30", "--batch_size=32",
         "--precise_bn_batches=1", f"--output_dir={out}")
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), f"{out / name} missing"
    model = common.load_model(str(out))
    assert model.input_shape == (None, 32, 32, 1)
    assert tfqkd.models.softmax_layer(model) == "quant_predictions"
    probs = model(np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype("float32")).numpy()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)


def test_recipe_normalisation_and_teacher_input_adapter():
    """Raw 0..255 pixels for a model that preprocesses itself, mean/std for the others; a teacher
    of the other kind sees, through its adapter, exactly the inputs it would get on its own."""
    cfg = common.Config(student="mobilenet_v2", arch="resnet", alpha=0.35)
    assert common.input_normalization(cfg) is None
    assert common.input_normalization(cfg.replace(student="efficientnet_b0")) == common.RAW_PIXELS
    info = {"mean": (0.2, 0.4, 0.6), "std": (0.1, 0.2, 0.3), "input_shape": (32, 32, 3),
            "num_classes": 5}
    teacher = tfqkd.models.get("mobilenet_v3_small", 5, (32, 32, 3), alpha=0.35)
    adapted = common.adapt_teacher(teacher, cfg, info)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    student_inputs = (pixels / 255.0 - np.array(info["mean"], "float32")) / np.array(
        info["std"], "float32")
    np.testing.assert_allclose(adapted(student_inputs).numpy(), teacher(pixels).numpy(),
                               atol=1e-4)
    # Same convention: the teacher is used as it is.
    assert common.adapt_teacher(teacher, cfg.replace(student="efficientnet_b0"), info) is teacher


def test_paper_rows_set_the_reported_settings_and_refuse_conflicts_and_wrong_models(tmp_path):
    from recipes import _paper_rows
    from recipes._stages import quantize_distill, quantize_distill_config
    from tfqkd import models

    # The reported rows as issue 22 reads the paper: CIFAR-10 WRN20x1.5 at τ = 10, CIFAR-100
    # WRN20x1.7 at τ = 3 with coefficient reducing; 2-bit ResNet20, 92.7 % and 67.0 %.
    c10 = quantize_distill_config("paper", row="cifar10-w2")
    assert (c10.dataset, c10.weight_bits, c10.temperature, c10.coefficient_schedule) == (
        "cifar10", 2, 10.0, "constant")
    c100 = quantize_distill_config("paper", row="cifar100-w2-cr")
    assert (c100.dataset, c100.temperature, c100.coefficient_schedule, c100.coefficient,
            c100.coefficient_end) == ("cifar100", 3.0, "linear", 0.5, 0.0)
    rows = _paper_rows.PAPER_ROWS
    assert [rows[n].teacher_width.value for n in ("cifar10-w2", "cifar100-w2-cr")] == [1.5, 1.7]
    assert [rows[n].reported_top1.value for n in ("cifar10-w2", "cifar100-w2-cr")] == [0.927, 0.670]
    # The budget is ours, and recorded so.
    record = _paper_rows.row_record(c10)
    assert record["settings"]["epochs"]["source"].startswith("our choice")
    assert record["settings"]["temperature"] == {"value": 10.0, "source": "paper"}
    # An explicit flag may change what the paper leaves open, not what it states.
    assert quantize_distill_config("paper", row="cifar10-w2", coefficient=0.3).coefficient == 0.3
    with pytest.raises(ValueError, match="--temperature=4.0"):
        quantize_distill_config("paper", row="cifar10-w2", temperature=4.0)
    # Algorithm 1: a trained student and one teacher of the row's width, checked before anything
    # is written.
    out = tmp_path / "row"
    with pytest.raises(ValueError, match="--student"):
        quantize_distill(quantize_distill_config("paper", row="cifar10-w2", teacher=["t"],
                                                 output_dir=str(out)))
    assert not out.exists()
    wrn = lambda w: models.wide_resnet20(w, 10, (32, 32, 3))  # noqa: E731
    with pytest.raises(ValueError, match="WRN20x1.5"):
        _paper_rows.check_row_teacher(c10, "t.h5", wrn(2.0), 10, (32, 32, 3))
    _paper_rows.check_row_teacher(c10, "t.h5", wrn(1.5), 10, (32, 32, 3))
