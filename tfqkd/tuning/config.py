"""A trial's config: the hyper-parameters of one quantized distillation, validated and keyed.

A trial is described by a plain ``dict`` with the keys of :data:`HYPERPARAMETERS`;
:func:`normalize_config` validates it and fills in defaults, :func:`config_key` identifies it
(a grid sweep skips the configs already in its CSV by this key).

Example:
    >>> cfg = normalize_config({"temperature": "4", "teacher": 2.0, "schedule": "linear"})
    >>> cfg["temperature"], cfg["teacher"], cfg["schedule"], cfg["weight_bits"]
    (4.0, '2', 'linear', 2)
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["HYPERPARAMETERS", "METRICS", "SCHEDULES", "NO_TEACHER", "normalize_config",
           "config_key"]


#: Columns that identify a trial (the hyper-parameters), in CSV order.
HYPERPARAMETERS: Tuple[str, ...] = (
    "temperature", "coefficient", "schedule", "teacher", "weight_bits", "activation_bits",
    "epochs",
)
#: Columns a finished trial reports.
METRICS: Tuple[str, ...] = ("val_accuracy", "test_accuracy", "train_accuracy", "teacher_accuracy",
                             "wall_time")
#: Coefficient schedules: fixed λ, or coefficient reducing (λ linear from its value to 0).
SCHEDULES: Tuple[str, ...] = ("constant", "linear")
#: Teacher key of the hard-label baseline (no distillation).
NO_TEACHER = "none"

_DEFAULTS: Dict[str, Any] = {
    "temperature": 1.0, "coefficient": 0.5, "schedule": "constant", "teacher": NO_TEACHER,
    "weight_bits": 2, "activation_bits": None, "epochs": 1,
}


def _teacher_key(value: Any) -> str:
    """Canonical teacher key: widths as ``f"{w:g}"`` (``2.0`` → ``"2"``), anything else as text."""
    if value is None:
        return NO_TEACHER
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{float(value):g}"
    text = str(value).strip()
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _teacher_width(key: str) -> Optional[float]:
    try:
        return float(key)
    except (TypeError, ValueError):
        return None


def _optional_int(value: Any) -> Optional[int]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return int(float(value))


def normalize_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Validates a trial config and fills in defaults, returning a new dict with canonical types.

    Raises:
        ValueError: naming the bad value and the accepted range (τ ≤ 0, λ outside [0, 1], an
            unknown schedule, a bit-width outside 1..8, epochs < 1).

    Example:
        >>> normalize_config({"temperature": "4", "teacher": 2.0})["teacher"]
        '2'
        >>> normalize_config({"temperature": 0})
        Traceback (most recent call last):
        ...
        ValueError: temperature must be > 0 (e.g. 1, 2, 4, 10), got 0.0.
    """
    unknown = set(config) - set(_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown trial config keys {sorted(unknown)}; accepted keys are {list(_DEFAULTS)}."
        )
    cfg = dict(_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if v is not None or k == "activation_bits"})
    cfg["temperature"] = float(cfg["temperature"])
    if not cfg["temperature"] > 0:
        raise ValueError(
            f"temperature must be > 0 (e.g. 1, 2, 4, 10), got {cfg['temperature']!r}."
        )
    cfg["coefficient"] = float(cfg["coefficient"])
    if not 0.0 <= cfg["coefficient"] <= 1.0:
        raise ValueError(
            f"coefficient λ must be in [0, 1] (0 = hard labels only, 1 = soft targets only), "
            f"got {cfg['coefficient']!r}."
        )
    cfg["schedule"] = str(cfg["schedule"]).strip().lower()
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(
            f"schedule must be one of {SCHEDULES} ('linear' = coefficient reducing), "
            f"got {cfg['schedule']!r}."
        )
    cfg["teacher"] = _teacher_key(cfg["teacher"])
    cfg["weight_bits"] = int(float(cfg["weight_bits"]))
    if not 1 <= cfg["weight_bits"] <= 8:
        raise ValueError(f"weight_bits must be in 1..8, got {cfg['weight_bits']!r}.")
    cfg["activation_bits"] = _optional_int(cfg["activation_bits"])
    if cfg["activation_bits"] is not None and not 1 <= cfg["activation_bits"] <= 8:
        raise ValueError(
            f"activation_bits must be None (float activations) or in 1..8, "
            f"got {cfg['activation_bits']!r}."
        )
    cfg["epochs"] = int(float(cfg["epochs"]))
    if cfg["epochs"] < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg['epochs']!r}.")
    return cfg


def config_key(config: Mapping[str, Any]) -> Tuple[str, ...]:
    """A hashable identity of a config (or of a CSV row): equal keys = the same trial.

    Example:
        >>> config_key({"temperature": 4, "teacher": "2.0"}) == config_key(
        ...     {"temperature": "4.0", "teacher": 2})
        True
    """
    cfg = normalize_config({k: config[k] for k in HYPERPARAMETERS if k in config})
    return tuple(
        "none" if cfg[k] is None else (f"{cfg[k]:g}" if isinstance(cfg[k], float) else str(cfg[k]))
        for k in HYPERPARAMETERS
    )
