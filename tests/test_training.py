"""tfqkd.training: accuracy, model loading, history CSV, optimizers, global batch size.

The references are hand-computed (counts of right predictions, the CSV text, the files in a
folder), never the code under test.
"""

import os

import numpy as np
import pytest

from tfqkd import training
from tfqkd._keras import keras, tf

from conftest import run_two_cpu_script

# Seven examples whose logits are the inputs: argmax per row is 1, 0, 2, 2, 0, 1, 1.
_LOGITS = np.array([[0, 5, 1], [3, 1, 0], [0, 0, 2], [1, 0, 4], [9, 2, 3], [0, 1, 0], [2, 3, 1]],
                   "float32")
#                    right: yes no  yes no  yes yes no  -> 4 of 7
_LABELS = np.array([1, 1, 2, 0, 0, 1, 0], "int32")


def _identity():
    return keras.Sequential([keras.layers.Lambda(lambda x: x, input_shape=(3,))])


@pytest.mark.parametrize("batch", [1, 3, 7, 100])  # 3: a short last batch (3 + 3 + 1)
def test_accuracy_counts_right_predictions(batch):
    ds = tf.data.Dataset.from_tensor_slices((_LOGITS, _LABELS)).batch(batch)
    assert training.evaluate_accuracy(_identity(), ds) == 4 / 7


def test_accuracy_one_hot_labels_probabilities_weights_and_steps():
    one_hot = np.eye(3, dtype="float32")[_LABELS]
    model = _identity()
    assert training.evaluate_accuracy(
        model, tf.data.Dataset.from_tensor_slices((_LOGITS, one_hot)).batch(3)) == 4 / 7
    softmax = keras.Sequential([keras.layers.Softmax(input_shape=(3,))])
    assert training.evaluate_accuracy(
        softmax, tf.data.Dataset.from_tensor_slices((_LOGITS, _LABELS)).batch(3)) == 4 / 7
    # Sample weights do not weigh the count: every example counts once.
    weights = np.array([0, 0, 0, 1, 1, 1, 1], "float32")
    ds = tf.data.Dataset.from_tensor_slices((_LOGITS, _LABELS, weights)).batch(3)
    assert training.evaluate_accuracy(model, ds) == 4 / 7
    # First two batches of three: right, no, right | no, right, right -> 4 of 6.
    assert training.evaluate_accuracy(model, ds, steps=2) == 4 / 6


def test_accuracy_runs_in_inference_mode():
    # Dropout(0.999) zeroes nearly every input in training; inference passes them through.
    model = keras.Sequential([keras.layers.Dropout(0.999, input_shape=(3,))])
    ds = tf.data.Dataset.from_tensor_slices((_LOGITS, _LABELS)).batch(7)
    assert training.evaluate_accuracy(model, ds) == 4 / 7


def test_accuracy_of_an_empty_set_raises():
    ds = tf.data.Dataset.from_tensor_slices((_LOGITS, _LABELS)).take(0).batch(2)
    with pytest.raises(ValueError, match="empty"):
        training.evaluate_accuracy(_identity(), ds)


def _dense(units):
    return keras.Sequential([keras.layers.Dense(units, input_shape=(3,))])


def test_load_model_lookup_order(tmp_path):
    # A run directory: model/model.h5 is found; a model.h5 beside model/ is looked at first.
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    _dense(4).save(run / "model" / "model.h5")
    assert training.load_model(str(run)).output_shape == (None, 4)
    assert training.load_model(str(run / "model")).output_shape == (None, 4)
    _dense(5).save(run / "model.h5")
    assert training.load_model(str(run)).output_shape == (None, 5)
    # A .keras file, directly or as model.keras in a folder.
    keras_dir = tmp_path / "k"
    keras_dir.mkdir()
    _dense(6).save(keras_dir / "model.keras")
    assert training.load_model(str(keras_dir / "model.keras")).output_shape == (None, 6)
    assert training.load_model(str(keras_dir)).output_shape == (None, 6)
    # A SavedModel folder is the folder itself.
    _dense(7).save(tmp_path / "saved", save_format="tf")
    assert os.path.isfile(tmp_path / "saved" / "saved_model.pb")
    assert training.load_model(str(tmp_path / "saved")).output_shape == (None, 7)


