"""Peer comparison (issue 25): tfqkd 2-bit against Larq ternary, tfmot 8-bit and a keras.io-style
Distiller, all from the SAME float student and teacher, data, optimizer and budget.

Protocol (every row):

* data: a class-balanced ``--train_images`` subset of the training split (default 10,000),
  ``--validation`` of it (10 %, class by class) carved out as the validation split; the rest
  trains. Rows are compared, and ablations chosen, on validation; the full test set is evaluated
  once per row, at the end. The exact arrays go to ``OUT/data.npz`` (the Larq rows read them too);
* models: a float ResNet20 student and a WRN20x2 teacher (``tfqkd.models``), trained here on the
  training part (``OUT/student``, ``OUT/teacher``; ``--student`` / ``--teacher`` reuse saved ones);
* training: every row starts from the float student, SGD (momentum 0.9, Nesterov) with cosine
  decay from ``--learning_rate`` over ``--epochs`` (8) epochs of batch ``--batch_size``; weight decay
  is the models' L2 regularizer. Our choice of optimizer, not the paper's. The reported model is
  the last epoch's.

Rows (``--rows``; ``all`` = the peer table, ``ablations`` = item 2's, ``everything``):

=================  =================================================================================
float              float fine-tune with the same budget (the ceiling)
tfmot8             tfmot's default 8-bit QAT (``tfmot.quantization.keras.quantize_model``)
hard               tfqkd 2-bit (first/last 8-bit, per-tensor L2 step, precise BN), hard labels
kd                 tfqkd 2-bit, KD lambda = 0.5 constant (tau = 4, tau^2; recipes' KD defaults)
kd_cr              tfqkd 2-bit, KD + CR (lambda linear 0.5 -> 0)
kerasio_kd         the tfqkd 2-bit student trained by a keras.io-style Distiller (lambda = 0.5)
larq_hard          Larq ternary (SteTern, TWN threshold, first/last float), hard labels
larq_kd_cr         Larq ternary, KD + CR (a keras.io-style distiller in Larq's environment)
hard_per_channel   ablation: ``hard`` with one step per output channel
hard_std           ablation: ``hard`` with the std step rule
hard_lsq           ablation: ``hard`` with learned steps (LSQ)
hard_fl_float      ablation: ``hard`` with first/last layers float (not 8-bit)
hard_no_precise_bn ablation: ``hard`` without the batch-norm re-estimation
=================  =================================================================================

``hard_fl_float`` uses ``quantize_model(first_last_bits="float")``: the stem and the classifier
stay unwrapped and float, as in the Larq rows.

The Larq rows run in a separate virtual environment (Larq pins ``numpy < 2`` and needs Keras 2 as
``tf.keras``): create it once with ``--make_larq_venv=PATH`` (TensorFlow 2.15 + Larq from PyPI, a
few minutes) and pass ``--larq_python=PATH/bin/python``. They run ``tools/peers/larq_rows.py`` as a
subprocess on ``OUT/data.npz`` and the float weights (``OUT/larq/weights.npz``); that script checks
that its tf.keras rebuild reproduces tfqkd's logits before training.

Output: ``OUT/results.csv`` (one line per row and seed, rewritten atomically; a row and seed
already there is not run again: resume by re-running the same command), ``OUT/rows/<row>_seed<s>/``
(``test_predictions.npy``, ``validation_predictions.npy``, history), a markdown table and, as the
LAST line, one JSON object (``rows``: mean / per-seed validation and test accuracy per row,
``ran`` / ``skipped``).

Examples::

    python tools/compare_peers.py --make_larq_venv=/work/venv-larq      # once
    python tools/compare_peers.py --smoke --larq_python=/work/venv-larq/bin/python \\
        --output_dir=/tmp/peers_smoke                                   # every row, minutes
    python tools/compare_peers.py --rows=everything --seeds=2 \\
        --larq_python=/work/venv-larq/bin/python --output_dir=runs/peers  # the real table
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARQ_SCRIPT = os.path.join(REPO, "tools", "peers", "larq_rows.py")
#: What --make_larq_venv installs: the newest TensorFlow with Keras 2 as tf.keras that Larq runs on.
LARQ_REQUIREMENTS = ("tensorflow-cpu==2.15.1", "larq", "numpy<2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/peers", "Where everything is written (resumable).")
flags.DEFINE_string("dataset", "cifar10", "Data set (tfqkd.data name).")
flags.DEFINE_string("data_dir", None, "Data source (default: $TFQKD_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_integer("train_images", 10_000, "Class-balanced training subset, validation included.")
flags.DEFINE_float("validation", 0.1, "Fraction of --train_images held out as validation.")
flags.DEFINE_integer("test_images", 0, "Class-balanced test images (0: the full test set).")
flags.DEFINE_enum("arch", "resnet20", ["resnet20", "tiny"], "Student ResNet20 / teacher WRN20x2 "
                  "(tiny: tfqkd.models.tiny_resnet x1 / x2, for tests).")
flags.DEFINE_float("teacher_width", 2.0, "Teacher width (WRN20xN).")
flags.DEFINE_string("student", None, "A saved float student to start from (default: train one).")
flags.DEFINE_string("teacher", None, "A saved float teacher (default: train one).")
flags.DEFINE_integer("teacher_epochs", 30, "Epochs of the float teacher, if trained here.")
flags.DEFINE_integer("student_epochs", 30, "Epochs of the float student, if trained here.")
flags.DEFINE_float("float_learning_rate", 0.1, "Peak learning rate of teacher / student training.")
flags.DEFINE_integer("epochs", 8, "Epochs of every row (fine-tune / quantized).")
flags.DEFINE_float("learning_rate", 0.01, "Peak learning rate of every row (cosine decay).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay (L2 regularizer of the models).")
flags.DEFINE_float("temperature", 4.0, "KD tau (recipes.common.KD_DEFAULTS), with tau^2.")
flags.DEFINE_float("coefficient", 0.5, "KD lambda (constant; CR starts there and ends at 0).")
flags.DEFINE_integer("precise_bn_batches", 100, "Batch-norm re-estimation of the tfqkd rows "
                     "(the recipes' default); hard_no_precise_bn turns it off.")
flags.DEFINE_integer("max_steps", 0, "If > 0, at most this many steps per epoch (smoke runs).")
flags.DEFINE_list("rows", ["all"], "Rows to run: names, 'all' (peer table), 'ablations', "
                  "'everything'.")
flags.DEFINE_integer("seed", 0, "First seed (also the subset and validation choice).")
flags.DEFINE_integer("seeds", 1, "Runs per row: seeds --seed, --seed+1, ... (>= 2 for ablations).")
flags.DEFINE_string("larq_python", None, "Python of the Larq venv (--make_larq_venv); without it "
                    "the Larq rows are skipped with a note.")
flags.DEFINE_string("make_larq_venv", None, "Create the Larq virtual environment at this path "
                    "(TensorFlow 2.15 + Larq from PyPI) and exit.")
flags.DEFINE_string("venv_python", None, "Interpreter for --make_larq_venv (a Python 3.9-3.11; "
                    "default: this one if it is, else python3.11 on PATH).")
flags.DEFINE_bool("smoke", False, "Every row for a few steps (SMOKE: 1,000 training images, 1 "
                  "epoch of 5 steps, teacher/student 1 epoch, 1,000 test images), except where "
                  "those flags are given.")


@dataclasses.dataclass
class Row:
    label: str
    kind: str  # float | tfmot8 | tfqkd | kerasio | larq
    loss: str = "hard"  # hard | kd | kd_cr
    quant: Dict[str, Any] = dataclasses.field(default_factory=dict)  # quantize_model options
    precise_bn: bool = True


ROWS: Dict[str, Row] = {
    "float": Row("float fine-tune, same budget (ceiling)", "float", precise_bn=False),
    "tfmot8": Row("tfmot default 8-bit QAT", "tfmot8", precise_bn=False),
    "hard": Row("tfqkd 2-bit (first/last 8-bit), hard labels", "tfqkd"),
    "kd": Row("tfqkd 2-bit, KD λ = 0.5", "tfqkd", "kd"),
    "kd_cr": Row("tfqkd 2-bit, KD + CR", "tfqkd", "kd_cr"),
    "kerasio_kd": Row("tfqkd 2-bit student, keras.io-style Distiller λ = 0.5", "kerasio", "kd",
                      precise_bn=False),
    "larq_hard": Row("Larq ternary (SteTern/TWN, first/last float), hard labels", "larq",
                     precise_bn=False),
    "larq_kd_cr": Row("Larq ternary, KD + CR", "larq", "kd_cr", precise_bn=False),
    "hard_per_channel": Row("ablation: hard, per-channel steps", "tfqkd",
                            quant=dict(per_channel=True)),
    "hard_std": Row("ablation: hard, std step", "tfqkd", quant=dict(step="std")),
    "hard_lsq": Row("ablation: hard, learned step (LSQ)", "tfqkd", quant=dict(step="learned")),
    "hard_fl_float": Row("ablation: hard, first/last float", "tfqkd",
                         quant=dict(first_last_bits="float")),
    "hard_no_precise_bn": Row("ablation: hard, no precise BN", "tfqkd", precise_bn=False),
}
GROUPS = {"all": ["float", "tfmot8", "hard", "kd", "kd_cr", "kerasio_kd", "larq_hard",
                  "larq_kd_cr"],
          "ablations": ["hard", "hard_per_channel", "hard_std", "hard_lsq", "hard_fl_float",
                        "hard_no_precise_bn"]}
GROUPS["everything"] = list(dict.fromkeys(GROUPS["all"] + GROUPS["ablations"]))
CSV_FIELDS = ["row", "seed", "label", "validation_accuracy", "test_accuracy", "num_validation",
              "num_test", "epochs", "steps", "train_time_s", "step_time_ms", "precise_bn"]


#: What --smoke sets (unless the flag is given): every row, a few steps each, in minutes.
SMOKE = dict(train_images=1000, test_images=1000, epochs=1, teacher_epochs=1, student_epochs=1,
             max_steps=5, precise_bn_batches=2, rows=["everything"])


def log(msg: str) -> None:
    print(f"[compare_peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def epoch_logger(what: str, epochs: int):
    """A callback printing one line per epoch (the fits run with verbose=0)."""
    from tfqkd._keras import keras

    start = time.time()

    def on_epoch_end(epoch, logs=None):
        loss = (logs or {}).get("loss", float("nan"))
        log(f"{what}: epoch {epoch + 1}/{epochs} loss {loss:.4f} ({time.time() - start:.0f} s)")

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def expand_rows(names: List[str]) -> List[str]:
    out: List[str] = []
    for n in names:
        for r in GROUPS.get(n, [n]):
            if r not in ROWS:
                raise app.UsageError(f"unknown row {r!r}; rows: {sorted(ROWS)}, groups: "
                                     f"{sorted(GROUPS)}")
            if r not in out:
                out.append(r)
    return out


# --------------------------------------------------------------------------------------------
# The Larq virtual environment
# --------------------------------------------------------------------------------------------
def make_larq_venv(path: str, python: Optional[str] = None) -> str:
    """Creates ``path`` with TensorFlow 2.15 + Larq (PyPI); returns its python. Idempotent."""
    exe = os.path.join(path, "bin", "python")
    if not os.path.exists(exe):
        python = python or (sys.executable if sys.version_info[:2] <= (3, 11) else "python3.11")
        subprocess.run([python, "-m", "venv", path], check=True)
    subprocess.run([exe, "-m", "pip", "install", "-q", *LARQ_REQUIREMENTS], check=True)
    subprocess.run([exe, "-c", "import larq, tensorflow; print('larq', larq.__version__, "
                    "'tensorflow', tensorflow.__version__)"], check=True)
    return exe


# --------------------------------------------------------------------------------------------
# Data and the float models
# --------------------------------------------------------------------------------------------
def prepare_data(out: str) -> str:
    """Writes ``OUT/data.npz``: the subset's train / validation part, the test set, indices."""
    import numpy as np

    from tfqkd import data as tdata
    from tfqkd._io import atomic_path
    from tfqkd.data.sources import validation_indices

    path = os.path.join(out, "data.npz")
    if os.path.isfile(path):
        return path
    x, y = tdata.load_arrays(FLAGS.dataset, "train", data_dir=FLAGS.data_dir)
    xt, yt = tdata.load_arrays(FLAGS.dataset, "test", data_dir=FLAGS.data_dir)
    classes = int(max(y.max(), yt.max())) + 1
    subset = tdata.balanced_subset(y, FLAGS.train_images, classes, FLAGS.seed)
    held = subset[validation_indices(y[subset], FLAGS.validation, classes)]
    train = np.setdiff1d(subset, held)
    test = tdata.balanced_subset(yt, FLAGS.test_images, classes, FLAGS.seed) \
        if FLAGS.test_images else np.arange(len(yt))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x_train=x[train], y_train=y[train], x_validation=x[held],
                     y_validation=y[held], x_test=xt[test], y_test=yt[test])
    with atomic_path(os.path.join(out, "data_indices.npz")) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, train=train, validation=held, test=test)
    return path


