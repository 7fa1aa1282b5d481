"""Tests of tfqkd.quantize: the scheme, quantize_model, save/load, quantized_weights."""


import numpy as np
import pytest
import tensorflow_model_optimization as tfmot
from sklearn.datasets import load_digits

import tfqkd
from tfqkd._keras import keras, tf
from tfqkd.quantize import (
    TfqkdQuantizeScheme,
    first_and_last_layers,
    quantization_info,
    quantize_model,
    quantize_scope,
    quantized_weights,
)
from tfqkd.quantizers import ActivationQuantizer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 - 0.5).astype("float32").reshape(-1, 8, 8, 1)[:384]
    return x, y.astype("int32")[:384]


def _levels(kernel, per_channel=False):
    if per_channel:
        flat = kernel.reshape(-1, kernel.shape[-1])
        return max(len(np.unique(flat[:, c])) for c in range(flat.shape[1]))
    return len(np.unique(kernel))


def _fit(model, x, y, epochs=4, lr=3e-3, eager=False):
    # eager: skips tracing the train step, much faster for a few steps of a big graph
    model.compile(keras.optimizers.Adam(lr), LOSS, run_eagerly=eager)
    keras.utils.set_random_seed(0)  # deterministic shuffling: the loss curve is reproducible
    losses = model.fit(x, y, epochs=epochs, batch_size=64, verbose=0).history["loss"]
    print(f"losses: {losses}")
    return losses


# -- W2 tiny ResNet: training, levels, first/last layers, save/load -----------------------
@pytest.fixture(scope="module")
def trained_w2(digits):
    x, y = digits
    q = quantize_model(tfqkd.models.tiny_resnet(10, seed=0), weight_bits=2)
    losses = _fit(q, x, y)
    return q, losses


def test_w2_tiny_resnet_trains_and_is_ternary(trained_w2, digits):
    q, losses = trained_w2
    # last/first epoch loss over seeds 0-5 (init and shuffling): 0.713-0.749
    assert losses[-1] < losses[0] * 0.85, losses
    assert isinstance(q.get_layer("quant_stage1_block1_conv1"), tfmot.quantization.keras.QuantizeWrapperV2)
    kernels = quantized_weights(q)
    assert set(kernels) == {"stem_conv", "stage1_block1_conv1", "stage1_block1_conv2",
                            "stage2_block1_conv1", "stage2_block1_conv2", "stage2_block1_proj_conv",
                            "classifier"}
    info = quantization_info(q)
    for name, kernel in kernels.items():
        if name in ("stem_conv", "classifier"):  # first/last at 8 bits
            assert info[name]["bits"] == 8 and 3 < _levels(kernel) <= 255
            assert np.abs(info[name]["levels"]).max() <= 127
        else:
            assert info[name]["bits"] == 2 and 2 <= _levels(kernel) <= 3
            assert set(np.unique(info[name]["levels"]).tolist()) <= {-1, 0, 1}
        np.testing.assert_allclose(info[name]["levels"] * info[name]["step"], kernel, rtol=1e-5, atol=1e-7)


def test_forward_pass_uses_the_quantized_kernels(trained_w2, digits):
    q, _ = trained_w2
    x = digits[0][:4]
    kernels = quantized_weights(q)
    wrapper = q.get_layer("quant_stage1_block1_conv1")
    # every layer belongs to the quantized model only, so intermediate outputs can be probed
    probe = keras.Model(q.input, [q.get_layer("stem_relu").output, wrapper.output])
    a, out = probe(x, training=False)
    expected = tf.nn.conv2d(a, kernels["stage1_block1_conv1"], 1, "SAME")
    np.testing.assert_allclose(out, expected, atol=1e-4)
    # the float shadow kernel is different (and trained): it is not what the forward pass uses
    shadow = wrapper._weight_vars[0][0].numpy()
    assert len(np.unique(shadow)) > 3


def test_bn_add_relu_pool_are_left_alone(trained_w2):
    q, _ = trained_w2
    for name in ("stem_bn", "stem_relu", "stage1_block1_add", "pool"):
        layer = q.get_layer(name)
        assert not isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)


