"""Precise batch-norm statistics (tfqkd.batch_norm)."""

import warnings

import numpy as np
import pytest

import tfqkd
from tfqkd._keras import keras, tf
from tfqkd.batch_norm import batch_norm_layers, recalibrate_batch_norm


def _batches(n=4, size=16, seed=0):
    x = np.random.default_rng(seed).normal(1.0, 2.0, (n * size, 8, 8, 1)).astype(np.float32)
    labels = np.arange(len(x)) % 10  # every batch mixes classes, as a shuffled data set does
    return x, tf.data.Dataset.from_tensor_slices((x, labels)).batch(size)


def _bn_state(model):
    return [(layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy())
            for layer in batch_norm_layers(model)]


@pytest.mark.parametrize("weight_bits", [None, 2])
def test_moving_statistics_become_the_average_of_batch_statistics(weight_bits):
    model = tfqkd.models.tiny_resnet(seed=0)
    if weight_bits:
        model = tfqkd.quantize_model(model, weight_bits=weight_bits)
    layers = batch_norm_layers(model)
    assert len(layers) == 6
    for layer in layers:  # stale statistics, far from the data's
        layer.moving_mean.assign(tf.fill(layer.moving_mean.shape, 5.0))
        layer.moving_variance.assign(tf.fill(layer.moving_variance.shape, 100.0))
    others = {v.name: v.numpy().copy() for v in model.variables if "moving_" not in v.name}
    x, ds = _batches()

    assert recalibrate_batch_norm(model, ds, batches=10) == 6

    # The first batch-norm layer's input does not depend on any batch-norm statistics, so its
    # expected statistics can be computed here: the mean over the 4 batches of each batch's
    # per-channel mean and variance (Bessel-corrected, as Keras stores it).
    first = layers[0]
    feed = keras.Model(model.inputs, first.input)
    feats = [feed(x[i:i + 16], training=True).numpy() for i in range(0, len(x), 16)]
    axes = tuple(range(feats[0].ndim - 1))
    np.testing.assert_allclose(first.moving_mean.numpy(),
                               np.mean([f.mean(axes) for f in feats], 0), rtol=1e-4, atol=1e-5)
    n = np.prod([feats[0].shape[a] for a in axes])
    np.testing.assert_allclose(first.moving_variance.numpy(),
                               np.mean([f.var(axes) * n / (n - 1) for f in feats], 0),
                               rtol=1e-4, atol=1e-5)
    for layer in layers:
        assert layer.momentum == 0.9  # restored
        assert np.all(layer.moving_variance.numpy() < 50.0)
    # Nothing else moved: weights, quantizer variables, everything that is not a moving statistic.
    for v in model.variables:
        if "moving_" not in v.name:
            np.testing.assert_array_equal(v.numpy(), others[v.name], err_msg=v.name)


def test_inference_matches_training_mode_after_recalibration():
    model = tfqkd.models.tiny_resnet(seed=0)
    for layer in batch_norm_layers(model):
        layer.moving_mean.assign(tf.fill(layer.moving_mean.shape, 3.0))
    x, _ = _batches(n=1, size=64)
    whole = tf.data.Dataset.from_tensor_slices(x).batch(64)  # images only, one batch
    gap_before = np.abs(model(x, training=False) - model(x, training=True)).max()
    recalibrate_batch_norm(model, whole, batches=1)
    gap_after = np.abs(model(x, training=False) - model(x, training=True)).max()
    # Not exactly 0: like Keras' own updates, the stored variance is Bessel-corrected while
    # training mode normalises with the biased one (a factor n / (n - 1) per channel).
    assert gap_after < 0.01 < 1.0 < gap_before


def test_bad_input_names_the_problem():
    model = tfqkd.models.tiny_resnet(seed=0)
    _, ds = _batches()
    before = _bn_state(model)
    with pytest.raises(ValueError, match="batches must be an integer >= 1"):
        recalibrate_batch_norm(model, ds, batches=0)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batch_norm(model, ds.take(0))
    plain = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="no BatchNormalization layer"):
        recalibrate_batch_norm(plain, ds)
    # A failed call leaves the statistics as they were.
    for (m0, v0), (m1, v1) in zip(before, _bn_state(model)):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v0, v1)


def test_batches_of_one_class_each_warn_and_mixed_batches_do_not():
    # A data set listed class by class and not shuffled (tools/check_applications.py did this
    # until 2026-12-06: 20 batches of airplanes) gives each class's own statistics.
    model = tfqkd.models.tiny_resnet(seed=0)
    x = np.random.default_rng(0).normal(1.0, 2.0, (64, 8, 8, 1)).astype(np.float32)
    by_class = np.repeat(np.arange(4), 16)
    sorted_ds = tf.data.Dataset.from_tensor_slices((x, by_class)).batch(16)
    with pytest.warns(UserWarning, match="each of the 4 batches holds images of a single class"):
        recalibrate_batch_norm(model, sorted_ds)
    mixed = tf.data.Dataset.from_tensor_slices((x, np.tile(np.arange(4), 16))).batch(16)
    images_only = tf.data.Dataset.from_tensor_slices(x).batch(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recalibrate_batch_norm(model, mixed)
        recalibrate_batch_norm(model, images_only)
        recalibrate_batch_norm(model, sorted_ds, batches=1)  # one batch: nothing to compare


MIRRORED_BODY = """
    import tfqkd
    from tfqkd.batch_norm import batch_norm_layers, recalibrate_batch_norm

    ds = tf.data.Dataset.from_tensor_slices(np.repeat(x, 3, axis=0)).batch(16)

    def recalibrated(strategy):
        with strategy.scope():
            model = tfqkd.quantize_model(tfqkd.models.tiny_resnet(seed=0), weight_bits=2)
        before = [layer.moving_mean.values[-1].numpy() if strategy is mirrored
                  else layer.moving_mean.numpy() for layer in batch_norm_layers(model)]
        recalibrate_batch_norm(model, ds, 3)  # cross-replica context: outside strategy.run
        layers = batch_norm_layers(model)
        per_replica = [[c.numpy() for c in getattr(layer.moving_mean, "values",
                                                   [layer.moving_mean])] for layer in layers]
        return before, per_replica

    one = recalibrated(tf.distribute.get_strategy())
    two = recalibrated(mirrored)
    print(json.dumps({
        "replicas": [len(p) for p in two[1]],
        "moved": min(float(np.abs(b - p[-1]).max()) for b, p in zip(two[0], two[1])),
        "max_diff_to_one_device": max(float(np.abs(c - p[0]).max())
                                      for p, q in zip(one[1], two[1]) for c in q),
    }))
"""


def test_under_mirrored_strategy_every_replica_gets_the_one_device_statistics(tmp_path):
    from conftest import run_two_cpu_script

    out = run_two_cpu_script(tmp_path, MIRRORED_BODY)
    assert out["replicas"] == [2] * 6
    assert out["moved"] > 1e-3  # the last replica's statistics changed...
    assert out["max_diff_to_one_device"] < 1e-5  # ...to exactly the one-device estimate
