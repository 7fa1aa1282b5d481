"""The Larq rows of ``tools/compare_peers.py``, run in Larq's own virtual environment.

Larq pins ``numpy < 2`` and needs Keras 2 as ``tf.keras`` (TensorFlow <= 2.15), which tfqkd's
environment cannot hold, so this script imports neither tfqkd nor anything of this repository: it
gets everything from files ``compare_peers.py`` writes.

* ``data.npz``: the exact images (``x_train``, ``y_train``, ``x_validation``, ``y_validation``,
  ``x_test``, ``y_test``, uint8), the per-channel ``mean`` / ``std`` of the tfqkd pipeline, and
  ``check_x`` (raw test images) with the float student's and teacher's logits on them
  (``check_student``, ``check_teacher``) as tfqkd computed them;
* ``weights.npz``: every weight of the float student and teacher, keyed ``student/<layer>/<i>``;
* ``config.json``: architecture (stage filters, blocks, weight decay) and the training budget.

The ResNet is rebuilt here with the same layer names; the weights are copied layer by layer
(every weighted layer must be matched, with equal shapes), and the float rebuild must reproduce
tfqkd's logits on ``check_x`` before anything trains: that proves the architecture, the weights
and the input normalisation all map. The ternary student is that ResNet with every convolution but
the first as ``larq.layers.QuantConv2D(kernel_quantizer=SteTern(ternary_weight_networks=True))``
(TWN threshold 0.7 * mean|w|, levels {-1, 0, 1}, straight-through gradient) and the first
convolution and the classifier float, Larq's usual recipe.

Rows: ``larq_hard`` (cross-entropy) and ``larq_kd_cr`` (a keras.io-style distiller: the same
``(1 - lambda) * CE + lambda * tau^2 * KL`` as tfqkd's KD rows, lambda linear from its start to 0).

Usage (by compare_peers.py)::

    /work/venv-larq/bin/python tools/peers/larq_rows.py --config=OUT/larq/config.json \\
        --row=larq_hard --seed=0 --output=OUT/rows/larq_hard_seed0
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Set by tfqkd for TF >= 2.16 (tf_keras); here tf.keras IS Keras 2, and tf_keras is not installed.
os.environ.pop("TF_USE_LEGACY_KERAS", None)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

keras = tf.keras

ROWS = ("larq_hard", "larq_kd_cr")


def build_resnet(cfg, filters, quantized, name):
    """The tfqkd CIFAR ResNet (tfqkd.models.cifar_resnet), same layer names, in tf.keras."""
    import larq as lq

    reg = keras.regularizers.l2(cfg["weight_decay"] / 2.0) if cfg["weight_decay"] else None

    def conv(x, f, k, s, lname):
        if quantized and lname != "stem_conv":
            return lq.layers.QuantConv2D(
                f, k, strides=s, padding="same", use_bias=False,
                kernel_quantizer=lq.quantizers.SteTern(ternary_weight_networks=True),
                kernel_regularizer=reg, name=lname)(x)
        return keras.layers.Conv2D(f, k, strides=s, padding="same", use_bias=False,
                                   kernel_regularizer=reg, name=lname)(x)

    def bn(x, lname):
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=lname)(x)

    inputs = keras.Input(shape=tuple(cfg["input_shape"]), name="images")
    x = keras.layers.ReLU(name="stem_relu")(bn(conv(inputs, filters[0], 3, 1, "stem_conv"),
                                               "stem_bn"))
    for s, f in enumerate(filters):
        for b in range(cfg["blocks_per_stage"]):
            stride = 2 if (s > 0 and b == 0) else 1
            p = f"stage{s + 1}_block{b + 1}"
            shortcut = x
            y = conv(x, f, 3, stride, f"{p}_conv1")
            y = keras.layers.ReLU(name=f"{p}_relu1")(bn(y, f"{p}_bn1"))
            y = bn(conv(y, f, 3, 1, f"{p}_conv2"), f"{p}_bn2")
            if stride != 1 or shortcut.shape[-1] != f:
                shortcut = bn(conv(shortcut, f, 1, stride, f"{p}_proj_conv"), f"{p}_proj_bn")
            x = keras.layers.ReLU(name=f"{p}_relu2")(keras.layers.Add(name=f"{p}_add")([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(cfg["num_classes"], kernel_regularizer=reg, name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)


def load_weights(model, weights, prefix):
    """Copies ``weights[prefix/<layer>/<i>]`` into ``model`` layer by layer; every must match."""
    saved = {}
    for key in weights.files:
        p, layer, i = key.split("/")
        if p == prefix:
            saved.setdefault(layer, {})[int(i)] = weights[key]
    mine = {layer.name for layer in model.layers if layer.weights}
    if set(saved) != mine:
        raise ValueError(f"{prefix}: weighted layers differ: only in tfqkd {sorted(set(saved) - mine)}, "
                         f"only here {sorted(mine - set(saved))}")
    for layer in model.layers:
        if layer.weights:
            values = [saved[layer.name][i] for i in range(len(saved[layer.name]))]
            shapes = [tuple(w.shape) for w in layer.get_weights()]
            if shapes != [v.shape for v in values]:
                raise ValueError(f"{prefix}/{layer.name}: shapes {shapes} vs tfqkd "
                                 f"{[v.shape for v in values]}")
            layer.set_weights(values)


def normalise(cfg_arrays, x):
    return (tf.cast(x, tf.float32) / 255.0 - cfg_arrays["mean"]) / cfg_arrays["std"]


def augment(images, seed, padding=4, flip=True):
    """Pad + random crop (+ horizontal flip), each image its own draw (tfqkd.data's augmentation)."""
    batch = tf.shape(images)[0]
    h, w = images.shape[1], images.shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    top = tf.random.stateless_uniform([batch], seeds[0], 0, 2 * padding + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([batch], seeds[1], 0, 2 * padding + 1, dtype=tf.int32)
    out = tf.gather(padded, top[:, None] + tf.range(h)[None, :], axis=1, batch_dims=1)
    out = tf.gather(out, left[:, None] + tf.range(w)[None, :], axis=2, batch_dims=1)
    if not flip:
        return out
    mirror = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
    return tf.where(mirror[:, None, None, None], tf.reverse(out, axis=[2]), out)


def train_dataset(arrays, cfg, seed):
    x, y = arrays["x_train"], arrays["y_train"].astype(np.int32)
    padding = max(1, int(round(cfg["augment_padding"] * x.shape[1])))
    images, labels = tf.constant(x), tf.constant(y)
    ds = tf.data.Dataset.range(len(y)).shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg["batch_size"], drop_remainder=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def prepare(idx, s):
        batch = tf.cast(tf.gather(images, idx), tf.float32) / 255.0
        batch = augment(batch, s, padding, cfg.get("augment_flip", True))
        return (batch - arrays["mean"]) / arrays["std"], tf.gather(labels, idx)

    return tf.data.Dataset.zip((ds, seeds)).map(prepare, num_parallel_calls=tf.data.AUTOTUNE) \
        .prefetch(tf.data.AUTOTUNE)


def predict(model, arrays, x):
    ds = tf.data.Dataset.from_tensor_slices(x).batch(500).map(lambda b: normalise(arrays, b))
    return np.concatenate([np.argmax(model(b, training=False).numpy(), -1) for b in ds])


class Distiller(keras.Model):
    """The keras.io "Knowledge Distillation" example, lambda a variable (for CR) and the student's
    regularization added (the same objective as tfqkd.Distiller with temperature_squared)."""

    def __init__(self, student, teacher, temperature, coefficient):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.temperature = temperature
        self.coefficient = tf.Variable(coefficient, trainable=False, dtype=tf.float32)
        self.ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.kl = keras.losses.KLDivergence()

    def call(self, x, training=False):
        return self.student(x, training=training)

    def train_step(self, data):
        x, y = data
        t = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            s = self.student(x, training=True)
            hard = self.ce(y, s)
            soft = self.kl(tf.nn.softmax(t / self.temperature), tf.nn.softmax(s / self.temperature))
            lam = self.coefficient
            loss = (1 - lam) * hard + lam * self.temperature ** 2 * soft + tf.add_n(
                self.student.losses or [tf.constant(0.0)])
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return {"loss": loss, "hard_loss": hard, "soft_loss": soft, "coefficient": lam}


class LinearCoefficient(keras.callbacks.Callback):
    """lambda from ``start`` to 0, linear in the step (tfqkd's CoefficientScheduler "linear")."""

    def __init__(self, distiller, start, total_steps):
        super().__init__()
        self.d, self.start, self.total, self.step = distiller, start, max(1, total_steps - 1), 0

    def on_train_batch_begin(self, batch, logs=None):
        self.d.coefficient.assign(self.start * (1 - min(1.0, self.step / self.total)))
        self.step += 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--row", required=True, choices=ROWS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True, help="Directory for result.json, predictions.")
    args = ap.parse_args(argv)
    import larq as lq

    with open(args.config) as f:
        cfg = json.load(f)
    arrays = dict(np.load(cfg["data"]))
    arrays["mean"] = arrays["mean"].astype(np.float32)
    arrays["std"] = np.maximum(arrays["std"].astype(np.float32), 1 / 255)
    weights = np.load(cfg["weights"])
    keras.utils.set_random_seed(args.seed)

    # The float rebuilds must give tfqkd's logits: architecture, weights and inputs all map.
    checks = {}
    for who, filters in (("student", cfg["student_filters"]), ("teacher", cfg["teacher_filters"])):
        m = build_resnet(cfg, filters, False, who)
        load_weights(m, weights, who)
        got = m(normalise(arrays, arrays["check_x"]), training=False).numpy()
        err = float(np.max(np.abs(got - arrays[f"check_{who}"])))
        checks[f"{who}_max_logit_diff"] = err
        if err > 1e-3 * max(1.0, float(np.max(np.abs(got)))):
            raise SystemExit(f"{who}: the tf.keras rebuild differs from tfqkd's model by {err} "
                             "on check_x: the architecture or the weights do not map.")
        if who == "teacher":
            teacher = m
    student = build_resnet(cfg, cfg["student_filters"], True, "larq_ternary")
    load_weights(student, weights, "student")

    ds = train_dataset(arrays, cfg, args.seed)
    steps = len(arrays["y_train"]) // cfg["batch_size"]
    if cfg.get("max_steps"):
        steps = min(steps, cfg["max_steps"])
    total = steps * cfg["epochs"]
    opt = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(cfg["learning_rate"], total),
                               momentum=0.9, nesterov=True)
    callbacks = []
    if args.row == "larq_hard":
        model = student
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    else:
        model = Distiller(student, teacher, cfg["temperature"], cfg["coefficient"])
        model.compile(opt)
        callbacks.append(LinearCoefficient(model, cfg["coefficient"], total))
    t0 = time.time()
    hist = model.fit(ds.repeat(), epochs=cfg["epochs"], steps_per_epoch=steps, verbose=0,
                     callbacks=callbacks)
    train_time = time.time() - t0
    os.makedirs(args.output, exist_ok=True)
    out = {}
    for split in ("validation", "test"):
        pred = predict(student, arrays, arrays[f"x_{split}"])
        np.save(os.path.join(args.output, f"{split}_predictions.npy"), pred)
        out[f"{split}_accuracy"] = float(np.mean(pred == arrays[f"y_{split}"].reshape(-1)))
    levels = {layer.name: len(np.unique(lq.quantizers.SteTern(ternary_weight_networks=True)(
        tf.constant(layer.get_weights()[0])).numpy())) for layer in student.layers
        if isinstance(layer, lq.layers.QuantConv2D)}
    out.update(row=args.row, seed=args.seed, train_time_s=round(train_time, 1), steps=total,
               step_time_ms=round(1000 * train_time / max(1, total), 1),
               max_levels=max(levels.values()), quantized_layers=len(levels),
               final_loss=float(hist.history["loss"][-1]),
               versions={"tensorflow": tf.__version__, "larq": lq.__version__,
                         "numpy": np.__version__}, **checks)
    tmp = os.path.join(args.output, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(args.output, "result.json"))
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