@pytest.mark.parametrize("filename", ["w2.h5", "w2.keras"])
def test_save_load_predict_identical(trained_w2, digits, tmp_path, filename):
    q, _ = trained_w2
    path = str(tmp_path / filename)
    q.save(path)
    with quantize_scope():
        loaded = keras.models.load_model(path)
    x = digits[0][:32]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), q.predict(x, verbose=0))
    for name, kernel in quantized_weights(q).items():
        np.testing.assert_array_equal(quantized_weights(loaded)[name], kernel)


@pytest.mark.parametrize("filename", ["w2a4.h5", "w2a4.keras"])
def test_save_load_with_activation_quantizers(digits, tmp_path, filename):
    # With activation_bits the model has an input QuantizeLayer; tfmot's class is built twice by
    # the zip-format loader and refused its own file ("expected 5 variables, received 3").
    x, y = digits
    q = quantize_model(tfqkd.models.tiny_resnet(10, seed=0), weight_bits=2, activation_bits=4)
    q.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(True))
    q.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0)  # moves the ranges off their init
    path = str(tmp_path / filename)
    q.save(path)
    with quantize_scope():
        loaded = keras.models.load_model(path)
    input_quantizer = loaded.layers[1]
    assert isinstance(input_quantizer, tfqkd.quantize.QuantizeLayer), input_quantizer
    assert len(input_quantizer.weights) == 3
    for a, b in zip(q.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    np.testing.assert_array_equal(loaded.predict(x[:32], verbose=0), q.predict(x[:32], verbose=0))


def test_first_last_none_and_per_channel(digits):
    model = tfqkd.models.tiny_resnet(10, seed=1)
    q = quantize_model(model, weight_bits=2, first_last_bits=None, per_channel=True)
    for name, kernel in quantized_weights(q).items():
        assert _levels(kernel, per_channel=True) <= 3, name
    steps = quantization_info(q)["stage2_block1_conv1"]["step"]
    assert steps.shape == (16,) and len(np.unique(steps)) > 1
    # the original model is not modified
    assert len(np.unique(model.get_layer("stage1_block1_conv1").kernel.numpy())) > 3


def test_first_last_float_leaves_them_unquantized(digits):
    model = tfqkd.models.tiny_resnet(10, seed=1)
    q = quantize_model(model, weight_bits=2, first_last_bits="float")
    wrapped = {layer.layer.name for layer in q.layers
               if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)}
    assert "stem_conv" not in wrapped and "classifier" not in wrapped
    assert {"stage1_block1_conv1", "stage2_block1_proj_conv"} <= wrapped
    assert set(quantized_weights(q)) == wrapped
    x = digits[0][:16]
    q.predict(x, verbose=0)  # a forward pass: tfmot leaves Q(w) in the wrapped kernels
    for name in ("stem_conv", "classifier"):  # float kernels, unchanged: the original's values
        np.testing.assert_array_equal(q.get_layer(name).kernel.numpy(),
                                      model.get_layer(name).kernel.numpy())
    for name, kernel in quantized_weights(q).items():
        assert _levels(kernel, per_channel=False) <= 3, name


def test_first_and_last_found_by_graph_position_not_name():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="classifier")(inputs)  # misleading names on purpose
    x = keras.layers.ReLU()(x)
    a = keras.layers.Conv2D(4, 3, padding="same", name="zz_mid")(x)
    b = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="aa_dw")(x)
    b = keras.layers.Conv2D(4, 1, name="pw")(b)
    x = keras.layers.Add()([a, b])
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, name="stem_conv")(x)
    model = keras.Model(inputs, out)
    assert first_and_last_layers(model) == (["classifier"], ["stem_conv"])
    q = quantize_model(model, weight_bits=2, per_channel=True)
    info = quantization_info(q)
    assert info["classifier"]["bits"] == 8 and info["stem_conv"]["bits"] == 8
    assert info["zz_mid"]["bits"] == info["aa_dw"]["bits"] == info["pw"]["bits"] == 2
    dw = quantized_weights(q)["aa_dw"]
    assert dw.shape == (3, 3, 4, 2) and info["aa_dw"]["step"].shape == (4, 2)
    assert max(len(np.unique(dw[:, :, i, m])) for i in range(4) for m in range(2)) <= 3


