"""Fit the device: per-layer kernel bit-widths searched under a size budget with KD in the loop,
then the chosen widths retrained fully with KD + CR, exported and verified.

1. Load the trained float student (``--student``) and teacher(s) (``--teacher``, repeat for an
   ensemble): the paper's Algorithm 1 trains both in float first (``recipes/train_student.py``,
   ``recipes/train_teacher.py``).
2. The budget, a hard constraint on the kernels' bytes in ``--storage`` (``int4``: the
   ``export_tflite(mode="int4")`` file's kernels; ``int8``; ``packed``: ``pack_weights``),
   computed exactly from the layer shapes (:mod:`tfqkd.budget`): ``--max_bytes=N``, or
   ``--max_bytes_at_bits=B``, the bytes of the same student at uniform ``B`` bits (first/last at
   ``--first_last_bits``): the equal-bytes point of a uniform ``B``-bit student.
3. The search (:class:`tfqkd.search.BitWidthTuner`): ``--max_trials`` candidates from
   ``--oracle``, one width per weighted layer from ``--choices`` (first/last fixed at
   ``--first_last_bits``), each narrowed to the budget and scored by a short proxy fine-tune
   (``--proxy_epochs`` on ``--proxy_subset`` training images; KD + CR, or hard labels with
   ``--nosearch_kd``: the AutoQKeras-style search) on the validation split, ``--validation`` of
   the training images held out class by class. The test split is never looked at here.
4. ``trials.csv`` (every trial: widths, kernel bytes, validation accuracy, on the Pareto front
   or not) and ``pareto.{png,svg}`` (kernel bytes vs validation accuracy).
5. The trial with the highest validation accuracy is retrained for ``--epochs`` (``--retrain``:
   ``kd_cr``, λ ``--coefficient`` → 0 linearly; or ``hard``), its batch-norm statistics
   re-estimated, exported (``--export``, default ``int4``) and verified against the Keras model
   (parity report); ``results.json`` records the widths, the budget, the kernel bytes, the
   file's bytes and the test accuracy (measured once, at the end).

Examples::

    python recipes/search_bits.py --preset=cpu --dataset=cifar10 --data_dir=../shared/data \\
        --student=runs/student --teacher=runs/teacher_x2 --max_bytes_at_bits=3 \\
        --storage=packed --output_dir=runs/search_w3
    python recipes/search_bits.py --preset=smoke --student=/tmp/s --teacher=/tmp/t \\
        --max_bytes=3000 --output_dir=/tmp/search

Resume: run the same command again. Finished trials are read back from
``output_dir/search/`` (keras-tuner's project) and not redone; the final retrain resumes from
its checkpoint like every recipe; a finished run prints its result.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from recipes import common
from recipes.common import KD_OPTIONS, QUANT_OPTIONS, Option

from tfqkd._keras import keras, tf

OPTIONS = common.COMMON_OPTIONS + KD_OPTIONS + [
    o for o in QUANT_OPTIONS if o.name != "weight_bits"] + [
    Option("student", None, "The trained float student (a train_student output_dir or "
           "model.h5). Required: the search quantizes it, as Algorithm 1 does."),
    Option("teacher", None, "Trained float teacher (output_dir or model.h5); repeat for an "
           "ensemble. Required unless --nosearch_kd and --retrain=hard.", "multi_string"),
    Option("storage", "int4", "What the budget counts: int4 (the int4 TFLite file's kernels: "
           "<= 4-bit kernels two per byte), int8 (one byte per weight) or packed (the packed "
           "archive: 1.6 bits per ternary weight, b bits otherwise).", "enum",
           ("int4", "int8", "packed")),
    Option("max_bytes", None, "Size budget: the kernels' bytes in --storage.", "integer"),
    Option("max_bytes_at_bits", None, "Budget instead of --max_bytes: the kernel bytes of the "
           "student at this uniform width (first/last at --first_last_bits).", "integer"),
    Option("max_latency_ms", None, "Latency budget: milliseconds per batch-1 inference of the "
           "--export file, measured with LiteRT on this machine for every candidate (widened "
           "until it fits). With or without a bytes budget.", "float"),
    Option("latency_threads", 1, "LiteRT threads of the latency measurements.", "integer"),
    Option("choices", "2,4,8", "Comma-separated widths a searched layer may take."),
    Option("oracle", "random", "Search algorithm.", "enum", ("random", "bayesian")),
    Option("max_trials", 12, "Candidates scored.", "integer"),
    Option("proxy_epochs", 1, "Epochs of each candidate's proxy fine-tune.", "integer"),
    Option("proxy_subset", 2000, "Training images of the proxy fine-tune (absent: as many as "
           "--subset).", "integer"),
    Option("proxy_learning_rate", 1e-3, "Adam learning rate of the proxy fine-tune.", "float"),
    Option("search_kd", True, "Score candidates with KD + CR (false: hard labels, the "
           "AutoQKeras-style search).", "bool"),
    Option("retrain", "kd_cr", "Final retrain of the chosen widths: kd_cr (KD, λ from "
           "--coefficient to 0 linearly) or hard (labels only).", "enum", ("kd_cr", "hard")),
    Option("validation", 0.1, "Fraction of the training images held out, class by class, to "
           "score the candidates on (never the test split).", "float"),
    Option("export", "int4", "Export of the retrained student: int4, int8 or none.", "enum",
           ("int4", "int8", "none")),
]

#: The search's presets on top of common.PRESETS and the quantized retrain's learning rates.
#: smoke: tiny models on digits, 3 candidates, ~1 min; cpu: the CPU protocol (10k CIFAR-10
#: images, 8 quantized epochs) with 12 candidates of 1 proxy epoch on 2,000 images.
PRESETS = common.merge_presets(common.QUANT_PRESETS, {
    "smoke": dict(dataset="digits", subset=None, test_subset=None, batch_size=50, epochs=2,
                  max_trials=3, proxy_subset=600, precise_bn_batches=10),
    "cpu": dict(epochs=8, max_trials=12, proxy_subset=2000),
    "paper": dict(max_trials=30, proxy_subset=None, proxy_epochs=2),
})

RUNTIME_KEYS = frozenset(common.RUNTIME_KEYS)


def make_config(preset: str = "paper", **overrides: Any) -> common.Config:
    """This recipe's configuration in Python (same resolution as the command line).

    Example:
        >>> cfg = make_config("smoke", student="/tmp/s", max_bytes=3000)
        >>> cfg.storage, cfg.choices, cfg.max_trials
        ('int4', '2,4,8', 3)
    """
    return common.make_config(OPTIONS, PRESETS, preset, **overrides)


def parse_choices(text: Any) -> List[int]:
    """``"2, 4,8"`` → ``[2, 4, 8]``, each a width in 1..8.

    Example:
        >>> parse_choices("8,2, 4")
        [2, 4, 8]
        >>> parse_choices("2,16")
        Traceback (most recent call last):
        ...
        ValueError: --choices='2,16': 16 is not a width in 1..8; pass e.g. --choices=2,4,8.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    out = []
    for t in items:
        try:
            bits = int(t)
        except ValueError:
            bits = None
        if bits is None or not 1 <= bits <= 8:
            raise ValueError(f"--choices={text!r}: {t} is not a width in 1..8; pass e.g. "
                             "--choices=2,4,8.")
        out.append(bits)
    if not out:
        raise ValueError("--choices is empty; pass e.g. --choices=2,4,8.")
    return sorted(set(out))


