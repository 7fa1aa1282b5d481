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
