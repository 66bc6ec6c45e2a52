"""Decoder limits: the sizes a reader accepts before it refuses a file.

A hostile file can claim anything; these bounds make it fail with a
:class:`~codec.errors.LimitError` before any large allocation. They are part
of the format specification (spec/format.md, "Decoder limits"). Callers with
larger models raise them explicitly::

    codec.open(path, limits=codec.Limits(max_tensor_bytes=64 << 30))
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "DEFAULT_LIMITS"]


@dataclass(frozen=True)
class Limits:
    """Upper bounds a reader enforces; every field is a plain integer."""

    #: Bytes of the JSON index.
    max_index_bytes: int = 64 << 20
    #: Entries in the index (tensors and aliases).
    max_tensors: int = 1 << 20
    #: Dimensions of one tensor.
    max_ndim: int = 32
    #: UTF-8 bytes of one tensor name or metadata key/value.
    max_name_bytes: int = 1 << 16
    #: Decoded bytes of one tensor.
    max_tensor_bytes: int = 16 << 30
    #: Decoded bytes of all tensors together.
    max_total_bytes: int = 256 << 30
    #: Pixels of one image blob (a mosaic of tiles).
    max_blob_pixels: int = 1 << 26
    #: Blobs of one tensor.
    max_blobs_per_tensor: int = 1 << 20
    #: Nesting depth of the JSON index (arrays and objects; the top-level object is depth 1).
    max_json_depth: int = 64


DEFAULT_LIMITS = Limits()