def check_inputs(cfg: common.Config) -> None:
    """Every option the search needs, checked before anything is loaded or written.

    Example:
        >>> check_inputs(make_config("smoke", student="/tmp/s", teacher=["/tmp/t"]))
        Traceback (most recent call last):
        ...
        ValueError: Give the budget: --max_bytes=N (kernel bytes in int4) or --max_bytes_at_bits=B (the bytes of the student at uniform B bits).
    """
    parse_choices(cfg.choices)
    if not cfg.student:
        raise ValueError("--student is required: the trained float student to quantize (train "
                         "one with recipes/train_student.py; Algorithm 1 starts from it).")
    if cfg.max_bytes is not None and cfg.max_bytes_at_bits is not None:
        raise ValueError("Give one size budget: --max_bytes=N or --max_bytes_at_bits=B, not "
                         "both.")
    if cfg.max_bytes is None and cfg.max_bytes_at_bits is None and cfg.max_latency_ms is None:
        raise ValueError(f"Give the budget: --max_bytes=N (kernel bytes in {cfg.storage}) or "
                         "--max_bytes_at_bits=B (the bytes of the student at uniform B bits), "
                         "and/or --max_latency_ms=T.")
    if cfg.max_latency_ms is not None:
        if cfg.max_latency_ms <= 0:
            raise ValueError(f"--max_latency_ms must be > 0, got {cfg.max_latency_ms}.")
        if cfg.export == "none":
            raise ValueError("--max_latency_ms is measured on the exported file: pass "
                             "--export=int4 or --export=int8.")
    if cfg.max_bytes is not None and cfg.max_bytes <= 0:
        raise ValueError(f"--max_bytes must be > 0, got {cfg.max_bytes}.")
    if cfg.max_bytes_at_bits is not None and not 1 <= cfg.max_bytes_at_bits <= 8:
        raise ValueError(f"--max_bytes_at_bits must be a width in 1..8, got "
                         f"{cfg.max_bytes_at_bits}.")
    if (cfg.search_kd or cfg.retrain == "kd_cr") and not common.teacher_paths(cfg):
        raise ValueError("--teacher is required for --search_kd and --retrain=kd_cr; pass a "
                         "trained teacher (recipes/train_teacher.py) or --nosearch_kd "
                         "--retrain=hard to search and retrain on labels only.")
    if not 0.0 < cfg.validation < 1.0:
        raise ValueError(f"--validation must be a fraction in (0, 1) of the training images: "
                         f"candidates are scored on it, never on the test split; got "
                         f"{cfg.validation!r}.")
    for name in ("max_trials", "proxy_epochs"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}.")
    if cfg.proxy_subset is not None and cfg.proxy_subset < cfg.batch_size:
        raise ValueError(f"--proxy_subset={cfg.proxy_subset} is smaller than one batch "
                         f"(--batch_size={cfg.batch_size}); raise it or leave it out (all "
                         "training images).")


