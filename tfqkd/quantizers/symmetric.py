"""Eq. (1)/(2): symmetric uniform quantization and the rules that choose its step ``Δ``.

``symmetric_quantize(w, bits, step)`` is the quantizer of the paper; ``l2_optimal_step`` (the
default rule), ``std_step`` (Gaussian-optimal multiple of the RMS) choose ``Δ``; ``check_bits``,
``num_levels`` and ``max_level`` describe a bit-width. :mod:`tfqkd.quantizers.weights` wraps them
in a tfmot ``Quantizer``.

Example:
    >>> import numpy as np
    >>> import numpy as np
    >>> w = np.array([-0.9, 0.05, 1.1], np.float32)
    >>> symmetric_quantize(w, bits=2, step=0.5).numpy().tolist()
    [-0.5, 0.0, 0.5]
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Tuple

import numpy as np

from tfqkd._keras import tf
from tfqkd.quantizers._base import _TINY, _keep_nan, _no_autograph

__all__ = [
    "symmetric_quantize",
    "l2_optimal_step",
    "std_step",
    "num_levels",
    "max_level",
    "check_bits",
    "GAUSSIAN_STEP_RATIO",
    "STEP_KINDS",
    "L2_ITERATIONS",
    "L2_CANDIDATES",
    "L2_REFINE_CANDIDATES",
    "L2_THOROUGH",
]


#: Accepted step-size rules of :class:`SymmetricQuantizer`.
STEP_KINDS: Tuple[str, ...] = ("l2", "std", "learned")


#: ``Δ / σ`` that minimises the expected squared error of Eq. (1)/(2) for ``w ~ N(0, σ²)``,
#: per bit-width. Computed by numerical integration of ``E[(w − Q(w))²]`` on a fine grid and a
#: bounded scalar minimisation (1 bit: ``sqrt(2/π)`` exactly, the mean of ``|w|``). For a
#: Laplacian the optimum is 0.707, 1.414, 0.822, 0.487, … — larger, because of the heavier
#: tails — which is one reason why the ``"l2"`` rule, that fits the actual weights, is the
#: default.
GAUSSIAN_STEP_RATIO: Dict[int, float] = {
    1: 0.797885, 2: 1.224008, 3: 0.650770, 4: 0.353410,
    5: 0.193250, 6: 0.105488, 7: 0.057261, 8: 0.030870,
}

#: Default number of Lloyd assignment/refit rounds of :func:`l2_optimal_step` after the
#: candidate search. Each round is a few element-wise ops and two reductions.
L2_ITERATIONS = 2
#: Default number of coarse candidate steps scored by :func:`l2_optimal_step` (the std step and a
#: geometric grid of one fewer).
L2_CANDIDATES = 12
#: Default number of fine candidate steps scored around the best coarse one.
L2_REFINE_CANDIDATES = 12
#: Coarse candidates of :func:`l2_optimal_step` above the top of its geometric grid (the larger
#: of the std step and the no-clipping step ``max|w|/K``), as fractions above it. The least
#: error can lie there: with few or heavy-tailed weights the top level may stay unused
#: (measured: 3.2 % above ``max|w|/K`` at 6 bits and 4.4 % at 7, rows of 256 weights).
_ABOVE_HI: Tuple[float, ...] = (0.025, 0.05)
#: Keyword arguments of :func:`l2_optimal_step` for a search within 0.1 % of a fine grid at every
#: bit-width (measured in ``tools/benchmark_l2_step.py``), at several times the default's cost.
L2_THOROUGH: Dict[str, int] = {"candidates": 25, "refine_candidates": 12, "basins": 3,
                               "polish_candidates": 12}


def check_bits(bits: Any, name: str = "bits") -> int:
    """Returns ``bits`` as an ``int`` after checking that it is an integer in 1..8.

    Example:
        >>> check_bits(4)
        4
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= int(bits) <= 8:
        raise ValueError(
            f"{name} must be an integer bit-width in 1..8, got {bits!r}; pass e.g. {name}=2 "
            "(ternary) or 8."
        )
    return int(bits)


