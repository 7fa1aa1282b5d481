"""Symmetric uniform weight quantization (Eq. 1/2), step-size estimators and tfmot quantizers.

The weight quantizer of the paper is symmetric and uniform with step size ``Δ``::

    b = 1:  Q(w) = Δ · sign(w)                                        (Eq. 1, sign(0) := +1)
    b > 1:  Q(w) = sign(w) · Δ · min(floor(|w| / Δ + 0.5), (M − 1) / 2),  M = 2^b − 1   (Eq. 2)

so a ``b``-bit weight takes one of ``M = 2^b − 1`` levels ``{−K, …, 0, …, K} · Δ`` with
``K = 2^(b−1) − 1`` (2 bits is ternary ``{−Δ, 0, Δ}``; 8 bits is TFLite's narrow-range int8),
and a 1-bit weight one of ``{−Δ, +Δ}``.

``Δ`` comes from one of three rules:

* ``"l2"`` (:func:`l2_optimal_step`): minimises ``‖w − Q(w)‖²`` by a batched coarse and fine
  candidate search followed by Lloyd-style alternation (see the function for the algorithm);
* ``"std"`` (:func:`std_step`): a fixed multiple of the weights' RMS, the multiple that is
  L2-optimal for Gaussian weights at that bit-width (:data:`GAUSSIAN_STEP_RATIO`);
* ``"learned"``: an LSQ-style trainable ``Δ`` (Esser et al. 2020), initialised with the L2 step.

:class:`SymmetricQuantizer` applies Q to a layer's kernel during quantization-aware training
with a straight-through gradient to the float "shadow" weights; :class:`ActivationQuantizer`
quantizes non-negative (post-ReLU) activations to an unsigned b-bit grid on ``[0, clip]``.

Example:
    >>> import numpy as np
    >>> from tfqkd.quantizers import symmetric_quantize, l2_optimal_step
    >>> w = np.array([-0.9, -0.6, 0.05, 0.4, 1.1], np.float32)
    >>> symmetric_quantize(w, bits=2, step=0.5).numpy().tolist()
    [-0.5, -0.5, 0.0, 0.5, 0.5]
    >>> step = l2_optimal_step(w, bits=2)
    >>> sorted(set(np.round(symmetric_quantize(w, 2, step).numpy() / step.numpy(), 6).tolist()))
    [-1.0, 0.0, 1.0]
"""

from tfqkd.quantizers.activations import (
    CLIP_KINDS,
    ActivationQuantizer,
    FixedRangeQuantizer,
    RangeQuantizer,
)
from tfqkd.quantizers.symmetric import (  # noqa: F401  (L2_*: module constants before the split)
    GAUSSIAN_STEP_RATIO,
    L2_CANDIDATES,
    L2_ITERATIONS,
    L2_REFINE_CANDIDATES,
    L2_THOROUGH,
    STEP_KINDS,
    check_bits,
    l2_optimal_step,
    max_level,
    num_levels,
    std_step,
    symmetric_quantize,
)
from tfqkd.quantizers.weights import SymmetricQuantizer

__all__ = [
    "symmetric_quantize",
    "l2_optimal_step",
    "std_step",
    "num_levels",
    "max_level",
    "check_bits",
    "SymmetricQuantizer",
    "ActivationQuantizer",
    "RangeQuantizer",
    "FixedRangeQuantizer",
    "GAUSSIAN_STEP_RATIO",
    "STEP_KINDS",
    "CLIP_KINDS",
]
