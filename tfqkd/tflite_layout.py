"""Integer-exact layout rewrites of int8 TFLite files: now :mod:`tfqkd.export.layout`, re-exported.

``tfqkd.tflite_layout`` stays importable (it is public): the names below are those of
:mod:`tfqkd.export.layout`.

Example:
    >>> from tfqkd.export import layout
    >>> space_to_depth_convs is layout.space_to_depth_convs
    True
"""

from tfqkd.export.layout import _block_kernel, space_to_depth_convs  # noqa: F401

__all__ = ["space_to_depth_convs"]
