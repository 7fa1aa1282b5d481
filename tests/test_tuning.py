"""tfqkd.tuning, recipes/sweep.py and tools/distributed_tuning_demo.py on tiny models and digits."""

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tfqkd import tuning
from tfqkd._keras import keras

from conftest import last_json_line
from recipes import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(temperatures=(1, 4), teachers=(1, 2), schedules=("constant",), acc=None):
    rng = np.random.default_rng(0)
    return [
        dict(tuning.normalize_config({"temperature": t, "teacher": w, "schedule": s}),
             test_accuracy=float(rng.uniform(0.5, 0.9)) if acc is None else acc,
             val_accuracy=0.5)
        for t in temperatures for w in teachers for s in schedules
    ]


# ---------------------------------------------------------------------------------------------
# configs, CSV, plots (no training)


@pytest.mark.parametrize("bad, word", [
    ({"temperature": 0}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"coefficient": 1.5}, "coefficient"),
    ({"schedule": "cosine"}, "schedule"),
    ({"weight_bits": 9}, "weight_bits"),
    ({"activation_bits": 0}, "activation_bits"),
    ({"epochs": 0}, "epochs"),
    ({"temprature": 2}, "temprature"),
])
def test_normalize_config_rejects_bad_values_by_name(bad, word):
    with pytest.raises(ValueError, match=word):
        tuning.normalize_config(bad)


def test_config_key_identifies_a_trial_whatever_the_spelling():
    a = tuning.config_key({"temperature": 4, "teacher": 2.0, "weight_bits": "2"})
    b = tuning.config_key({"temperature": "4.0", "teacher": "2", "weight_bits": 2})
    assert a == b
    assert a != tuning.config_key({"temperature": 4, "teacher": 2, "schedule": "linear"})


def test_grid_configs_are_distinct_and_duplicates_are_refused():
    configs = tuning.grid_configs([1, 2, 5, 10], [1, 1.5, 2], ["constant", "linear"])
    assert len(configs) == 24
    assert len({tuning.config_key(c) for c in configs}) == 24
    with pytest.raises(ValueError, match="repeats"):
        tuning.grid_configs([1, 1.0], [1], ["constant"])


def test_append_result_rewrites_atomically_and_replaces_unique_rows(tmp_path):
    path = str(tmp_path / "trials.csv")
    row = dict(tuning.normalize_config({"teacher": 1}), test_accuracy=0.5, trial_id="00")
    tuning.append_result(path, row)
    tuning.append_result(path, dict(row, teacher="2", trial_id="01"))
    tuning.append_result(path, dict(row, test_accuracy=0.75), unique="trial_id")
    rows = tuning.read_results(path)
    assert [(r["teacher"], r["test_accuracy"]) for r in rows] == [("2", 0.5), ("1", 0.75)]
    assert sorted(os.listdir(tmp_path)) == [".trials.csv.lock", "trials.csv"]  # no temp files
    with open(path) as f:
        header = next(csv.reader(f))
    assert header[:len(tuning.HYPERPARAMETERS)] == list(tuning.HYPERPARAMETERS)


def test_figure_1_has_one_line_per_temperature_plus_baseline(tmp_path):
    rows = _rows(temperatures=(1, 2, 5), teachers=(1, 1.5, 2))
    fig = tuning.plot_accuracy_vs_teacher(rows, baseline=0.6)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3 + 1
    assert [list(l.get_xdata()) for l in lines[:3]] == [[1.0, 1.5, 2.0]] * 3
    baseline = lines[3]
    assert list(baseline.get_ydata()) == [0.6, 0.6]
    png, svg = tuning.save_figure(fig, str(tmp_path / "fig1"))
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 0.01  # not a blank canvas
    with open(svg) as f:
        assert "<svg" in f.read(2000)


