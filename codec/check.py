"""Checking a whole .jwt file without writing anything: :func:`verify`.

Numpy only (no torch): every blob's CRC-32 is checked and every tensor and
attachment decoded, exactly as :func:`codec.load` and ``jwt decode`` would,
then dropped; the file size must match the index (no truncation, no
trailing bytes). The first problem raises, naming the file, tensor and blob.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from .limits import DEFAULT_LIMITS, Limits
from .reader import Reader

__all__ = ["Verified", "verify"]


@dataclass(frozen=True)
class Verified:
    """What :func:`verify` checked."""

    name: str
    tensors: int  # index entries, aliases included
    aliases: int
    weights: int  # elements of the stored (non-alias) tensors
    attachments: int
    file_bytes: int

    def __str__(self) -> str:
        aliases = f" ({self.aliases} aliases)" if self.aliases else ""
        return (f"{self.name}: OK: {self.tensors} tensors{aliases}, {self.weights:,} weights, "
                f"{self.attachments} attachments, {self.file_bytes:,} bytes; every CRC matches, everything decodes")


def verify(source: str | os.PathLike[str] | BinaryIO | bytes | Any, *, limits: Limits = DEFAULT_LIMITS,
           jobs: int | None = None, timeout: float | None = None,
           progress: Callable[[str, int], None] | None = None) -> Verified:
    """Decode every tensor and attachment of a .jwt (path, URL, file object or bytes) and check every CRC.

    Returns a :class:`Verified` summary; raises the first :class:`codec.JwtError` (or ``OSError``) met.
    Memory holds a few decoded tensors at a time. ``progress(name, elements)`` is called per tensor.
    """
    with Reader(source, limits=limits, jobs=jobs, timeout=timeout) as reader:
        weights = aliases = 0
        for entry, _array in reader.iter_arrays():
            if entry.alias is not None:
                aliases += 1
            else:
                weights += entry.numel
            if progress:
                progress(entry.name, entry.numel)
        attachments = sum(1 for _ in reader.iter_attachments())
        return Verified(str(reader.name), len(reader.index.entries), aliases, weights, attachments, reader.size)
