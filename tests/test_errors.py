"""Bad inputs and faults, the way a new user meets them (docs/errors.md lists every case).

Each test feeds one bad input and checks two things: the error names the file, flag or layer at
fault (and the fix), and nothing was deleted or half-written. Runs are in-process on the built-in
digits set with tiny models, except where the behaviour is about the process (Ctrl-C).
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_test_set, subprocess_env
from recipes import common, quantize_distill, sweep, train_student, train_teacher

REPO = pathlib.Path(__file__).resolve().parents[1]

import tfqkd  # noqa: E402
from tfqkd._keras import keras  # noqa: E402

DIGITS = dict(dataset="digits", subset=None, test_subset=None, epochs=1, progress="none")


def _snapshot(root):
    """Every file under ``root`` with its content hash: equal snapshots = nothing changed."""
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_teacher(tmp_path_factory):
    """A finished train_teacher run (1 epoch, digits); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "teacher"
    train_teacher.run(train_teacher.make_config("smoke", **DIGITS, output_dir=str(out)))
    assert (out / "results.json").is_file()
    return out


@pytest.fixture
def run_copy(finished_teacher, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_teacher, dst)
    return dst


# --------------------------------------------------------------------------------------------
# --overwrite
# --------------------------------------------------------------------------------------------
def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path):
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    before = _snapshot(folder)
    cfg = train_teacher.make_config("smoke", **DIGITS, output_dir=str(folder), overwrite=True)
    with pytest.raises(ValueError, match="does not hold a tfqkd run.*notes.txt"):
        train_teacher.run(cfg)
    assert _snapshot(folder) == before


def test_overwrite_refuses_the_working_directory_and_its_parents(tmp_path, monkeypatch):
    sub = tmp_path / "checkout" / "src"
    sub.mkdir(parents=True)
    # Even a folder with a run marker is refused when it is the working directory (or above it).
    (tmp_path / "checkout" / "run_config.json").write_text("{}")
    (sub / "code.py").write_text("x = 1")
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path / "checkout")
    for output_dir in (".", str(tmp_path)):
        cfg = train_teacher.make_config("smoke", **DIGITS, output_dir=output_dir, overwrite=True)
        with pytest.raises(ValueError, match="working directory"):
            train_teacher.run(cfg)
    assert _snapshot(tmp_path) == before


def test_overwrite_with_a_bad_input_keeps_the_finished_run(run_copy, tmp_path):
    before = _snapshot(run_copy)
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(os.urandom(2048))
    bad_inputs = [
        (dict(teacher=str(tmp_path / "typo")), FileNotFoundError, "--teacher .*typo.*does not exist"),
        (dict(teacher=str(corrupt)), ValueError, "--teacher .*corrupt.h5.*not a readable Keras"),
        (dict(learning_rate=-0.1), ValueError, "--learning_rate"),
        (dict(dataset="digitz"), (ValueError, KeyError), "digitz"),
    ]
    for overrides, error, message in bad_inputs:
        # Config.replace skips make_config's checks: the run itself must check before deleting.
        cfg = train_student.make_config("smoke", **DIGITS, output_dir=str(run_copy),
                                        overwrite=True).replace(**overrides)
        with pytest.raises(error, match=message):
            train_student.run(cfg)
        assert _snapshot(run_copy) == before, overrides


def test_overwrite_replaces_a_run_once_every_input_is_valid(run_copy):
    stray = run_copy / "logs" / "stale.txt"
    stray.write_text("from the old run")
    old = json.loads((run_copy / "results.json").read_text())
    cfg = train_teacher.make_config("smoke", **DIGITS, output_dir=str(run_copy), overwrite=True,
                                    seed=1)
    res = train_teacher.run(cfg)
    assert not stray.exists()  # the old run was deleted, not merged into
    assert res["flags"]["seed"] == 1 and old["flags"]["seed"] == 0
    assert res["attempts"] == 1
    assert json.loads((run_copy / "results.json").read_text()) == json.loads(json.dumps(res))


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("not a directory")
    for overwrite in (False, True):
        cfg = train_teacher.make_config("smoke", **DIGITS, output_dir=str(f), overwrite=overwrite)
        with pytest.raises(NotADirectoryError, match="results.txt.* is a file"):
            train_teacher.run(cfg)
    assert f.read_text() == "not a directory"