def test_figure_2_splits_constant_and_linear_lambda():
    rows = _rows(temperatures=(1, 4), teachers=(1, 2), schedules=("constant", "linear"))
    fig = tuning.plot_cr_comparison(rows, baseline=0.5)
    assert [len(ax.get_lines()) for ax in fig.axes] == [3, 3]
    assert "without CR" in fig.axes[0].get_title() and "with CR" in fig.axes[1].get_title()
    # A τ has the same colour in both panels even when a panel lacks some τ.
    fig = tuning.plot_cr_comparison(
        _rows(temperatures=(1, 4), schedules=("constant",)) + _rows(temperatures=(4,),
                                                                     schedules=("linear",)))
    left, right = ({l.get_label(): l.get_color() for l in ax.get_lines()} for ax in fig.axes)
    assert set(right) == {"τ=4"}
    assert right["τ=4"] == left["τ=4"] != left["τ=1"]
    # Both panels show one y range that holds every point of both. Sixteen validation
    # accuracies of the 2026-12-05 sweep (teacher, τ, schedule; two seeds): sharing the left
    # panel's limits cut the right panel at 0.697, below its τ = 10 line (0.7035).
    measured = [(1, 10, "c", 0.6964), (1, 10, "l", 0.7068), (1, 20, "c", 0.6946),
                (1, 20, "l", 0.6976), (2, 10, "c", 0.7018), (2, 10, "l", 0.7092),
                (2, 20, "c", 0.702), (2, 20, "l", 0.7062), (1, 10, "c", 0.6666),
                (1, 10, "l", 0.6924), (1, 20, "c", 0.6904), (1, 20, "l", 0.6962),
                (2, 10, "c", 0.6908), (2, 10, "l", 0.6978), (2, 20, "c", 0.687),
                (2, 20, "l", 0.6894)]
    rows = [dict(tuning.normalize_config({"temperature": t, "teacher": w, "schedule":
                                          {"c": "constant", "l": "linear"}[s]}), val_accuracy=v)
            for w, t, s, v in measured]
    fig = tuning.plot_cr_comparison(rows, baseline=0.6967, metric="val_accuracy")
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    bottom, top = fig.axes[0].get_ylim()
    for ax in fig.axes:
        for line in ax.get_lines():
            assert bottom <= min(line.get_ydata()) and max(line.get_ydata()) <= top
    # Only one schedule swept: the other panel says so instead of drawing nothing silently.
    fig = tuning.plot_cr_comparison(_rows(schedules=("linear",)))
    assert len(fig.axes[0].get_lines()) == 0 and "no constant runs" in fig.axes[0].texts[0].get_text()


def test_heatmap_cells_hold_the_mean_accuracy():
    rows = _rows(temperatures=(1, 4), teachers=(1, 2, 3), acc=0.7)
    rows[0]["test_accuracy"] = 0.1  # τ=1, teacher 1
    fig = tuning.plot_heatmap(rows)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (2, 3)
    assert grid[0, 0] == pytest.approx(0.1) and grid[1, 2] == pytest.approx(0.7)


def test_saved_teacher_paths_plot_as_categories(tmp_path):
    rows = _rows(teachers=(str(tmp_path / "a.h5"), str(tmp_path / "b.h5")))
    ax = tuning.plot_accuracy_vs_teacher(rows).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a.h5", "b.h5"]


def test_sweep_rejects_unknown_teachers_before_training(tmp_path):
    cfg = sweep.make_config("smoke", output_dir=str(tmp_path), teachers="1,no/such/teacher.h5")
    with pytest.raises(ValueError, match="no/such/teacher.h5"):
        sweep.grid(cfg)
    with pytest.raises(ValueError, match="width"):
        sweep.grid(cfg.replace(teachers="-1"))


def test_cached_teacher_for_other_data_is_refused(tmp_path, data):
    cache = tmp_path / "teachers"
    cache.mkdir()
    other = keras.Sequential([keras.layers.Flatten(input_shape=(4, 4, 1)), keras.layers.Dense(3)])
    other.save(str(cache / "teacher_2.h5"), save_format="h5")
    pool = tuning.TeacherPool(cache_dir=str(cache))
    with pytest.raises(ValueError, match="delete"):
        pool.get(2, data)


def test_search_space_and_oracles():
    import keras_tuner

    space = tuning.DistillationSearchSpace(temperatures=[1, 4], teachers=[1, 2],
                                           schedules=["constant", "linear"])
    hp = keras_tuner.HyperParameters()
    config = space.build(hp)
    assert set(hp.values) == {"temperature", "coefficient", "schedule", "teacher", "weight_bits"}
    assert config["teacher"] in ("1", "2") and config["temperature"] in (1.0, 4.0)
    with pytest.raises(ValueError, match="temperature"):
        tuning.DistillationSearchSpace(temperatures=[0, 1])
    assert isinstance(tuning.make_oracle("bayesian", max_trials=4),
                      keras_tuner.oracles.BayesianOptimizationOracle)
    assert tuning.make_oracle("hyperband", max_epochs=3).max_epochs == 3
    with pytest.raises(ValueError, match="oracle"):
        tuning.make_oracle("grid")


# ---------------------------------------------------------------------------------------------
# training: grid recipe, keras-tuner search, distributed search


@pytest.fixture(scope="module")
def data():
    cfg = sweep.make_config("smoke", subset=300)
    return sweep.load_trial_data(cfg)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, data):
    """One tiny float teacher trained once and saved, shared by the search tests."""
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.h5")
    model = tuning._default_builder(data.num_classes, data.input_shape, width=2, seed=0)
    tuning.train_classifier(model, data, epochs=3, learning_rate=1e-2)
    model.save(path, save_format="h5", include_optimizer=False)
    return path


