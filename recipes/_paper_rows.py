"""The paper's reported rows by name, for ``recipes/quantize_distill.py --row=NAME``.

A row sets the options the paper states for one reported result and says where each value comes
from: ``"paper"`` (the paper states it) or ``"our choice"`` (the paper gives no value; the run
needs one). The paper gives no optimiser, learning rate, schedule or epoch count: those stay
with ``--preset`` (``paper``: 200 epochs, SGD + cosine from 0.01, our choice) and are recorded as
our choice in ``results.json``'s ``row``.

Algorithm 1 retrains a *trained* float student: a row needs ``--student`` (a
``recipes/train_student.py`` output) and one ``--teacher`` of the row's width (a
``recipes/train_teacher.py --width=W`` output); both are checked before training.

Example:
    >>> sorted(PAPER_ROWS)
    ['cifar10-w2', 'cifar100-w2-cr']
    >>> PAPER_ROWS["cifar10-w2"].options["temperature"]
    Setting(value=10.0, source='paper')
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping

__all__ = ["Setting", "PaperRow", "PAPER_ROWS", "apply_row", "check_row_inputs",
           "check_row_teacher", "row_record"]

PAPER = "paper"
OURS = "our choice"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One value of a row and its source (:data:`PAPER` or :data:`OURS`)."""

    value: Any
    source: str


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """A reported result: the recipe options it sets, its teacher's width, its reported top-1."""

    summary: str
    options: Mapping[str, Setting]
    teacher_width: Setting
    reported_top1: Setting


PAPER_ROWS: Dict[str, PaperRow] = {
    "cifar10-w2": PaperRow(
        summary="2-bit ResNet20 on CIFAR-10, KD from a WRN20x1.5 teacher at τ = 10",
        options={
            "dataset": Setting("cifar10", PAPER),
            "weight_bits": Setting(2, PAPER),
            "temperature": Setting(10.0, PAPER),
            # The reported CIFAR-10 row names no coefficient reducing: λ stays constant.
            "coefficient_schedule": Setting("constant", PAPER),
            "coefficient": Setting(0.5, OURS),
            "activation_bits": Setting(None, OURS),
            "first_last_bits": Setting(8, OURS),
        },
        teacher_width=Setting(1.5, PAPER),
        reported_top1=Setting(0.927, PAPER),
    ),
    "cifar100-w2-cr": PaperRow(
        summary="2-bit ResNet20 on CIFAR-100, KD from a WRN20x1.7 teacher at τ = 3 with "
                "coefficient reducing (λ 0.5 → 0)",
        options={
            "dataset": Setting("cifar100", PAPER),
            "weight_bits": Setting(2, PAPER),
            "temperature": Setting(3.0, PAPER),
            "coefficient_schedule": Setting("linear", PAPER),
            "coefficient": Setting(0.5, PAPER),
            "coefficient_end": Setting(0.0, PAPER),
            "activation_bits": Setting(None, OURS),
            "first_last_bits": Setting(8, OURS),
        },
        teacher_width=Setting(1.7, PAPER),
        reported_top1=Setting(0.670, PAPER),
    ),
}

#: Options a row leaves to ``--preset`` (the paper gives none of them).
BUDGET_OPTIONS = ("epochs", "learning_rate", "lr_schedule", "batch_size", "weight_decay")