# --------------------------------------------------------------------------------------------
# Finished runs
# --------------------------------------------------------------------------------------------
def test_finished_run_with_other_training_options_is_refused(finished_teacher):
    before = _snapshot(finished_teacher)
    stored = json.loads((finished_teacher / "run_config.json").read_text())
    cfg = common.Config(**stored).replace(learning_rate=0.5, width=1.0)
    with pytest.raises(ValueError, match=r"finished run with different options \(--learning_rate: "
                                         r"0.05 -> 0.5, --width: 2.0 -> 1.0\)"):
        train_teacher.run(cfg)
    assert _snapshot(finished_teacher) == before
    # The same options (runtime-only changes allowed) return the stored result, untouched.
    res = train_teacher.run(common.Config(**stored).replace(progress="line"))
    assert res == json.loads((finished_teacher / "results.json").read_text())
    assert _snapshot(finished_teacher) == before


def test_run_saved_before_an_option_existed_resumes_with_its_default(run_copy):
    # A run recorded before --image_size / --skip_corrupt_images / --alpha existed ran with their
    # defaults.
    config_path = run_copy / "run_config.json"
    stored = json.loads(config_path.read_text())
    cfg = common.Config(**stored).replace(output_dir=str(run_copy))
    older = {k: v for k, v in stored.items()
             if k not in ("image_size", "skip_corrupt_images", "alpha")}
    assert older != stored, "the options this test drops are no longer recipe options"
    config_path.write_text(json.dumps(older))
    res = train_teacher.run(cfg)
    assert res == json.loads((run_copy / "results.json").read_text())
    # A non-default value for the missing option is a change, and is refused.
    with pytest.raises(ValueError, match=r"--skip_corrupt_images: False -> True"):
        train_teacher.run(cfg.replace(skip_corrupt_images=True))


def test_run_recorded_with_former_kd_defaults_resumes_with_them(tmp_path, capsys):
    # τ = 2 without τ² were the defaults until 2026-12-04; such a run, asked for again without
    # those flags, keeps them (the defaults are now τ = 4 with τ²); an explicit flag is a change.
    out = tmp_path / "kd"
    out.mkdir()

    def recorded(**options):
        stored = quantize_distill.make_config("smoke", output_dir=str(out), **options).to_dict()
        (out / "run_config.json").write_text(json.dumps(stored))
        (out / "results.json").write_text(json.dumps({"test_accuracy": 0.5, "flags": stored}))
        return stored

    stored = recorded(temperature=2.0, temperature_squared=False)
    cfg = quantize_distill.make_config("smoke", output_dir=str(out))
    assert (cfg.temperature, cfg.temperature_squared) == (4.0, True)
    common.OutputDir(str(out)).check_options(cfg)
    assert (cfg.temperature, cfg.temperature_squared) == (2.0, False)
    assert "--temperature=2.0, --temperature_squared=False" in capsys.readouterr().out
    assert cfg.to_dict() == stored
    explicit = quantize_distill.make_config("smoke", output_dir=str(out), temperature=4.0)
    with pytest.raises(ValueError, match=r"--temperature: 2.0 -> 4.0"):
        common.OutputDir(str(out)).check_options(explicit)
    # A record from before --temperature_squared existed ran without τ²: kept as well.
    recorded(temperature=2.0)
    older = {k: v for k, v in stored.items() if k != "temperature_squared"}
    (out / "run_config.json").write_text(json.dumps(older))
    cfg = quantize_distill.make_config("smoke", output_dir=str(out))
    common.OutputDir(str(out)).check_options(cfg)
    assert (cfg.temperature, cfg.temperature_squared) == (2.0, False)
    # A run recorded with today's defaults keeps them; a Config read back from a record has no
    # implicit options, so a changed value there is refused, not adopted.
    recorded()
    cfg = quantize_distill.make_config("smoke", output_dir=str(out))
    common.OutputDir(str(out)).check_options(cfg)
    assert (cfg.temperature, cfg.temperature_squared) == (4.0, True)
    with pytest.raises(ValueError, match=r"--temperature: 4.0 -> 2.0"):
        common.OutputDir(str(out)).check_options(common.Config(**stored))