def _counting(monkeypatch, module, name):
    """Counts the calls of ``module.name`` (patched in the module that calls it)."""
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args[0] if args else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _images(ds):
    return np.concatenate([x.numpy() for x, _ in ds])


def test_sweep_compares_trials_on_held_out_training_images():
    from recipes import common
    from tfqkd import data as data_lib

    cfg = sweep.make_config("smoke")
    trial_data = sweep.load_trial_data(cfg)
    every = dict(augment=False, shuffle=False, batch_size=10_000)
    train_rows = {r.tobytes() for r in _images(data_lib.load_dataset("digits", "train", **every))}
    test_rows = {r.tobytes() for r in _images(data_lib.load_dataset("digits", "test", **every))}
    held_out = _images(trial_data.validation)
    # 10 % of the 1,437 training digits, class by class; training images, none of the test's.
    assert 1437 // 10 - 10 <= len(held_out) <= 1437 // 10 + 10
    assert all(r.tobytes() in train_rows and r.tobytes() not in test_rows for r in held_out)
    # ... and left out of training (seen without augmentation, the same loader).
    plain = common.load_data(cfg, augment=False, validation=cfg.validation)
    trained_on = {r.tobytes() for r in _images(plain.train)}
    assert not any(r.tobytes() in trained_on for r in held_out)
    assert len(_images(trial_data.test)) == 360
    with pytest.raises(ValueError, match="--validation"):
        sweep.check_inputs(cfg.replace(validation=1.0))


def test_smoke_grid_writes_rows_and_figures_resumes_and_replots(tmp_path, monkeypatch):
    out = str(tmp_path / "sweep")
    cfg = sweep.make_config("smoke", output_dir=out)
    trials = _counting(monkeypatch, tuning.results, "run_trial_config")  # run_grid's
    result = sweep.run(cfg)

    rows = tuning.read_results(os.path.join(out, "trials.csv"))
    assert len(rows) == 8 and len(trials) == 8 + 1  # + the hard-label baseline
    # The README's τ × teacher × CR grid, in small: constant λ against CR's linear fade.
    assert {(r["temperature"], r["teacher"], r["schedule"]) for r in rows} == {
        (t, w, s) for t in (1.0, 4.0) for w in ("1", "2") for s in ("constant", "linear")}
    # Measured over sweep seeds 0-4 (40 trials, trained on the 90 % left after the validation
    # hold-out): students 0.367-0.756, teachers 0.839-0.967, baseline 0.486-0.742 of the 360 test
    # digits (chance 0.1); bounds below those minima.
    for r in rows:
        assert r["test_accuracy"] > 0.25 and r["wall_time"] > 0, r
    assert result["trials"] == 8 and result["baseline_test_accuracy"] > 0.3
    # val_accuracy counts right answers among the held-out training digits, test_accuracy among
    # the 360 test digits; the best trial is chosen on the former.
    trial_data = sweep.load_trial_data(cfg)
    num_held_out, num_trained_on = len(_images(trial_data.validation)), len(_images(trial_data.clean_train))
    assert num_held_out != 360 and num_held_out + num_trained_on == 1437
    for r in rows:
        for metric, count in (("val_accuracy", num_held_out), ("test_accuracy", 360),
                              ("train_accuracy", num_trained_on)):
            assert r[metric] * count == pytest.approx(round(r[metric] * count), abs=1e-6), (metric, r)
    assert result["best_metric"] == "val_accuracy"
    assert result["best"]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert sorted(os.listdir(os.path.join(out, "teachers"))) == ["teacher_1.h5", "teacher_2.h5"]
    # The teachers' reported accuracy is the cached files' (recomputed from their predictions).
    from tfqkd import data as data_lib

    x, y = next(iter(data_lib.load_dataset("digits", "test", batch_size=10_000)))
    for width in ("1", "2"):
        teacher = tuning._load_model(os.path.join(out, "teachers", f"teacher_{width}.h5"))
        acc = float(np.mean(teacher(x, training=False).numpy().argmax(-1) == y.numpy()))
        reported = [r["teacher_accuracy"] for r in rows if r["teacher"] == width]
        assert reported == pytest.approx([acc] * 4, abs=1e-9) and acc > 0.75

    import matplotlib.image

    for name in ("accuracy_vs_teacher", "cr_comparison", "heatmap"):
        image = matplotlib.image.imread(os.path.join(out, f"{name}.png"))
        assert image.ndim == 3 and min(image.shape[:2]) > 200
        assert os.path.getsize(os.path.join(out, f"{name}.svg")) > 1000
    baseline = tuning.read_results(os.path.join(out, "baseline.csv"))
    fig = tuning.plot_accuracy_vs_teacher(rows, baseline=baseline[0]["test_accuracy"])
    assert len(fig.axes[0].get_lines()) == 2 + 1  # τ ∈ {1, 4} + the baseline

    # Rerun: nothing is trained again (trials skipped, teachers loaded from the cache).
    teachers_trained = _counting(monkeypatch, tuning.trials, "train_classifier")  # the pool's
    del trials[:]
    sweep.run(cfg)
    assert trials == [] and teachers_trained == []

    # An interrupted sweep (last row missing) continues with exactly the missing trial.
    csv_path = os.path.join(out, "trials.csv")
    with open(csv_path) as f:
        lines = f.read().splitlines()
    with open(csv_path, "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    sweep.run(cfg)
    assert len(trials) == 1
    assert tuning.config_key(trials[0]) == tuning.config_key(rows[-1])
    assert len(tuning.read_results(csv_path)) == 8

    # --plot_only redraws from the CSV without training.
    for name in ("accuracy_vs_teacher", "cr_comparison", "heatmap"):
        os.remove(os.path.join(out, f"{name}.png"))
    del trials[:]
    sweep.run(cfg.replace(plot_only=True))
    assert trials == []
    assert all(os.path.exists(os.path.join(out, f"{n}.png"))
               for n in ("accuracy_vs_teacher", "cr_comparison", "heatmap"))


def test_reused_student_and_model_train_exactly_like_fresh_ones(data):
    """Trials reuse quantized students and compiled models: the reset must be complete."""
    from tfqkd import data as data_lib

    fixed = data_lib.load_dataset("digits", "train", batch_size=50, subset=100, shuffle=False,
                                  augment=False)
    trial_data = tuning.TrialData(fixed, data.validation, data.test, data.num_classes,
                                  data.input_shape)
    teacher = tuning._default_builder(data.num_classes, data.input_shape, width=2, seed=5)
    pool = tuning.TeacherPool({"t": teacher})
    config = {"temperature": 4, "teacher": "t", "schedule": "linear", "epochs": 2}

    def run(cfg, reuse):
        losses = []
        record = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: losses.append(logs["loss"]))
        metrics = tuning.run_trial_config(cfg, trial_data, teachers=pool, seed=3,
                                          reuse_student=reuse, callbacks=[record])
        return losses, metrics["val_accuracy"]

    fresh = run(config, reuse=False)
    first = run(config, reuse=True)
    run(dict(config, temperature=1, schedule="constant"), reuse=True)  # dirties the cached state
    reused = run(config, reuse=True)
    for losses, accuracy in (first, reused):
        assert losses == pytest.approx(fresh[0], rel=1e-5)
        assert accuracy == pytest.approx(fresh[1])


