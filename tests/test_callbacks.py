"""Coefficient/temperature schedulers: exact end points, shapes, resume after interruption, logging,
config, errors."""

import csv
import glob

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfqkd import models
from tfqkd._keras import keras, tf
from tfqkd.callbacks import CoefficientScheduler, TemperatureScheduler, schedule_value
from tfqkd.distiller import Distiller

N_TRAIN, BATCH = 20, 5  # 4 steps per epoch


def _data(n=N_TRAIN):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32"), (np.arange(n) % 10).astype("int32")


def _distiller(seed=1):
    d = Distiller(models.tiny_resnet(10, seed=seed), models.tiny_resnet(10, width=2, seed=2),
                  temperature=2.0, coefficient=0.5)
    # Eager steps: the schedulers only touch Python-side hooks, and eager avoids a tracing per test.
    d.compile(keras.optimizers.SGD(0.01), run_eagerly=True)
    return d


class Recorder(keras.callbacks.Callback):
    """Records, per step, the optimizer step, the variables' values and the logged values."""

    def __init__(self):
        super().__init__()
        self.steps, self.lam, self.tau, self.logged = [], [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.steps.append(int(self.model.optimizer.iterations.numpy()))
        self.lam.append(float(self.model.coefficient.numpy()))
        self.tau.append(float(self.model.temperature.numpy()))

    def on_train_batch_end(self, batch, logs=None):
        self.logged.append(float(logs["coefficient"]))


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_step):
        super().__init__()
        self.at_step = at_step

    def on_train_batch_begin(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.at_step:
            raise RuntimeError("simulated pre-emption")


def test_linear_cr_over_two_epochs():
    x, y = _data()
    d, rec = _distiller(), Recorder()
    d.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
          callbacks=[CoefficientScheduler("linear", 0.5, 0.0), rec])
    total = 2 * N_TRAIN // BATCH
    assert rec.steps == list(range(total))
    lam = np.array(rec.lam)
    assert lam[0] == 0.5 and lam[-1] == 0.0  # exactly, not approximately
    assert np.all(np.diff(lam) < 0)  # strictly decreasing in between
    np.testing.assert_allclose(lam, 0.5 * (1 - np.arange(total) / (total - 1)), atol=1e-7)
    # What the step used (the Distiller's log) is what the scheduler set.
    np.testing.assert_allclose(rec.logged, lam, atol=1e-7)


@pytest.mark.parametrize("save_freq", ["epoch", 1])
def test_schedule_resumes_after_interruption(tmp_path, save_freq):
    x, y = _data()
    total = 2 * N_TRAIN // BATCH  # 8 steps
    expected = 0.5 * (1 - np.arange(total) / (total - 1))
    backup = str(tmp_path / "backup")

    d, rec = _distiller(), Recorder()
    with pytest.raises(RuntimeError, match="simulated pre-emption"):
        d.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[
            CoefficientScheduler("linear", 0.5, 0.0), Interrupt(at_step=6), rec,
            keras.callbacks.BackupAndRestore(backup, save_freq=save_freq)])
    assert rec.steps == list(range(6))

    # A fresh process would rebuild everything: new Distiller, new optimizer, new scheduler.
    d2, rec2 = _distiller(seed=7), Recorder()
    d2.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[
        CoefficientScheduler("linear", 0.5, 0.0), rec2,
        keras.callbacks.BackupAndRestore(backup, save_freq=save_freq)])
    # Epoch backups restart the interrupted epoch (step 4); batch backups the next step (6).
    first = 4 if save_freq == "epoch" else 6
    assert rec2.steps == list(range(first, total))
    np.testing.assert_allclose(rec2.lam, expected[first:], atol=1e-7)
    assert rec2.lam[0] < 0.5 and rec2.lam[-1] == 0.0


def test_per_epoch_schedule():
    x, y = _data()
    d, rec = _distiller(), Recorder()
    h = d.fit(x, y, batch_size=BATCH, epochs=3, verbose=0,
              callbacks=[CoefficientScheduler("linear", 0.5, 0.1, per="epoch"), rec])
    np.testing.assert_allclose(rec.lam, np.repeat([0.5, 0.3, 0.1], 4), atol=1e-7)
    np.testing.assert_allclose(h.history["coefficient"], [0.5, 0.3, 0.1], atol=1e-7)


def test_temperature_scheduler_and_both_together():
    x, y = _data()
    d, rec = _distiller(), Recorder()
    d.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[
        TemperatureScheduler("cosine", 4.0, 1.0), CoefficientScheduler("constant", 0.3), rec])
    assert rec.tau[0] == 4.0 and rec.tau[-1] == 1.0
    assert np.all(np.diff(rec.tau) < 0)
    np.testing.assert_allclose(rec.lam, 0.3, atol=1e-7)


def test_schedule_shapes():
    assert schedule_value("constant", 0.7, 0.2, 0.9) == 0.2
    assert schedule_value("linear", 0.0, 0.1, 0.7) == 0.1
    assert schedule_value("linear", 1.0, 0.1, 0.7) == 0.7  # exact despite float rounding
    assert schedule_value("cosine", 0.5, 1.0, 0.0) == pytest.approx(0.5)
    assert schedule_value("cosine", 0.25, 1.0, 0.0) == pytest.approx((1 + np.cos(np.pi / 4)) / 2)
    steps = [schedule_value("step", p, 0.6, 0.0, boundaries=(0.25, 0.75)) for p in
             (0.0, 0.24, 0.25, 0.74, 0.75, 1.0)]
    assert steps == pytest.approx([0.6, 0.6, 0.3, 0.3, 0.0, 0.0])
    assert schedule_value(lambda p: p**2, 0.5, 0, 0) == 0.25
    assert schedule_value("linear", 1.7, 0.5, 0.0) == 0.0  # progress clipped


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["linear", "cosine", "step"]), st.floats(0, 1), st.floats(0, 1),
       st.lists(st.floats(0, 1), min_size=2, max_size=10))
