"""The teacher's forward pass in inference form: batch norm folded, optionally in bfloat16.

A teacher only ever runs with ``training=False`` and no gradient, so the :class:`tfqkd.Distiller`
runs a frozen copy of it instead (:class:`InferenceTeacher`): every batch norm that follows a
convolution or dense layer is folded into that layer's kernel and bias (one op instead of two;
the fold is :func:`tfqkd.export.forward`'s, the one the exporter uses), and with
``dtype="bfloat16"`` the copy computes in bfloat16 (weights stored in bfloat16, logits returned in
float32), which CPUs with AMX or AVX512-BF16 run several times faster than float32.

The copy holds its own variables. :meth:`InferenceTeacher.refresh` copies the teacher's current
weights into it; the Distiller calls it at the start of every ``fit``/``evaluate`` and on every
eager call, so a teacher whose weights are loaded or changed between runs is followed. A teacher
changed *during* a ``fit`` (by a callback) is not: use ``Distiller(..., teacher_inference=False)``.

Before it is used, the copy is checked against the teacher on a random probe batch; a model the
copy cannot reproduce (a subclassed model, a nested model, a layer whose config does not round-trip)
falls back to the teacher itself (``InferenceTeacher.model is teacher``), with a warning when
bfloat16 was asked for. Measured costs and accuracy: ``docs/distillation.md``.

Example:
    >>> import numpy as np, tfqkd
    >>> t = tfqkd.models.tiny_resnet(seed=0)
    >>> fast = InferenceTeacher(t)
    >>> x = np.random.rand(4, 8, 8, 1).astype("float32")
    >>> bool(np.allclose(fast(x), t(x, training=False), atol=1e-4)), fast.folded
    (True, 6)
"""

from __future__ import annotations

import os
import warnings
from typing import Any, List, Optional, Tuple

import numpy as np

from tfqkd._graph import GraphError, finalize_layer_states, rebuild
from tfqkd._keras import keras, tf

__all__ = ["InferenceTeacher", "TEACHER_DTYPES", "probe_error", "native_bfloat16",
           "resolve_teacher_dtype"]

#: The compute types a teacher copy may use; ``"auto"`` picks one (:func:`resolve_teacher_dtype`).
TEACHER_DTYPES = ("auto", "float32", "bfloat16")

#: Largest |copy - teacher| / (1 + |teacher|) on the probe batch for a float32 copy to be used
#: (folding reorders float32 arithmetic: measured ~1e-6 on ResNets).
FLOAT32_TOLERANCE = 1e-3
#: The same for a bfloat16 copy (8-bit mantissa: measured up to ~0.05 relative on random
#: networks and inputs); beyond it the copy is wrong, not merely rounded.
BFLOAT16_TOLERANCE = 0.25


def _kernel_layers():
    from tfqkd.qat_weights import KERNEL_LAYERS

    return KERNEL_LAYERS


def _keeps_float32(layer, model) -> bool:
    """Output layers and softmaxes stay float32: the logits (or probabilities) keep full precision."""
    is_output = any(layer is t._keras_history.layer for t in model.outputs)  # noqa: SLF001
    act = getattr(layer, "activation", None)
    return is_output or isinstance(layer, keras.layers.Softmax) or \
        getattr(act, "__name__", "") == "softmax"


def native_bfloat16() -> bool:
    """Whether bfloat16 convolutions run natively here: TensorFlow on the CPU only, with oneDNN on,
    on a CPU with AMX-BF16 or AVX512-BF16 (Linux ``/proc/cpuinfo``). Elsewhere bfloat16 is
    emulated, slower than float32.

    Example:
        >>> isinstance(native_bfloat16(), bool)
        True
    """
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") == "0" or tf.config.list_physical_devices("GPU"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_teacher_dtype(dtype: str) -> str:
    """``"auto"`` becomes ``"bfloat16"`` where :func:`native_bfloat16`, else ``"float32"``.

    Example:
        >>> resolve_teacher_dtype("float32")
        'float32'
    """
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {dtype!r}.")
    if dtype == "auto":
        return "bfloat16" if native_bfloat16() else "float32"
    return dtype