class _CountingTuner(tuning.DistillationTuner):
    def run_trial(self, trial, *args, **kwargs):
        type(self).calls.append(trial.trial_id)
        return super().run_trial(trial, *args, **kwargs)


def _tuner(directory, oracle, teacher_path, **kwargs):
    space = tuning.DistillationSearchSpace(
        temperatures=[1, 2, 4, 8], teachers=[teacher_path], schedules=["constant", "linear"],
        epochs=1)
    return _CountingTuner(oracle, search_space=space, directory=directory, project_name="p",
                          csv_path=os.path.join(directory, "trials.csv"),
                          trial_kwargs={"learning_rate": 1e-2}, **kwargs)


def test_random_search_finds_best_and_a_rerun_redoes_nothing(tmp_path, data, teacher_path):
    directory = str(tmp_path)
    _CountingTuner.calls = []
    tuner = _tuner(directory, tuning.make_oracle("random", max_trials=3, seed=3), teacher_path)
    tuner.search(data, verbose=0)
    assert len(_CountingTuner.calls) == 3

    rows = tuning.read_results(os.path.join(directory, "trials.csv"))
    assert len(rows) == 3
    best_hp = tuner.get_best_hyperparameters(1)[0].values
    best_trial = tuner.oracle.get_best_trials(1)[0]
    assert best_trial.score == pytest.approx(max(r["val_accuracy"] for r in rows))
    best_row = next(r for r in rows if r["trial_id"] == best_trial.trial_id)
    assert best_row["val_accuracy"] == pytest.approx(best_trial.score)
    assert (best_hp["temperature"], best_hp["schedule"]) == (
        best_row["temperature"], best_row["schedule"])
    assert best_hp["teacher"] == tuning._teacher_key(teacher_path)
    # The saved student of the best trial is the trained one: same accuracy when reloaded.
    student = tuner.load_model(best_trial)
    hits = [np.argmax(student(x, training=False).numpy(), -1) == y.numpy()
            for x, y in data.validation]  # recomputed here, not with tuning.evaluate_accuracy
    assert np.mean(np.concatenate(hits)) == pytest.approx(best_trial.score)

    _CountingTuner.calls = []
    again = _tuner(directory, tuning.make_oracle("random", max_trials=3, seed=3), teacher_path)
    again.search(data, verbose=0)
    assert _CountingTuner.calls == []
    # Same trials, same scores (ties may list another trial first, so compare scores).
    assert [t.score for t in again.oracle.get_best_trials(3)] == [
        t.score for t in tuner.oracle.get_best_trials(3)]
    assert again.get_best_hyperparameters(1)[0].values["teacher"] == best_hp["teacher"]


