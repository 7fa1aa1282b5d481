"""The rows of the reproduction benchmark (``tools/reproduce_cpu.py``): one :class:`Method` each.

Every row trains from the benchmark's float student (and teacher) in ``ctx.stage_dir(name)``
through a recipe's ``run`` and returns its ``results.json`` content (``test_accuracy``, ...).

Adding a method is a one-entry edit of :data:`METHODS`::

    METHODS["speq"] = Method("2-bit SPEQ", run_speq)   # run_speq(ctx: Context) -> results dict

where the function trains from ``ctx.student_dir`` (and ``ctx.teacher_dir``), writes into
``ctx.stage_dir("speq")`` and returns a dict with ``test_accuracy`` (a recipe's results.json).
``ctx.quant_config(name, **overrides)`` gives the shared quantize_distill configuration (data,
budget, bit-widths, learning rate) for that directory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict

from recipes import common, qkd, quantize_distill, speq

__all__ = ["BENCHMARK_KD", "Context", "Method", "METHODS"]

#: KD settings of the benchmark's KD rows: the recipes' KD defaults (``common.KD_DEFAULTS``,
#: τ = 4 with τ²), which were chosen on this benchmark's holdout (docs/recipes.md); the quick
#: start uses them too, so demo and benchmark agree.
BENCHMARK_KD = common.KD_DEFAULTS


@dataclasses.dataclass
class Context:
    """What a method needs: the trained teacher/student and the shared settings."""

    output_dir: str
    teacher_dir: str
    student_dir: str
    base: Dict[str, Any]  # options shared by every stage (data, batch, seed, ...)
    quant: Dict[str, Any]  # options shared by every 2-bit stage (bits, epochs, lr)
    strategy: Any
    kd: Dict[str, Any] = dataclasses.field(default_factory=dict)  # extra options of KD rows
    suffix: str = ""  # appended to every stage directory of a repeated (other-seed) run

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.output_dir, name + self.suffix)

    def with_seed(self, seed: int) -> "Context":
        """The context of the run with ``seed`` (own stage directories unless it is ``base``'s).

        Only the seed changes: ``base["subset_seed"]`` keeps every run on the same images.
        """
        if seed == self.base["seed"]:
            return self
        return dataclasses.replace(self, base=dict(self.base, seed=seed), suffix=f"_seed{seed}")

    def quant_config(self, name: str, **overrides) -> common.Config:
        """The quantize_distill config of stage ``name`` (writes to ``stage_dir(name)``)."""
        opts = dict(self.base, **self.quant)
        opts.update(student=self.student_dir, output_dir=self.stage_dir(name))
        opts.update(overrides)
        return quantize_distill.make_config("paper", **opts)


@dataclasses.dataclass
class Method:
    """One row of the benchmark: a label for the table and ``fn(ctx) -> results dict``."""

    label: str
    fn: Callable[[Context], Dict[str, Any]]


def run_hard(ctx: Context) -> Dict[str, Any]:
    """(a) 2-bit retraining with hard labels only."""
    return quantize_distill.run(ctx.quant_config("hard"), ctx.strategy)


def run_kd(ctx: Context) -> Dict[str, Any]:
    """(b) 2-bit retraining with KD, constant λ."""
    return quantize_distill.run(ctx.quant_config(
        "kd", teacher=[ctx.teacher_dir], coefficient_schedule="constant", **ctx.kd),
        ctx.strategy)


def run_kd_cr(ctx: Context) -> Dict[str, Any]:
    """(c) 2-bit retraining with KD and coefficient reducing (λ linear to 0)."""
    return quantize_distill.run(ctx.quant_config(
        "kd_cr", teacher=[ctx.teacher_dir], coefficient_schedule="linear",
        coefficient_end=0.0, **ctx.kd), ctx.strategy)


# --------------------------------------------------------------------------------------------
# QKD rows (recipes/qkd.py: SS -> CS -> TU)
# --------------------------------------------------------------------------------------------
def qkd_config(ctx: Context, name: str, **overrides: Any) -> common.Config:
    """The QKD config of benchmark stage ``name`` (``ctx``: a :class:`Context`).

    Same data, batch, seed, bit-widths and learning rate as the benchmark's other quantized
    stages, from its float student and teacher. The benchmark's retraining budget of E epochs
    is split E//4 SS + E//4 CS + the rest TU (each at least 1), so QKD trains as many epochs as
    the KD + CR row (co-studying epochs cost about twice a KD epoch: the teacher trains too).
    """
    epochs = int(ctx.quant["epochs"])
    ss = cs = max(1, epochs // 4)
    opts = dict(ctx.base)
    opts.update({k: v for k, v in ctx.quant.items() if k != "epochs"})
    opts.update(student=ctx.student_dir, teacher=ctx.teacher_dir, output_dir=ctx.stage_dir(name),
                ss_epochs=ss, cs_epochs=cs, tu_epochs=max(1, epochs - ss - cs))
    opts.update(overrides)
    return qkd.make_config("paper", **opts)


def run_qkd_w2(ctx: Context) -> dict:
    """QKD at the benchmark's weight bits (2) with float activations and the l2 step, like its
    KD rows (the QKD recipe's own defaults are W4A4 with the learned step)."""
    return qkd.run(qkd_config(ctx, "qkd", activation_bits=None, step="l2"), ctx.strategy)


def run_qkd_w4a4(ctx: Context) -> dict:
    """QKD with 4-bit weights and 4-bit activations (QKD's reported bit-widths), with the l2
    step of the benchmark's other rows."""
    return qkd.run(qkd_config(ctx, "qkd_w4a4", weight_bits=4, activation_bits=4, step="l2"),
                   ctx.strategy)


# --------------------------------------------------------------------------------------------
# SPEQ rows (recipes/speq.py: self-distillation, no teacher)
# --------------------------------------------------------------------------------------------
def speq_config(ctx: Context, name: str, **overrides: Any) -> common.Config:
    """The SPEQ config of benchmark stage ``name`` (``ctx``: a :class:`Context`).

    Same data, batch, seed, weight bits, epochs and learning rate as the benchmark's other
    quantized stages, from its float student; SPEQ needs no teacher (``ctx.teacher_dir`` unused).
    """
    opts = dict(ctx.base)
    opts.update(ctx.quant)
    opts.update(student=ctx.student_dir, output_dir=ctx.stage_dir(name))
    opts.update(overrides)
    return speq.make_config("paper", **opts)


def run_speq_w2(ctx: Context) -> dict:
    """SPEQ at the benchmark's weight bits with 8-bit activations (SPEQ needs quantized
    activations; 8 bits is the nearest to the KD rows' float activations), float teacher
    alternative."""
    return speq.run(speq_config(ctx, "speq", activation_bits=8, high_bits="float"), ctx.strategy)


def run_speq_w4a4(ctx: Context) -> dict:
    """SPEQ with 4-bit weights and activations, the teacher drawing 8-bit activations."""
    return speq.run(speq_config(ctx, "speq_w4a4", weight_bits=4, activation_bits=4,
                                high_bits="8"), ctx.strategy)


#: name -> Method: the rows ``--methods`` picks from.
METHODS: Dict[str, Method] = {
    "hard": Method("(a) 2-bit, hard labels", run_hard),
    "kd": Method("(b) 2-bit, KD constant λ", run_kd),
    "kd_cr": Method("(c) 2-bit, KD + CR", run_kd_cr),
    "qkd": Method("QKD, 2-bit (SS+CS+TU)", run_qkd_w2),
    "qkd_w4a4": Method("QKD, W4A4 (SS+CS+TU)", run_qkd_w4a4),
    "speq": Method("SPEQ, W2A8 (no teacher)", run_speq_w2),
    "speq_w4a4": Method("SPEQ, W4A4 (no teacher)", run_speq_w4a4),
}
