"""Bit-width search: per-layer kernel widths under a size budget, with distillation in the loop.

A keras-tuner ``Tuner`` (:class:`BitWidthTuner`, its ``run_trial`` path) chooses a width per
weighted layer from ``choices`` (first and last layers fixed at ``first_last_bits``). Every
candidate is first brought within the budget (:func:`fit_to_budget`: the budget is a hard
constraint on the kernel bytes, computed from the shapes by :mod:`tfqkd.budget`), then scored
by a cheap proxy: quantize the float student at those widths, fine-tune it briefly with KD and
coefficient reducing (λ 0.5 → 0; hard labels with ``kd=False``, the AutoQKeras-style baseline),
and measure accuracy on the validation split. A latency budget (``max_latency_ms``) is a measured
constraint too: each candidate's runtime file is exported and timed with LiteRT
(:class:`tfqkd.latency.LatencyProbe`) and widened until it meets the budget
(:func:`fit_to_latency`). Any keras-tuner oracle drives it; a rerun with the
same ``directory`` resumes, skipping finished trials.

Example:
    >>> import tfqkd
    >>> model = tfqkd.models.tiny_resnet(seed=0)
    >>> widths = {"stem_conv": 8, "stage1_block1_conv1": 8, "stage1_block1_conv2": 8,
    ...           "stage2_block1_conv1": 8, "stage2_block1_conv2": 8,
    ...           "stage2_block1_proj_conv": 8, "classifier": 8}
    >>> fitted = fit_to_budget(model, widths, max_bytes=3000, storage="int4", choices=(2, 4, 8))
    >>> fitted["stage2_block1_conv2"], tfqkd.budget.kernel_bytes(model, fitted, "int4") <= 3000
    (4, True)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tfqkd._io import atomic_write
from tfqkd._keras import keras, tf
from tfqkd.budget import STORAGES, kernel_bytes, kernel_shapes, layer_widths, tensor_bytes
from tfqkd.layer_bits import weighted_layers
from tfqkd.quantize_registry import first_and_last_layers
from tfqkd.quantizers.symmetric import check_bits
from tfqkd.tuning.crash_safe import CrashSafeTunerSaves, crash_safe_oracle

__all__ = ["fit_to_budget", "fit_to_latency", "BitWidthSpace", "BitWidthTuner", "pareto_front"]


def fit_to_budget(model: keras.Model, widths: Mapping[str, int], max_bytes: int, storage: str,
                  choices: Sequence[int], per_channel: bool = False,
                  frozen: Sequence[str] = ()) -> Dict[str, int]:
    """``widths`` narrowed until the kernels take at most ``max_bytes`` (:func:`kernel_bytes`).

    Each step moves one layer to the next smaller width in ``choices``: the one that saves the
    most bytes (ties: the first in the model). Layers in ``frozen`` keep their width.

    Raises:
        ValueError: the budget cannot be met even with every free layer at the narrowest width.
    """
    choices = sorted({check_bits(b, "choices") for b in choices})
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r} unknown; choose one of {', '.join(STORAGES)}.")
    shapes = kernel_shapes(model)  # once: each step below prices one layer's change only
    out = dict(widths)

    def layer_bytes(name: str, bits: int) -> int:
        n, channels = shapes[name]
        return tensor_bytes(n, bits, storage, num_steps=channels if per_channel else 1)

    current = kernel_bytes(model, out, storage, per_channel=per_channel, shapes=shapes)
    while current > max_bytes:
        best: Optional[Tuple[int, str, int]] = None
        for name in shapes:
            if name in frozen:
                continue
            lower = [b for b in choices if b < out[name]]
            if not lower:
                continue
            saved = layer_bytes(name, out[name]) - layer_bytes(name, lower[-1])
            if saved > 0 and (best is None or saved > best[0]):
                best = (saved, name, lower[-1])
        if best is None:
            raise ValueError(
                f"the kernels need {current} bytes in {storage} at the narrowest widths allowed "
                f"({min(choices)} bits, {len(frozen)} fixed layers), over max_bytes={max_bytes}: "
                "raise max_bytes, allow narrower choices or free the first/last layers.")
        out[best[1]] = best[2]
        current -= best[0]
    return out


def fit_to_latency(model: keras.Model, widths: Mapping[str, int], max_latency_ms: float,
                   latency_of: Callable[[Mapping[str, int]], float], runtime: str,
                   choices: Sequence[int], *, max_bytes: Optional[int] = None,
                   storage: str = "int4", per_channel: bool = False,
                   frozen: Sequence[str] = ()) -> Tuple[Dict[str, int], float]:
    """``widths`` widened until ``latency_of(widths)`` (a measurement, e.g. a
    :class:`tfqkd.latency.LatencyProbe`) is at most ``max_latency_ms``; returns the widths and
    their measured milliseconds.

    Each step widens the largest free kernel that changes its storage in the ``runtime`` file
    (``"int4"``: from <= 4 bits to the next choice above 4; INT4 kernels run slower than int8 ones
    on LiteRT's CPU kernels, docs/export.md) to that width, if the kernels then still fit
    ``max_bytes`` in ``storage``; then measures again.

    Raises:
        ValueError: no such widening is left and the measurement is still over the budget.
    """
    choices = sorted({check_bits(b, "choices") for b in choices})
    shapes = kernel_shapes(model)
    out = dict(widths)
    measured = float(latency_of(out))
    while measured > max_latency_ms:
        step = None
        for name in sorted(shapes, key=lambda n: -shapes[n][0]):
            if name in frozen:
                continue
            n = shapes[name][0]
            now = tensor_bytes(n, out[name], runtime)
            wider = [b for b in choices if b > out[name] and tensor_bytes(n, b, runtime) != now]
            if not wider:
                continue
            candidate = dict(out, **{name: wider[0]})
            if max_bytes is None or kernel_bytes(model, candidate, storage, per_channel,
                                                 shapes=shapes) <= max_bytes:
                step = candidate
                break
        if step is None:
            raise ValueError(
                f"measured {measured:.3f} ms > max_latency_ms={max_latency_ms:g} and no kernel is "
                f"left to widen in the {runtime} file within the bytes budget: raise "
                "max_latency_ms or max_bytes, or allow wider choices (width does not change an "
                "int8 file's speed).")
        out = step
        measured = float(latency_of(out))
    return out, measured


class BitWidthSpace:
    """The search space: one ``keras_tuner`` choice per free weighted layer, repaired to the budget.

    Args:
        model: The float student (its layer names and kernel shapes).
        max_bytes: Kernel-bytes budget in ``storage`` (:mod:`tfqkd.budget`); None: no size
            budget (then give ``max_latency_ms``).
        storage: ``"int8"``, ``"int4"`` or ``"packed"``.
        choices: Widths a free layer may take.
        first_last_bits: Width of the first / last weighted layers (fixed, not searched).
        per_channel: Steps per channel (counts in the packed budget).
        max_latency_ms: Latency budget, measured by ``latency_of`` (a
            :class:`tfqkd.latency.LatencyProbe`: the candidate's ``runtime`` file run by
            LiteRT on this machine); candidates are widened to it (:func:`fit_to_latency`)
            after being narrowed to ``max_bytes``.
        latency_of: ``widths -> milliseconds``; required with ``max_latency_ms``.
        runtime: The file the latency is measured on: ``"int4"`` or ``"int8"``.

    ``latency`` holds the last candidate's measured milliseconds (None without a latency
    budget).
    """

    def __init__(self, model: keras.Model, max_bytes: Optional[int], storage: str = "int4",
                 choices: Sequence[int] = (2, 4, 8), first_last_bits: int = 8,
                 per_channel: bool = False, max_latency_ms: Optional[float] = None,
                 latency_of: Optional[Callable[[Mapping[str, int]], float]] = None,
                 runtime: str = "int4"):
        if max_bytes is None and max_latency_ms is None:
            raise ValueError("give a budget: max_bytes (kernel bytes) and/or max_latency_ms.")
        if max_latency_ms is not None and latency_of is None:
            raise ValueError("max_latency_ms needs latency_of, e.g. a "
                             "tfqkd.latency.LatencyProbe(student, mode=runtime, ...).")
        self.model = model
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.storage = storage
        self.choices = sorted({check_bits(b, "choices") for b in choices})
        self.per_channel = per_channel
        self.max_latency_ms = None if max_latency_ms is None else float(max_latency_ms)
        self.latency_of = latency_of
        self.runtime = runtime
        self.latency: Optional[float] = None
        first, last = first_and_last_layers(model)
        self.fixed = {name: check_bits(first_last_bits, "first_last_bits") for name in first + last}
        self.free = [layer.name for layer in weighted_layers(model) if layer.name not in self.fixed]
        # Fails early, naming the fix, if no choice at all fits: the narrowest widths for the
        # size, the widest within the size for the latency.
        if self.max_bytes is not None:
            fit_to_budget(model, layer_widths(model, min(self.choices), first_last_bits),
                          self.max_bytes, storage, self.choices, per_channel,
                          frozen=list(self.fixed))
        if self.max_latency_ms is not None:
            self._fit(layer_widths(model, max(self.choices), first_last_bits))

    def _fit(self, chosen: Mapping[str, int]) -> Dict[str, int]:
        out = dict(chosen)
        if self.max_bytes is not None:
            out = fit_to_budget(self.model, out, self.max_bytes, self.storage, self.choices,
                                self.per_channel, frozen=list(self.fixed))
        if self.max_latency_ms is not None:
            out, self.latency = fit_to_latency(
                self.model, out, self.max_latency_ms, self.latency_of, self.runtime,
                self.choices, max_bytes=self.max_bytes, storage=self.storage,
                per_channel=self.per_channel, frozen=list(self.fixed))
        return out

    def widths(self, hp) -> Dict[str, int]:
        """The widths ``hp`` (keras-tuner HyperParameters) chooses, narrowed to the size budget
        and then widened to the latency budget (each measured)."""
        chosen = dict(self.fixed)
        for name in self.free:
            chosen[name] = hp.Choice(f"bits/{name}", self.choices)
        return self._fit(chosen)

    def bytes_of(self, widths: Mapping[str, int]) -> int:
        """Kernel bytes of ``widths`` in this space's storage."""
        return kernel_bytes(self.model, widths, self.storage, per_channel=self.per_channel)


