"""Shared test set-up: CPU only, quiet TensorFlow, offline data location, small fixtures."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
#: The offline CIFAR-10 archive beside the checkout (see ../shared/data/README.md).
CIFAR10_ARCHIVE = pathlib.Path(
    os.environ.get("TFQKD_CIFAR10_ARCHIVE", REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz")
)

requires_cifar10 = pytest.mark.skipif(
    not CIFAR10_ARCHIVE.exists(),
    reason=f"offline CIFAR-10 archive not found at {CIFAR10_ARCHIVE} (see ../shared/data/README.md)",
)


def pytest_configure(config):
    # Markers of steps CI can run on their own (``-m applications`` / ``-m "not applications"``).
    config.addinivalue_line(
        "markers", "applications: Keras Applications families through quantize -> distil -> "
        "export (the slowest tests; tests/test_applications.py)")


@pytest.fixture(scope="session")
def cifar10_archive():
    if not CIFAR10_ARCHIVE.exists():
        pytest.skip(f"offline CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    return CIFAR10_ARCHIVE


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