def test_export_added_to_a_finished_run_is_carried_out(tmp_path):
    out = tmp_path / "q"
    # W2A8: the student rounds its kernels' outputs, so it can take a runtime's rounding.
    cfg = quantize_distill.make_config("smoke", **DIGITS, output_dir=str(out),
                                       precise_bn_batches=0, activation_bits=8)
    first = quantize_distill.run(cfg)
    assert "export" not in first
    tflite = out / "model" / "model_int8.tflite"
    assert not tflite.exists()
    res = quantize_distill.run(cfg.replace(export="int8"))
    assert tflite.is_file() and res["export"]["mode"] == "int8"
    assert res["export"]["bytes"] == tflite.stat().st_size
    assert res["flags"]["export"] == "int8" and res["parity"]["num_examples"] == first["num_test"]
    assert res["test_accuracy_before_export"] == first["test_accuracy"]
    assert json.loads((out / "results.json").read_text())["export"]["mode"] == "int8"
    # The exported file gets the permissions of every other output (not mkstemp's 0600).
    model_h5 = out / "model" / "model.h5"
    assert tflite.stat().st_mode & 0o777 == model_h5.stat().st_mode & 0o777
    # Asked again: already there, nothing redone.
    mtime = tflite.stat().st_mtime_ns
    again = quantize_distill.run(cfg.replace(export="int8"))
    assert again == json.loads((out / "results.json").read_text())
    assert tflite.stat().st_mtime_ns == mtime
    # XNNPACK (the default) rounds each kernel's output once, as the student does: no shifts.
    assert res["parity"]["runtime"] == "xnnpack"
    assert res["export"]["aligned_requantization"] == {"layers": 0, "unmatched": []}

    # --export_runtime=builtin: exported again, the student given the built-in kernels' double
    # rounding at every one of its 7 kernels (stem, 5 block convs, classifier) and its global
    # pooling's MEAN, and saved so; the parity measured on those kernels.
    builtin = quantize_distill.run(cfg.replace(export="int8", export_runtime="builtin"))
    assert builtin["flags"]["export_runtime"] == "builtin"
    assert builtin["parity"]["runtime"] == "builtin"
    assert builtin["export"]["aligned_requantization"] == {"layers": 8, "unmatched": []}
    assert tflite.stat().st_mtime_ns != mtime
    from tfqkd import export

    saved = common.load_model(str(out))
    shifts = [q.requant_shifts for layer in saved.layers
              for q in getattr(layer, "_output_quantizers", []) or []
              if getattr(q, "requant_shifts", None) is not None]
    assert len(shifts) == 8
    # Recomputed from the saved student: the recorded parity is on the built-in kernels.
    x, y = run_test_set(out)
    report = export.verify_tflite(str(tflite), saved, (x, y), runtime="builtin")
    assert report.relative_output_error == pytest.approx(
        builtin["parity"]["relative_output_error"], rel=1e-6)
    # Relative output error on the built-in kernels, seeds 0-2 (2026-12-07): 0.016-0.023 with
    # the student aligned for XNNPACK, 0.000-0.001 aligned for them (agreement 100 %).
    assert report.relative_output_error < 0.01, report.relative_output_error
    # And again: nothing redone.
    mtime = tflite.stat().st_mtime_ns
    assert quantize_distill.run(cfg.replace(export="int8", export_runtime="builtin")) == builtin
    assert tflite.stat().st_mtime_ns == mtime


