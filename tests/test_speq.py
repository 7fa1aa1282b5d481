"""SPEQ: the stochastic-precision quantizer, the self-distilling SPEQ model, its recipe."""

import json

import numpy as np
import pytest

from conftest import saved_model_accuracy
from tfqkd._keras import keras, tf
from tfqkd import speq
from tfqkd.quantizers import ActivationQuantizer
from tfqkd.speq import StochasticPrecisionQuantizer, stochastic_precision

# Activations spread over [0, 4]: the 2-bit grid on [0, 4] is far from float and from 8 bits.
_X = np.linspace(0.0, 4.0, 64, dtype="float32").reshape(4, 16)


def _built(q, name="act"):
    layer = keras.layers.Layer()
    weights = q.build((None, 16), name, layer)
    weights["clip"].assign(4.0)  # as if trained: activations clipped to [0, 4]
    return layer, weights


# ---------------------------------------------------------------- quantizer
def test_quantizer_student_pass_is_deterministic_target_bits():
    q = StochasticPrecisionQuantizer(bits=2, high_bits=8, probability=0.5)
    _, w = _built(q)
    a, b = q(_X, False, w).numpy(), q(_X, False, w).numpy()
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 4  # 2 bits: four levels, nothing else
    # Exactly the toolkit's ActivationQuantizer: same graph, so the same export.
    expected = ActivationQuantizer(2, clip="fixed", clip_value=4.0)(_X, False, {}).numpy()
    np.testing.assert_array_equal(a, expected)
    assert isinstance(q, ActivationQuantizer)


def test_quantizer_teacher_draws_precision_per_call_and_per_layer():
    q1 = StochasticPrecisionQuantizer(bits=2, high_bits=None, probability=0.5)
    q2 = StochasticPrecisionQuantizer(bits=2, high_bits=None, probability=0.5)
    _, w1 = _built(q1, "a")
    _, w2 = _built(q2, "b")
    low = q1(_X, False, w1).numpy()
    seen1, pairs = set(), set()
    with stochastic_precision():
        for _ in range(40):
            o1, o2 = q1(_X, False, w1).numpy(), q2(_X, False, w2).numpy()
            for o in (o1, o2):  # every output is one of the two precisions, nothing in between
                assert np.array_equal(o, low) or np.allclose(o, _X)
            is_float = (bool(np.allclose(o1, _X)), bool(np.allclose(o2, _X)))
            seen1.add(is_float[0])
            pairs.add(is_float)
    assert seen1 == {True, False}
    assert len(pairs) >= 3  # the two layers draw independently (P(fail) ~ 40 * 0.5^40)
    # Leaving the context restores the deterministic student behaviour.
    np.testing.assert_array_equal(q1(_X, False, w1).numpy(), low)


def test_quantizer_probability_zero_teacher_equals_student_and_one_is_high():
    q0 = StochasticPrecisionQuantizer(bits=2, high_bits=8, probability=0.0)
    q1 = StochasticPrecisionQuantizer(bits=2, high_bits=8, probability=1.0)
    _, w0 = _built(q0)
    _, w1 = _built(q1)
    student = q0(_X, False, w0).numpy()
    with stochastic_precision():
        np.testing.assert_array_equal(q0(_X, False, w0).numpy(), student)
        eight = q1(_X, False, w1).numpy()
    assert len(np.unique(eight)) > 16  # 8 bits: many levels
    np.testing.assert_allclose(eight, _X, atol=0.5 * 4.0 / 255 + 1e-6)


def test_quantizer_in_tf_function_draws_afresh_without_retracing_and_tensor_flag():
    q = StochasticPrecisionQuantizer(bits=2, high_bits=None, probability=0.5)
    _, w = _built(q)
    flag = tf.Variable(True, trainable=False)

    @tf.function
    def step(x):
        student = q(x, False, w)
        with stochastic_precision(flag):
            teacher = q(x, False, w)
        return student, teacher

    outs = [step(tf.constant(_X)) for _ in range(30)]
    assert step.experimental_get_tracing_count() == 1
    students = {o[0].numpy().tobytes() for o in outs}
    teachers = {o[1].numpy().tobytes() for o in outs}
    assert len(students) == 1 and len(teachers) == 2
    flag.assign(False)  # the run-time flag switches the traced teacher off, still no retrace
    for _ in range(5):
        np.testing.assert_array_equal(step(tf.constant(_X))[1].numpy(), outs[0][0].numpy())
    assert step.experimental_get_tracing_count() == 1