def _tuner_base():
    import keras_tuner

    return keras_tuner.Tuner


class BitWidthTuner(CrashSafeTunerSaves, _tuner_base()):
    """Scores each width choice with a short KD + CR fine-tune, on the validation split.

    Args:
        space: A :class:`BitWidthSpace`.
        student: The float student (trained: Algorithm 1 retrains it in the quantized domain).
        teacher: The float teacher (logits out), or a list of them (an ensemble averaging the
            softened probabilities); ignored with ``kd=False``.
        train: ``(images, labels)`` batches for the proxy fine-tune.
        validation: Batches the objective ``val_accuracy`` is measured on (never the test split).
        proxy_epochs: Epochs of the proxy fine-tune.
        kd: KD + CR (λ 0.5 → 0) if True, hard labels if False (search without KD).
        temperature: KD temperature.
        learning_rate: Adam learning rate of the proxy.
        activation_bits: Passed to :func:`tfqkd.quantize_model`.
        step: The step estimator, passed to :func:`tfqkd.quantize_model` (``"l2"``, ``"std"``,
            ``"learned"``).
        **kwargs: ``keras_tuner.Tuner`` arguments (``oracle``, ``directory``, ``project_name``).

    Each finished trial writes ``trial_<id>_widths.json`` (widths, kernel bytes, measured
    latency with a latency budget, validation accuracy) in the project directory: the Pareto
    front is read from those. keras-tuner's own project files are written atomically
    (:mod:`tfqkd.tuning.crash_safe`), so a search killed at any moment resumes.
    """

    def __init__(self, space: BitWidthSpace, student: keras.Model,
                 teacher: Union[keras.Model, Sequence[keras.Model], None],
                 train: tf.data.Dataset, validation: tf.data.Dataset, proxy_epochs: int = 1,
                 kd: bool = True, temperature: float = 4.0, learning_rate: float = 1e-3,
                 activation_bits: Optional[int] = None, step: str = "l2", **kwargs: Any):
        if kwargs.get("oracle") is not None:
            kwargs["oracle"] = crash_safe_oracle(kwargs["oracle"])
        super().__init__(**kwargs)
        if isinstance(teacher, (list, tuple)):
            teacher = list(teacher) if len(teacher) > 1 else (teacher[0] if teacher else None)
        if kd and teacher is None:
            raise ValueError("kd=True needs a teacher; pass kd=False to search without KD.")
        self.space = space
        self.student = student
        self.teacher = teacher
        self.train_data = train
        self.validation_data = validation
        self.proxy_epochs = int(proxy_epochs)
        self.kd = bool(kd)
        self.temperature = float(temperature)
        self.learning_rate = float(learning_rate)
        self.activation_bits = activation_bits
        self.step = step

    def quantized_student(self, widths: Mapping[str, int]) -> keras.Model:
        """The float student quantized at ``widths``."""
        from tfqkd.quantize import quantize_at_widths

        return quantize_at_widths(self.student, widths, activation_bits=self.activation_bits,
                                  per_channel=self.space.per_channel, step=self.step)

    def run_trial(self, trial, *args, **kwargs) -> Dict[str, float]:
        from tfqkd.callbacks import CoefficientScheduler
        from tfqkd.distiller import Distiller
        from tfqkd.training import evaluate_accuracy, make_optimizer

        widths = self.space.widths(trial.hyperparameters)
        q = self.quantized_student(widths)
        batches = int(self.train_data.cardinality())
        if batches < 0:  # unknown (a filtered or generated pipeline): count it once
            batches = sum(1 for _ in self.train_data)
        steps = batches * self.proxy_epochs
        optimizer = make_optimizer("adam", self.learning_rate)
        callbacks = []
        if self.kd:
            model = Distiller(q, self.teacher, temperature=self.temperature, coefficient=0.5)
            model.compile(optimizer=optimizer)
            callbacks.append(CoefficientScheduler("linear", start=0.5, end=0.0,
                                                  total_steps=max(1, steps)))
        else:
            model = q
            model.compile(optimizer=optimizer,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(self.train_data, epochs=self.proxy_epochs, verbose=0, callbacks=callbacks)
        accuracy = evaluate_accuracy(q, self.validation_data)
        record = {"trial_id": trial.trial_id, "widths": dict(widths),
                  "kernel_bytes": self.space.bytes_of(widths), "val_accuracy": accuracy,
                  "kd": self.kd, "latency_ms": self.space.latency}
        atomic_write(os.path.join(self.project_dir, f"trial_{trial.trial_id}_widths.json"),
                     json.dumps(record, sort_keys=True).encode())
        return {"val_accuracy": accuracy, "kernel_bytes": float(record["kernel_bytes"])}

    def trial_records(self) -> Sequence[Dict[str, Any]]:
        """Every finished trial's record (widths, kernel bytes, validation accuracy), by id."""
        out = []
        for name in sorted(os.listdir(self.project_dir)):
            if name.startswith("trial_") and name.endswith("_widths.json"):
                with open(os.path.join(self.project_dir, name)) as f:
                    out.append(json.load(f))
        return out


def pareto_front(records: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """The records no other record beats on both kernel bytes (fewer) and accuracy (higher),
    by increasing bytes.

    Example:
        >>> [r["id"] for r in pareto_front([{"id": 1, "kernel_bytes": 10, "val_accuracy": 0.5},
        ...                                 {"id": 2, "kernel_bytes": 20, "val_accuracy": 0.4},
        ...                                 {"id": 3, "kernel_bytes": 30, "val_accuracy": 0.7}])]
        [1, 3]
    """
    ordered = sorted(records, key=lambda r: (r["kernel_bytes"], -r["val_accuracy"]))
    front, best = [], -np.inf
    for r in ordered:
        if r["val_accuracy"] > best:
            front.append(r)
            best = r["val_accuracy"]
    return front