@pytest.mark.parametrize("build", [lambda: tfqkd.models.resnet20(seed=0),
                                   lambda: tfqkd.models.wide_resnet20(1.5, seed=0)])
def test_first_and_last_of_paper_networks(build):
    assert first_and_last_layers(build()) == (["stem_conv"], ["classifier"])


def test_sequential_model_with_dense_layers(digits):
    x, y = digits
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(10),
    ])
    q = quantize_model(model, weight_bits=2, activation_bits=4)
    losses = _fit(q, x, y, epochs=3)
    assert losses[-1] < losses[0]
    info = quantization_info(q)
    bits = [info[layer.name]["bits"] for layer in model.layers if layer.weights]
    assert bits == [8, 2, 8]
    # the fused ReLU of the middle Dense gets the 4-bit activation quantizer
    dense = q.get_layer("quant_" + model.layers[2].name)  # the middle Dense (fused ReLU)
    probe = keras.Model(q.input, dense.output)
    out = probe(x[:16], training=False).numpy()
    assert len(np.unique(out)) <= 16 and out.min() >= 0


def test_resnet20_build_trains(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 10, 16).astype("int32")
    q = quantize_model(tfqkd.models.resnet20(10, (8, 8, 3), seed=0), weight_bits=2)
    losses = _fit(q, x, y, epochs=3, lr=1e-2, eager=True)
    assert losses[-1] < losses[0]
    kernels = quantized_weights(q)
    assert len(kernels) == 22  # 19 convs + 2 projections + classifier
    assert sum(_levels(k) <= 3 for k in kernels.values()) == 20  # all but stem and classifier


# -- activations ---------------------------------------------------------------------------
def test_w4a4_trains_and_activations_on_grid(digits, tmp_path):
    x, y = digits
    q = quantize_model(tfqkd.models.tiny_resnet(10, seed=2), weight_bits=4, activation_bits=4,
                       step="learned", activation_clip="ema")
    relus = [l for l in q.layers if isinstance(l, tfmot.quantization.keras.QuantizeWrapper)
             and isinstance(l.layer, keras.layers.ReLU)]
    assert len(relus) == 5
    losses = _fit(q, x, y, epochs=4, eager=True)
    assert losses[-1] < losses[0] * 0.85, losses  # seeds 0-5 (init, shuffling): 0.662-0.700
    wrapper = q.get_layer("quant_stage1_block1_relu1")
    clip = float(wrapper._output_quantizer_vars["clip"])
    assert clip > 0
    out = keras.Model(q.input, wrapper.output)(x[:32], training=False).numpy()
    n = out / (clip / 15)
    assert out.min() >= 0 and out.max() <= clip * (1 + 1e-6)
    np.testing.assert_allclose(n, np.round(n), atol=1e-3)
    for name, kernel in quantized_weights(q).items():
        assert _levels(kernel) <= (255 if name in ("stem_conv", "classifier") else 15)
    # learned steps were initialised from the weights and trained
    steps = [v for v in q.trainable_variables if "kernel_step" in v.name]
    assert len(steps) == 7 and all(float(tf.reduce_min(s)) > 0 for s in steps)
    q.run_eagerly = False  # compare graph mode with graph mode (eager rounds differently)
    path = str(tmp_path / "w4a4.h5")
    q.save(path)
    with quantize_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x[:16], verbose=0), q.predict(x[:16], verbose=0))


def test_custom_activation_quantizer_is_used_for_every_activation():
    made = []

    def factory(bits):
        made.append(bits)
        return ActivationQuantizer(bits, clip="fixed", clip_value=2.0)

    q = quantize_model(tfqkd.models.tiny_resnet(10, seed=0), activation_bits=3,
                       activation_quantizer=factory)
    assert made and set(made) == {3}
    quantizers = [l.quantize_config.activation_quantizer for l in q.layers
                  if isinstance(l, tfmot.quantization.keras.QuantizeWrapper)
                  and isinstance(l.layer, keras.layers.ReLU)]
    assert len(quantizers) == 5
    assert all(qz.clip == "fixed" and qz.clip_value == 2.0 and qz.bits == 3 for qz in quantizers)