def test_quantizer_config_round_trip_and_registration():
    q = StochasticPrecisionQuantizer(bits=4, high_bits=None, probability=0.25, clip="pact",
                                     clip_value=3.0, ema_decay=0.9)
    config = q.get_config()
    assert StochasticPrecisionQuantizer.from_config(config) == q
    serialized = keras.utils.serialize_keras_object(q)
    assert serialized["registered_name"] == "tfqkd>StochasticPrecisionQuantizer"
    restored = keras.utils.deserialize_keras_object(serialized)
    assert isinstance(restored, StochasticPrecisionQuantizer) and restored == q
    assert json.loads(json.dumps(config)) == config
    # An 8-bit one in a signed same-scale group gets the file's range from align_student.
    aligned = StochasticPrecisionQuantizer(bits=8, high_bits=8, signed_range=(-1.0, 3.0))
    assert StochasticPrecisionQuantizer.from_config(aligned.get_config()).signed_range == (-1.0, 3.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=0), "bits"),
        (dict(bits=2, high_bits=16), "high_bits"),
        (dict(bits=4, high_bits=2), "high_bits"),
        (dict(probability=1.5), "probability"),
        (dict(probability="0.5"), "probability"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(clip="minmax"), "clip"),
    ],
)
def test_quantizer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StochasticPrecisionQuantizer(**kwargs)


# ---------------------------------------------------------------- the SPEQ model
def _digits(n_train=600):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[..., None] / 16.0).astype("float32")
    y = d.target.astype("int32")
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _speq_student(bits=2, **kwargs):
    import tfqkd

    return speq.speq_quantize(tfqkd.models.tiny_resnet(10, seed=0), bits, bits, **kwargs)


@pytest.fixture(scope="module")
def student():
    """A W2A2 SPEQ student (float teacher alternative, p=0.5), shared by the read-only tests."""
    return _speq_student(high_bits=None, probability=0.5)


def test_teacher_shares_the_students_variables_and_adds_none(student):
    model = speq.SPEQ(student, temperature=2.0)
    assert len(speq.stochastic_quantizers(student)) >= 3  # one per quantized ReLU
    before = [id(v) for v in student.weights]
    x = _digits()[0][:8]
    model.teacher_logits(x)
    model.teacher_probabilities(x)
    assert [id(v) for v in student.weights] == before  # the teacher pass created nothing
    trainable = {id(v) for v in student.trainable_variables}
    assert {id(v) for v in model.trainable_variables} == trainable
    metric_vars = {id(v) for m in model.metrics for v in m.variables}  # loss trackers
    extra = {id(v) for v in model.weights} - set(before) - metric_vars
    assert extra == {id(model.coefficient), id(model.temperature)}  # SPEQ's own two scalars only