def probe_error(a, b) -> float:
    """``max |a - b| / (1 + |b|)``: the relative (large values) or absolute (small) difference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / (1.0 + np.abs(b)))) if a.size else 0.0


class InferenceTeacher:
    """A frozen, batch-norm-folded copy of ``teacher`` computing in ``dtype``; call it like a model.

    Args:
        teacher: A built ``tf_keras`` model (functional or Sequential for the copy to be made).
        dtype: ``"float32"``, ``"bfloat16"`` (see the module docstring) or ``"auto"``
            (:func:`resolve_teacher_dtype`).
        fold: Fold batch norm into the preceding kernel layers (default). ``False`` copies them.

    Attributes:
        model: The copy, or ``teacher`` itself when no copy could be made (see :attr:`reason`).
        folded: How many batch norms were folded.
        reason: Why the teacher itself is used, or None.

    Example:
        >>> import tfqkd
        >>> InferenceTeacher(tfqkd.models.tiny_resnet(seed=0), "bfloat16").model.get_layer("stem_conv").dtype
        'bfloat16'
    """

    def __init__(self, teacher: keras.Model, dtype: str = "float32", fold: bool = True):
        dtype = resolve_teacher_dtype(dtype)
        self.teacher, self.dtype = teacher, dtype
        self._pairs: List[Tuple[Any, Any, Any]] = []  # (copy layer, teacher layer, folded bn)
        self.folded, self.reason = 0, None
        try:
            self.model = self._build(teacher, dtype, fold)
            self.refresh()
            err = self._probe()
        except Exception as e:  # noqa: BLE001  (any failure: the teacher itself is always correct)
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            self._fallback(f"the copy could not be built ({type(e).__name__}: {first_line})")
            return
        limit = BFLOAT16_TOLERANCE if dtype == "bfloat16" else FLOAT32_TOLERANCE
        if not err <= limit:
            self._fallback(f"the copy differs from the teacher by {err:.3g} (> {limit:g}) on a "
                           "random probe batch")

    def _fallback(self, why: str) -> None:
        self.model, self._pairs, self.folded, self.reason = self.teacher, [], 0, why
        if self.dtype != "float32":
            warnings.warn(f"teacher {self.teacher.name!r} runs as it is (float32, batch norm not "
                          f"folded): {why}.", stacklevel=3)

    def _build(self, teacher: keras.Model, dtype: str, fold: bool) -> keras.Model:
        from tfqkd.export.forward import _fold_plan

        plan = _fold_plan(teacher) if fold and getattr(teacher, "_is_graph_network", False) else {}
        folded_bns = {id(bn) for bn in plan.values()}
        kernel_layers = _kernel_layers()

        def layer_fn(layer, args, kwargs):
            if id(layer) in folded_bns:  # its kernel layer applies it
                return args[0] if len(args) == 1 else args
            if isinstance(layer, keras.Model):
                raise GraphError(f"nested model {layer.name!r}")
            config = layer.get_config()
            config["dtype"] = "float32" if _keeps_float32(layer, teacher) else dtype
            bn = plan.get(id(layer))
            if bn is not None and isinstance(layer, kernel_layers):
                config["use_bias"] = True
            clone = layer.__class__.from_config(config)
            out = clone(*args, **kwargs)
            self._pairs.append((clone, layer, bn))
            return out

        cast = (lambda t: tf.cast(t, dtype)) if dtype != "float32" else None
        model = rebuild(teacher, layer_fn, cast)
        self.folded = len(plan)
        model.trainable = False
        return model

    def refresh(self) -> None:
        """Copies the teacher's current weights (batch norm folded in) into the copy."""
        if not self._pairs:
            return
        from tfqkd.export.forward import _fold

        for clone, layer, bn in self._pairs:
            if bn is not None:
                kernel, bias, _ = _fold(layer, bn)
                weights = [kernel, bias] + layer.get_weights()[2:]
            else:
                weights = layer.get_weights()
            clone.set_weights(weights)
        finalize_layer_states(self.model)  # e.g. a Normalization layer's mean from its weights

    def _probe(self) -> float:
        shape = [2] + [d or 8 for d in self.teacher.input_shape[1:]]
        x = tf.random.stateless_uniform(shape, seed=[1, 2])
        return probe_error(self(x), tf.cast(self.teacher(x, training=False), tf.float32))

    def __call__(self, x, training: Optional[bool] = False) -> tf.Tensor:
        """The copy's output on ``x`` in float32 (``training`` is ignored: always inference)."""
        del training
        return tf.cast(self.model(x, training=False), tf.float32)