def test_hyperband_passes_epochs_and_continues_students(tmp_path, data, teacher_path):
    directory = str(tmp_path)
    _CountingTuner.calls = []
    # max_epochs=2, factor=2: bracket 1 trains 2 trials for 1 epoch and continues the better one
    # to 2 epochs (initial_epoch=1, from its saved student); bracket 0 trains 1 trial for 2.
    oracle = tuning.make_oracle("hyperband", max_epochs=2, hyperband_factor=2, seed=1)
    tuner = _tuner(directory, oracle, teacher_path)
    tuner.search(data, verbose=0)
    records = []
    for trial_id in _CountingTuner.calls:
        with open(os.path.join(tuner.get_trial_dir(trial_id), "metrics.json")) as f:
            records.append(json.load(f))
    epochs = sorted(r["config"]["epochs"] for r in records)
    assert epochs[0] == 1 and epochs[-1] == 2  # tuner/epochs honoured
    continued = [r for r in records if r["initial_epoch"] > 0]
    assert continued, "Hyperband should continue at least one trial from a saved student"
    assert all(r["config"]["epochs"] == 2 and r["initial_epoch"] == 1 for r in continued)


@pytest.mark.parametrize("kind", ["random", "bayesian", "hyperband"])
def test_every_oracle_drives_the_tuner(tmp_path, data, monkeypatch, kind):
    """Oracle wiring only: the trainer is replaced by a known function of the config."""
    seen = []

    def fake_trial(config, data, **kwargs):
        seen.append((dict(config), kwargs["epochs"], kwargs["initial_epoch"]))
        if kwargs["initial_epoch"]:
            assert os.path.exists(kwargs["initial_weights"])  # the continued trial's student
        with open(kwargs["save_student"], "w") as f:  # stands in for the student's weights
            f.write("weights")
        score = 1.0 / (1.0 + abs(config["temperature"] - 4.0)) + 0.01 * kwargs["epochs"]
        return {"val_accuracy": score, "test_accuracy": score, "teacher_accuracy": 0.9,
                "wall_time": 0.0, "epochs": float(kwargs["epochs"])}

    monkeypatch.setattr(tuning.tuner, "run_trial_config", fake_trial)
    space = tuning.DistillationSearchSpace(temperatures=[1, 2, 4, 8], teachers=[1, 2],
                                           schedules=["constant", "linear"], epochs=2)
    oracle = tuning.make_oracle(kind, max_trials=5, max_epochs=2, hyperband_factor=2, seed=2)
    tuner = tuning.DistillationTuner(oracle, search_space=space, directory=str(tmp_path),
                                     project_name=kind, log=lambda m: None)
    tuner.search(data, verbose=0)
    trials = list(tuner.oracle.trials.values())
    assert len(seen) == len(trials) >= (4 if kind == "hyperband" else 5)
    assert {t.status for t in trials} == {"COMPLETED"}
    best = tuner.oracle.get_best_trials(1)[0]
    assert best.score == pytest.approx(max(
        1.0 / (1.0 + abs(c["temperature"] - 4.0)) + 0.01 * e for c, e, _ in seen))
    assert all(c["teacher"] in ("1", "2") and c["schedule"] in tuning.SCHEDULES
               for c, _, _ in seen)
    if kind == "hyperband":
        assert sorted({e for _, e, _ in seen}) == [1, 2]
        assert any(i == 1 for _, _, i in seen)  # a trial continued from epoch 1


