"""Latency of TFLite files measured with LiteRT on this machine, and of quantized candidates.

What a latency budget constrains: a measured figure, not an estimate. :func:`median_latency_ms`
times interpreters side by side (rounds in a rotating order, the median of the per-round means,
so a change of the machine's speed during the run hits every file alike);
:func:`tflite_latency_ms` times one file; :class:`LatencyProbe` quantizes a float student at
given per-layer widths, exports it as the runtime file (``"int8"`` or ``"int4"``) and times it,
which is what :class:`tfqkd.search.BitWidthSpace` checks a ``max_latency_ms`` budget with.

On LiteRT's CPU kernels the width changes the runtime format only in ``"int4"`` files (kernels at
<= 4 bits are INT4 tensors); an INT4 file ran 4x slower than the int8 file of the same ResNet20
on an AMD EPYC (docs/export.md), so under a latency budget layers are *widened*.

Example:
    >>> import os, tempfile, numpy as np, tfqkd
    >>> from tfqkd import export
    >>> path = os.path.join(tempfile.mkdtemp(), "m.tflite")
    >>> _ = export.export_tflite(tfqkd.models.tiny_resnet(seed=0), path, mode="float")
    >>> ms = tflite_latency_ms(path, rounds=3, inner=5)
    >>> bool(0 < ms < 1000)
    True
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Dict, Hashable, Mapping, Union

import numpy as np

from tfqkd._keras import keras

__all__ = ["median_latency_ms", "tflite_latency_ms", "LatencyProbe"]


def _ready_interpreter(path: Union[str, os.PathLike, bytes], threads: int):
    """A LiteRT interpreter of the file with its inputs set (zeros: the kernels' cost does not
    depend on the values)."""
    from ai_edge_litert.interpreter import Interpreter

    kwargs = ({"model_content": path} if isinstance(path, bytes)
              else {"model_path": os.fspath(path)})
    interpreter = Interpreter(num_threads=int(threads), **kwargs)
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        shape = [1 if d < 0 else int(d) for d in detail["shape_signature"]]
        if list(detail["shape"]) != shape:
            interpreter.resize_tensor_input(detail["index"], shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], np.zeros(shape, detail["dtype"]))
    return interpreter


def median_latency_ms(interpreters: Mapping[Hashable, Any], *, warmup: int = 5,
                      rounds: int = 15, inner: int = 20) -> Dict[Hashable, float]:
    """``{key: median ms per invoke}`` of interpreters whose inputs are set, timed side by side.

    Each gets ``warmup`` untimed invocations; then every round runs each one ``inner`` times, in
    an order rotating by round; the figure is the median of the per-round means.
    """
    keys = list(interpreters)
    for it in interpreters.values():
        for _ in range(warmup):
            it.invoke()
    samples: Dict[Hashable, list] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            it = interpreters[k]
            t0 = time.perf_counter()
            for _ in range(inner):
                it.invoke()
            samples[k].append((time.perf_counter() - t0) / inner * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def tflite_latency_ms(path: Union[str, os.PathLike, bytes], threads: int = 1, *,
                      warmup: int = 5, rounds: int = 15, inner: int = 20) -> float:
    """Median milliseconds per batch-1 invocation of the ``.tflite`` file (path or content)
    with ``threads`` LiteRT threads."""
    return median_latency_ms({0: _ready_interpreter(path, threads)}, warmup=warmup,
                             rounds=rounds, inner=inner)[0]


class LatencyProbe:
    """Measures the runtime file of a float student quantized at per-layer widths.

    Args:
        student: The float student.
        mode: The runtime file: ``"int8"`` or ``"int4"`` (:func:`tfqkd.export.export_tflite`).
        representative_data: Calibration images for the export (a few batches suffice: the
            ranges do not change the kernels' cost).
        threads: LiteRT threads.
        rounds, inner: Timing (:func:`median_latency_ms`).
        **quantize_kwargs: Passed to :func:`tfqkd.quantize_model` (``activation_bits``,
            ``per_channel``, ``step``); ``layer_bits`` comes from the widths.

    Calling the probe with widths returns the milliseconds, measured once per distinct widths
    (kept in ``measured``).
    """

    def __init__(self, student: keras.Model, mode: str = "int4", representative_data: Any = None,
                 threads: int = 1, rounds: int = 15, inner: int = 20, **quantize_kwargs: Any):
        if mode not in ("int8", "int4"):
            raise ValueError(f"latency is measured on the runtime file: mode 'int8' or 'int4', "
                             f"got {mode!r}.")
        self.student = student
        self.mode = mode
        self.representative_data = representative_data
        self.threads = int(threads)
        self.rounds = int(rounds)
        self.inner = int(inner)
        self.quantize_kwargs = dict(quantize_kwargs)
        self.measured: Dict[tuple, float] = {}

    def __call__(self, widths: Mapping[str, int]) -> float:
        key = tuple(sorted(widths.items()))
        if key not in self.measured:
            self.measured[key] = self._measure(widths)
        return self.measured[key]

    def _measure(self, widths: Mapping[str, int]) -> float:
        from tfqkd.export import export_tflite
        from tfqkd.quantize import quantize_at_widths

        q = quantize_at_widths(self.student, widths, **self.quantize_kwargs)
        directory = tempfile.mkdtemp(prefix="tfqkd-latency-")
        try:
            path = os.path.join(directory, f"candidate_{self.mode}.tflite")
            export_tflite(q, path, self.representative_data, mode=self.mode, num_calibration=64)
            return tflite_latency_ms(path, self.threads, rounds=self.rounds, inner=self.inner)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