def test_scheme_with_quantize_apply_directly():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    annotated = tfmot.quantization.keras.quantize_annotate_model(model)
    q = tfmot.quantization.keras.quantize_apply(annotated, scheme=TfqkdQuantizeScheme(weight_bits=1))
    kernel = quantized_weights(q)["dense" if "dense" in quantized_weights(q) else model.layers[0].name]
    assert len(np.unique(np.abs(kernel))) == 1 and len(np.unique(kernel)) == 2


# -- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(weight_bits=0), r"weight_bits.*1\.\.8.*0"),
    (dict(weight_bits=9), r"weight_bits.*1\.\.8"),
    (dict(weight_bits=2.5), r"weight_bits.*2\.5"),
    (dict(activation_bits=16), r"activation_bits.*16"),
    (dict(first_last_bits=0), r"first_last_bits"),
    (dict(step="minmax"), r"step.*'minmax'"),
    (dict(per_channel="yes"), r"per_channel"),
    (dict(activation_clip="max"), r"activation_clip"),
    (dict(activation_quantizer=lambda b: None), r"activation_bits"),
    (dict(activation_quantizer=3, activation_bits=4), r"callable"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_model(tfqkd.models.tiny_resnet(seed=0), **kwargs)


@pytest.mark.parametrize("layer", [
    keras.layers.Conv1D(4, 3, name="my_conv1d"),
    keras.layers.LSTM(4, name="my_lstm"),
])
def test_unsupported_weighted_layer_is_named(layer):
    inputs = keras.Input((10, 3))
    x = layer(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match=layer.name):
        quantize_model(model)


def test_already_quantized_and_non_relu_activation():
    q = quantize_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q)
    inp = keras.Input((4,))
    h = keras.layers.Dense(3, activation="tanh", name="tanh_fc")(inp)
    h = keras.layers.Dense(3, name="fc")(h) * 0.5  # a TensorFlow op in the graph: TFOpLambda
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    with pytest.warns(UserWarning, match=r"'tf.math.multiply.*' stay float.*rounds their outputs"):
        q = quantize_model(model, activation_bits=4)
    # The tanh output is rounded on TFLite's TANH grid, its input by a range quantizer.
    cfg = q.get_layer("quant_tanh_fc").quantize_config
    assert repr(cfg.output_quantizer) == "FixedRangeQuantizer(bits=8, min=-1.0, max=0.9921875)"
    assert type(cfg.pre_activation_quantizer).__name__ == "RangeQuantizer"


# -- tensors the integer file rounds -------------------------------------------------------
def test_activation_bits_models_every_integer_tensor(digits, tmp_path):
    """W2A8: input, pre-add BN, pool and logits get 8-bit range quantizers; W2A32: none of them."""
    from tfqkd.quantize import integer_graph_tensors
    from tfqkd.quantize_configs import OutputQuantizeConfig
    from tfqkd.quantizers import RangeQuantizer
    from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (
        QuantizeLayer)

    x, y = digits
    model = tfqkd.models.tiny_resnet(10, seed=0)
    names = integer_graph_tensors(model)
    assert "classifier" in names and "pool" in names
    assert any(n.endswith("_bn2") for n in names)
    assert not any(n.endswith("_bn1") or n.endswith("_add") or n.endswith("conv1") for n in names)

    plain = quantize_model(model, weight_bits=2)  # W2A32: unchanged, no new quantizers
    assert not any(isinstance(l, QuantizeLayer) for l in plain.layers)
    assert not any(isinstance(getattr(l, "quantize_config", None), OutputQuantizeConfig)
                   for l in plain.layers)
    assert plain.get_layer("quant_classifier").quantize_config.output_quantizer is None

    q = quantize_model(model, weight_bits=2, activation_bits=8)
    inputs_q = [l for l in q.layers if isinstance(l, QuantizeLayer)]
    assert len(inputs_q) == 1
    wrapped = {l.layer.name: l for l in q.layers
               if isinstance(l, tfmot.quantization.keras.QuantizeWrapper)}
    for name in names:
        assert isinstance(wrapped[name]._output_quantizers[0], RangeQuantizer), name
    # Untrained, the range quantizers pass through (they have seen no data): not all-zero inputs.
    untrained = q.predict(x[:8], verbose=0)
    assert np.ptp(untrained, axis=0).max() > 0
    _fit(q, x, y, epochs=1)
    bn = wrapped[[n for n in names if n.endswith("_bn2")][0]]
    lo, hi = (float(bn._output_quantizer_vars[k]) for k in ("min_var", "max_var"))
    assert lo < 0 < hi  # a signed pre-add tensor keeps its negative half
    out = keras.Model(q.input, bn.output)(x[:16], training=False).numpy()
    assert len(np.unique(out)) <= 256 and out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6
    path = str(tmp_path / "w2a8.h5")
    q.save(path)
    with quantize_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x[:16], verbose=0), q.predict(x[:16], verbose=0))