def test_teacher_passes_differ_student_pass_deterministic_probability_zero_equal(student):
    x = _digits()[0][:32]
    model = speq.SPEQ(student)
    s1, s2 = model.student(x, training=False).numpy(), model.student(x, training=False).numpy()
    np.testing.assert_array_equal(s1, s2)
    teachers = [model.teacher_logits(x).numpy() for _ in range(6)]
    assert any(not np.allclose(teachers[0], t) for t in teachers[1:])
    assert any(not np.allclose(s1, t) for t in teachers)
    # Traced once, the teacher still draws afresh on every call (the draw is a graph op).
    traced = tf.function(model.teacher_logits)
    traced_outs = [traced(x).numpy() for _ in range(6)]
    assert traced.experimental_get_tracing_count() == 1
    assert any(not np.allclose(traced_outs[0], t) for t in traced_outs[1:])
    # Probability 0: the teacher is the student, bit for bit.
    model0 = speq.SPEQ(_speq_student(high_bits=None, probability=0.0))
    np.testing.assert_array_equal(model0.teacher_logits(x).numpy(),
                                  model0.student(x, training=False).numpy())


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_stochastic_teacher_accuracy_counts_the_teacher_pass(probability):
    # Probability 0 or 1 makes the teacher pass deterministic (all target bits / all float), so
    # the figure is the hand count of that pass's right predictions, on a short last batch too.
    student = _speq_student(high_bits=None, probability=probability)
    x, y = _digits()[2][:50], _digits()[3][:50]
    with stochastic_precision(True):
        teacher = student(x, training=False).numpy()
    student_pass = student(x, training=False).numpy()
    if probability == 1.0:  # the context changed the pass (else the test would prove nothing)
        assert not np.allclose(teacher, student_pass)
    else:
        np.testing.assert_array_equal(teacher, student_pass)
    expected = int((teacher.argmax(-1) == y).sum()) / 50
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # 16 + 16 + 16 + 2
    assert speq.stochastic_teacher_accuracy(student, ds) == expected


@pytest.mark.parametrize("teacher_bn", ["inference", "batch"])
def test_teacher_pass_leaves_batch_norm_and_clip_state_untouched(student, teacher_bn):
    x = _digits()[0][:32]
    model = speq.SPEQ(student, teacher_bn=teacher_bn, teacher_passes=2)
    state = lambda: [v.numpy().copy() for v in student.non_trainable_variables]  # noqa: E731
    before = state()
    tf.function(model.teacher_probabilities)(x)
    for a, b in zip(before, state()):
        np.testing.assert_array_equal(a, b)
    student(x, training=True)  # the check can fail: a training pass does move the state
    assert any(not np.array_equal(a, b) for a, b in zip(before, state()))


def test_speq_config_round_trip(student):
    import tfqkd

    model = speq.SPEQ(student, temperature=3.0, coefficient=0.25, teacher_passes=2,
                      teacher_bn="batch")
    config = model.get_config()
    assert "teacher" not in config
    with tfqkd.quantize_scope():
        again = speq.SPEQ.from_config(config)
    assert (again.teacher_passes, again.teacher_bn, again.soft_loss_fn) == (
        2, "batch", tfqkd.losses.cosine_distance)
    assert float(again.temperature.numpy()) == 3.0 and float(again.coefficient.numpy()) == 0.25
    assert [q.get_config() for q in speq.stochastic_quantizers(again.student)] == [
        q.get_config() for q in speq.stochastic_quantizers(student)]


def test_speq_rejects_bad_arguments(student):
    import tfqkd

    plain = tfqkd.quantize_model(tfqkd.models.tiny_resnet(10, seed=0), 2, 2)
    with pytest.raises(ValueError, match="speq_quantize"):
        speq.SPEQ(plain)
    with pytest.raises(ValueError, match="teacher_bn"):
        speq.SPEQ(student, teacher_bn="train")
    with pytest.raises(ValueError, match="teacher_passes"):
        speq.SPEQ(student, teacher_passes=0)
    with pytest.raises(ValueError, match="tau|temperature"):
        speq.SPEQ(student, temperature=0.0)
    with pytest.raises(ValueError, match="activation_bits"):
        speq.speq_quantize(tfqkd.models.tiny_resnet(10, seed=0), 2, None)


