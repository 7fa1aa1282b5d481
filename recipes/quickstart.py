"""Quick start: the whole method on the built-in ``digits`` set in under a minute, no download.

Runs, in one process and in ``--output_dir`` (default ``runs/quickstart``):

1. ``teacher/``    a float tiny ResNet (width 2) with hard labels;
2. ``student/``    a float tiny ResNet (width 1) with hard labels;
3. ``q2_hard/``    the student quantized to 2-bit (ternary) weights, retrained with hard labels;
4. ``q2_kd_cr/``   the same, retrained with KD from the teacher and coefficient reducing (λ 0.5
                   → 0), then exported to an int8 TFLite file and checked against Keras;

and prints a table of the four accuracies, the TFLite file size and its parity with Keras; the
last line is one JSON object with every figure (also saved as ``summary.json``). Each stage is a normal recipe run (its own
model/, checkpoints/, history.csv, results.json), so re-running resumes or skips finished stages.

Example::

    python recipes/quickstart.py                       # 28 s on 2 idle CPU cores
    python recipes/quickstart.py --epochs=2 --output_dir=/tmp/qs   # a few seconds per stage
"""

from __future__ import annotations

import json
import os

from recipes import _stages, common

#: Stage budgets (epochs) of the default run; ``--epochs`` replaces all of them.
EPOCHS = {"teacher": 30, "student": 30, "q2_hard": 15, "q2_kd_cr": 15}

#: Settings shared by every stage: the whole digits set, tiny models, batch 64.
BASE = dict(dataset="digits", subset=None, test_subset=None, batch_size=64, arch="tiny",
            weight_decay=5e-4, save_freq="epoch", validation_freq=0, seed=0)


def stage_configs(output_dir: str, epochs: dict, progress: str = "auto") -> dict:
    """The four stages' configurations (each a normal recipe config)."""
    d = lambda name: os.path.join(output_dir, name)  # noqa: E731
    base = dict(BASE, progress=progress)
    return {
        "teacher": _stages.teacher_config(
            "smoke", **base, width=2.0, epochs=epochs["teacher"], learning_rate=0.05,
            output_dir=d("teacher")),
        "student": _stages.student_config(
            "smoke", **base, width=1.0, epochs=epochs["student"], learning_rate=0.05,
            output_dir=d("student")),
        "q2_hard": _stages.quantize_distill_config(
            "smoke", **base, student=d("student"), weight_bits=2, epochs=epochs["q2_hard"],
            learning_rate=0.02, output_dir=d("q2_hard")),
        "q2_kd_cr": _stages.quantize_distill_config(
            "smoke", **base, student=d("student"), teacher=[d("teacher")], weight_bits=2,
            **common.KD_DEFAULTS, coefficient=0.5, coefficient_schedule="linear",
            coefficient_end=0.0, epochs=epochs["q2_kd_cr"], learning_rate=0.02,
            export="int8", output_dir=d("q2_kd_cr")),
    }


def run(output_dir: str = "runs/quickstart", epochs=None, progress: str = "none") -> dict:
    """Runs the four stages and returns the summary (also printed)."""
    if isinstance(epochs, int):
        epochs = {k: epochs for k in EPOCHS}
    epochs = dict(EPOCHS, **(epochs or {}))
    cfgs = stage_configs(output_dir, epochs, progress)
    strategy = common.make_strategy("none")
    res = {
        "teacher": _stages.train_teacher(cfgs["teacher"], strategy),
        "student": _stages.train_student(cfgs["student"], strategy),
        "q2_hard": _stages.quantize_distill(cfgs["q2_hard"], strategy),
        "q2_kd_cr": _stages.quantize_distill(cfgs["q2_kd_cr"], strategy),
    }
    parity = res["q2_kd_cr"].get("parity", {})
    summary = {
        "float_teacher": res["teacher"]["test_accuracy"],
        "float_student": res["student"]["test_accuracy"],
        "w2_hard": res["q2_hard"]["test_accuracy"],
        "w2_kd_cr": res["q2_kd_cr"]["test_accuracy"],
        "tflite_path": parity.get("path"),
        "tflite_bytes": parity.get("file_bytes"),
        "tflite_top1": parity.get("tflite_top1"),
        "tflite_keras_agreement": parity.get("top1_agreement"),
        "tflite_max_logit_diff": parity.get("max_logit_diff"),
        "wall_time_s": round(sum(r.get("wall_time_s", 0.0) for r in res.values()), 1),
        "output_dir": os.path.abspath(output_dir),
    }
    common.atomic_write_json(os.path.join(output_dir, "summary.json"), summary)
    print_table(summary)
    return summary


def print_table(s: dict) -> None:
    rows = [
        ("float teacher (tiny ResNet x2)", s["float_teacher"]),
        ("float student (tiny ResNet x1)", s["float_student"]),
        ("2-bit student, hard labels", s["w2_hard"]),
        ("2-bit student, KD + CR", s["w2_kd_cr"]),
    ]
    print()
    print(f"{'model (digits test set, 360 images)':<40} {'accuracy':>9}")
    print("-" * 50)
    for name, acc in rows:
        print(f"{name:<40} {100 * acc:>8.2f}%")
    print("-" * 50)
    if s.get("tflite_bytes") is not None:
        print(f"int8 TFLite of the KD + CR student: {s['tflite_bytes']:,} bytes at "
              f"{s['tflite_path']}")
        print(f"  TFLite top-1 {100 * s['tflite_top1']:.2f}%, agreement with Keras "
              f"{100 * s['tflite_keras_agreement']:.2f}%, max |logit diff| "
              f"{s['tflite_max_logit_diff']:.4f}")
    print(json.dumps(s, sort_keys=True), flush=True)


def _main(argv):
    del argv
    from absl import flags

    common.quiet_logs()
    f = flags.FLAGS
    run(f.output_dir, f.epochs, f.progress)


def main() -> None:
    """The command line (console script ``tfqkd-quickstart``)."""
    from absl import flags

    flags.DEFINE_string("output_dir", "runs/quickstart", "Where the four stages write.")
    flags.DEFINE_integer("epochs", None, "Epochs of every stage (default: 30/30/15/15 for "
                         "teacher/student/2-bit hard/2-bit KD+CR).")
    flags.DEFINE_enum("progress", "none", ["auto", "bar", "line", "none"],
                      "Per-epoch display of each stage (default none: one line per stage).")
    common.run_main(_main, ())  # Ctrl-C: one line, exit 130; finished stages are kept


if __name__ == "__main__":
    main()
