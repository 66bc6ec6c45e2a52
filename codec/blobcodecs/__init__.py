"""Blob codecs behind one registry (see :mod:`codec.blobcodecs.abc`)."""

from __future__ import annotations

from typing import Any

from ..errors import FormatError, UnknownCodecError
from .abc import BlobCodec
from .jpeg import Jpeg
from .jpegxl import JpegXL
from .quant import Quant
from .zstd import Zstd, ZstdPlanes

__all__ = ["BlobCodec", "Jpeg", "JpegXL", "Quant", "Zstd", "ZstdPlanes", "REGISTRY", "get_codec", "register_codec"]

#: codec_id -> class. Identifiers are never reused for a different codec.
REGISTRY: dict[str, type[BlobCodec]] = {}


def register_codec(cls: type[BlobCodec]) -> type[BlobCodec]:
    """Add a codec class to the registry (usable as a decorator)."""
    REGISTRY[cls.codec_id] = cls
    return cls


for _cls in (Zstd, ZstdPlanes, Jpeg, JpegXL, Quant):
    register_codec(_cls)


def get_codec(config: Any) -> BlobCodec:
    """Instantiate the codec described by ``{"id": ..., **params}``."""
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise FormatError(f"codec config must be an object with a string 'id', found {config!r:.80}")
    cls = REGISTRY.get(config["id"])
    if cls is None:
        raise UnknownCodecError(f"unknown codec {config['id']!r:.80} (known: {', '.join(sorted(REGISTRY))})")
    try:
        return cls.from_config(config)
    except TypeError as exc:
        raise FormatError(f"codec {config['id']!r}: bad parameters ({exc})") from None
