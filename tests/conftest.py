"""Shared test set-up: CPU only, quiet TensorFlow, offline data location, small fixtures."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cifar10_archive() -> pathlib.Path:
    """The offline CIFAR-10 archive: ``$TFQKD_DATA_DIR`` (a folder holding it, or the archive
    itself) as the library reads it, else ``../shared/data`` beside the checkout (see
    ../shared/data/README.md). ``TFQKD_CIFAR10_ARCHIVE`` (the archive's path) is an older alias."""
    given = os.environ.get("TFQKD_DATA_DIR") or os.environ.get("TFQKD_CIFAR10_ARCHIVE")
    path = pathlib.Path(given) if given else REPO.parent / "shared" / "data"
    return path if path.name.endswith(".tar.gz") else path / "cifar10-jpg.tar.gz"


CIFAR10_ARCHIVE = _cifar10_archive()
#: Without the archive, CIFAR cases skip on a developer's machine; CI (``CI=1``, or
#: ``TFQKD_REQUIRE_DATA=1`` as .ci/run sets) must not skip them, so there they fail.
REQUIRE_DATA = any(os.environ.get(v, "").lower() not in ("", "0", "false")
                   for v in ("CI", "TFQKD_REQUIRE_DATA"))
_MISSING = "offline CIFAR-10 archive not found at"


def pytest_configure(config):
    # Markers of steps CI can run on their own (``-m applications`` / ``-m "not applications"``).
    config.addinivalue_line(
        "markers", "applications: Keras Applications families through quantize -> distil -> "
        "export (the slowest tests; tests/test_applications.py)")


@pytest.fixture(scope="session")
def cifar10_archive():
    if not CIFAR10_ARCHIVE.exists():
        msg = (f"{_MISSING} {CIFAR10_ARCHIVE} (set TFQKD_DATA_DIR to its folder; see "
               f"../shared/data/README.md)")
        if REQUIRE_DATA:
            pytest.fail(f"{msg}; CI=1 / TFQKD_REQUIRE_DATA=1 require it", pytrace=False)
        pytest.skip(msg)
    return CIFAR10_ARCHIVE


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Says how many cases skipped for want of the CIFAR-10 archive (never silent)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if _MISSING in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.write_sep(
            "=", f"{len(skipped)} CIFAR-10 case(s) SKIPPED: {_MISSING} {CIFAR10_ARCHIVE} "
                 f"(CI=1 or TFQKD_REQUIRE_DATA=1 makes them fail)", yellow=True)


def packed_ternary_bits(kernels, per_channel: bool = False) -> float:
    """Bits per ternary weight that tfqkd's packed archive takes, from its format alone.

    Each ternary tensor is base-3 digits, 5 per byte (3^5 = 243 <= 256: 1.6 bits, against the
    log2(3) = 1.585 floor) plus its float32 steps: one per tensor (tfqkd's default) or one per
    output channel. Plain 2-bit packing would take >= 2 bits, so an equality with this fails it.
    """
    import numpy as np

    kernels = [np.asarray(k) for k in kernels]
    bits = sum(8 * -(-k.size // 5) + 32 * (k.shape[-1] if per_channel else 1) for k in kernels)
    return bits / sum(k.size for k in kernels)


def run_test_set(run_dir, split: str = "test"):
    """The images and labels a recipe run evaluated on (from its run_config.json), as numpy:
    its test images, or with ``split="train"`` the images it trained on, unaugmented."""
    import json

    import numpy as np

    from recipes import common
    from tfqkd import data

    cfg = common.Config(**json.loads((pathlib.Path(run_dir) / "run_config.json").read_text()))
    subset = cfg.test_subset if split == "test" else cfg.subset
    images = data.load_dataset(cfg.dataset, split, subset=subset, batch_size=256, seed=cfg.seed,
                               subset_seed=getattr(cfg, "subset_seed", None), augment=False,
                               shuffle=False, **common.data_source_kwargs(cfg))
    batches = list(images.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def saved_model_accuracy(run_dir, model: str = "model", split: str = "test") -> float:
    """Top-1 accuracy of a recipe run's saved ``run_dir/<model>/`` on the run's test images (or
    with ``split="train"`` its unaugmented training images).

    Computed here in numpy from the model's predictions, to check the accuracy a run reports
    against the model it saved (the run's own figure comes from ``common.evaluate_accuracy``).
    """
    import numpy as np

    from recipes import common

    x, y = run_test_set(run_dir, split)
    net = common.load_model(str(pathlib.Path(run_dir) / model))
    pred = np.concatenate([np.argmax(net(x[i:i + 256], training=False).numpy(), -1)
                           for i in range(0, len(x), 256)])
    return float(np.mean(pred == y))


#: Prelude of a script that compares one device with MirroredStrategy over two logical CPUs.
#: It must run in a fresh process: logical devices are fixed before anything initialises them.
#: Defines ``keras``, ``tf``, ``np``, ``json``, a batch-norm-free ``net(seed, width)`` (replicas
#: normalise with their own half-batch, which legitimately differs from one device) and 23
#: examples ``x``, ``y`` (batches of 16 + 7: the short batch splits 4 + 3 over the replicas, so
#: only an exact global batch size reproduces the single device).
TWO_CPU_PRELUDE = '''
import json, os
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
from tfqkd._keras import keras, tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
import numpy as np

def net(seed, width):
    init = lambda k: keras.initializers.GlorotUniform(seed=seed * 10 + k)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(width, 3, activation="relu", kernel_initializer=init(1),
                            kernel_regularizer=keras.regularizers.l2(1e-3))(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(10, kernel_initializer=init(2),
                             kernel_regularizer=keras.regularizers.l2(1e-3))(h)
    return keras.Model(inp, out)

rng = np.random.default_rng(0)
x = rng.normal(size=(23, 8, 8, 1)).astype("float32")
y = rng.integers(0, 10, size=23).astype("int32")
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert mirrored.num_replicas_in_sync == 2
'''


def subprocess_env(**extra) -> dict:
    """Environment of a recipe or tool run as a subprocess: CPU only, quiet, no inherited cluster."""
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def last_json_line(stdout: str):
    """The last line of a tool's or recipe's output, parsed as JSON (where they put their figures)."""
    import json

    return json.loads(stdout.strip().splitlines()[-1])


def run_script(script, *args, timeout: float = 300, env=None, cwd=None, ok: bool = True):
    """Runs ``python script args...`` as a user would; with ``ok``, asserts it exited with 0.

    Returns the ``subprocess.CompletedProcess`` (text ``stdout``/``stderr``).
    """
    import subprocess
    import sys

    cmd = [sys.executable, str(script), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=env or subprocess_env(), cwd=cwd)
    if ok:
        assert p.returncode == 0, \
            f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def run_two_cpu_script(tmp_path, body: str) -> dict:
    """Runs ``TWO_CPU_PRELUDE + body`` in a fresh Python; returns its last stdout line as JSON."""
    import textwrap

    script = tmp_path / "two_cpus.py"
    script.write_text(TWO_CPU_PRELUDE + textwrap.dedent(body))
    env = subprocess_env(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return last_json_line(run_script(script, timeout=300, env=env).stdout)


def tflite_outputs(interpreter, x):
    """A LiteRT interpreter's first output for the batch ``x``, its input resized to ``x.shape``
    (``x`` as the file's input takes it: float, or already quantized for an int8 input)."""
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def file_tensor_steps(path, student, x, tensor_filter, builtin_kernels=False):
    """|file tensor - student tensor| in steps of the file tensor's scale, over images ``x``.

    The file tensor is the int8 output of the first op for which ``tensor_filter(op, tensor
    name)`` holds; ``student`` is a Keras model whose output is the matching tensor. The file
    runs on LiteRT's default kernels (XNNPACK), or with ``builtin_kernels`` on its built-in ones.
    """
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin_kernels
                else OpResolverType.AUTO)
    it = Interpreter(model_path=path, experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    details = {d["index"]: d for d in it.get_tensor_details()}
    ops = it._get_ops_details()  # noqa: SLF001 (the op graph)
    op = next(o for o in ops if tensor_filter(o, details[o["outputs"][0]]["name"]))
    out = details[op["outputs"][0]]
    scale, zero = out["quantization"]
    assert out["dtype"] == np.int8 and scale > 0
    inp = it.get_input_details()[0]
    steps = []
    for image in x:
        it.set_tensor(inp["index"], image[None])
        it.invoke()
        got = (it.get_tensor(out["index"]).astype(np.float32) - zero) * scale
        steps.append(np.abs(got - student(image[None], training=False).numpy()).ravel() / scale)
    return np.concatenate(steps)


def centred_rms_ratio(out, ref) -> float:
    """RMS of ``out - ref`` over RMS of ``ref``, both centred per example over the last axis
    (ParityReport.relative_output_error's definition, computed here independently)."""
    import numpy as np

    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    diff = out - ref
    diff = diff - diff.mean(-1, keepdims=True)
    centred = ref - ref.mean(-1, keepdims=True)
    return float(np.sqrt((diff ** 2).sum() / (centred ** 2).sum()))
