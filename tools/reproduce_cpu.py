"""Reproduction benchmark on 2 CPU cores: does KD + coefficient reducing (CR) help a 2-bit ResNet20?

On the offline CIFAR-10 archive, with a fixed class-balanced training subset (default 20,000
images) and the full 10,000 test images, it trains in order, each stage a normal recipe run in
``--output_dir/<stage>/`` (resumable; finished stages are skipped when re-run):

1. ``teacher``  float WideResNet20x``--teacher_width`` (hard labels);
2. ``student``  float ResNet20 (hard labels);
3. one 2-bit-weight ResNet20 per entry of ``--methods``, each retrained from the float student:
   ``hard`` (a) hard labels, ``kd`` (b) KD with constant λ = 0.5, ``kd_cr`` (c) KD + CR
   (λ linear 0.5 → 0), plus any other row of ``tools/reproduce/rows.py`` (QKD, SPEQ).
   Each ends, like the recipes, by re-estimating its batch-norm statistics
   (``--precise_bn_batches=100``; 0 repeats the runs made before 2026-12-01).

Every 2-bit method runs ``--seeds`` times (default 3: seeds ``--seed``, ``--seed``+1, ...; the
first in ``<method>/``, the others in ``<method>_seed<N>/``), all from the same teacher and
student; its accuracy is the mean of those runs, because one run's differences between methods
are within seed noise (one run's (c) − (b) has ranged over −1.52..+2.54 points in our runs).

It prints a table and, as its LAST line, one JSON object with every figure (mean, std and
per-seed accuracies, deltas (c) − (a) and (c) − (b) of the means and the per-seed paired
(c) − (b), per-stage wall times, the budget). Target: (c) ≥ (a) + 1.0 point and (c) ≥ (b)
within 60 minutes on 2 cores.

The rows live in ``tools/reproduce/rows.py`` (``METHODS``, ``Context``); adding a method is a
one-entry edit of ``METHODS`` there (its docstring says how).

Honest tuning: hyper-parameters must not be chosen on the test set. ``--holdout=N`` replaces the
test set by N class-balanced images held out of the training split (and trains on a subset of the
rest), for tuning; the reported run uses the test set with the chosen values. Use a large N
(30,000 leaves exactly the 20,000 training images): on 5,000 images one seed's (c) − (b) has a
standard error of about 0.33 points from the evaluation alone. ``--unseen_eval=N`` evaluates
every trained model again on N training images outside ``--subset`` (never trained on).

Examples::

    python tools/reproduce_cpu.py             # the full budget: 57 min on a 2-core AMD EPYC
    python tools/reproduce_cpu.py --seeds=1   # one run per method: for hosts 2x slower
    python tools/reproduce_cpu.py --subset=500 --epochs=1 --test_subset=500 --seeds=1 \\
        --output_dir=/tmp/repro                                    # end-to-end check, minutes
    python tools/reproduce_cpu.py --holdout=30000 --output_dir=runs/tune  # tuning run
    python tools/reproduce_cpu.py --output_dir=runs/reproduce_cpu --unseen_eval=30000
        # after a run: the same models on the 30,000 training images outside the subset
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Dict

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python tools/reproduce_cpu.py` puts tools/ first on sys.path: `reproduce` is tools/reproduce/.
from reproduce.rows import BENCHMARK_KD, METHODS, Context  # noqa: E402
from recipes import common, quantize_distill, train_student, train_teacher  # noqa: E402
from tfqkd._io import atomic_path  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "CIFAR-10 source (default: $TFQKD_DATA_DIR, else "
                    "../shared/data beside the repository).")
flags.DEFINE_string("output_dir", "runs/reproduce_cpu", "Where every stage writes.")
flags.DEFINE_integer("subset", 20_000, "Class-balanced training images (0: all 50,000; 20,000 "
                     "over 10,000 at the same compute: chosen on --holdout, see docs/recipes.md).")
flags.DEFINE_integer("test_subset", 0, "Class-balanced test images (0: all 10,000).")
flags.DEFINE_integer("holdout", 0, "Tuning mode: evaluate on this many class-balanced images "
                     "held out of the training split instead of the test set (0: off).")
flags.DEFINE_integer("unseen_eval", 0, "Also evaluate every trained model on this many "
                     "class-balanced training images outside --subset, which no stage trained on "
                     "(0: off; at most the training split minus --subset: 30,000 by default): a "
                     "second estimate of every figure, same models, from the training "
                     "distribution. On a finished --output_dir it only evaluates.")
flags.DEFINE_float("teacher_width", 1.5, "Teacher WideResNet20 width.")
flags.DEFINE_integer("teacher_epochs", 25, "Teacher epochs (25 x 20,000 images; the split "
                     "25 / 13 / 7 of the hour was chosen on --holdout, see docs/recipes.md).")
flags.DEFINE_integer("student_epochs", 13, "Float student epochs (13 x 20,000 images: a float "
                     "student closer to convergence, as the paper's Algorithm 1 assumes).")
flags.DEFINE_integer("quant_epochs", 7, "Epochs of every 2-bit retraining (7: what fits the hour "
                     "with three seeds beside the 25 / 13-epoch teacher and student).")
flags.DEFINE_integer("epochs", None, "If set, overrides all three epoch budgets.")
flags.DEFINE_integer("batch_size", 128, "Batch size of every stage.")
flags.DEFINE_float("learning_rate", 0.1, "Peak learning rate of the float stages.")
flags.DEFINE_enum("quant_lr_schedule", "cosine", ["cosine", "step", "constant"],
                  "Learning-rate schedule of the 2-bit retraining (the float stages: cosine).")
flags.DEFINE_float("quant_learning_rate", 0.01, "Peak learning rate of the 2-bit retraining "
                   "(starts from a converged float model: 10x lower).")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay of every stage (5e-4: the usual value "
                   "for short CIFAR schedules).")
flags.DEFINE_float("temperature", BENCHMARK_KD["temperature"],
                   "KD temperature τ (4 over 2 and 8: best KD + CR on --holdout, see "
                   "docs/recipes.md).")
flags.DEFINE_float("coefficient", 0.5, "KD λ (constant for kd, start of CR for kd_cr).")
flags.DEFINE_bool("temperature_squared", BENCHMARK_KD["temperature_squared"],
                  "KD rows: multiply the soft loss by τ² (Hinton's scaling; the paper's Eq. 3 "
                  "has none). On: chosen on --holdout, see docs/recipes.md.")
flags.DEFINE_integer("weight_bits", 2, "Weight bits of the quantized students.")
flags.DEFINE_integer(
    "precise_bn_batches",
    next(o.default for o in quantize_distill.OPTIONS if o.name == "precise_bn_batches"),
    "Batch-norm re-estimation at the end of every 2-bit stage, over this many training batches "
    "(the recipes' default; 0: off, as in the runs before 2026-12-01).")
flags.DEFINE_list("methods", ["hard", "kd", "kd_cr"], "Methods to run, keys of METHODS.")
flags.DEFINE_integer("seed", 0, "Seed of every stage.")
flags.DEFINE_integer("seeds", 3, "Runs of every 2-bit method, with seeds --seed, --seed+1, ... "
                     "from the same teacher and student; the table reports their mean (one "
                     "run's differences between methods are within seed noise).")
flags.DEFINE_enum("progress", "line", ["auto", "bar", "line", "none"], "Per-epoch display.")


def _wall_time(results: Dict[str, Any]) -> float:
    """A stage's training time over all its attempts (resumed runs), else this attempt's."""
    return results.get("total_wall_time_s", results.get("wall_time_s"))


def default_data_dir() -> str:
    return os.environ.get("TFQKD_DATA_DIR") or os.path.join(os.path.dirname(REPO), "shared",
                                                            "data")


def make_holdout_source(data_dir: str, holdout: int, seed: int, path: str) -> str:
    """Writes an npz whose test split is ``holdout`` balanced training images (for tuning)."""
    import numpy as np

    from tfqkd import data as tdata

    if os.path.isfile(path):
        return path
    x, y = tdata.load_arrays("cifar10", "train", data_dir=data_dir)
    try:
        held = tdata.balanced_subset(y, holdout, 10, seed + 12345)
    except ValueError as e:
        raise app.UsageError(f"--holdout={holdout}: {e} (the held-out images come from the "
                             f"{len(y)} training images).") from e
    keep = np.setdiff1d(np.arange(len(y)), held)
    with atomic_path(path) as tmp:
        np.savez(tmp, x_train=x[keep], y_train=y[keep], x_test=x[held], y_test=y[held])
    return path


def make_unseen_source(data_dir: str, subset: int, subset_seed: int, count: int,
                       path: str) -> str:
    """Writes an npz whose test split is ``count`` balanced training images outside the subset.

    Its train split is the subset itself (the images every stage trained on), so the file
    documents both sides of the split.
    """
    import numpy as np

    from tfqkd import data as tdata

    if os.path.isfile(path):
        return path
    x, y = tdata.load_arrays("cifar10", "train", data_dir=data_dir)
    seen = tdata.balanced_subset(y, subset, 10, subset_seed)
    rest = np.setdiff1d(np.arange(len(y)), seen)
    try:
        picked = rest[tdata.balanced_subset(y[rest], count, 10, subset_seed + 1)]
    except ValueError as e:
        raise app.UsageError(
            f"--unseen_eval={count}: {e} (it picks from the {len(rest)} training images outside "
            f"--subset={subset}; pass a smaller multiple of 10).") from e
    with atomic_path(path) as tmp:
        np.savez(tmp, x_train=x[seen], y_train=y[seen], x_test=x[picked], y_test=y[picked])
    return path


def evaluate_models(model_dirs: Dict[str, str], source: str) -> Dict[str, float]:
    """Accuracy of every saved model ``{key: run directory}`` on the test split of ``source``."""
    from tfqkd import data as tdata

    ds = tdata.load_dataset("cifar10", "test", data_dir=source, batch_size=500)
    return {key: common.evaluate_accuracy(common.load_model(d), ds)
            for key, d in model_dirs.items()}


def summarize(acc: Dict[str, float], per_seed: Dict[str, Dict[int, float]],
              seeds: list) -> Dict[str, Any]:
    """Means over seeds, their std, and the (c) - (a), (c) - (b) deltas of one evaluation set.

    ``acc`` holds the single-run stages (teacher, student), ``per_seed`` the 2-bit methods.
    """
    acc = dict(acc)
    acc.update({name: statistics.mean(v.values()) for name, v in per_seed.items()})
    out: Dict[str, Any] = {
        "accuracy": acc,  # the 2-bit methods: mean over --seeds runs
        "accuracy_per_seed": {name: {str(s): a for s, a in v.items()}
                              for name, v in per_seed.items()},
        "accuracy_std": {name: statistics.stdev(v.values()) if len(v) > 1 else 0.0
                         for name, v in per_seed.items()},
    }
    if "kd_cr" in acc and "hard" in acc:
        out["cr_minus_hard_points"] = round(100 * (acc["kd_cr"] - acc["hard"]), 2)
    if "kd_cr" in acc and "kd" in acc:
        out["cr_minus_kd_points"] = round(100 * (acc["kd_cr"] - acc["kd"]), 2)
        # Same seed = same data order and augmentation: the paired differences, seed by seed.
        out["cr_minus_kd_points_per_seed"] = {
            str(s): round(100 * (per_seed["kd_cr"][s] - per_seed["kd"][s]), 2) for s in seeds}
    return out


def main(argv):
    del argv
    common.quiet_logs()
    t0 = time.time()
    unknown = [m for m in FLAGS.methods if m not in METHODS]
    if unknown:
        raise app.UsageError(f"unknown --methods {unknown}; registered: {sorted(METHODS)}")
    if FLAGS.seeds < 1:
        raise app.UsageError(f"--seeds must be >= 1 (runs per 2-bit method), got {FLAGS.seeds}.")
    e_t, e_s, e_q = (FLAGS.teacher_epochs, FLAGS.student_epochs, FLAGS.quant_epochs) \
        if FLAGS.epochs is None else (FLAGS.epochs,) * 3
    if FLAGS.unseen_eval < 0 or (FLAGS.unseen_eval and not FLAGS.subset):
        raise app.UsageError(
            f"--unseen_eval={FLAGS.unseen_eval} needs a positive count and a training "
            f"--subset (got --subset={FLAGS.subset}): the unseen images are the training "
            "images outside the subset.")
    out = os.path.abspath(FLAGS.output_dir)
    data_dir = FLAGS.data_dir or default_data_dir()
    if FLAGS.holdout:
        data_dir = make_holdout_source(data_dir, FLAGS.holdout, FLAGS.seed,
                                       os.path.join(out, f"holdout{FLAGS.holdout}.npz"))
        common.log(f"tuning mode: evaluating on {FLAGS.holdout} held-out training images")
    unseen_source = None
    if FLAGS.unseen_eval:
        unseen_source = make_unseen_source(
            data_dir, FLAGS.subset, FLAGS.seed, FLAGS.unseen_eval,
            os.path.join(out, f"unseen{FLAGS.unseen_eval}_subset{FLAGS.subset}"
                              f"_seed{FLAGS.seed}.npz"))
    os.makedirs(out, exist_ok=True)  # after the checks above: bad counts leave nothing behind
    base = dict(dataset="cifar10", data_dir=data_dir, subset=FLAGS.subset or None,
                test_subset=FLAGS.test_subset or None, subset_seed=FLAGS.seed,
                batch_size=FLAGS.batch_size,
                weight_decay=FLAGS.weight_decay, seed=FLAGS.seed, arch="resnet",
                lr_schedule="cosine", validation_freq=0, save_freq="epoch",
                progress=FLAGS.progress, temperature=FLAGS.temperature,
                coefficient=FLAGS.coefficient)
    quant = dict(weight_bits=FLAGS.weight_bits, first_last_bits=8, epochs=e_q,
                 precise_bn_batches=FLAGS.precise_bn_batches,
                 learning_rate=FLAGS.quant_learning_rate, lr_schedule=FLAGS.quant_lr_schedule)
    strategy = common.make_strategy("none")

    stage_results: Dict[str, Dict[str, Any]] = {}
    teacher_dir, student_dir = os.path.join(out, "teacher"), os.path.join(out, "student")
    t_opts = {k: v for k, v in base.items() if k not in ("temperature", "coefficient")}
    stage_results["teacher"] = train_teacher.run(train_teacher.make_config(
        "paper", **t_opts, width=FLAGS.teacher_width, epochs=e_t,
        learning_rate=FLAGS.learning_rate, output_dir=teacher_dir), strategy)
    stage_results["student"] = train_student.run(train_student.make_config(
        "paper", **base, width=1.0, epochs=e_s, learning_rate=FLAGS.learning_rate,
        output_dir=student_dir), strategy)
    ctx = Context(out, teacher_dir, student_dir, base, quant, strategy,
                  kd=dict(temperature_squared=FLAGS.temperature_squared))
    seeds = [FLAGS.seed + i for i in range(FLAGS.seeds)]
    per_seed: Dict[str, Dict[int, float]] = {}
    wall = {k: _wall_time(r) for k, r in stage_results.items()}
    # Seed-major order: an interrupted run leaves every method with the same number of seeds.
    for seed in seeds:
        for name in FLAGS.methods:
            r = METHODS[name].fn(ctx.with_seed(seed))
            per_seed.setdefault(name, {})[seed] = r["test_accuracy"]
            wall[name] = wall.get(name, 0.0) + _wall_time(r)
            stage_results[f"{name}_seed{seed}"] = r

    summary: Dict[str, Any] = summarize(
        {k: stage_results[k]["test_accuracy"] for k in ("teacher", "student")}, per_seed, seeds)
    acc = summary["accuracy"]
    summary.update({
        "seeds": seeds,
        "stage_wall_time_s": {k: round(v, 1) for k, v in wall.items()},  # methods: all seeds
        "budget": {"subset": FLAGS.subset, "test_subset": FLAGS.test_subset,
                   "holdout": FLAGS.holdout, "teacher_width": FLAGS.teacher_width,
                   "teacher_epochs": e_t, "student_epochs": e_s, "quant_epochs": e_q,
                   "batch_size": FLAGS.batch_size, "temperature": FLAGS.temperature,
                   "coefficient": FLAGS.coefficient,
                   "temperature_squared": FLAGS.temperature_squared,
                   "weight_bits": FLAGS.weight_bits, "seeds": FLAGS.seeds,
                   "quant_lr_schedule": FLAGS.quant_lr_schedule,
                   "precise_bn_batches": FLAGS.precise_bn_batches},
        "evaluated_on": f"holdout{FLAGS.holdout}" if FLAGS.holdout else "test",
        "num_test": stage_results["student"].get("num_test"),
        "wall_time_s": round(time.time() - t0, 1),
        "total_stage_time_s": round(sum(r.get("total_wall_time_s", 0.0)
                                        for r in stage_results.values()), 1),
    })
    if unseen_source:
        t_eval = time.time()
        unseen = evaluate_models({k: stage_results[k]["output_dir"] for k in stage_results},
                                 unseen_source)
        summary["unseen"] = dict(
            summarize({k: unseen[k] for k in ("teacher", "student")},
                      {name: {s: unseen[f"{name}_seed{s}"] for s in v}
                       for name, v in per_seed.items()}, seeds),
            num_images=FLAGS.unseen_eval, eval_time_s=round(time.time() - t_eval, 1))
        summary["wall_time_s"] = round(time.time() - t0, 1)
    if "cr_minus_hard_points" in summary and "cr_minus_kd_points" in summary:
        summary["target_met"] = (summary["cr_minus_hard_points"] >= 1.0
                                 and summary["cr_minus_kd_points"] >= 0.0)

    common.atomic_write_json(os.path.join(out, "summary.json"), summary)
    labels = {"teacher": f"float WRN20x{FLAGS.teacher_width:g} teacher",
              "student": "float ResNet20 student",
              **{k: m.label for k, m in METHODS.items()}}
    print()
    print(f"2-bit rows: mean ± std over seeds {seeds}; time summed over them")
    unseen = summary.get("unseen")
    extra = f" {'unseen':>9}" if unseen else ""
    width = 61 + len(extra)
    if unseen:
        print(f"unseen: {unseen['num_images']} training images outside the subset, same models")
    print(f"{'stage':<34} {'accuracy':>9} {'± std':>6} {'time (s)':>9}{extra}")
    print("-" * width)
    for k, a in acc.items():
        std = f"{100 * summary['accuracy_std'][k]:.2f}" if k in per_seed else ""
        col = f" {100 * unseen['accuracy'][k]:>8.2f}%" if unseen else ""
        print(f"{labels.get(k, k):<34} {100 * a:>8.2f}% {std:>6} "
              f"{summary['stage_wall_time_s'][k]:>9.0f}{col}")
    print("-" * width)
    for key, text in (("cr_minus_hard_points", "(c) - (a)"), ("cr_minus_kd_points", "(c) - (b)")):
        if key in summary:
            line = f"{text:<34} {summary[key]:>+8.2f} points"
            print(f"{line:<62}{unseen[key]:>+8.2f}" if unseen else line)
    print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
    app.run(main)
