"""Exports quantized students to TFLite, checks the files, and packs weights at their true bit-width.

Four TFLite modes, one function (:func:`export_tflite`):

* ``"float"``   -- float32 everything (the reference file).
* ``"dynamic"`` -- int8 weights, float activations (no calibration data needed).
* ``"int8"``    -- full-integer: int8 weights *and* activations, calibrated on representative data;
  optionally int8 input/output (``int8_io=True``).
* ``"int4"``    -- like ``"int8"`` but weights trained at <= 4 bits are stored as TFLite ``INT4``
  tensors (two weights per byte); LiteRT runs them.

How a tfmot/tfqkd QAT student becomes a TFLite file. The QAT model computes its kernels as
``quantizer(w, training=False, weights=vars)`` inside ``QuantizeWrapperV2``; the converter cannot
see through custom quantizers, so :func:`forward_model` first rebuilds a *plain* Keras model of the
same architecture whose kernels are those forward-pass values ``Q(w)`` (wrappers stripped, batch
norm kept). Then:

* ``int8``: full-integer post-training quantization of that model. Batch norm folding multiplies each
  output channel by one number, so a ternary channel ``{-d, 0, d}`` stays ternary, and the per-channel
  int8 scale ``max|w_c| / 127`` maps it exactly onto ``{-127, 0, 127}`` (binary likewise onto
  ``{-127, 127}``). For 3..8-bit kernels whose levels ``k * d`` do not land on that grid (127 is
  prime), the file's weight tensors are afterwards *snapped*: the scale of such a channel becomes
  ``d_c / n_c`` with ``n_c = floor(127 / kmax_c)`` and the integers ``k * n_c``, and the int32 bias is
  re-expressed in the new scale, so every trained level is represented exactly.
* ``int4``: batch norm is folded by us, every kernel goes through a ``FakeQuantWithMinMaxVarsPerChannel``
  (4 bits for kernels trained at <= 4 bits, 8 bits otherwise) whose range puts the trained levels on
  the integer grid, every activation through an 8-bit ``FakeQuantWithMinMaxVars`` whose range is
  the student's own where it has a quantizer there (with ``activation_bits`` tfqkd students have one
  at every such tensor, input included: the file then rounds as the student does) and is
  calibrated on the representative data elsewhere, and the converter's low-bit QAT path
  (``_experimental_low_bit_qat``) emits ``INT4`` weight tensors.

:func:`verify_tflite` runs a file with LiteRT and compares it with the Keras model (a
:class:`ParityReport`), feeding int8 inputs rounded by :func:`quantize_input` as the student
rounds them; ``export_tflite(..., align_student=True)`` puts the student's folded biases on the
file's int32 grid so that the two compute the same; :func:`tflite_weight_levels` reads the weight
tensors back from the interpreter.
:func:`pack_weights` / :func:`load_packed_weights` store the forward weights at their
true bit-width (ternary: 5 trits per byte, 1.6 bits) with exact round trip.

The package, one concept per module: :mod:`~tfqkd.export.forward` (the float forward model,
batch-norm folding), :mod:`~tfqkd.export.convert` (converter runs, diagnosis, snapping, bias
alignment), :mod:`~tfqkd.export.fakequant` (the fake-quant / INT4 graph),
:mod:`~tfqkd.export.ranges` (the student's activation ranges, the groups the file gives one
range, aligning them),
:mod:`~tfqkd.export.tflite` (:func:`export_tflite`), :mod:`~tfqkd.export.verify` (reading files
back, parity), :mod:`~tfqkd.export.packed` (the packed archive), :mod:`~tfqkd.export.layout`
(layout rewrites of int8 files) and the private ``_flatbuffer`` (reading / writing ``.tflite``
object trees). What a QAT kernel holds (``Q(w)``, levels, steps, bit-width) is read by one
function, :func:`tfqkd.qat_weights.read_layer_weights`, for every mode and the archive alike.

Example:
    >>> import numpy as np, tempfile, os
    >>> import tfqkd
    >>> from tfqkd import export
    >>> m = tfqkd.models.tiny_resnet(seed=0)
    >>> d = tempfile.mkdtemp()
    >>> info = export.export_tflite(m, os.path.join(d, "m.tflite"), mode="float")
    >>> info["mode"], info["bytes"] > 0
    ('float', True)
"""

from tfqkd.export._common import MODES, RUNTIMES, ExportError
from tfqkd.export.forward import forward_model, forward_weights
from tfqkd.export.packed import load_packed_weights, pack_weights, packed_archive_stats
from tfqkd.export.tflite import export_tflite
from tfqkd.export.verify import ParityReport, quantize_input, tflite_weight_levels, verify_tflite
# The TFLite facts the quantization scheme mirrors; they live below both (quantize_configs).
from tfqkd.quantize_configs import PINNED_OUTPUT_RANGES, activation_name

__all__ = [
    "MODES",
    "RUNTIMES",
    "ExportError",
    "ParityReport",
    "export_tflite",
    "verify_tflite",
    "quantize_input",
    "tflite_weight_levels",
    "forward_model",
    "forward_weights",
    "pack_weights",
    "load_packed_weights",
    "packed_archive_stats",
    "PINNED_OUTPUT_RANGES",
    "activation_name",
]