def apply_row(cfg):
    """``cfg`` with ``cfg.row``'s settings; a conflicting explicit flag is an error.

    Example:
        >>> from recipes._stages import quantize_distill_config
        >>> apply_row(quantize_distill_config("paper", row="cifar100-w2-cr")).temperature
        3.0
    """
    if not getattr(cfg, "row", None):
        return cfg
    if cfg.row not in PAPER_ROWS:
        raise ValueError(f"--row={cfg.row!r} is not a reported row; use one of "
                         f"{', '.join(sorted(PAPER_ROWS))}.")
    row = PAPER_ROWS[cfg.row]
    explicit = getattr(cfg, "_explicit", frozenset())
    conflicts = [f"--{k}={getattr(cfg, k)!r} (the row's is {s.value!r}, {s.source})"
                 for k, s in row.options.items()
                 if k in explicit and getattr(cfg, k) != s.value and s.source == PAPER]
    if conflicts:
        raise ValueError(f"--row={cfg.row} fixes what the paper reports; drop "
                         + ", ".join(conflicts) + " or drop --row.")
    changes = {k: s.value for k, s in row.options.items() if k not in explicit}
    for key, value in changes.items():
        setattr(cfg, key, value)  # not .replace(): these are the row's, not explicit flags
    return cfg


def _recorded_width(path: str) -> Any:
    """The ``--width`` a ``recipes/train_teacher.py`` output directory was trained with, or None
    (a model file, or no record)."""
    config = os.path.join(path, "run_config.json") if os.path.isdir(path) else None
    if config and os.path.isfile(config):
        with open(config) as f:
            return json.load(f).get("width")
    return None


def _teacher_fix(cfg) -> str:
    width = PAPER_ROWS[cfg.row].teacher_width.value
    return (f"train one with `python recipes/train_teacher.py --dataset={cfg.dataset} "
            f"--width={width} --output_dir=runs/teacher_x{width}` and pass it as --teacher")


def check_row_inputs(cfg, teacher_paths) -> None:
    """Before anything is loaded or written: a row retrains a trained float student (Algorithm
    1: ``--student``) with KD from exactly one teacher."""
    if not getattr(cfg, "row", None):
        return
    if not cfg.student:
        raise ValueError(f"--row={cfg.row} retrains a trained float student (Algorithm 1): pass "
                         "--student=<recipes/train_student.py output_dir>.")
    if len(teacher_paths) != 1:
        width = PAPER_ROWS[cfg.row].teacher_width.value
        raise ValueError(f"--row={cfg.row} distils from one WRN20x{width} teacher; got "
                         f"{len(teacher_paths)}: {_teacher_fix(cfg)}.")


def check_row_teacher(cfg, teacher_path: str, teacher, num_classes: int, input_shape) -> None:
    """Refuses a teacher that is not a WRN20 of the row's width (its recorded ``--width``, and
    its parameter count against a WRN20 of that width built here)."""
    if not getattr(cfg, "row", None):
        return
    from tfqkd import models

    width = PAPER_ROWS[cfg.row].teacher_width.value
    found = _recorded_width(teacher_path)
    if found is not None and float(found) != float(width):
        raise ValueError(f"--row={cfg.row} takes a WRN20x{width} teacher (paper); "
                         f"--teacher={teacher_path} was trained with --width={found}: "
                         f"{_teacher_fix(cfg)}.")
    reference = models.wide_resnet20(width, num_classes, input_shape).count_params()
    if teacher.count_params() != reference:
        raise ValueError(f"--row={cfg.row} takes a WRN20x{width} teacher (paper, "
                         f"{reference:,} parameters); --teacher={teacher_path} has "
                         f"{teacher.count_params():,}: {_teacher_fix(cfg)}.")


def row_record(cfg) -> Dict[str, Any]:
    """``results.json``'s ``row``: every setting with its source, the budget as our choice."""
    row = PAPER_ROWS[cfg.row]
    settings = {k: {"value": s.value, "source": s.source} for k, s in row.options.items()}
    settings["teacher_width"] = {"value": row.teacher_width.value, "source": row.teacher_width.source}
    for key in BUDGET_OPTIONS:
        if hasattr(cfg, key):
            settings[key] = {"value": getattr(cfg, key), "source": f"{OURS} (--preset={cfg.preset})"}
    return {"name": cfg.row, "summary": row.summary, "settings": settings,
            "reported_top1": {"value": row.reported_top1.value, "source": row.reported_top1.source}}