def num_levels(bits: int) -> int:
    """Number of distinct values Q can produce: 2 for 1 bit, ``2^b − 1`` otherwise.

    Example:
        >>> [num_levels(b) for b in (1, 2, 3, 8)]
        [2, 3, 7, 255]
    """
    bits = check_bits(bits)
    return 2 if bits == 1 else 2 ** bits - 1


def max_level(bits: int) -> int:
    """Largest integer level ``K = (M − 1) / 2 = 2^(b−1) − 1`` (1 for 1 bit: ``±Δ``).

    Example:
        >>> [max_level(b) for b in (1, 2, 3, 8)]
        [1, 1, 3, 127]
    """
    bits = check_bits(bits)
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


@_no_autograph
def symmetric_quantize(w, bits: int, step) -> tf.Tensor:
    """Eq. (1)/(2): the symmetric uniform ``bits``-bit quantization of ``w`` with step ``step``.

    Args:
        w: Tensor (or array) to quantize.
        bits: Bit-width, an integer in 1..8.
        step: ``Δ > 0``: a scalar, or a tensor broadcastable against ``w`` (a per-channel vector
            for the last axis, as returned by :func:`l2_optimal_step` with ``axis=-1``).

    Returns:
        A float32 tensor shaped like ``w`` whose values are integer multiples of ``Δ`` in
        ``[−KΔ, KΔ]``; for ``bits=1`` exactly ``±Δ`` (zero maps to ``+Δ``). No gradient trick
        is applied here (see :class:`SymmetricQuantizer`).

    Example:
        >>> symmetric_quantize([0.0, -0.3, 0.3], bits=1, step=0.25).numpy().tolist()
        [0.25, -0.25, 0.25]
    """
    bits = check_bits(bits)
    w = tf.convert_to_tensor(w, tf.float32)
    step = tf.convert_to_tensor(step, tf.float32)
    if bits == 1:
        # sign(0) would give a third level 0; Eq. (1) has two levels, so 0 goes to +Δ. A NaN
        # stays NaN (w >= 0 is False for NaN, which would silently make it −Δ).
        return _keep_nan(w, tf.where(w >= 0.0, step, -step) * tf.ones_like(w))
    k = float(max_level(bits))
    return tf.sign(w) * step * _levels(tf.abs(w), step, k)


def _reduction_axes(rank: int, axis) -> Tuple[Optional[list], Optional[Tuple[int, ...]]]:
    """(axes to reduce over, kept axes) for ``axis`` (None, an int or a tuple of ints)."""
    if axis is None:
        return list(range(rank)), None
    kept = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    if rank < 2 or not kept:
        raise ValueError(
            f"per-channel steps need a tensor with an output-channel axis (rank >= 2), got a "
            f"rank-{rank} tensor with axis={axis!r}; use axis=None (per-tensor) instead."
        )
    norm = []
    for a in kept:
        if isinstance(a, bool) or not isinstance(a, numbers.Integral) or not -rank <= a < rank:
            raise ValueError(
                f"axis={axis!r} is out of range for a rank-{rank} tensor; pass the output-channel "
                f"axis in [-{rank}, {rank - 1}] (-1 for Conv2D/Dense, (2, 3) for DepthwiseConv2D)."
            )
        norm.append(int(a) % rank)
    if len(set(norm)) == rank:
        raise ValueError(f"axis={axis!r} keeps every axis of a rank-{rank} tensor: nothing to reduce.")
    reduce = [i for i in range(rank) if i not in norm]
    return reduce, tuple(sorted(norm))


def _squeeze_leading(step: tf.Tensor, kept: Optional[Tuple[int, ...]]) -> tf.Tensor:
    """Drops the size-1 axes before the first kept axis, so a last-axis step is a vector."""
    if kept is None:
        return tf.reshape(step, [])
    return tf.reshape(step, tf.shape(step)[kept[0]:])