def test_distributed_search_chief_and_two_workers(tmp_path, teacher_path):
    out = str(tmp_path / "dist")
    cmd = [sys.executable, os.path.join(REPO, "tools", "distributed_tuning_demo.py"),
           f"--output_dir={out}", "--max_trials=4", "--workers=2", "--epochs=1",
           f"--teachers={teacher_path}", "--temperatures=1,2,4,8", "--timeout=200"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    finally:
        # The launcher kills its processes itself; if it was killed, clean up after it.
        pids_path = os.path.join(out, "pids.json")
        if os.path.exists(pids_path):
            with open(pids_path) as f:
                for pid in json.load(f).values():
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
    summary = last_json_line(output)
    assert proc.returncode == 0 and summary["ok"], output[-3000:]
    assert summary["by_status"] == {"COMPLETED": 4}
    assert set(summary["trials_per_worker"]) == {"tuner0", "tuner1"}
    rows = tuning.read_results(os.path.join(out, "trials.csv"))
    assert len(rows) == 4 and {r["tuner_id"] for r in rows} == {"tuner0", "tuner1"}


def _spy_quantized_float_weights(monkeypatch):
    """The weights of every float model handed to tfqkd.quantize_model, in call order."""
    from tfqkd import quantize as quantize_lib

    quantized_from = []
    original = quantize_lib.quantize_model

    def spy(model, *args, **kwargs):
        quantized_from.append(model.get_weights())
        return original(model, *args, **kwargs)

    monkeypatch.setattr(quantize_lib, "quantize_model", spy)
    return quantized_from


def test_sweep_trials_quantize_the_saved_float_student(tmp_path, monkeypatch):
    """--student: every trial and the baseline start from the saved float student's weights
    (the paper's Algorithm 1), read back here from the file with plain Keras."""
    from recipes import _stages
    student_dir = tmp_path / "student"
    _stages.train_student(_stages.student_config(
        "smoke", dataset="digits", subset=None, test_subset=None, epochs=2, progress="none",
        output_dir=str(student_dir)))
    saved = keras.models.load_model(str(student_dir / "model" / "model.h5"), compile=False)
    quantized_from = _spy_quantized_float_weights(monkeypatch)
    cfg = sweep.make_config("smoke", output_dir=str(tmp_path / "sweep"), student=str(student_dir),
                            temperatures="4", teachers="1", schedules="constant,linear",
                            epochs=1, teacher_epochs=1)
    result = sweep.run(cfg)
    assert result["trials"] == 2 and result["baseline_test_accuracy"] is not None
    # Teachers are fresh width-1 models, quantized never; every quantization is the student's.
    assert quantized_from, "no trial quantized a student"
    for weights in quantized_from:
        assert len(weights) == len(saved.get_weights())
        for got, want in zip(weights, saved.get_weights()):
            np.testing.assert_array_equal(got, want)
    # A student of another data set's shape is refused before any trial, naming the fix.
    other = keras.Sequential([keras.layers.Input((32, 32, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    other.save(str(tmp_path / "other.h5"))
    with pytest.raises(ValueError, match="train the student on this data set"):
        sweep.run(cfg.replace(output_dir=str(tmp_path / "sweep2"),
                              student=str(tmp_path / "other.h5")))
    assert not os.path.exists(tmp_path / "sweep2")  # nothing written


def test_teacher_ensembles_resolve_to_their_members_and_score_their_mean_probabilities():
    import tfqkd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, 40).astype("int32")
    from tfqkd._keras import tf

    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    data = tuning.TrialData(train=batches, validation=batches, test=batches, num_classes=10,
                            input_shape=(8, 8, 1))
    a, b = tfqkd.models.tiny_resnet(seed=1), tfqkd.models.tiny_resnet(width=2, seed=2)
    pool = tuning.TeacherPool({"a": a, "b": b})
    assert pool.get(" a + b ") == [a, b] and pool.get("a") is a
    # Reference: NumPy softmax of each member's logits, averaged, top-1.
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    mean = (softmax(a.predict(x, verbose=0)) + softmax(b.predict(x, verbose=0))) / 2
    assert pool.accuracy("a+b", data) == pytest.approx(float(np.mean(mean.argmax(-1) == y)))
    assert tuning.ensemble_members("1 + 1.5") == ["1", "1.5"]
    # The sweep's --teachers: an ensemble of widths becomes one key, each member checked.
    assert sweep._teacher_keys(sweep.make_config("smoke", teachers="1, 1.5+2")) == ["1", "1.5+2"]
    with pytest.raises(ValueError, match="neither a width"):
        sweep._teacher_keys(sweep.make_config("smoke", teachers="1+nope"))


def test_sweep_pretrains_the_float_student_once_with_kd_and_quantizes_it(tmp_path, monkeypatch):
    """--pretrain_student=kd (Figure 2(b)): the float student is trained once, with KD from the
    first teacher, saved, and every trial quantizes exactly that file's weights; a rerun
    trains nothing."""
    quantized_from = _spy_quantized_float_weights(monkeypatch)
    from tfqkd.distiller import Distiller

    float_students = []  # Distillers built around a float (not quantized) student
    init = Distiller.__init__

    def spy_init(self, student, *args, **kwargs):
        if not any(type(layer).__name__.startswith("Quantize") for layer in student.layers):
            float_students.append(student.name)
        return init(self, student, *args, **kwargs)

    monkeypatch.setattr(Distiller, "__init__", spy_init)
    out = tmp_path / "sweep"
    cfg = sweep.make_config("smoke", output_dir=str(out), pretrain_student="kd",
                            temperatures="4", teachers="2", schedules="linear", epochs=1,
                            teacher_epochs=1, baseline=False)
    assert sweep.run(cfg)["trials"] == 1
    path = out / "student_kd.h5"
    saved = keras.models.load_model(str(path), compile=False)
    assert quantized_from
    for weights in quantized_from:
        for got, want in zip(weights, saved.get_weights()):
            np.testing.assert_array_equal(got, want)
    # The pretraining distilled (one Distiller around the float student), from the teacher
    # trained first.
    assert len(float_students) == 1
    assert os.path.exists(out / "teachers" / "teacher_2.h5")
    stamp = os.path.getmtime(path)
    sweep.run(cfg.replace(temperatures="1,4"))  # one more trial, the same student
    assert os.path.getmtime(path) == stamp
    assert len(tuning.read_results(str(out / "trials.csv"))) == 2
    with pytest.raises(ValueError, match="pass one"):
        sweep.check_inputs(cfg.replace(student=str(path)))


def test_run_grid_progress_line_ranks_on_validation(tmp_path, monkeypatch):
    """The "best" a grid's progress line names is the best validation trial, not the best test."""
    scores = {1.0: (0.9, 0.5), 4.0: (0.5, 0.9)}  # temperature -> (val, test)

    def fake_trial(cfg, data, teachers=None, **kwargs):
        val, test = scores[float(cfg["temperature"])]
        return {"val_accuracy": val, "test_accuracy": test, "train_accuracy": 1.0,
                "teacher_accuracy": 0.8, "wall_time": 0.0}

    monkeypatch.setattr(tuning.results, "run_trial_config", fake_trial)
    lines = []
    tuning.run_grid(tuning.grid_configs(temperatures=[1, 4], teachers=["1"],
                                        schedules=["constant"]),
                    None, str(tmp_path / "trials.csv"), log=lines.append)
    last = lines[-1]
    assert "val_accuracy=0.5000 test_accuracy=0.9000" in last
    assert last.endswith("| best val_accuracy 0.9000 (τ=1 teacher=1 λ=0.5 constant w2)"), last


_FILL_THE_DISK = r'''
import json, resource, sys
import keras_tuner
import tfqkd
from tfqkd import tuning
from tfqkd.search import BitWidthSpace, BitWidthTuner

directory, kind, fill = sys.argv[1], sys.argv[2], sys.argv[3] == "fill"
space = keras_tuner.HyperParameters()  # room for many distinct trials, whatever the tuner
space.Int("x", 0, 10**6)
oracle = keras_tuner.oracles.RandomSearchOracle(
    objective=keras_tuner.Objective("val_accuracy", "max"), max_trials=5, seed=0,
    hyperparameters=space)
if kind == "bits":
    student = tfqkd.models.tiny_resnet(seed=0)
    space = BitWidthSpace(student, max_bytes=3500, storage="int4", choices=(2, 4, 8))
    tuner = BitWidthTuner(space, student, None, None, None, kd=False, oracle=oracle,
                          directory=directory, project_name="p", overwrite=False)
else:
    tuner = tuning.DistillationTuner(oracle, directory=directory, project_name="p",
                                     overwrite=False, log=lambda m: None)
if not fill:  # the reload: what survived
    print(json.dumps({t.trial_id: [t.status, t.score] for t in tuner.oracle.trials.values()}))
    sys.exit()
trial = tuner.oracle.create_trial(tuner.tuner_id)
tuner.oracle.update_trial(trial.trial_id, {"val_accuracy": 0.75})
trial.status = "COMPLETED"
tuner.oracle.end_trial(trial)
tuner.save()
# The disk fills up: from now on no file may grow past 8 bytes (Python ignores SIGXFSZ, so
# each write fails with an error instead of killing the process).
resource.setrlimit(resource.RLIMIT_FSIZE, (8, resource.RLIM_INFINITY))
failed = []
for name, save in [("create_trial", lambda: tuner.oracle.create_trial(tuner.tuner_id)),
                   ("tuner.save", tuner.save)]:
    try:
        save()
    except Exception as e:
        failed.append(name)
print(json.dumps({"finished": trial.trial_id, "failed": failed}))
'''


@pytest.mark.parametrize("kind", ["distillation", "bits"])
def test_a_save_that_fails_halfway_leaves_the_project_reloadable(tmp_path, kind):
    # keras-tuner truncates oracle.json, trial.json and tuner0.json before writing them: a
    # kill or a full disk in between used to leave an empty file, and the next run could not
    # reload the project (CI saw "Expecting value: line 1 column 1" after a SIGKILL).
    from conftest import run_script

    script = tmp_path / "fill_the_disk.py"
    script.write_text(_FILL_THE_DISK)
    project = tmp_path / "project"
    first = last_json_line(run_script(script, project, kind, "fill").stdout)
    assert first["failed"] == ["create_trial", "tuner.save"]  # the fault did hit both saves
    for path in (project / "p").rglob("*.json"):
        json.loads(path.read_text())  # every file left is whole
    assert not list((project / "p").rglob(".tmp-*"))  # no temporary file left behind
    reloaded = last_json_line(run_script(script, project, kind, "reload").stdout)
    assert reloaded == {first["finished"]: ["COMPLETED", 0.75]}


def test_crash_safe_oracle_keeps_the_search_and_an_oracle_that_saves_itself():
    import keras_tuner

    from tfqkd.tuning.crash_safe import crash_safe_oracle

    def random_oracle(cls=keras_tuner.oracles.RandomSearchOracle):
        space = keras_tuner.HyperParameters()
        space.Int("x", 0, 10**6)
        return cls(objective="val_accuracy", max_trials=3, seed=4, hyperparameters=space)

    plain, safe = random_oracle(), crash_safe_oracle(random_oracle())
    assert type(safe).__name__ == "CrashSafeRandomSearchOracle"
    assert crash_safe_oracle(safe) is safe and type(crash_safe_oracle(safe)) is type(safe)
    # The same draws: the subclass changes only how files are written.
    assert [plain._random_values() for _ in range(3)] == [safe._random_values() for _ in range(3)]

    class SavesItself(keras_tuner.oracles.RandomSearchOracle):
        def save(self):
            self.saved = True

    own = random_oracle(SavesItself)
    assert type(crash_safe_oracle(own)) is SavesItself  # its own save is kept


@pytest.mark.parametrize("kill", ["in_create_trial", "after_end_trial"])
def test_a_kill_between_two_project_files_loses_no_trial_and_reruns_none(tmp_path, kill):
    # keras-tuner's create_trial writes the new trial.json, then oracle.json. CI killed a
    # search between the two: the resumed search never ran that trial and numbered the next
    # one after it (trials.csv held 0, 1 and 3). And end_trial writes oracle.json while the
    # finished trial is still listed as running: a kill before the tuner's next save trained
    # it again.
    import keras_tuner

    from tfqkd.tuning.crash_safe import crash_safe_oracle

    def oracle():
        space = keras_tuner.HyperParameters()
        space.Int("x", 0, 10**6)
        made = crash_safe_oracle(keras_tuner.oracles.RandomSearchOracle(
            objective="val_accuracy", max_trials=3, seed=4, hyperparameters=space))
        made._set_project_dir(str(tmp_path), "p")
        return made

    def finish(oracle_, trial):
        oracle_.update_trial(trial.trial_id, {"val_accuracy": 0.5})
        trial.status = "COMPLETED"
        oracle_.end_trial(trial)

    first = oracle()
    finish(first, first.create_trial("tuner0"))
    orphan = None
    if kill == "in_create_trial":
        first.save()  # as the tuner does after end_trial

        class Killed(Exception):
            pass

        def killed():
            raise Killed

        first.save = killed  # the kill lands after the new trial.json, before oracle.json
        with pytest.raises(Killed):
            first.create_trial("tuner0")
        orphan = json.loads((tmp_path / "p" / "trial_1" / "trial.json").read_text())
        assert orphan["status"] == "RUNNING"

    resumed = oracle()
    resumed.reload()
    ids = []
    while True:
        trial = resumed.create_trial("tuner0")
        if trial.status == "STOPPED":
            break
        ids.append(trial.trial_id)
        if orphan and trial.trial_id == "1":  # the same draw as the one the kill cut short
            assert trial.hyperparameters.values == orphan["hyperparameters"]["values"]
        finish(resumed, trial)
    assert ids == ["1", "2"]
    assert {t.trial_id: t.status for t in resumed.trials.values()} == {
        "0": "COMPLETED", "1": "COMPLETED", "2": "COMPLETED"}
