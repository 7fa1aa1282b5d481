"""Tests of tfqkd.models: sizes, shapes, logits, seeding, weight decay, argument checks.

Full-size networks are built once per module (``resnet20_seed0``) and only where the test is about
them; shape and seeding checks use ``tiny_resnet``.
"""

import numpy as np
import pytest

from tfqkd import models
from tfqkd._keras import keras, tf


@pytest.fixture(scope="module")
def resnet20_seed0():
    return models.resnet20(seed=0)


def _weights_equal(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(wa, wb)
    )


def test_resnet20_size_and_logits(resnet20_seed0):
    model = resnet20_seed0
    assert 260_000 < model.count_params() < 280_000
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Dense)
    assert last.activation is keras.activations.linear
    # Logits, not probabilities: negative values and rows that do not sum to one.
    x = tf.random.stateless_normal((4, 32, 32, 3), seed=(1, 2))
    logits = model(x, training=False).numpy()
    assert logits.min() < 0
    assert not np.allclose(logits.sum(axis=1), 1.0, atol=1e-3)
    # 19 convolutions of the basic blocks + stem, 2 projection shortcuts, 1 dense: ResNet20.
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len([c for c in convs if "proj" not in c.name]) + 1 == 20
    assert len(convs) - 19 == 2


def test_width_one_is_resnet20(resnet20_seed0):
    wide1 = models.wide_resnet20(1, seed=0)
    assert wide1.count_params() == resnet20_seed0.count_params()
    assert [l.name for l in wide1.layers] == [l.name for l in resnet20_seed0.layers]
    assert [w.shape for w in wide1.weights] == [w.shape for w in resnet20_seed0.weights]
    assert _weights_equal(wide1, resnet20_seed0)


def test_wider_networks_have_more_parameters(resnet20_seed0):
    p12 = models.wide_resnet20(1.2, seed=0).count_params()
    p15 = models.wide_resnet20(1.5, seed=0).count_params()
    assert resnet20_seed0.count_params() < p12 < p15
    # Parameters grow roughly with width squared (x1.5 -> about 2.25x).
    assert 2.0 < p15 / resnet20_seed0.count_params() < 2.5


def test_same_seed_same_weights_different_seed_different(resnet20_seed0):
    again = models.resnet20(seed=0)
    assert _weights_equal(again, resnet20_seed0)
    other = models.resnet20(seed=1)
    kernels = [(a, b) for a, b in zip(other.get_weights(), resnet20_seed0.get_weights())
               if a.ndim > 1]
    assert kernels and all(not np.array_equal(a, b) for a, b in kernels)


@pytest.mark.parametrize("num_classes, input_shape", [
    (10, (8, 8, 1)), (2, (16, 16, 3)), (100, (32, 32, 3)), (7, (12, 10, 2)),
])
def test_output_shapes(num_classes, input_shape):
    model = models.tiny_resnet(num_classes, input_shape, seed=0)
    assert model.output_shape == (None, num_classes)
    out = model(np.zeros((3, *input_shape), np.float32))
    assert out.shape == (3, num_classes)


def test_resnet20_other_classes_and_shape():
    model = models.resnet20(np.int64(100), (16, 16, 3), seed=0)  # NumPy integers are fine
    assert model.output_shape == (None, 100)
    assert model(np.zeros((2, 16, 16, 3), np.float32)).shape == (2, 100)


def test_tiny_seeding():
    a, b, c = (models.tiny_resnet(seed=s) for s in (3, 3, 4))
    assert _weights_equal(a, b) and not _weights_equal(a, c)
    # No seed: two models differ (random initialisation).
    assert not _weights_equal(models.tiny_resnet(), models.tiny_resnet())


@pytest.mark.parametrize("width", [0, -1, "2", None, True])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        models.wide_resnet20(width)
    with pytest.raises(ValueError, match="width"):
        models.tiny_resnet(width=width)


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, None, "10", True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        models.tiny_resnet(num_classes)


def test_bad_weight_decay():
    with pytest.raises(ValueError, match="weight_decay"):
        models.tiny_resnet(weight_decay=-1e-4)


def test_weight_decay_adds_regularization_losses():
    model = models.tiny_resnet(weight_decay=1e-3, seed=0)
    kernels = [l.kernel for l in model.layers if hasattr(l, "kernel")]
    assert len(model.losses) == len(kernels) > 0
    # L2 with coefficient weight_decay / 2: gradient of the penalty is weight_decay * w.
    expected = sum(5e-4 * float(tf.reduce_sum(tf.square(k))) for k in kernels)
    np.testing.assert_allclose(float(tf.add_n(model.losses)), expected, rtol=1e-5)
    assert models.tiny_resnet(weight_decay=0.0, seed=0).losses == []


