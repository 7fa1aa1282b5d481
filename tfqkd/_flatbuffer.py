"""Where ``tfqkd._flatbuffer`` was: it moved into the exporter (:mod:`tfqkd.export._flatbuffer`).

Kept for ``tools/`` and other code that imports it from here.
"""

from tfqkd.export._flatbuffer import WEIGHT_OPS, op_names, read, write

__all__ = ["WEIGHT_OPS", "read", "write", "op_names"]
