"""The size figures every report uses: bits per weight and "x smaller", defined once.

``jwt encode``'s summary, ``jwt info`` and :meth:`codec.api.JwtFile.totals`
all call :func:`file_totals`, so they print the same numbers for one file:

* weights: elements of the stored tensors (an alias, a second name for a
  stored tensor, adds no weights);
* bits per weight: ``8 * file bytes / weights``, the whole file (header,
  index and attachments included);
* ratio ("x smaller"): the stored tensors' raw bytes (elements times dtype
  size, as they are in memory) divided by the file bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .format import Index

__all__ = ["Totals", "file_totals"]


@dataclass(frozen=True)
class Totals:
    """Size facts of one .jwt file (see the module docstring for the definitions)."""

    #: Elements of the stored (non-alias) tensors.
    weights: int
    #: Bytes of the stored tensors as decoded (elements times dtype size).
    raw_bytes: int
    #: Size of the whole file.
    file_bytes: int

    @property
    def bits_per_weight(self) -> float:
        """``8 * file_bytes / weights``; 0.0 without weights."""
        return 8 * self.file_bytes / self.weights if self.weights else 0.0

    @property
    def ratio(self) -> float:
        """``raw_bytes / file_bytes``: how many times smaller than the raw tensors; 0.0 for an empty file."""
        return self.raw_bytes / self.file_bytes if self.file_bytes else 0.0

    def summary(self) -> str:
        """E.g. ``5.969 bits/weight, 5.4x smaller than the raw tensors``."""
        return f"{self.bits_per_weight:.3f} bits/weight, {self.ratio:.1f}x smaller than the raw tensors"


def file_totals(index: Index, file_bytes: int) -> Totals:
    """The :class:`Totals` of a file from its index and size (nothing decoded)."""
    stored = [e for e in index.entries if e.alias is None]
    return Totals(sum(e.numel for e in stored), sum(e.nbytes for e in stored), file_bytes)