def test_tiny_resnet_has_every_layer_type():
    model = models.tiny_resnet(seed=0)
    types = {type(l) for l in model.layers}
    for cls in (keras.layers.Conv2D, keras.layers.BatchNormalization, keras.layers.ReLU,
                keras.layers.Add, keras.layers.GlobalAveragePooling2D, keras.layers.Dense):
        assert cls in types, f"tiny_resnet lacks {cls.__name__}"
    assert any("proj" in l.name for l in model.layers), "no projection shortcut"
    assert model.count_params() < 10_000
    assert models.tiny_resnet(width=2, seed=0).count_params() > model.count_params()


def test_paper_widths():
    # The paper's WRN20xN teacher widths (Figure 1; docs/recipes.md lists the same).
    assert models.PAPER_WIDTHS == (1, 1.2, 1.5, 1.7, 2, 3, 4, 5, 10)


# ---- Applications models by name (build only: 32x32, alpha 0.35 where there is a width) -------
FAMILIES = {
    "mobilenet": 0.25, "mobilenet_v2": 0.35, "mobilenet_v3_small": 0.35,
    "mobilenet_v3_large": 0.35, "efficientnet_b0": 1.0, "efficientnet_v2_b0": 1.0,
    "resnet50": 1.0, "resnet50_v2": 1.0, "densenet121": 1.0, "nasnet_mobile": 1.0,
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_get_builds_every_family_with_a_softmax_head(name):
    model = models.get(name, 7, (32, 32, 3), alpha=FAMILIES[name])
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 7)
    assert models.softmax_layer(model) is not None
    plain = models.get(name, 7, (32, 32, 3), alpha=FAMILIES[name], include_softmax=False)
    assert models.softmax_layer(plain) is None and plain.output_shape == (None, 7)


def test_get_cifar_names_and_errors(tmp_path):
    assert models.get("tiny_resnet", 10, (8, 8, 1), seed=0).count_params() == \
        models.tiny_resnet(10, seed=0).count_params()
    assert models.get("wide_resnet20", 10, (32, 32, 3), width=2).name == "wide_resnet20x2"
    with pytest.raises(ValueError, match="at least 32x32 pixels.*--image_size=32"):
        models.get("mobilenet_v2", 10, (31, 31, 3))
    with pytest.raises(ValueError, match="resnet50 has no width multiplier"):
        models.get("resnet50", 10, (32, 32, 3), alpha=0.5)
    with pytest.raises(ValueError, match="never downloads.*local path"):
        models.get("mobilenet_v2", 10, (32, 32, 3), weights="imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.get("mobilenet_v2", 10, (32, 32, 3), weights=str(tmp_path / "nope.h5"))
    with pytest.raises(ValueError, match="unknown model name 'alexnet'"):
        models.get("alexnet", 10, (32, 32, 3))
    assert models.min_input_size("MobileNetV2") == 32


def test_get_reads_local_weights_and_rejects_another_head(tmp_path):
    keras.utils.set_random_seed(0)
    source = models.get("mobilenet_v2", 5, (32, 32, 3), alpha=0.35)
    path = str(tmp_path / "w.h5")
    source.save_weights(path)
    loaded = models.get("mobilenet_v2", 5, (32, 32, 3), alpha=0.35, weights=path)
    assert _weights_equal(source, loaded)
    with pytest.raises(ValueError, match="could not load weights.*num_classes=10"):
        models.get("mobilenet_v2", 10, (32, 32, 3), alpha=0.35, weights=path)


def test_preprocess_input_is_the_family_function_and_raw_pixel_families():
    x = tf.constant([[[[0.0, 127.5, 255.0]]]])
    np.testing.assert_allclose(models.preprocess_input("mobilenet_v2")(x), [[[[-1.0, 0.0, 1.0]]]])
    for name in ("efficientnet_b0", "efficientnet_v2_b0", "mobilenet_v3_small"):
        assert models.takes_raw_pixels(name)
        np.testing.assert_allclose(models.preprocess_input(name)(x), x)  # the identity
    assert not models.takes_raw_pixels("resnet50") and not models.takes_raw_pixels("tiny_resnet")
    # the data pipeline's "imagenet:<family>" is the same function
    from tfqkd.data import normalization
    assert normalization.applications_preprocess_input("densenet121") is \
        models.preprocess_input("densenet121")


def test_input_adapter_maps_one_preprocessing_onto_another():
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 3, 3, 3)).astype("float32")
    for src, dst in (("mobilenet_v2", "efficientnet_b0"), ("resnet50", "densenet121")):
        f, g = models.preprocess_input(src), models.preprocess_input(dst)
        adapter = models.input_adapter(f, g)
        np.testing.assert_allclose(adapter(f(pixels.copy())), g(pixels.copy()), atol=1e-3)


