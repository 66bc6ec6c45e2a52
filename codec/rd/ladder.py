"""A finer JPEG quality ladder where one quality step is coarse.

libjpeg scales a base table by ``s = 5000 / q`` percent below quality 50
(spec/format.md 8.2), so at the low qualities where the bench models' big
tensors sit one quality step is a large step of the table: q4 / q5 / q6 are
scales 1250 / 1000 / 833, and the BatchNorm CNN's fc1 codes to 3,773 /
8,631 / 16,051 bytes there. A table scaled by a value between two
qualities' is a table between theirs; the format stores it as its 64
entries (the ``jpeg`` codec's list table, read from the JPEG stream's DQT
like any other: the decoder does not change). Those entries cost the
tensor's index entry about 250 bytes (:func:`table_bytes`): a fine step
pays only on tensors of several KB, and the searches count them. :attr:`EncodeOptions.scale
<codec.tensorcodec.EncodeOptions.scale>` asks for one.

The ladder here has the integer qualities' scales and, where two of them
are more than :data:`FINE_RATIO` apart, scales in between in steps of that
ratio. The rate search (:func:`codec.rd.allocate._refine`) and repair's
keep-size (:func:`codec.rd.repair.budget._fit_size`) bisect it between two
qualities they have measured, so a finer ladder costs a coding or two more,
not one per step.
"""

from __future__ import annotations

import functools
import json
import math

from ..blobcodecs import BlobCodec
from ..blobcodecs.jpeg import quality_at_scale, quality_scale
from ..format import compress_index
from ..tensorcodec import DEFAULT_QUALITY, EncodeOptions

__all__ = ["FINE_RATIO", "scale_of", "at_scale", "between", "scales", "text", "table_bytes"]

#: Ratio of successive scales on the fine ladder (where the integer qualities' are further apart).
FINE_RATIO = 1.03


def scale_of(opts: EncodeOptions) -> int:
    """The table scale (percent) a JPEG setting codes with: its own, else its quality's."""
    return opts.scale if opts.scale is not None else quality_scale(opts.quality or DEFAULT_QUALITY)


def at_scale(opts: EncodeOptions, scale: int) -> EncodeOptions:
    """``opts`` with the table scaled by ``scale`` percent: the quality is the largest whose scale is at least
    ``scale`` (the next coarser step, or the quality itself when ``scale`` is its own)."""
    return opts.with_(quality=quality_at_scale(scale), scale=scale)


def between(cheap: EncodeOptions, dear: EncodeOptions, ratio: float = FINE_RATIO) -> list[EncodeOptions]:
    """The ladder's settings strictly between two settings of one JPEG family (they differ in quality or scale
    only), from ``cheap``'s side (the larger scale) to ``dear``'s: every integer quality between them and, where
    two neighbours are more than ``ratio`` (:data:`FINE_RATIO`) apart, scales in steps of that ratio."""
    top, bottom = scale_of(cheap), scale_of(dear)
    return [at_scale(cheap, s) for s in scales(ratio) if bottom < s < top]


@functools.cache
def scales(ratio: float = FINE_RATIO) -> tuple[int, ...]:
    """The ladder's scales, decreasing: the integer qualities', and each gap wider than ``ratio`` cut into equal
    ratios of at most that."""
    qualities = [quality_scale(q) for q in range(1, 101)]
    found = set(qualities)
    for a, b in zip(qualities, qualities[1:]):
        n = math.ceil(math.log(a / b) / math.log(ratio)) if b > 0 else 1
        found |= {round(a * (b / a) ** (k / n)) for k in range(1, n)}
    return tuple(sorted(found, reverse=True))


def text(opts: EncodeOptions) -> str:
    """A JPEG setting's quality as text: ``q5``, or between two qualities the one whose scale it is (libjpeg's
    formula inverted), ``q5.56`` (scale 900)."""
    if opts.scale is None:
        return f"q{opts.quality or DEFAULT_QUALITY}"
    s = opts.scale
    return f"q{5000 / s if s >= 100 else (200 - s) / 2:.2f}"


def table_bytes(codec: BlobCodec, compressed: bool = False) -> int:
    """Index bytes a blob codec's list table takes beyond a named table's (0 for a named one): the JSON of its 64
    entries less that of the shortest name, ``"flat"``. In a zstd-compressed index (format 1.3, ``compressed``),
    the table's JSON compressed alone as the index is (:func:`codec.format.compress_index`), a frame of its own: no
    less than what it adds to the index's one in practice (the bench BatchNorm CNN's fc1 at a scale between q3 and
    q4, a flat table: 251 bytes of JSON, 23 counted, 12 added to the compressed index; a second table like it adds
    2)."""
    table = getattr(codec, "table", None)
    if table is None or isinstance(table, str):
        return 0
    text = json.dumps(table, separators=(",", ":"))
    if compressed:
        return len(compress_index(text.encode()))
    return len(text) - len(json.dumps("flat"))
