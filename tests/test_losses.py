"""Soft losses: NumPy reference formulas, edge cases, name lookup."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfqkd import losses
from tfqkd._keras import keras, tf


def _softmax(z, tau):
    z = np.asarray(z, np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_kl(p_t, z_s, tau):
    p_s = _softmax(z_s, tau)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_log_t = np.where(p_t > 0, p_t * np.log(np.where(p_t > 0, p_t, 1.0)), 0.0)
    return (t_log_t - p_t * np.log(p_s)).sum(-1)


def _np_ce(p_t, z_s, tau):
    return -(p_t * np.log(_softmax(z_s, tau))).sum(-1)


def _np_cosine(p_t, z_s, tau):
    p_s = _softmax(z_s, tau)
    cos = (p_t * p_s).sum(-1) / (np.linalg.norm(p_t, axis=-1) * np.linalg.norm(p_s, axis=-1))
    return 1.0 - cos


REFERENCE = {"kl": _np_kl, "ce": _np_ce, "cosine": _np_cosine}


@pytest.mark.parametrize("name", ["kl", "ce", "cosine"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_matches_numpy_formula(name, tau):
    rng = np.random.default_rng(0)
    p_t = _softmax(rng.normal(size=(6, 10)) * 3, 1.0)
    z_s = rng.normal(size=(6, 10)) * 3
    got = losses.get(name)(p_t.astype("float32"), z_s.astype("float32"), tau).numpy()
    assert got.shape == (6,)
    np.testing.assert_allclose(got, REFERENCE[name](p_t, z_s, tau), rtol=1e-5, atol=1e-6)


def test_temperature_may_be_a_variable():
    tau = tf.Variable(3.0)
    p_t = np.array([[0.6, 0.3, 0.1]], "float32")
    z_s = np.array([[1.0, -2.0, 0.5]], "float32")
    np.testing.assert_allclose(
        losses.kl_divergence(p_t, z_s, tau).numpy(), _np_kl(p_t, z_s, 3.0), rtol=1e-5)


def test_zero_teacher_probabilities_are_finite():
    one_hot = np.eye(4, dtype="float32")
    z_s = np.random.default_rng(1).normal(size=(4, 4)).astype("float32")
    kl = losses.kl_divergence(one_hot, z_s, 1.0).numpy()
    assert np.all(np.isfinite(kl))
    # With one-hot targets the KL equals the ordinary cross-entropy.
    np.testing.assert_allclose(kl, _np_ce(one_hot, z_s, 1.0), rtol=1e-5)


def test_kl_is_ce_minus_teacher_entropy():
    rng = np.random.default_rng(2)
    p_t = _softmax(rng.normal(size=(5, 7)), 1.0).astype("float32")
    z_s = rng.normal(size=(5, 7)).astype("float32")
    entropy = -(p_t * np.log(p_t)).sum(-1)
    np.testing.assert_allclose(
        losses.kl_divergence(p_t, z_s, 2.0).numpy(),
        losses.soft_cross_entropy(p_t, z_s, 2.0).numpy() - entropy, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=3, max_size=3),
       st.lists(st.floats(-20, 20), min_size=3, max_size=3),
       st.floats(0.1, 10))
def test_kl_and_cosine_ranges(z_t, z_s, tau):
    p_t = _softmax(np.array([z_t]), 1.0).astype("float32")
    z_s = np.array([z_s], "float32")
    # Gibbs' inequality and the cosine range, and the float64 formulas, at extreme logits
    # (|z| / τ up to 200): a float32 softmax without log-sum-exp would overflow or give NaN.
    kl = losses.kl_divergence(p_t, z_s, tau).numpy()[0]
    assert kl >= -1e-5
    np.testing.assert_allclose(kl, _np_kl(p_t.astype(np.float64), z_s, tau)[0], rtol=1e-4, atol=1e-3)
    cos = losses.cosine_distance(p_t, z_s, tau).numpy()[0]
    assert -1e-6 <= cos <= 1.0 + 1e-6
    np.testing.assert_allclose(cos, _np_cosine(p_t.astype(np.float64), z_s, tau)[0], atol=1e-5)


def test_mixed_precision_logits_are_computed_in_float32():
    p_t = np.array([[0.5, 0.5]], "float32")
    # z / τ = 120,000 overflows float16 (max 65,504): computed in float16, this is inf or NaN.
    z_s = tf.constant([[0.0, 60000.0]], tf.float16)
    out = losses.soft_cross_entropy(p_t, z_s, 0.5)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [0.5 * 120000.0], rtol=1e-6)  # -0.5 * log p_0


def test_get_names_aliases_and_callables():
    assert losses.get("kl") is losses.kl_divergence
    assert losses.get("KL_divergence") is losses.kl_divergence
    assert losses.get("ce") is losses.soft_cross_entropy
    assert losses.get("cosine") is losses.cosine_distance
    fn = lambda p_t, z_s, tau: tf.reduce_sum(p_t, -1)  # noqa: E731
    assert losses.get(fn) is fn
    for f in (losses.kl_divergence, losses.soft_cross_entropy, losses.cosine_distance):
        assert losses.get(losses.serialize(f)) is f


def test_get_registered_custom_loss():
    @keras.utils.register_keras_serializable(package="tfqkd_test")
    def l1_probs(p_t, z_s, tau):
        return tf.reduce_sum(tf.abs(p_t - tf.nn.softmax(z_s / tau)), -1)

    name = losses.serialize(l1_probs)
    assert losses.get(name) is l1_probs


@pytest.mark.parametrize("bad", ["mse_soft", "", None, 3])
def test_get_rejects_unknown(bad):
    with pytest.raises(ValueError, match="kl.*ce.*cosine"):
        losses.get(bad)


def test_serialize_unregistered_callable_explains():
    with pytest.raises(ValueError, match="register_keras_serializable"):
        losses.serialize(lambda p, z, t: p)