def test_input_entering_zero_padding_is_quantized():
    """A model input that enters a ``ZeroPadding2D`` first (ResNet50, ResNet50V2, DenseNet121) is
    rounded to 8 bits like the integer file's input. tfmot lists an input for its input quantizer
    only when the layer right after it is annotated, so these students saw a float input: traced
    on ResNet50 W8A8 (seed 0), the file's first conv then equalled the student on 93.8 % of its
    outputs, and on all of them with the input quantized."""
    from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (
        QuantizeLayer)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=64)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.ZeroPadding2D(1, name="pad")(inputs)
    h = keras.layers.Conv2D(4, 3, name="conv")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="classifier")(h))
    assert not any(isinstance(l, QuantizeLayer)
                   for l in quantize_model(model, weight_bits=2).layers)  # W2A32: float input
    q = quantize_model(model, weight_bits=2, activation_bits=8)
    assert isinstance(q.layers[1], QuantizeLayer) and q.get_layer("pad").input is q.layers[1].output
    _fit(q, x, y, epochs=1)
    padded = keras.Model(q.input, q.get_layer("pad").output)(x, training=False).numpy()
    assert len(np.unique(padded)) <= 256 < len(np.unique(x))  # on an 8-bit grid, zero included


def test_separable_conv_is_split_into_depthwise_and_pointwise():
    """SeparableConv2D (NASNet, Xception) is quantized as DepthwiseConv2D + 1x1 Conv2D: the same
    function before quantization, both kernels quantized, the caller's model untouched."""
    init = keras.initializers.GlorotUniform(seed=4)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.SeparableConv2D(6, 3, padding="same", depth_multiplier=2, activation="relu",
                                     depthwise_initializer=init, pointwise_initializer=init,
                                     bias_initializer="ones", name="sep")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, kernel_initializer=init)(
        keras.layers.GlobalAveragePooling2D()(h)))
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    # Reference by hand: depthwise (channel c, multiplier m -> output c * 2 + m), then 1x1.
    dw, pw, bias = model.get_layer("sep").get_weights()
    depth = tf.nn.depthwise_conv2d(x, dw, [1, 1, 1, 1], "SAME").numpy()
    want = np.maximum(np.einsum("bhwc,co->bhwo", depth, pw[0, 0]) + bias, 0.0)
    probe = keras.Model(inp, h)
    np.testing.assert_allclose(probe(x).numpy(), want, rtol=1e-5, atol=1e-5)
    q = quantize_model(model, weight_bits=8, first_last_bits=None)
    inner = {layer.layer.name: layer.layer for layer in q.layers
             if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)}
    assert type(inner["sep_depthwise"]) is keras.layers.DepthwiseConv2D
    assert type(inner["sep_pointwise"]) is keras.layers.Conv2D

    def shadow(layer, name):  # the float shadow weight the wrapper trains
        return next(w.numpy() for w in q.get_layer(layer).weights if name in w.name)

    np.testing.assert_array_equal(shadow("quant_sep_depthwise", "depthwise_kernel"), dw)
    np.testing.assert_array_equal(shadow("quant_sep_pointwise", "kernel"), pw)
    np.testing.assert_array_equal(shadow("quant_sep_pointwise", "bias"), bias)
    # 8-bit kernels: the QAT model computes nearly the float function.
    np.testing.assert_allclose(q(x).numpy(), model(x).numpy(), atol=0.05)
    assert [type(layer) for layer in model.layers].count(keras.layers.SeparableConv2D) == 1
    assert len(model.get_layer("sep")._inbound_nodes) == 1  # noqa: SLF001