def budget_bytes(cfg: common.Config, student: keras.Model) -> Optional[int]:
    """``--max_bytes``, or the kernel bytes of ``student`` at uniform ``--max_bytes_at_bits``
    (None: no size budget)."""
    from tfqkd.budget import kernel_bytes, layer_widths

    if cfg.max_bytes is not None:
        return int(cfg.max_bytes)
    if cfg.max_bytes_at_bits is None:
        return None
    widths = layer_widths(student, cfg.max_bytes_at_bits, cfg.first_last_bits)
    return kernel_bytes(student, widths, cfg.storage, per_channel=cfg.per_channel)


TRIAL_COLUMNS = ("trial_id", "kernel_bytes", "latency_ms", "val_accuracy", "pareto", "mean_bits",
                 "widths")


def write_trials(records: Sequence[Mapping[str, Any]], shapes: Mapping[str, Any],
                 path: str) -> List[Dict[str, Any]]:
    """``trials.csv``: one row per finished trial, ``pareto`` 1 for the front; returns the rows.

    ``mean_bits`` is the weight-count-weighted mean kernel width.
    """
    from tfqkd.search import pareto_front

    front = {r["trial_id"] for r in pareto_front(records)}
    rows = []
    total = sum(n for n, _ in shapes.values())
    for r in sorted(records, key=lambda r: (r["kernel_bytes"], -r["val_accuracy"])):
        mean_bits = sum(shapes[k][0] * b for k, b in r["widths"].items()) / total
        rows.append({"trial_id": r["trial_id"], "kernel_bytes": r["kernel_bytes"],
                     "latency_ms": r.get("latency_ms"),
                     "val_accuracy": r["val_accuracy"], "pareto": int(r["trial_id"] in front),
                     "mean_bits": round(mean_bits, 4),
                     "widths": json.dumps(r["widths"], sort_keys=True)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TRIAL_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    common.atomic_write_text(path, buf.getvalue())
    return rows


def plot_pareto(rows: Sequence[Mapping[str, Any]], budget: Optional[int], stem: str,
                storage: str) -> List[str]:
    """``stem.{png,svg}``: every trial's kernel bytes vs validation accuracy, the front joined."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    from tfqkd.tuning.plots import save_figure

    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.scatter([r["kernel_bytes"] for r in rows], [r["val_accuracy"] for r in rows],
               c="0.6", label="trials")
    front = [r for r in rows if r["pareto"]]
    ax.plot([r["kernel_bytes"] for r in front], [r["val_accuracy"] for r in front], "o-",
            c="C0", label="Pareto front")
    if budget is not None:
        ax.axvline(budget, ls="--", c="C3", label=f"budget {budget:,} B")
    ax.set_xlabel(f"kernel bytes ({storage})")
    ax.set_ylabel("validation accuracy (proxy fine-tune)")
    ax.legend(loc="lower right")
    return save_figure(fig, stem)


def run(cfg: common.Config, strategy: tf.distribute.Strategy = None) -> Dict[str, Any]:
    """Runs (or continues) the search and the final retrain; returns results.json's content."""
    from tfqkd import search, tuning
    from tfqkd.budget import kernel_shapes

    check_inputs(cfg)
    # Candidates are scored on held-out training images: the run's data carry the hold-out.
    run_ = common.start_run(cfg, "runs/search_bits", strategy, validation=cfg.validation)
    if run_.finished is not None:
        return run_.finished
    data = run_.data
    # The proxy never trains on more images than the run: --proxy_subset within --subset.
    proxy_subset = min(n for n in (cfg.proxy_subset, cfg.subset) if n) \
        if (cfg.proxy_subset or cfg.subset) else None
    proxy = common.load_data(cfg.replace(subset=proxy_subset), validation=cfg.validation)
    teacher_paths = common.teacher_paths(cfg)
    with run_.strategy.scope():
        student, origin = common.load_or_build_student(cfg, data)
        teachers = common.load_teachers(teacher_paths, run_.strategy, cfg, data.info) \
            if teacher_paths else []
    max_bytes = budget_bytes(cfg, student)
    choices = parse_choices(cfg.choices)
    probe = None
    if cfg.max_latency_ms is not None:
        from tfqkd.latency import LatencyProbe

        probe = LatencyProbe(student, cfg.export, data.train, threads=cfg.latency_threads,
                             activation_bits=cfg.activation_bits, per_channel=cfg.per_channel,
                             step=cfg.step)
    # Refuses a budget no choice meets (the latency one after measuring the fastest widths).
    space = search.BitWidthSpace(student, max_bytes, cfg.storage, choices, cfg.first_last_bits,
                                 cfg.per_channel, max_latency_ms=cfg.max_latency_ms,
                                 latency_of=probe, runtime=cfg.export)
    run_.begin()  # inputs validated: --overwrite may delete the old run now
    tuner_dir = os.path.join(run_.out.root, "search")
    oracle = tuning.make_oracle(cfg.oracle, objective="val_accuracy", max_trials=cfg.max_trials,
                                seed=cfg.seed + 1)
    tuner = search.BitWidthTuner(
        space, student, teachers or None, proxy.train, data.validation,
        proxy_epochs=cfg.proxy_epochs, kd=cfg.search_kd, temperature=cfg.temperature,
        learning_rate=cfg.proxy_learning_rate, activation_bits=cfg.activation_bits,
        step=cfg.step, oracle=oracle, directory=tuner_dir, project_name="bits",
        overwrite=False)
    budget = " and ".join(
        ([f"{max_bytes:,} kernel bytes ({cfg.storage})"] if max_bytes is not None else [])
        + ([f"{cfg.max_latency_ms:g} ms ({cfg.export} file, LiteRT, {cfg.latency_threads} "
            f"thread(s))"] if cfg.max_latency_ms is not None else []))
    common.log(f"search_bits: {origin}, budget {budget}, "
               f"widths {choices} (first/last {cfg.first_last_bits}), {cfg.max_trials} "
               f"candidates, proxy {cfg.proxy_epochs} epoch(s) on {proxy.num_train} images with "
               f"{'KD + CR' if cfg.search_kd else 'hard labels'}, scored on "
               f"{cfg.validation:g} of the training images")
    tuner.search()
    records = tuner.trial_records()
    shapes = kernel_shapes(student)
    rows = write_trials(records, shapes, os.path.join(run_.out.root, "trials.csv"))
    figures = plot_pareto(rows, max_bytes, os.path.join(run_.out.root, "pareto"), cfg.storage)
    best = max(records, key=lambda r: r["val_accuracy"])
    widths = best["widths"]
    common.log(f"chosen: trial {best['trial_id']}, {best['kernel_bytes']:,} kernel bytes"
               + (f" of {max_bytes:,}" if max_bytes is not None else "")
               + (f", {best['latency_ms']:.3f} ms" if best.get("latency_ms") is not None else "")
               + f", validation accuracy {best['val_accuracy']:.4f} (proxy)")

    with run_.strategy.scope():
        q = tuner.quantized_student(widths)
        kd = cfg.retrain == "kd_cr"
        if kd:
            model = common.make_distiller(q, teachers, cfg)
            common.compile_distiller(model, cfg, data.steps_per_epoch)
        else:
            model = q
            common.compile_classifier(model, cfg, data.steps_per_epoch)
    callbacks = [common.coefficient_scheduler(cfg.replace(coefficient_schedule="linear",
                                                          coefficient_end=0.0))] if kd else []
    common.fit_with_resume(model, data.train, data.validation, cfg.epochs, run_.out, callbacks,
                           save_freq=cfg.save_freq, progress=cfg.progress,
                           validation_freq=cfg.validation_freq, name="searched")
    extra = common.precise_bn(cfg, q, data)
    extra.update({
        "widths": widths, "kernel_bytes": best["kernel_bytes"], "budget_bytes": max_bytes,
        "storage": cfg.storage, "chosen_trial": best["trial_id"],
        "proxy_val_accuracy": best["val_accuracy"],
        "val_accuracy": common.evaluate_accuracy(q, data.validation),
        "trials": len(records), "pareto": [r for r in rows if r["pareto"]],
        "figures": figures, "mode": "kd_cr" if kd else "hard",
        "search": "kd_cr" if cfg.search_kd else "hard",
    })
    if cfg.export != "none" and run_.out.chief:
        # Before the packed archive: an integer export aligns the student's biases.
        extra.update(common.export_and_verify(q, run_.out, data, cfg.export,
                                              common.export_runtime(cfg)))
        if cfg.max_latency_ms is not None:
            from tfqkd.latency import tflite_latency_ms

            # The shipped file, measured again (its kernels cost what the candidate's did).
            ms = tflite_latency_ms(extra["export"]["path"], cfg.latency_threads)
            extra["latency"] = {"budget_ms": cfg.max_latency_ms, "shipped_file_ms": ms,
                                "candidate_ms": best.get("latency_ms"),
                                "threads": cfg.latency_threads}
            common.log(f"shipped {cfg.export} file: {ms:.3f} ms per image (budget "
                       f"{cfg.max_latency_ms:g} ms"
                       + (f", over it by {ms - cfg.max_latency_ms:.3f} ms: the candidate "
                          f"measured {best.get('latency_ms'):.3f} ms; measurements move with "
                          "the machine's load" if ms > cfg.max_latency_ms else "") + ")")
    if cfg.storage == "packed" and run_.out.chief:
        extra["packed"] = _pack(q, run_.out.model_dir)
    return common.finish_run(run_, q, "searched student", extra=extra)


def _pack(model: keras.Model, model_dir: str) -> Dict[str, Any]:
    """The packed archive of ``model`` and its sizes (``quantized_bytes``: what the budget
    priced)."""
    from tfqkd import export

    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "model.tfqkdpw")
    export.pack_weights(model, path)
    stats = export.packed_archive_stats(path)
    common.log(f"packed archive: {stats['bytes']:,} bytes, quantized tensors "
               f"{stats['quantized_bytes']:,} bytes -> {path}")
    return stats


def _main(argv):
    del argv
    common.quiet_logs()
    run(common.config_from_flags(OPTIONS, PRESETS))


def main() -> None:
    """The command line (console script ``tfqkd-search-bits``): absl flags from ``OPTIONS``."""
    common.run_main(_main, OPTIONS)


if __name__ == "__main__":
    main()