def test_load_model_errors_name_what_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--teacher .*missing.h5.* does not exist"):
        training.load_model(str(tmp_path / "missing.h5"), what="--teacher")
    with pytest.raises(FileNotFoundError, match="holds no saved model"):
        training.load_model(str(tmp_path))
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="--model .*empty.h5.* is empty"):
        training.load_model(str(tmp_path / "empty.h5"), what="--model")
    (tmp_path / "junk.h5").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="junk.h5"):
        training.load_model(str(tmp_path / "junk.h5"))


def test_load_model_reads_a_quantized_model(tmp_path):
    from tfqkd.quantize import quantize_model

    q = quantize_model(keras.Sequential([keras.layers.Dense(4, input_shape=(3,)),
                                         keras.layers.Dense(2)]), weight_bits=2)
    q.save(tmp_path / "q.h5")
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    loaded = training.load_model(str(tmp_path / "q.h5"))
    np.testing.assert_allclose(loaded(x, training=False), q(x, training=False), atol=1e-6)


def test_history_csv_round_trip(tmp_path):
    path = str(tmp_path / "history.csv")
    assert training.read_history(path) == []
    training.write_history(path, [{"epoch": 0, "loss": 2.5}, {"epoch": 1, "lr": 0.1, "loss": 1}])
    with open(path, newline="") as f:
        assert f.read() == "epoch,loss,lr\r\n0,2.5,\r\n1,1,0.1\r\n"
    assert training.read_history(path) == [{"epoch": "0", "loss": "2.5", "lr": ""},
                                           {"epoch": "1", "loss": "1", "lr": "0.1"}]
    training.write_history(path, [{"epoch": 0}])  # rewritten whole, not appended
    assert training.read_history(path) == [{"epoch": "0"}]
    assert os.listdir(tmp_path) == ["history.csv"]  # no temporary file left behind


def test_make_optimizer():
    adam = training.make_optimizer("Adam", 0.5)
    assert isinstance(adam, keras.optimizers.Adam)
    assert float(adam.learning_rate) == 0.5
    sgd = training.make_optimizer("sgd", 0.25)
    assert isinstance(sgd, keras.optimizers.SGD)
    assert (float(sgd.learning_rate), sgd.momentum, sgd.nesterov) == (0.25, 0.9, True)
    schedule = keras.optimizers.schedules.CosineDecay(1.0, 10)
    plain = training.make_optimizer("sgd", schedule, momentum=0.8, nesterov=False)
    assert (plain.momentum, plain.nesterov) == (0.8, False)
    assert plain._learning_rate is schedule
    assert training.make_optimizer(lambda s, e: (s, e), 1.0, 7, 3) == (7, 3)
    with pytest.raises(ValueError, match="'adam' or 'sgd'.*'rmsprop'"):
        training.make_optimizer("rmsprop", 0.1)


def test_global_batch_size_without_strategy():
    assert int(training.global_batch_size(tf.zeros([5, 2]))) == 5


def test_global_batch_size_sums_uneven_replicas(tmp_path):
    # 7 examples over 2 replicas split 4 + 3: each replica must see 7 (not 2 x its own batch).
    out = run_two_cpu_script(tmp_path, '''
    from tfqkd.training import global_batch_size
    ds = mirrored.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(np.zeros((7, 1), "float32")).batch(7))

    @tf.function
    def step(batch):
        return mirrored.run(lambda b: (tf.shape(b)[0], global_batch_size(b)), args=(batch,))

    local, total = step(next(iter(ds)))
    print(json.dumps({"local": sorted(int(v) for v in mirrored.experimental_local_results(local)),
                      "total": [int(v) for v in mirrored.experimental_local_results(total)]}))
    ''')
    assert out == {"local": [3, 4], "total": [7, 7]}