# ---- logits_model ------------------------------------------------------------------------------
def _softmax_models():
    base = models.tiny_resnet(10, seed=3)
    features = base.get_layer("pool").output
    dense = keras.Model(base.inputs, keras.layers.Dense(10, activation="softmax", name="head")(
        features))
    act = keras.Model(base.inputs, keras.layers.Activation("softmax", name="sm")(base.output))
    return {"dense": dense, "activation": act}


def _assert_logits_of(model, view, x):
    """log p - z is the same for every class (the logits up to a per-example constant),
    with p from the ORIGINAL model (numpy log), z from the view."""
    p = model(x, training=False).numpy().astype(np.float64)
    z = view(x, training=False).numpy().astype(np.float64)
    assert not np.allclose(p.sum(-1), z.sum(-1))  # z are not the probabilities
    diff = np.log(p) - z
    np.testing.assert_allclose(diff - diff[:, :1], 0.0, atol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "activation"])
def test_logits_model_shares_variables(kind):
    model = _softmax_models()[kind]
    view = models.logits_model(model)
    assert view is not model and models.softmax_layer(view) is None
    assert models.logits_model(view) is view
    x = tf.random.stateless_normal((4, 8, 8, 1), seed=(3, 4))
    _assert_logits_of(model, view, x)
    assert {id(v) for v in view.trainable_variables} == {id(v) for v in model.trainable_variables}
    # Training the view trains the original.
    view.compile(keras.optimizers.SGD(0.5),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = model(x, training=False).numpy()
    view.train_on_batch(x, np.arange(4))
    assert not np.allclose(before, model(x, training=False).numpy())
    _assert_logits_of(model, view, x)


@pytest.mark.parametrize("kind", ["dense", "activation"])
def test_logits_model_of_a_qat_model(kind):
    import tfqkd
    # W4A32: the softmax output is not rounded, so log p - z is exactly constant.
    q = tfqkd.quantize_model(_softmax_models()[kind], weight_bits=4)
    view = models.logits_model(q)
    x = tf.random.stateless_normal((4, 8, 8, 1), seed=(5, 6))
    _assert_logits_of(q, view, x)
    # W4A8: the student rounds its softmax head on the grid the file stores it on: int16 steps
    # of 1/32768 by default, TFLite's int8 SOFTMAX grid (1/256) with softmax_head_bits=8; the
    # view's logits give those probabilities after softmax and that rounding.
    for head_bits, steps, top in ((16, 32768, 32767), (8, 256, 255)):
        q8 = tfqkd.quantize_model(_softmax_models()[kind], weight_bits=4, activation_bits=8,
                                  softmax_head_bits=head_bits)
        view8 = models.logits_model(q8)
        q8(x, training=True)  # the range quantizers see data
        p = q8(x, training=False).numpy().astype(np.float64)
        z = view8(x, training=False).numpy().astype(np.float64)
        soft = np.exp(z - z.max(-1, keepdims=True))
        soft /= soft.sum(-1, keepdims=True)
        np.testing.assert_allclose(p * steps, np.clip(np.floor(soft * steps + 0.5), 0, top),
                                   atol=1e-3 * steps / 256)


def test_logits_model_returns_logit_models_as_is_and_rejects_nested_softmax():
    logits = models.tiny_resnet(10, seed=0)
    assert models.logits_model(logits) is logits
    inp = keras.Input((4,))
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(ValueError, match="nested model"):
        models.logits_model(keras.Model(inp, seq(inp)))


def test_logits_model_of_a_tfmot_default_qat_model():
    # tfmot's own 8-bit scheme wraps a softmax Dense's activation in a QuantizeAwareActivation
    # that quantizes the softmax INPUT: the view keeps that quantizer and drops the softmax.
    import tensorflow_model_optimization as tfmot
    q = tfmot.quantization.keras.quantize_model(_softmax_models()["dense"])
    head = q.get_layer("quant_head")
    assert head._quantize_activations  # the case under test
    view = models.logits_model(q)
    x = tf.random.stateless_normal((4, 8, 8, 1), seed=(7, 8))
    q(x, training=True)  # move the EMA ranges off their initial values
    _assert_logits_of(q, view, x)
