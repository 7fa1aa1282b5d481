"""Trial results: the CSV (one row per finished trial, appended under a file lock) and the grid.

:func:`run_grid` is the exhaustive sweep: it appends one row per finished trial and skips the
configs already in the CSV, so an interrupted sweep continues where it stopped.

Example:
    >>> configs = grid_configs(temperatures=[1, 4], teachers=["1", "2"], schedules=["constant"])
    >>> len(configs), sorted({c["temperature"] for c in configs})
    (4, [1.0, 4.0])
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from tfqkd._io import atomic_write
from tfqkd.tuning.config import HYPERPARAMETERS, METRICS, NO_TEACHER, config_key, normalize_config
from tfqkd.tuning.trials import TeacherPool, TrialData, run_trial_config

__all__ = ["read_results", "append_result", "grid_configs", "run_grid"]


def _csv_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value) if not math.isnan(value) else "nan"
    return str(value)


#: Result columns that stay text (ids like "00" are not numbers).
_TEXT_COLUMNS = frozenset({"trial_id", "tuner_id", "status"})


def read_results(path: str) -> List[Dict[str, Any]]:
    """Reads a results CSV; hyper-parameters are normalised, metrics become floats.

    A missing file reads as no rows (a sweep that has not finished a trial yet).

    Example:
        >>> read_results("/no/such/trials.csv")
        []
    """
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed: Dict[str, Any] = {}
        for k, v in row.items():
            if k in HYPERPARAMETERS:
                continue
            if k in _TEXT_COLUMNS:
                parsed[k] = v
                continue
            try:
                parsed[k] = float(v)
            except (TypeError, ValueError):
                parsed[k] = v
        parsed.update(normalize_config({k: row[k] for k in HYPERPARAMETERS if k in row}))
        out.append(parsed)
    return out


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive advisory lock (POSIX ``flock``) serialising writers of ``path``.

    The workers of a distributed search append to one CSV; without the lock two read-modify-write
    cycles could interleave and drop a row.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: single writer assumed
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_result(path: str, row: Mapping[str, Any], *, unique: Optional[str] = None) -> None:
    """Adds one row to a results CSV by rewriting it atomically (an interrupt loses no row).

    With ``unique="trial_id"``, an earlier row with the same ``trial_id`` is replaced (a trial
    retried after an interrupt keeps one row).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "trials.csv")
        >>> append_result(path, {**normalize_config({"teacher": 2}), "test_accuracy": 0.5})
        >>> [r["teacher"] for r in read_results(path)]
        ['2']
    """
    with _file_lock(path):
        _append_unlocked(path, row, unique)


def _append_unlocked(path: str, row: Mapping[str, Any], unique: Optional[str]) -> None:
    existing: List[Dict[str, str]] = []
    columns: List[str] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            existing = list(reader)
    if unique is not None:
        existing = [r for r in existing if r.get(unique) != _csv_value(row.get(unique))]
    for k in list(HYPERPARAMETERS) + list(METRICS) + list(row):
        if k not in columns:
            columns.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(existing)
    writer.writerow({k: _csv_value(v) for k, v in row.items()})
    atomic_write(path, buf.getvalue())


def grid_configs(
    temperatures: Iterable[float] = (1, 2, 5, 10),
    teachers: Iterable[Any] = (1, 1.5, 2),
    schedules: Iterable[str] = ("constant", "linear"),
    coefficient: float = 0.5,
    weight_bits: Iterable[int] = (2,),
    activation_bits: Optional[int] = None,
    epochs: int = 1,
) -> List[Dict[str, Any]]:
    """Every combination of the given values, as normalised configs (teacher-major order).

    Example:
        >>> [c["schedule"] for c in grid_configs([1], [1], ["constant", "linear"])]
        ['constant', 'linear']
    """
    configs = []
    for teacher, temperature, schedule, bits in itertools.product(
        teachers, temperatures, schedules, weight_bits
    ):
        configs.append(normalize_config({
            "temperature": temperature, "coefficient": coefficient, "schedule": schedule,
            "teacher": teacher, "weight_bits": bits, "activation_bits": activation_bits,
            "epochs": epochs,
        }))
    keys = [config_key(c) for c in configs]
    if len(set(keys)) != len(keys):
        raise ValueError("the grid repeats a configuration: remove duplicate values from the lists.")
    return configs


def _describe(cfg: Mapping[str, Any]) -> str:
    if cfg["teacher"] == NO_TEACHER:
        return f"hard labels, w{cfg['weight_bits']}"
    return (f"τ={cfg['temperature']:g} teacher={cfg['teacher']} λ={cfg['coefficient']:g} "
            f"{cfg['schedule']} w{cfg['weight_bits']}")


def run_grid(
    configs: Sequence[Mapping[str, Any]],
    data: TrialData,
    csv_path: str,
    *,
    teachers: Optional[TeacherPool] = None,
    objective: str = "val_accuracy",
    log: Optional[Callable[[str], None]] = None,
    **trial_kwargs: Any,
) -> List[Dict[str, Any]]:
    """Runs every config not yet in ``csv_path``, appending one row per finished trial.

    Rerunning after an interrupt continues with the missing configs only. Each row holds the
    hyper-parameters, the metrics of :func:`run_trial_config` and the wall time.

    Args:
        configs: Trial configs (e.g. from :func:`grid_configs`).
        data: Train / validation / test batches.
        csv_path: The results file (created if missing).
        teachers: Where teachers come from.
        objective: Metric the progress line ranks trials by: the validation accuracy, as every
            choice is made (the test accuracy is shown beside it, never ranked on).
        log: Receives one progress line per trial (default: print to stdout).
        **trial_kwargs: Passed to :func:`run_trial_config` (optimizer, learning rate, ...).

    Returns:
        All rows of the CSV after the sweep.

    Example:
        >>> rows = run_grid(grid_configs([1, 4], [1, 2], ["constant"]), make_trial_data("digits"),
        ...                 "runs/sweep/trials.csv",
        ...                 teachers=TeacherPool(cache_dir="runs/sweep/teachers"))  # doctest: +SKIP
    """
    log = log or (lambda msg: print(msg, flush=True))
    configs = [normalize_config(c) for c in configs]
    done = {config_key(r) for r in read_results(csv_path)}
    todo = [c for c in configs if config_key(c) not in done]
    skipped = len(configs) - len(todo)
    if skipped:
        log(f"[sweep] {skipped} of {len(configs)} trials already in {csv_path}: skipped")
    best: Optional[Tuple[float, str]] = None
    for r in read_results(csv_path):
        if objective in r and not math.isnan(r[objective]):
            if best is None or r[objective] > best[0]:
                best = (r[objective], _describe(r))
    for i, cfg in enumerate(todo, start=skipped + 1):
        log(f"[sweep] trial {i}/{len(configs)}: {_describe(cfg)} ...")
        metrics = run_trial_config(cfg, data, teachers=teachers, **trial_kwargs)
        append_result(csv_path, {**cfg, **metrics})
        if best is None or metrics[objective] > best[0]:
            best = (metrics[objective], _describe(cfg))
        # run_trial_config always fills test_accuracy: reported beside, never ranked on.
        columns = [objective] + (["test_accuracy"] if objective != "test_accuracy" else [])
        shown = "".join(f" {m}={metrics[m]:.4f}" for m in columns)
        log(f"[sweep] trial {i}/{len(configs)} done in {metrics['wall_time']:.1f} s:{shown} | "
            f"best {objective} {best[0]:.4f} ({best[1]})")
    return read_results(csv_path)