def test_w4a4_speq_trains_with_scheduler_saves_and_exports_int8(tmp_path):
    import tfqkd
    from tfqkd.callbacks import CoefficientScheduler
    from tfqkd.export import export_tflite, verify_tflite

    x, y, xt, yt = _digits(500)
    # Built and trained under a (one-device) MirroredStrategy: replica context, mirrored
    # variables. docs/speq.md reports the two-replica run.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        student = _speq_student(bits=4, high_bits=8, probability=0.5)
        model = speq.SPEQ(student, temperature=2.0, coefficient=0.5)
        model.compile(keras.optimizers.Adam(3e-3), metrics=["accuracy"])
    n_weights = len(student.weights)
    hist = model.fit(x, y, batch_size=50, epochs=8, verbose=0,
                     callbacks=[CoefficientScheduler("linear", 0.5, 0.0)]).history
    assert len(student.weights) == n_weights
    # No retracing per step: Keras traces its train function at most twice (the first shape,
    # then a relaxed one: reduce_retracing), a plain float model too; more steps add none.
    traces = model.train_function.experimental_get_tracing_count()
    assert traces <= 2
    model.fit(x[:100], y[:100], batch_size=50, epochs=1, verbose=0)
    assert model.train_function.experimental_get_tracing_count() == traces
    assert hist["coefficient"][0] < 0.5 and hist["coefficient"][-1] == pytest.approx(0.0, abs=1e-6)
    assert all(np.isfinite(hist["soft_loss"])) and max(hist["soft_loss"]) > 0
    assert hist["hard_loss"][-1] < hist["hard_loss"][0]
    acc = float(np.mean(student.predict(xt, verbose=0).argmax(-1) == yt))
    # Measured over 8 seeds (keras.utils.set_random_seed 0..7, same protocol without the
    # strategy): 0.773-0.849, median 0.832; chance is 0.1. The bound leaves ~3 std below the min.
    assert acc > 0.7, acc

    # The student saves and reloads with its stochastic quantizers (registered, serialisable).
    path = str(tmp_path / "student.h5")
    student.save(path, save_format="h5", include_optimizer=False)
    with tfqkd.quantize_scope():
        again = keras.models.load_model(path, compile=False)
    np.testing.assert_allclose(again(xt[:16], training=False), student(xt[:16], training=False),
                               rtol=1e-5, atol=1e-5)
    assert len(speq.stochastic_quantizers(again)) == len(speq.stochastic_quantizers(student))

    # Student mode is a plain ActivationQuantizer graph: int8 TFLite export like any tfqkd model.
    # (The file rounds the A4 activations on the student's grid, but its int32 biases differ from
    # the student's without align_student, so A4 agrees closely with Keras but not exactly.)
    info = export_tflite(student, str(tmp_path / "speq.tflite"), x[:200], mode="int8")
    report = verify_tflite(info["path"], student,
                           tf.data.Dataset.from_tensor_slices((xt, yt)).batch(300))
    # Same 8 seeds, measured when the file still rounded activations at 8 bits: agreement
    # 0.932-0.956, TFLite top-1 0.785-0.860.
    assert report.top1_agreement > 0.9, report
    assert report.tflite_top1 > 0.7, report


# ---------------------------------------------------------------- recipe
def test_recipe_smoke_run_writes_results_and_a_rerun_trains_nothing(tmp_path):
    from recipes import speq as speq_recipe

    out = tmp_path / "speq_run"
    cfg = speq_recipe.make_config("smoke", dataset="digits", subset=200, test_subset=100,
                                  epochs=2, progress="none", output_dir=str(out))
    assert (cfg.weight_bits, cfg.activation_bits, cfg.soft_loss) == (2, 2, "cosine")
    res = speq_recipe.run(cfg)
    stored = json.loads((out / "results.json").read_text())
    assert stored == json.loads(json.dumps(res))
    assert res["mode"] == "speq" and res["flags"]["high_bits"] == "8"
    # The reported accuracy is the saved student's (recomputed from its predictions); the
    # stochastic teacher's is a count of the 100 test images (one random-precision pass).
    assert res["test_accuracy"] == pytest.approx(saved_model_accuracy(out), abs=1e-9)
    assert res["stochastic_teacher_accuracy"] * 100 == pytest.approx(
        round(res["stochastic_teacher_accuracy"] * 100), abs=1e-6)
    # The recipes' default: batch-norm statistics re-estimated on the trained SPEQ student.
    assert res["precise_bn"]["batches"] == 100 and res["precise_bn"]["layers"] > 0
    for name in ("history.csv", "run_config.json", "model/model.h5"):
        assert (out / name).exists(), name
    assert len((out / "history.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    again = speq_recipe.run(cfg)  # complete: returns the stored results, trains nothing
    assert again["completed_at"] == res["completed_at"]
    with pytest.raises(ValueError, match="high_bits"):
        speq_recipe.parse_high_bits("eight")
