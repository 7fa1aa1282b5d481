"""The paper's figures from trial rows: accuracy vs teacher width, with/without CR, τ × teacher.

Plots are bare matplotlib ``Figure`` objects (no pyplot: no global state, no GUI backend).

Example:
    >>> rows = [dict(normalize_config({"temperature": t, "teacher": w}), test_accuracy=0.5)
    ...         for t in (1, 4) for w in (1, 2)]
    >>> [len(ax.get_lines()) for ax in plot_accuracy_vs_teacher(rows).axes]
    [2]
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from tfqkd._io import atomic_path
from tfqkd.tuning.config import NO_TEACHER, SCHEDULES, _teacher_width
from tfqkd.tuning.config import normalize_config  # noqa: F401  (the examples use it)
from tfqkd.tuning.results import read_results

__all__ = ["plot_accuracy_vs_teacher", "plot_cr_comparison", "plot_heatmap", "save_figure",
           "plot_results"]


def _figure(nrows: int = 1, ncols: int = 1, size: Tuple[float, float] = (6.0, 4.0)):
    # A bare Figure (no pyplot): no global state, no GUI backend, works under Agg everywhere.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _x_positions(keys: Sequence[str]) -> Tuple[Dict[str, float], Optional[List[str]]]:
    """Teacher keys → x: widths where every key is a width, else categorical positions."""
    widths = [_teacher_width(k) for k in keys]
    if all(w is not None for w in widths):
        return {k: w for k, w in zip(keys, widths)}, None
    labels = [os.path.basename(k.rstrip("/")) or k for k in keys]
    return {k: float(i) for i, k in enumerate(keys)}, labels


def _sorted_teachers(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    keys = sorted({r["teacher"] for r in rows if r["teacher"] != NO_TEACHER})
    return sorted(keys, key=lambda k: (_teacher_width(k) is None, _teacher_width(k) or 0.0, k))


def _draw_lines(ax, rows, *, metric, baseline, linestyle="-", label_suffix="", teachers=None,
                colors=None):
    teachers = teachers or _sorted_teachers(rows)
    xs, labels = _x_positions(teachers)
    temperatures = sorted({r["temperature"] for r in rows if r["teacher"] != NO_TEACHER})
    # One colour per τ across panels, so the two halves of Figure 2 read against each other.
    colors = colors or {t: f"C{i}" for i, t in enumerate(temperatures)}
    for t in temperatures:
        points = {}
        for r in rows:
            if r["teacher"] != NO_TEACHER and r["temperature"] == t and r["teacher"] in xs:
                points.setdefault(r["teacher"], []).append(r[metric])
        keys = [k for k in teachers if k in points]
        ax.plot([xs[k] for k in keys], [float(np.mean(points[k])) for k in keys],
                linestyle=linestyle, marker="o", color=colors[t], label=f"τ={t:g}{label_suffix}")
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle=":", linewidth=1.2, label="hard labels")
    if labels is not None:
        ax.set_xticks(list(xs.values()), labels, rotation=20)
        ax.set_xlabel("teacher")
    else:
        ax.set_xlabel("teacher width (WRN20×N)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(True, alpha=0.3)


def _baseline_value(rows: Sequence[Mapping[str, Any]], baseline, metric: str) -> Optional[float]:
    if baseline is not None:
        return float(baseline)
    values = [r[metric] for r in rows if r["teacher"] == NO_TEACHER]
    return float(np.mean(values)) if values else None


def plot_accuracy_vs_teacher(
    rows: Sequence[Mapping[str, Any]],
    *,
    baseline: Optional[float] = None,
    schedule: Optional[str] = "constant",
    metric: str = "test_accuracy",
    title: Optional[str] = None,
):
    """Figure 1: accuracy vs teacher width, one line per τ, hard-label baseline as a flat line.

    Args:
        rows: Result rows (:func:`read_results`). Rows with ``teacher="none"`` are baselines.
        baseline: Hard-label accuracy (default: mean of the baseline rows, if any).
        schedule: Only rows with this schedule (None: all; falls back to all if none match).
        metric: Column on the y axis.
        title: Figure title.

    Returns:
        The ``matplotlib.figure.Figure`` (one ``Line2D`` per τ, plus one for the baseline).

    Example:
        >>> rows = [dict(normalize_config({"temperature": t, "teacher": w}), test_accuracy=0.5)
        ...         for t in (1, 4) for w in (1, 2)]
        >>> len(plot_accuracy_vs_teacher(rows, baseline=0.4).axes[0].get_lines())
        3
    """
    base = _baseline_value(rows, baseline, metric)
    selected = [r for r in rows if schedule is None or r["schedule"] == schedule]
    if not [r for r in selected if r["teacher"] != NO_TEACHER]:
        selected = list(rows)
    fig, axes = _figure()
    ax = axes[0, 0]
    _draw_lines(ax, selected, metric=metric, baseline=base)
    ax.legend(fontsize="small")
    ax.set_title(title or f"quantized student vs teacher ({schedule or 'all'} λ)")
    return fig


def plot_cr_comparison(
    rows: Sequence[Mapping[str, Any]],
    *,
    baseline: Optional[float] = None,
    metric: str = "test_accuracy",
    title: Optional[str] = None,
):
    """Figure 2: the same curves without CR (constant λ) and with CR (linear λ), side by side.

    Two panels with one y range covering both: left constant λ, right coefficient reducing; each
    has one line per τ and the hard-label baseline.

    Example:
        >>> rows = [dict(normalize_config({"temperature": 2, "teacher": w, "schedule": s}),
        ...              test_accuracy=0.5) for w in (1, 2) for s in ("constant", "linear")]
        >>> [len(ax.get_lines()) for ax in plot_cr_comparison(rows).axes]
        [1, 1]
    """
    base = _baseline_value(rows, baseline, metric)
    fig, axes = _figure(1, 2, size=(10.0, 4.0))
    teachers = _sorted_teachers(rows)
    temperatures = sorted({r["temperature"] for r in rows if r["teacher"] != NO_TEACHER})
    colors = {t: f"C{i}" for i, t in enumerate(temperatures)}
    for ax, schedule, name in zip(axes[0], SCHEDULES, ("without CR (constant λ)",
                                                       "with CR (λ linear → 0)")):
        selected = [r for r in rows if r["schedule"] == schedule]
        if [r for r in selected if r["teacher"] != NO_TEACHER]:
            _draw_lines(ax, selected, metric=metric, baseline=base, teachers=teachers,
                        colors=colors)
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {schedule} runs", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(name)
    # One y range over both panels (the union of their data): sharing the left panel's limits
    # cut off the CR lines that rose above the constant-λ panel's range (2026-12-05 sweep).
    lows, highs = zip(*(ax.get_ylim() for ax in axes[0]))
    for ax in axes[0]:
        ax.set_ylim(min(lows), max(highs))
    if title:
        fig.suptitle(title)
    return fig


def plot_heatmap(
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str = "test_accuracy",
    title: Optional[str] = None,
):
    """τ × teacher heat map of ``metric``, one panel per schedule present (cells annotated).

    Example:
        >>> rows = [dict(normalize_config({"temperature": t, "teacher": w}), test_accuracy=0.5)
        ...         for t in (1, 4) for w in (1, 2)]
        >>> plot_heatmap(rows).axes[0].images[0].get_array().shape
        (2, 2)
    """
    rows = [r for r in rows if r["teacher"] != NO_TEACHER]
    schedules = [s for s in SCHEDULES if any(r["schedule"] == s for r in rows)] or ["constant"]
    teachers = _sorted_teachers(rows)
    temperatures = sorted({r["temperature"] for r in rows})
    fig, axes = _figure(1, len(schedules), size=(4.5 * len(schedules) + 1, 4.0))
    values = [r[metric] for r in rows] or [0.0, 1.0]
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    image = None
    for ax, schedule in zip(axes[0], schedules):
        grid = np.full((len(temperatures), len(teachers)), np.nan)
        for i, t in enumerate(temperatures):
            for j, k in enumerate(teachers):
                cell = [r[metric] for r in rows
                        if r["schedule"] == schedule and r["temperature"] == t and r["teacher"] == k]
                if cell:
                    grid[i, j] = float(np.mean(cell))
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i, j] < (vmin + vmax) / 2 else "black")
        _, labels = _x_positions(teachers)
        ax.set_xticks(range(len(teachers)), labels or teachers)
        ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
        ax.set_xlabel("teacher width" if labels is None else "teacher")
        ax.set_ylabel("temperature τ")
        ax.set_title(f"{schedule} λ")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label=metric.replace("_", " "))
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig, stem: str, formats: Sequence[str] = ("png", "svg"), dpi: int = 120) -> List[str]:
    """Saves ``fig`` as ``stem.png`` and ``stem.svg`` (atomically) and returns the paths.

    Example:
        >>> import tempfile
        >>> rows = [dict(normalize_config({"temperature": 2, "teacher": w}), test_accuracy=0.5)
        ...         for w in (1, 2)]
        >>> paths = save_figure(plot_accuracy_vs_teacher(rows), os.path.join(tempfile.mkdtemp(), "f"))
        >>> [os.path.basename(p) for p in paths]
        ['f.png', 'f.svg']
    """
    paths = []
    for fmt in formats:
        path = f"{stem}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
        paths.append(path)
    return paths


def plot_results(
    csv_path: str,
    output_dir: str,
    *,
    baseline_csv: Optional[str] = None,
    metric: str = "test_accuracy",
) -> Dict[str, List[str]]:
    """Draws every figure from a results CSV into ``output_dir`` (PNG + SVG each).

    Returns ``{"accuracy_vs_teacher": [...], "cr_comparison": [...], "heatmap": [...]}`` paths.

    Example:
        >>> plot_results("runs/sweep/trials.csv", "runs/sweep",
        ...              baseline_csv="runs/sweep/baseline.csv")  # doctest: +SKIP
    """
    rows = read_results(csv_path)
    if not rows:
        raise ValueError(f"no results to plot in {csv_path}: run the sweep first.")
    baseline_rows = read_results(baseline_csv) if baseline_csv else []
    baseline = _baseline_value(rows + baseline_rows, None, metric)
    figures = {
        "accuracy_vs_teacher": plot_accuracy_vs_teacher(
            rows, baseline=baseline,
            schedule="constant" if any(r["schedule"] == "constant" for r in rows) else "linear",
            metric=metric),
        "cr_comparison": plot_cr_comparison(rows, baseline=baseline, metric=metric),
        "heatmap": plot_heatmap(rows, metric=metric),
    }
    return {name: save_figure(fig, os.path.join(output_dir, name)) for name, fig in figures.items()}
