"""KD from a clearly stronger teacher beats hard labels: a paired, seed-robust check on digits.

Every other test checks that distillation runs as specified; this one checks that it helps.
"""

import numpy as np
import pytest

from tfqkd import Distiller, models
from tfqkd._keras import keras

#: Students see 100 labelled digits; the teacher saw 1,000; all are evaluated on the other 797.
N_STUDENT, N_TEACHER, EPOCHS = 100, 1000, 60


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images[..., None] / 16.0).astype("float32"), d.target.astype("int32")


@pytest.fixture(scope="module")
def teacher_and_data():
    x, y = _digits()
    keras.utils.set_random_seed(0)
    teacher = models.tiny_resnet(10, width=2, seed=0)
    teacher.compile(keras.optimizers.Adam(3e-3),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(x[:N_TEACHER], y[:N_TEACHER], batch_size=50, epochs=10, verbose=0)
    return teacher, x, y


def _student_accuracy(teacher, x, y, seed, coefficient):
    """A float tiny ResNet trained on the first 100 digits; λ = 0 is hard labels alone.

    The same seed gives both arms the same initial weights and the same batch order.
    """
    keras.utils.set_random_seed(seed)
    student = models.tiny_resnet(10, seed=seed)
    d = Distiller(student, teacher, temperature=4.0, temperature_squared=True,
                  coefficient=coefficient)
    d.compile(keras.optimizers.Adam(3e-3))
    d.fit(x[:N_STUDENT], y[:N_STUDENT], batch_size=50, epochs=EPOCHS, verbose=0)
    x_test, y_test = x[N_TEACHER:], y[N_TEACHER:]
    return float(np.mean(student.predict(x_test, verbose=0).argmax(-1) == y_test))


def test_kd_from_a_stronger_teacher_beats_hard_labels_paired_over_seeds(teacher_and_data):
    """KD (τ = 4, τ², λ = 0.9) against hard labels, same student init and data order per seed.

    Measured out of the suite (2026-12-04, seeds 0-9, teacher 97.0 % on the 797 test digits):
    hard labels 69.1-77.8 %, KD 78.9-85.8 %, paired KD − hard +3.5 to +10.3 points (median
    +6.1), positive for all ten seeds. The test runs seeds 0-2 (+8.0, +4.4, +5.7) and asks for
    more than +1 point on each and +3 points on average: a distiller whose soft term did not
    help (wrong targets, temperature or weighting) fails it. About 16 s.
    """
    teacher, x, y = teacher_and_data
    teacher_acc = float(np.mean(teacher.predict(x[N_TEACHER:], verbose=0).argmax(-1)
                                == y[N_TEACHER:]))
    diffs = []
    for seed in (0, 1, 2):
        hard = _student_accuracy(teacher, x, y, seed, coefficient=0.0)
        kd = _student_accuracy(teacher, x, y, seed, coefficient=0.9)
        diffs.append(kd - hard)
    assert teacher_acc > 0.93, teacher_acc  # clearly stronger than any student here (< 0.86)
    assert min(diffs) > 0.01 and np.mean(diffs) > 0.03, diffs