def datasets(data: str, seed: int) -> Dict[str, Any]:
    from tfqkd import data as tdata

    name = "npz:" + data
    kw = dict(batch_size=FLAGS.batch_size, seed=seed)
    return {"train": tdata.load_dataset(name, "train", drop_remainder=True, **kw),
            "validation": tdata.load_dataset(name, "validation", **kw),
            "test": tdata.load_dataset(name, "test", **kw),
            "info": tdata.dataset_info(name)}


def build(width: float, input_shape, num_classes: int, seed: int):
    import tfqkd

    if FLAGS.arch == "tiny":
        return tfqkd.models.tiny_resnet(num_classes, input_shape, width=width,
                                        weight_decay=FLAGS.weight_decay, seed=seed)
    return tfqkd.models.wide_resnet20(width, num_classes, input_shape,
                                      weight_decay=FLAGS.weight_decay, seed=seed)


def optimizer(steps: int, lr: float):
    from tfqkd._keras import keras
    from tfqkd.training import make_optimizer

    return make_optimizer("sgd", keras.optimizers.schedules.CosineDecay(lr, max(1, steps)))


def steps_per_epoch(ds) -> int:
    n = int(ds.cardinality())
    return min(n, FLAGS.max_steps) if FLAGS.max_steps else n


def float_model(out: str, who: str, width: float, epochs: int, data: str) -> str:
    """A float model trained on the training part (hard labels), or ``--student/--teacher``."""
    from tfqkd._keras import keras
    from tfqkd._io import atomic_path
    from tfqkd.training import evaluate_accuracy

    given = FLAGS.student if who == "student" else FLAGS.teacher
    if given:
        return given
    path = os.path.join(out, who, "model.h5")
    if os.path.isfile(path):
        return path
    log(f"training the float {who} ({epochs} epochs)")
    ds = datasets(data, FLAGS.seed)
    model = build(width, ds["info"].input_shape, ds["info"].num_classes, FLAGS.seed)
    steps = steps_per_epoch(ds["train"])
    model.compile(optimizer(steps * epochs, FLAGS.float_learning_rate),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras.utils.set_random_seed(FLAGS.seed)
    model.fit(ds["train"].repeat(), epochs=epochs, steps_per_epoch=steps, verbose=0,
              callbacks=[epoch_logger(f"float {who}", epochs)])
    acc = {s: evaluate_accuracy(model, ds[s]) for s in ("validation", "test")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        model.save(tmp + ".h5")
        os.replace(tmp + ".h5", tmp)
    from tfqkd._io import atomic_write
    atomic_write(os.path.join(out, who, "results.json"), json.dumps(acc, indent=1))
    log(f"float {who}: {acc}")
    return path


# --------------------------------------------------------------------------------------------
# tfqkd-environment rows
# --------------------------------------------------------------------------------------------
def student_for(row: Row, student_path: str):
    import tensorflow_model_optimization as tfmot

    import tfqkd
    from tfqkd.training import load_model

    model = load_model(student_path)
    if row.kind == "float":
        return model
    if row.kind == "tfmot8":
        return tfmot.quantization.keras.quantize_model(model)
    opts = dict(weight_bits=2, first_last_bits=8, per_channel=False, step="l2")
    opts.update(row.quant)
    return tfqkd.quantize_model(model, **opts)


def run_tfqkd_env_row(name: str, seed: int, out: str, data: str, student_path: str,
                      teacher_path: str) -> Dict[str, Any]:
    """Trains row ``name`` with ``seed`` in this process; returns its results."""
    import numpy as np

    from peers.kerasio import KerasIODistiller

    import tfqkd
    from tfqkd._keras import keras
    from tfqkd.batch_norm import recalibrate_batch_norm
    from tfqkd.callbacks import CoefficientScheduler
    from tfqkd.training import load_model, write_history

    row = ROWS[name]
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    ds = datasets(data, seed)
    steps = steps_per_epoch(ds["train"])
    total = steps * FLAGS.epochs
    student = student_for(row, student_path)
    callbacks = [epoch_logger(f"{name}_seed{seed}", FLAGS.epochs)]
    if row.loss == "hard":
        model = student
        model.compile(optimizer(total, FLAGS.learning_rate),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    else:
        teacher = load_model(teacher_path)
        teacher.trainable = False
        if row.kind == "kerasio":
            # The student's weight decay is added so that the objective equals the kd row's.
            model = KerasIODistiller(student, teacher, regularization=True)
            model.compile(optimizer(total, FLAGS.learning_rate), metrics=None,
                          student_loss_fn=keras.losses.SparseCategoricalCrossentropy(
                              from_logits=True),
                          distillation_loss_fn=keras.losses.KLDivergence(),
                          alpha=1 - FLAGS.coefficient, temperature=FLAGS.temperature)
        else:
            model = tfqkd.Distiller(student, teacher, temperature=FLAGS.temperature,
                                    coefficient=FLAGS.coefficient, temperature_squared=True)
            model.compile(optimizer(total, FLAGS.learning_rate))
            if row.loss == "kd_cr":
                callbacks.append(CoefficientScheduler("linear", start=FLAGS.coefficient, end=0.0))
    t0 = time.time()
    hist = model.fit(ds["train"].repeat(), epochs=FLAGS.epochs, steps_per_epoch=steps,
                     verbose=0, callbacks=callbacks)
    train_time = time.time() - t0
    if row.precise_bn and FLAGS.precise_bn_batches:
        recalibrate_batch_norm(student, ds["train"], batches=FLAGS.precise_bn_batches)
    row_dir = os.path.join(out, "rows", f"{name}_seed{seed}")
    os.makedirs(row_dir, exist_ok=True)
    write_history(os.path.join(row_dir, "history.csv"),
                  [{"epoch": e, **{k: v[e] for k, v in hist.history.items()}}
                   for e in range(FLAGS.epochs)])
    res: Dict[str, Any] = {}
    for split in ("validation", "test"):
        pred = np.concatenate([np.argmax(student(x, training=False).numpy(), -1)
                               for x, _ in ds[split]])
        labels = np.concatenate([y.numpy() for _, y in ds[split]])
        np.save(os.path.join(row_dir, f"{split}_predictions.npy"), pred)
        res[f"{split}_accuracy"] = float(np.mean(pred == labels))
        res[f"num_{split}"] = len(labels)
    res.update(steps=total, train_time_s=round(train_time, 1),
               step_time_ms=round(1000 * train_time / max(1, total), 1))
    return res


# --------------------------------------------------------------------------------------------
# Larq rows (subprocess in the Larq venv)
# --------------------------------------------------------------------------------------------
def larq_inputs(out: str, data: str, student_path: str, teacher_path: str) -> str:
    """Writes ``OUT/larq/``: data + check logits, float weights by layer, config.json."""
    import numpy as np

    from tfqkd import data as tdata
    from tfqkd._io import atomic_path, atomic_write
    from tfqkd.data.builtin import AUGMENTATION
    from tfqkd.training import load_model

    d = os.path.join(out, "larq")
    config = os.path.join(d, "config.json")
    if os.path.isfile(config):
        return config
    os.makedirs(d, exist_ok=True)
    arrays = dict(np.load(data))
    info = tdata.dataset_info("npz:" + data)
    check_ds = tdata.load_dataset("npz:" + data, "test", batch_size=256)
    x_check, _ = next(iter(check_ds))
    weights, filters = {}, {}
    for who, path in (("student", student_path), ("teacher", teacher_path)):
        m = load_model(path)
        arrays[f"check_{who}"] = m(x_check, training=False).numpy()
        for layer in m.layers:
            for i, w in enumerate(layer.get_weights()):
                weights[f"{who}/{layer.name}/{i}"] = w
        filters[who] = [int(m.get_layer(f"stage{s}_block1_conv1").filters)
                        for s in range(1, 10) if f"stage{s}_block1_conv1" in
                        {layer.name for layer in m.layers}]
        blocks = sum(1 for layer in m.layers if layer.name.startswith("stage1_block")
                     and layer.name.endswith("_conv1"))
    arrays["check_x"] = arrays["x_test"][:int(x_check.shape[0])]
    arrays["mean"] = np.asarray(info.mean, np.float32)
    arrays["std"] = np.asarray(info.std, np.float32)
    for name, content in (("data.npz", arrays), ("weights.npz", weights)):
        with atomic_path(os.path.join(d, name)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **content)
    # tfqkd.data's augmentation of this data set (CIFAR: 4 pixels of 32, mirrored).
    pad, flip = AUGMENTATION.get(FLAGS.dataset, (4 / 32, True))
    cfg = dict(data=os.path.join(d, "data.npz"), weights=os.path.join(d, "weights.npz"),
               input_shape=list(info.input_shape), num_classes=info.num_classes,
               student_filters=filters["student"], teacher_filters=filters["teacher"],
               blocks_per_stage=blocks, weight_decay=FLAGS.weight_decay,
               batch_size=FLAGS.batch_size, epochs=FLAGS.epochs,
               learning_rate=FLAGS.learning_rate, max_steps=FLAGS.max_steps,
               temperature=FLAGS.temperature, coefficient=FLAGS.coefficient,
               augment_padding=pad, augment_flip=flip)
    atomic_write(config, json.dumps(cfg, indent=1))
    return config


def run_larq_row(name: str, seed: int, out: str, config: str) -> Dict[str, Any]:
    row_dir = os.path.join(out, "rows", f"{name}_seed{seed}")
    cmd = [FLAGS.larq_python, LARQ_SCRIPT, f"--config={config}", f"--row={name}",
           f"--seed={seed}", f"--output={row_dir}"]
    env = dict(os.environ, PYTHONPATH="", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)  # tfqkd's setting; Larq's TF 2.15 has Keras 2 built in
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    with open(config) as f:
        cfg_data = json.load(f)["data"]
    import numpy as np

    arrays = np.load(cfg_data)
    res.update(num_validation=len(arrays["y_validation"]), num_test=len(arrays["y_test"]))
    return res


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def read_results(path: str) -> List[Dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_results(path: str, rows: List[Dict[str, Any]]) -> None:
    from tfqkd._io import atomic_write

    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def summarize(results: List[Dict[str, str]], names: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in names:
        mine = [r for r in results if r["row"] == name]
        if not mine:
            continue
        entry: Dict[str, Any] = {"label": ROWS[name].label, "seeds": [int(r["seed"]) for r in mine]}
        for split in ("validation", "test"):
            accs = [float(r[f"{split}_accuracy"]) for r in mine]
            entry[f"{split}_accuracy"] = statistics.mean(accs)
            entry[f"{split}_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
            entry[f"{split}_per_seed"] = {r["seed"]: float(r[f"{split}_accuracy"]) for r in mine}
        entry["step_time_ms"] = statistics.mean(float(r["step_time_ms"]) for r in mine)
        out[name] = entry
    return out


def markdown(summary: Dict[str, Any]) -> str:
    lines = ["| row | model | validation top-1 | test top-1 | seeds | step (ms) |",
             "|---|---|---|---|---|---|"]
    for name, e in summary.items():
        lines.append(f"| `{name}` | {e['label']} | {100 * e['validation_accuracy']:.2f} "
                     f"± {100 * e['validation_std']:.2f} | {100 * e['test_accuracy']:.2f} "
                     f"± {100 * e['test_std']:.2f} | {len(e['seeds'])} | "
                     f"{e['step_time_ms']:.0f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.make_larq_venv:
        exe = make_larq_venv(FLAGS.make_larq_venv, FLAGS.venv_python)
        print(json.dumps({"larq_python": exe}))
        return
    if FLAGS.smoke:  # flags given on the command line win
        for name, value in SMOKE.items():
            if FLAGS[name].using_default_value:
                setattr(FLAGS, name, value)
    if FLAGS.seeds < 1:
        raise app.UsageError(f"--seeds must be >= 1, got {FLAGS.seeds}")
    names = expand_rows(FLAGS.rows)
    if FLAGS.data_dir is None and FLAGS.dataset == "cifar10":
        FLAGS.data_dir = os.environ.get("TFQKD_DATA_DIR") or os.path.join(
            os.path.dirname(REPO), "shared", "data")
    from tfqkd._keras import keras  # noqa: F401  (TensorFlow loads after flag checks)
    out = os.path.abspath(FLAGS.output_dir)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    data = prepare_data(out)
    student = float_model(out, "student", 1.0, FLAGS.student_epochs, data)
    # The teacher is trained only when a row distils (or the Larq rows need its weights).
    teacher = None
    csv_path = os.path.join(out, "results.csv")
    results = read_results(csv_path)
    done = {(r["row"], int(r["seed"])) for r in results}
    ran, skipped, missing = [], [], []
    seeds = [FLAGS.seed + i for i in range(FLAGS.seeds)]
    larq_config = None
    for seed in seeds:  # seed-major: an interrupted run leaves every row with as many seeds
        for name in names:
            key = f"{name}_seed{seed}"
            if (name, seed) in done:
                skipped.append(key)
                continue
            row = ROWS[name]
            if row.kind == "larq" and not FLAGS.larq_python:
                missing.append(key)
                continue
            log(f"{key}: {row.label}")
            if teacher is None and (row.loss != "hard" or row.kind == "larq"):
                teacher = float_model(out, "teacher", FLAGS.teacher_width, FLAGS.teacher_epochs,
                                      data)
            if row.kind == "larq":
                larq_config = larq_config or larq_inputs(out, data, student, teacher)
                res = run_larq_row(name, seed, out, larq_config)
            else:
                res = run_tfqkd_env_row(name, seed, out, data, student, teacher)
            res.update(row=name, seed=seed, label=row.label, epochs=FLAGS.epochs,
                       precise_bn=int(row.precise_bn and ROWS[name].kind == "tfqkd"
                                      and FLAGS.precise_bn_batches > 0))
            results.append(res)
            write_results(csv_path, results)
            ran.append(key)
            log(f"{key}: validation {res['validation_accuracy']:.4f} test "
                f"{res['test_accuracy']:.4f} ({res['train_time_s']} s)")
    results = read_results(csv_path)
    summary = summarize(results, names)
    table = markdown(summary)
    from tfqkd._io import atomic_write

    atomic_write(os.path.join(out, "table.md"), table + "\n")
    print(table)
    if missing:
        print(f"not run (no --larq_python): {', '.join(missing)}")
    print(json.dumps({"rows": summary, "ran": ran, "skipped": skipped, "not_run": missing,
                      "results_csv": csv_path, "output_dir": out,
                      "budget": {"train_images": FLAGS.train_images,
                                 "validation": FLAGS.validation, "epochs": FLAGS.epochs,
                                 "batch_size": FLAGS.batch_size,
                                 "learning_rate": FLAGS.learning_rate,
                                 "max_steps": FLAGS.max_steps, "seeds": seeds,
                                 "arch": FLAGS.arch, "teacher_width": FLAGS.teacher_width},
                      "wall_time_s": round(time.time() - t0, 1)}, sort_keys=True), flush=True)


if __name__ == "__main__":
    app.run(main)