def _as_rows(absw: tf.Tensor, reduce, kept: Optional[Tuple[int, ...]]) -> tf.Tensor:
    """``absw`` as a matrix with one row per step: the kept axes first (in order), flattened."""
    if kept is None:
        return tf.reshape(absw, [1, -1])
    rows = tf.transpose(absw, list(kept) + list(reduce))
    if rows.shape.is_fully_defined():
        # A static shape lets the search size its chunks (`_chunk_size`).
        n_rows = int(np.prod(rows.shape[:len(kept)]))
        return tf.reshape(rows, [n_rows, rows.shape.num_elements() // max(n_rows, 1)])
    return tf.reshape(rows, tf.stack([tf.reduce_prod(tf.shape(rows)[:len(kept)]), -1]))


def _rms(absw: tf.Tensor, reduce) -> tf.Tensor:
    return tf.sqrt(tf.reduce_mean(tf.square(absw), axis=reduce, keepdims=True))


def _std_step_keepdims(absw: tf.Tensor, bits: int, reduce) -> tf.Tensor:
    return tf.maximum(GAUSSIAN_STEP_RATIO[bits] * _rms(absw, reduce), _TINY)


def _sum(x, reduce):
    return tf.reduce_sum(x, axis=reduce, keepdims=True)


def _levels(absw: tf.Tensor, step: tf.Tensor, k: float) -> tf.Tensor:
    """The level ``n`` of each weight for ``step``: the nearest one, clipped at ``K``."""
    return tf.minimum(tf.floor(absw / step + 0.5), k)


def _chunk_size(count: int, weights: Optional[int]) -> int:
    """Candidates scored per batched op, for ``count`` candidates over ``weights`` weights.

    The search is memory-bound: one batch of many candidates over a kernel streams MBs through
    every op, while one chunk's values stay in cache. Each chunk is another op chain in the
    graph, though, which costs tracing time, so small jobs stay in one batch. Measured on 2
    cores: the whole default search over 36,864 weights 0.50–0.62 ms with one candidate per
    chain, 0.74–0.97 ms in one batch, 0.80–0.94 ms in two chunks (2026-12-07); 24 candidates
    over 1,024 rows of 256 weights 4.5 ms in one batch, 2.3–2.4 ms in chunks of 2–3.
    """
    if weights is None or count * weights <= 131_072:
        return count
    if weights <= 65_536:
        return 1
    return max(1, round(600_000 / weights))


def _score_steps(absw: tf.Tensor, steps: tf.Tensor, k: float, c_reduce) -> tf.Tensor:
    """‖w − Q(w)‖² for each of the candidate steps ``steps`` (leading axis), in batched ops.

    Written in units of the step, ``Δ²·Σ(t − min(round(t), K))²`` with ``t = |w|/Δ``: one op
    fewer per weight than rounding ``|w|/Δ + 0.5`` down, and the same error, since at an exact
    tie both levels are equally far. The search is memory-bound, so ops per weight and their
    cache traffic are its cost: large kernels are scored a few candidates at a time.
    """
    count = steps.shape[0]
    if count is None:  # an unknown number of candidates: one batch
        return _score_chunk(absw, steps, k, c_reduce)
    chunk = _chunk_size(count, absw.shape.num_elements())
    if chunk >= count:
        return _score_chunk(absw, steps, k, c_reduce)
    return tf.concat([_score_chunk(absw, steps[i:i + chunk], k, c_reduce)
                      for i in range(0, count, chunk)], 0)


def _score_chunk(absw: tf.Tensor, steps: tf.Tensor, k: float, axes) -> tf.Tensor:
    """The error of each step in ``steps``, summed over ``axes``: ``steps`` either carries a
    leading candidate axis (then ``axes`` are the candidate-shifted ones) or is one step per row.
    |w| gets no candidate axis of its own: broadcasting adds it, with no op in the graph."""
    t = absw * (1.0 / steps)
    r = t - tf.minimum(tf.round(t), k)
    return tf.reduce_sum(tf.square(r), axis=axes, keepdims=True) * tf.square(steps)


def _pick(steps: tf.Tensor, errs: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """(step, error) of the least-error candidate along the leading axis, per channel."""
    count = steps.shape[0] if steps.shape[0] is not None else tf.shape(steps)[0]
    pick = tf.one_hot(tf.argmin(errs, axis=0), count, axis=0, dtype=steps.dtype)
    return tf.reduce_sum(steps * pick, axis=0), tf.reduce_min(errs, axis=0)


def _basin_steps(steps: tf.Tensor, errs: tf.Tensor, basins: int) -> tf.Tensor:
    """The ``basins`` least-error grid steps that are not grid neighbours of a better one.

    The error is bumpy in ``Δ`` at 5–8 bits: two basins a few grid points apart can differ by
    under 1 %, so refining only the best grid point settles in the wrong one (measured: 0.7 %
    above the optimum at 5 bits). Refining the best few separate basins finds the right one.
    """
    index = tf.reshape(tf.range(tf.shape(steps)[0]), [-1] + [1] * (steps.shape.rank - 1))
    picked = []
    for _ in range(basins):
        best = tf.argmin(errs, axis=0, output_type=tf.int32)
        picked.append(tf.reduce_sum(steps * tf.cast(tf.equal(index, best[None]), steps.dtype), axis=0))
        errs = tf.where(tf.abs(index - best[None]) <= 1, tf.cast(float("inf"), errs.dtype), errs)
    return tf.stack(picked)


def _linspace(start: float, stop: float, num: int) -> np.ndarray:
    """``tf.linspace(start, stop, num)`` in float32, value for value, computed in NumPy."""
    if num == 1:
        return np.array([start], np.float32)
    delta = (np.float32(stop) - np.float32(start)) / np.float32(num - 1)
    inner = np.float32(start) + delta * np.arange(1, num - 1, dtype=np.float32)
    return np.concatenate([[start], inner, [stop]]).astype(np.float32)


def _column(values: np.ndarray, rank: int) -> tf.Tensor:
    """``values`` as one float32 constant shaped ``(len, 1, ..., 1)`` to broadcast against a
    rank-``rank`` tensor: a constant, not ``tf.linspace`` and a reshape, which add a dozen ops
    each to a graph that holds a search per quantized layer (tracing time)."""
    return tf.constant(np.asarray(values, np.float32).reshape([-1] + [1] * rank))


def _keep_better(step, err, cands, cand_errs):
    cand_step, cand_err = _pick(cands, cand_errs)
    return tf.where(cand_err < err, cand_step, step), tf.minimum(cand_err, err)


def _l2_step_keepdims(absw: tf.Tensor, bits: int, reduce, iterations: int, candidates: int,
                      refine_candidates: int, basins: int, polish_candidates: int) -> tf.Tensor:
    # Every statistic keeps the reduced axes (size 1) so that it broadcasts against |w|.
    if bits == 1:
        # Closed form: for Q = Δ·sign(w) the error Σ(|w| − Δ)² is minimal at Δ = mean|w|.
        return tf.maximum(tf.reduce_mean(absw, axis=reduce, keepdims=True), _TINY)
    k = float(max_level(bits))
    std = _std_step_keepdims(absw, bits, reduce)
    rank = absw.shape.rank
    c_reduce = [a + 1 for a in reduce]
    # 1. Coarse search: a geometric grid between 0.7·min and max of the std step and the
    #    no-clipping step max|w|/K, plus the std step itself.
    no_clip = tf.maximum(tf.reduce_max(absw, axis=reduce, keepdims=True) / k, _TINY)
    lo, hi = 0.7 * tf.minimum(std, no_clip), tf.maximum(std, no_clip)
    points = max(1, candidates - 1)
    grid = lo * tf.pow(hi / lo, _column(_linspace(0.0, 1.0, points), rank))
    if points > 1:
        # 1 + x summed in float32, as the graph summed it before: the same steps bit for bit.
        above = np.float32(1.0) + np.array(_ABOVE_HI, np.float32)
        grid = tf.concat([grid, hi * _column(above, rank)], 0)
    grid_errs = _score_steps(absw, grid, k, c_reduce)
    best, best_err = _keep_better(std, _score_chunk(absw, std, k, reduce), grid, grid_errs)
    if refine_candidates > 0 and points > 1:
        # 2. Fine search: a geometric grid one coarse spacing either side of each of the best
        #    `basins` separate coarse steps.
        spacing = tf.pow(hi / lo, 1.0 / (points - 1))
        offsets = _column(_linspace(-1.0, 1.0, refine_candidates), rank)
        # One basin: around the best step so far (the std step included).
        if basins == 1:
            fine = best * tf.pow(spacing, offsets)
        else:
            centres = _basin_steps(grid, grid_errs, min(basins, points))
            fine = centres[:, None] * tf.pow(spacing, offsets)[None]  # (basins, refine, ...)
            fine = tf.reshape(fine, tf.concat([[-1], tf.shape(fine)[2:]], 0))
            fine.set_shape([centres.shape[0] * refine_candidates] + best.shape.as_list())
        best, best_err = _keep_better(best, best_err, fine, _score_steps(absw, fine, k, c_reduce))
        if polish_candidates > 0:
            # 3. Polish: a geometric grid one fine spacing either side of the best so far.
            fine_spacing = tf.pow(spacing, 2.0 / max(1, refine_candidates - 1))
            polish = best * tf.pow(
                fine_spacing, _column(_linspace(-1.0, 1.0, polish_candidates), rank))
            best, best_err = _keep_better(best, best_err, polish,
                                          _score_steps(absw, polish, k, c_reduce))
    if iterations == 0:
        return best
    # 4. Lloyd refinement from the best step.
    step = best
    for _ in range(iterations):
        n = _levels(absw, step, k)  # assignment: nearest level for this Δ
        num, den = _sum(absw * n, reduce), _sum(n * n, reduce)
        # refit: the least-squares Δ for these levels (keep Δ where every weight rounds to 0)
        step = tf.maximum(tf.where(den > 0.0, tf.math.divide_no_nan(num, den), step), _TINY)
    # Each round cannot increase the error in exact arithmetic; in float32 keep the better of
    # the two, so "l2 error <= std error" holds to the last bit (std is a candidate).
    final_err = _score_chunk(absw, step, k, reduce)
    return tf.where(final_err <= best_err, step, best)


@_no_autograph
def l2_optimal_step(
    w, bits: int, axis=None, iterations: int = L2_ITERATIONS, candidates: int = L2_CANDIDATES,
    refine_candidates: int = L2_REFINE_CANDIDATES, basins: int = 1, polish_candidates: int = 0,
) -> tf.Tensor:
    """The step ``Δ`` minimising ``‖w − Q(w)‖²`` (per tensor, or per output channel).

    Algorithm (a fixed amount of vectorised work, so it is one static graph and fast):

    1. *coarse search*: score ``candidates`` steps — a geometric grid from
       ``0.7·min(std, max|w|/K)`` to ``max(std, max|w|/K)`` (``max|w|/K`` is the step that clips
       nothing) — plus two steps 2.5 % and 5 % above its top (the optimum can leave the top
       level unused) and the Gaussian-optimal :func:`std_step`, and take the one with the least
       error. This finds the right basin even for heavy-tailed weights at high bit-widths, where
       clipping dominates the error and Lloyd alone converges very slowly;
    2. *fine search*: score ``refine_candidates`` steps on a geometric grid one coarse spacing
       either side of that step (with ``basins > 1``: of each of the ``basins`` best coarse grid
       steps that are not neighbours of a better one), and keep the best so far;
    3. *polish* (``polish_candidates > 0``): score that many steps one fine spacing either side
       of the best so far;
    4. *Lloyd refinement*, ``iterations`` rounds of: assign ``n_i = min(floor(|w_i|/Δ + 0.5), K)``
       (the nearest level for this ``Δ``), then refit ``Δ = Σ|w_i|·n_i / Σ n_i²`` (the
       least-squares ``Δ`` for these levels). Neither half-step can raise the error;
    5. return the better of the refined and the best searched step.

    The std step is a candidate, so the result is never worse than :func:`std_step`. For 1 bit
    the optimum is closed-form, ``Δ = mean|w|``. Measured against a 20,000-point grid
    (``tools/benchmark_l2_step.py``: Gaussian, Laplacian and Student-t(2, 3) weights, 256 to
    9,216 per step, 96 draws per bit-width):

    * the defaults are within 0.04 % at 2–3 bits and 0.14 % at 4–5; at 6–8 bits, where the
      error is small and bumpy in ``Δ``, within 1.3 %, 3.3 % and 3.9 %. Time: 0.57–1.32x the
      search as filed with issue 25 (8 candidates, 4 Lloyd rounds: 0.6–25 % above the grid);
    * ``**L2_THOROUGH`` (25 coarse candidates, 3 basins, 12 fine candidates each and a
      12-candidate polish) is within 0.07 % at every bit-width but 8 bits on rows of 256
      weights (0.78 %), at 1.13–2.74x the filed search's time (above 2x on the 1x1 256->1024
      per channel). The step is recomputed at every training step, so the default stays the
      cheaper search; use this one where a step is computed once. Figures:
      docs/quantization.md (2026-12-06).

    Args:
        w: The weights.
        bits: Bit-width in 1..8.
        axis: ``None`` for one step per tensor; else the output-channel axis (or axes) whose
            every index gets its own step: ``-1`` for Conv2D ``(h, w, in, out)`` and Dense
            ``(in, out)`` kernels, ``(2, 3)`` for a DepthwiseConv2D ``(h, w, in, mult)`` kernel
            (its output channels are the ``in × mult`` pairs).
        iterations: Lloyd rounds after the searches.
        candidates: Number of coarse candidate steps (>= 1; 1 scores the std step only).
        refine_candidates: Number of fine candidate steps per basin (>= 0; 0 skips the fine
            search and the polish).
        basins: Number of separate coarse basins refined (>= 1).
        polish_candidates: Number of polish candidate steps (>= 0; 0 skips the polish).

    Returns:
        A scalar, or the per-channel steps shaped to broadcast against ``w`` (the axes before
        the first kept axis dropped: shape ``(out,)`` for ``axis=-1``).

    Example:
        >>> import numpy as np
        >>> w = np.random.default_rng(0).normal(size=(3, 3, 8, 4)).astype("float32")
        >>> l2_optimal_step(w, 2, axis=-1).shape
        TensorShape([4])
    """
    bits = check_bits(bits)
    for name, value, low in (("iterations", iterations, 0), ("candidates", candidates, 1),
                             ("refine_candidates", refine_candidates, 0), ("basins", basins, 1),
                             ("polish_candidates", polish_candidates, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    w = tf.convert_to_tensor(w, tf.float32)
    reduce, kept = _reduction_axes(w.shape.rank, axis)
    # The search runs on one row per step, (steps, weights per step): reducing the contiguous
    # last axis is several times faster than reducing the leading axes of a channels-last kernel.
    rows = _as_rows(tf.abs(w), reduce, kept)
    step = _l2_step_keepdims(rows, bits, [1], int(iterations), int(candidates),
                             int(refine_candidates), int(basins), int(polish_candidates))
    if kept is None:
        return tf.reshape(step, [])
    shape = tf.shape(w)
    return _squeeze_leading(
        tf.reshape(step, tf.stack([shape[i] if i in kept else 1 for i in range(w.shape.rank)])), kept)


@_no_autograph
def std_step(w, bits: int, axis=None) -> tf.Tensor:
    """``Δ = c_b · σ``: the step that is L2-optimal if the weights were Gaussian.

    ``σ`` is the root-mean-square of the weights (their standard deviation about zero: the
    quantizer is symmetric about zero, and trained kernels are near zero-mean) and ``c_b`` is
    :data:`GAUSSIAN_STEP_RATIO` (0.798 for 1 bit, 1.224 for 2 bits, 0.354 for 4, 0.031 for 8).

    Args:
        w: The weights.
        bits: Bit-width in 1..8.
        axis: As in :func:`l2_optimal_step`.

    Example:
        >>> round(float(std_step([1.0, -1.0], bits=2)), 4)
        1.224
    """
    bits = check_bits(bits)
    w = tf.convert_to_tensor(w, tf.float32)
    reduce, kept = _reduction_axes(w.shape.rank, axis)
    return _squeeze_leading(_std_step_keepdims(tf.abs(w), bits, reduce), kept)