def test_export_warns_where_the_student_cannot_follow_the_runtime(tmp_path):
    """A squeeze-excite-style pooling (keepdims=True) runs a MEAN whose rounding on the built-in
    kernels the student does not follow: the export (here through the recipes' helper) warns,
    naming the layer."""
    import types
    import warnings

    from tfqkd.quantize import quantize_model

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.ReLU(name="r1")(keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs))
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    x = keras.layers.Flatten()(keras.layers.Conv2D(8, 1, name="c2")(x))
    q = quantize_model(keras.Model(inputs, keras.layers.Dense(4, name="head")(x)),
                       weight_bits=4, activation_bits=8)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    q.compile(keras.optimizers.SGD(0.01), "mse")
    q.fit(images, rng.normal(size=(64, 4)).astype(np.float32), epochs=1, verbose=0)
    data = types.SimpleNamespace(train=images[:32], test=(images[32:], np.zeros(32, "int32")))
    out = types.SimpleNamespace(model_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="cannot take the builtin kernels' rounding at se_pool"):
        res = common.export_and_verify(q, out, data, "int8", "builtin")
    assert res["export"]["aligned_requantization"]["unmatched"] == ["se_pool"]
    # On XNNPACK (one rounding, as the student) nothing is left out, and nothing is said.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = common.export_and_verify(q, out, data, "int8", "xnnpack")
    assert res["export"]["aligned_requantization"]["unmatched"] == []
    assert not [w for w in caught if "cannot take" in str(w.message)]


# --------------------------------------------------------------------------------------------
# Option values and lists
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [
    ("learning_rate", -0.1), ("learning_rate", 0.0), ("momentum", 1.5), ("weight_decay", -1e-4),
    ("temperature", 0.0), ("coefficient", 1.5), ("subset", -5),
])
def test_out_of_range_option_values_are_refused(option, value):
    with pytest.raises(ValueError, match=f"--{option}={value!r} is out of range"):
        train_student.make_config("smoke", **{option: value})


@pytest.mark.parametrize("overrides, message", [
    (dict(temperatures="abc,0"), "--temperatures: cannot read 'abc,0'"),
    (dict(temperatures="1,0"), "--temperatures='1,0': 0.0 is out of range"),
    (dict(coefficient="0.5,2"), "--coefficient='0.5,2': 2.0 is out of range"),
    (dict(weight_bits="2,9"), "--weight_bits='2,9': 9 is out of range"),
    (dict(schedules="constant,sometimes"), "--schedules=.*'sometimes' is out of range"),
    (dict(teachers="1,nope"), "--teachers: 'nope' is neither a width"),
])
def test_sweep_lists_are_checked_before_any_training(tmp_path, overrides, message):
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match=message):
        sweep.run(sweep.make_config("smoke", output_dir=str(out), **overrides))
    assert not out.exists()  # nothing trained, nothing written


def test_sweep_overwrite_refuses_a_folder_that_holds_no_sweep(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="does not hold a tfqkd run"):
        sweep.run(sweep.make_config("smoke", output_dir=str(tmp_path), overwrite=True))
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Model and TFLite files
# --------------------------------------------------------------------------------------------
def test_load_model_accepts_every_documented_form(finished_teacher, tmp_path):
    reference = common.load_model(str(finished_teacher / "model" / "model.h5"))
    keras_file = tmp_path / "teacher.keras"
    reference.save(keras_file)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    want = reference(x, training=False).numpy()
    for form in (finished_teacher, finished_teacher / "model", keras_file):
        got = common.load_model(str(form))(x, training=False).numpy()
        np.testing.assert_array_equal(got, want, err_msg=str(form))
    with pytest.raises(FileNotFoundError, match="--model .*holds no saved model"):
        common.load_model(str(tmp_path), what="--model")