def test_schedules_are_monotone_between_start_and_end(name, start, end, progresses):
    values = [schedule_value(name, p, start, end, boundaries=(0.3, 0.7))
              for p in sorted(progresses)]
    lo, hi = min(start, end), max(start, end)
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in values)
    diffs = np.diff(values) * (1 if end >= start else -1)
    assert np.all(diffs >= -1e-12)
    assert schedule_value(name, 0.0, start, end, boundaries=(0.3, 0.7)) == start
    assert schedule_value(name, 1.0, start, end, boundaries=(0.3, 0.7)) == end


def test_callable_schedule_and_explicit_total_steps():
    x, y = _data()
    d, rec = _distiller(), Recorder()
    # total_steps longer than this fit: a schedule spread over several fit() calls.
    sched = CoefficientScheduler(lambda p: 0.5 * (1 - p) ** 2, total_steps=9)
    d.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[sched, rec])
    d.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[sched, rec])
    np.testing.assert_allclose(rec.lam, 0.5 * (1 - np.arange(8) / 8) ** 2, atol=1e-7)


def test_start_step_offsets_a_schedule_for_a_used_optimizer():
    x, y = _data()
    d, rec = _distiller(), Recorder()
    d.optimizer.iterations.assign(100)  # e.g. an optimizer carried over from an earlier phase
    d.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
          callbacks=[CoefficientScheduler("linear", 0.5, 0.0, start_step=100), rec])
    np.testing.assert_allclose(rec.lam, 0.5 * (1 - np.arange(4) / 3), atol=1e-7)


def test_logs_reach_history_csv_and_summaries(tmp_path):
    x, y = _data()
    d = _distiller()
    csv_path = tmp_path / "history.csv"
    # The Keras TensorBoard callback needs the `tensorboard` package (not a dependency, absent
    # here); it works by keeping a default writer active during fit, which this reproduces.
    writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
    with writer.as_default(), tf.summary.record_if(True):
        h = d.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[
            CoefficientScheduler("linear", 0.5, 0.0, log_name="lambda_cr"),
            keras.callbacks.CSVLogger(str(csv_path))])
    writer.flush()
    assert h.history["lambda_cr"] == pytest.approx([0.5 * (1 - 3 / 7), 0.0])
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lambda_cr"]) for r in rows] == pytest.approx(h.history["lambda_cr"])
    values = {}
    for event_file in glob.glob(str(tmp_path / "tb" / "events*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            for value in event.summary.value:
                if value.tag == "batch_lambda_cr":
                    assert value.metadata.plugin_data.plugin_name == "scalars"
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(values) == list(range(8))
    np.testing.assert_allclose([values[i] for i in range(8)],
                               0.5 * (1 - np.arange(8) / 7), atol=1e-7)


def test_unknown_length_needs_total_steps():
    x, y = _data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(BATCH)
    d = _distiller()
    with pytest.raises(ValueError, match="total_steps"):
        d.fit(ds, epochs=1, verbose=0, callbacks=[CoefficientScheduler()])
    rec = Recorder()
    d.fit(ds, epochs=1, verbose=0, callbacks=[CoefficientScheduler(total_steps=4), rec])
    assert rec.lam[0] == 0.5 and rec.lam[-1] == 0.0


def test_config_round_trip():
    for sched in (CoefficientScheduler("step", 0.4, 0.1, per="epoch", boundaries=(0.3, 0.6)),
                  TemperatureScheduler("cosine", 6.0, 2.0, total_steps=100)):
        cfg = sched.get_config()
        clone = type(sched).from_config(cfg)
        assert clone.get_config() == cfg
        blob = keras.utils.serialize_keras_object(sched)
        again = keras.utils.deserialize_keras_object(blob)
        assert type(again) is type(sched) and again.get_config() == cfg
    assert keras.utils.get_registered_object("tfqkd>CoefficientScheduler") is CoefficientScheduler


@pytest.mark.parametrize("kwargs,match", [
    ({"start": 1.5}, r"start.*\[0, 1\]"),
    ({"end": -0.1}, r"end.*\[0, 1\]"),
    ({"schedule": "exp"}, "Unknown schedule 'exp'"),
    ({"per": "step"}, "per must be 'batch' or 'epoch'"),
    ({"total_steps": 0}, "total_steps must be a positive integer"),
    ({"start_step": -1}, "start_step must be an integer >= 0"),
    ({"schedule": "step", "boundaries": (0.8, 0.2)}, "boundaries must be increasing"),
])
def test_coefficient_scheduler_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoefficientScheduler(**kwargs)


def test_temperature_scheduler_rejects_non_positive():
    with pytest.raises(ValueError, match="must be > 0"):
        TemperatureScheduler("linear", 4.0, 0.0)


def test_callable_out_of_range_fails_clearly():
    x, y = _data()
    with pytest.raises(ValueError, match=r"scheduled at progress 0\.0000 .*\[0, 1\]"):
        _distiller().fit(x, y, batch_size=BATCH, verbose=0,
                         callbacks=[CoefficientScheduler(lambda p: 2.0)])


def test_model_without_the_variable():
    x, y = _data()
    plain = models.tiny_resnet(10, seed=0)
    plain.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="has no such tf.Variable"):
        plain.fit(x, y, verbose=0, callbacks=[CoefficientScheduler()])