def test_unreadable_model_files_name_the_file_and_the_fix(tmp_path):
    corrupt, empty = tmp_path / "corrupt.h5", tmp_path / "empty.h5"
    corrupt.write_bytes(os.urandom(4096))
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="--teacher .*corrupt.h5.*corrupt or not a model"):
        common.load_model(str(corrupt), what="--teacher")
    with pytest.raises(ValueError, match="--student .*empty.h5.* is empty"):
        common.load_model(str(empty), what="--student")

    class Unregistered(keras.layers.Layer):  # a layer no scope knows how to rebuild
        def call(self, x):
            return x

    inp = keras.Input((4,))
    path = tmp_path / "custom.h5"
    keras.Model(inp, Unregistered()(inp)).save(path)
    with pytest.raises(ValueError, match="custom.h5.*Unregistered.*quantize_scope"):
        common.load_model(str(path), what="--teacher")


def test_keras3_teacher_gets_a_keras2_hint(tmp_path):
    script = ("import keras\n"
              "m = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), "
              "keras.layers.Dense(10)])\n"
              f"m.save({str(tmp_path / 'k3.keras')!r}); m.save({str(tmp_path / 'k3.h5')!r})\n")
    env = subprocess_env()
    env.pop("TF_USE_LEGACY_KERAS", None)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120,
                   capture_output=True)
    for name in ("k3.keras", "k3.h5"):
        with pytest.raises(TypeError, match=f"--teacher .*{name}.*Keras 3.*tfqkd uses Keras 2"):
            common.load_model(str(tmp_path / name), what="--teacher")


def test_unreadable_tflite_files_name_the_file(tmp_path):
    model = tfqkd.models.tiny_resnet(seed=0)
    data = (np.zeros((2, 8, 8, 1), "float32"), np.zeros(2, "int32"))
    corrupt, empty = tmp_path / "corrupt.tflite", tmp_path / "empty.tflite"
    corrupt.write_bytes(os.urandom(4096))
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt.tflite.*not a valid TFLite model"):
        tfqkd.export.verify_tflite(corrupt, model, data)
    with pytest.raises(ValueError, match="empty.tflite.*is empty"):
        tfqkd.export.verify_tflite(empty, model, data)


# --------------------------------------------------------------------------------------------
# Distiller
# --------------------------------------------------------------------------------------------
def test_distiller_names_the_teacher_the_labels_and_the_missing_teacher():
    student = tfqkd.models.tiny_resnet(seed=0)  # 8x8x1 inputs
    wrong = tfqkd.models.tiny_resnet(input_shape=(32, 32, 3), seed=1)
    with pytest.raises(ValueError, match=r"teacher .*takes inputs of shape \(32, 32, 3\) but the "
                                         r"student .*takes \(8, 8, 1\)"):
        tfqkd.Distiller(student, wrong)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32")
    y = np.arange(8) % 10
    d = tfqkd.Distiller(student, tfqkd.models.tiny_resnet(seed=2))
    d.compile("sgd")
    with pytest.raises(ValueError, match=r"labels have shape \(8, 10\): they look one-hot"):
        d.fit(x, np.eye(10)[y], verbose=0)
    alone = tfqkd.Distiller(student, None, coefficient=0.5)
    alone.compile("sgd")
    with pytest.raises(ValueError, match="has no teacher .*λ = 0.5"):
        alone.fit(x, y, verbose=0)
    # Precomputed teacher logits are a teacher source: accepted without a teacher model.
    from tfqkd._keras import tf

    batches = tf.data.Dataset.from_tensor_slices((x, y, np.zeros((8, 10), "float32"))).batch(8)
    history = alone.fit(batches, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    out = tmp_path / "t"
    cmd = [sys.executable, str(REPO / "recipes" / "train_teacher.py"), "--preset=smoke",
           "--dataset=digits", "--subset=0", "--test_subset=0", "--epochs=500",
           "--progress=line", "--save_freq=epoch", f"--output_dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env())
    deadline = time.time() + 240
    seen = ""
    while time.time() < deadline and "epoch 2/" not in seen:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
    assert "epoch 2/" in seen, f"never reached epoch 2:\n{seen}\n{proc.stderr.read()[-3000:]}"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "run the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert (out / "checkpoints" / "backup").is_dir() and not (out / "results.json").exists()
