"""The contract of a blob codec.

A blob codec turns one numpy array into one byte string (a *blob*) and back.
It is a leaf: it knows nothing about tensors, tiles or files. Its
parameters form a flat JSON object ``{"id": codec_id, **params}``
(:meth:`BlobCodec.get_config`) that the container stores in its index and
hands back to :meth:`BlobCodec.from_config` when reading.

``decode`` receives the shape and numpy dtype the container expects and
must verify the blob against them *before* allocating anything large: a
blob that claims other dimensions or another size is a
:class:`~codec.errors.FormatError`, never a silently different array.
The blob is bytes-like: ``bytes``, or a ``memoryview`` slice of a larger
read (the reader does not copy a tensor's blobs apart).
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ..errors import FormatError

__all__ = ["BlobCodec", "check_params", "decode_image"]


class BlobCodec(ABC):
    """Base class: encode an array to bytes and decode it back."""

    #: Lowercase identifier stored in the index; never reused for another codec.
    codec_id: ClassVar[str]
    #: Whether decode(encode(x)) may differ from x.
    lossy: ClassVar[bool]
    #: Parameters a later minor version added: absent in a file means their default.
    optional: ClassVar[tuple[str, ...]] = ()
    #: Pixel bits of an image codec (0 for a byte codec).
    bits: ClassVar[int] = 0

    @abstractmethod
    def encode(self, array: np.ndarray) -> bytes:
        """Return the blob for ``array``."""

    @abstractmethod
    def decode(self, blob: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Return the array of ``shape`` and ``dtype`` held by ``blob``."""

    def round_trip(self, array: np.ndarray) -> np.ndarray:
        """What :meth:`decode` gives for the blob :meth:`encode` makes of ``array``, without needing the blob: a
        codec whose bytes take work that does not change the decoded array (JPEG's Huffman optimisation) or that
        stores the pixels exactly (``quant``) skips it. For codec-in-the-loop training (codec.train), which needs
        the decoded values only; never for sizes."""
        return self.decode(self.encode(array), array.shape, array.dtype)

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """Return ``{"id": codec_id, **params}``, JSON-serializable."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BlobCodec":
        """Build the codec from :meth:`get_config`'s output (validated).

        Every parameter the codec defines is required (FormatError if one is
        missing), except those in :attr:`optional` (added by a later minor
        version, absent means their default); parameters it does not define
        are ignored, as unknown index fields are (spec section 5).
        """
        names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        missing = [p for p in names if p not in config and p not in cls.optional]
        if missing:
            raise FormatError(f"codec {cls.codec_id!r}: missing parameter {missing[0]!r} "
                              f"(required: {', '.join(p for p in names if p not in cls.optional)})")
        return cls(**{p: config[p] for p in names if p in config})

    @property
    def minor(self) -> int:
        """The format minor version that defines this codec with these parameters (0: format 1.0)."""
        return 0

    def describe(self, sep: str = " ", skip: tuple[str, ...] = ()) -> str:
        """The codec and its parameters in a few words for people (notes, ``jwt show``), e.g. ``quant bits=4``: a
        long list (an explicit JPEG table) is summed up (``64 x 212``, or its first and last values) where the index
        and ``jwt info --json`` keep every value. ``skip``: parameters left out."""
        return f"{self.codec_id} {self.params_text(sep, skip)}".strip()

    def params_text(self, sep: str = " ", skip: tuple[str, ...] = ()) -> str:
        """:meth:`describe` without the codec's id: ``quality=3 table=64 x 212``."""
        return sep.join(f"{k}={_brief(v)}" for k, v in self.get_config().items() if k != "id" and k not in skip)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "id")
        return f"{type(self).__name__}({params})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash(json.dumps(self.get_config(), sort_keys=True))  # a JPEG table is a list


def _brief(value: Any) -> str:
    """A parameter's value as a few characters: a list of more than 8 values as ``64 x 212`` when they are all
    equal, else ``[2, 3, 5, ..., 99] (64 values)``."""
    if not isinstance(value, (list, tuple)) or len(value) <= 8:
        return str(value)
    if all(v == value[0] for v in value):
        return f"{len(value)} x {value[0]}"
    return f"[{', '.join(map(str, value[:3]))}, ..., {value[-1]}] ({len(value)} values)"


def check_params(codec_id: str, name: str, value: Any, kind: type, lo: float, hi: float) -> Any:
    """Validate one codec parameter's type and range; FormatError otherwise."""
    ok = isinstance(value, kind) and not isinstance(value, bool) or (kind is bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value, ok = float(value), True
        except OverflowError:  # a JSON integer of hundreds of digits
            ok = False
    if not ok or (kind is not bool and not lo <= value <= hi):
        raise FormatError(f"codec {codec_id!r}: parameter {name}={value!r:.40} is not a {kind.__name__} in [{lo}, {hi}]")
    return value


def decode_image(codec_id: str, decode: Callable[[bytes], np.ndarray], blob: bytes, shape: tuple[int, ...],
                 pixel: np.dtype) -> np.ndarray:
    """Run an image library's ``decode`` (header already checked) and verify what it returns."""
    try:
        image = decode(blob)
    except Exception as exc:  # imagecodecs raises its own error classes
        raise FormatError(f"{codec_id}: cannot decode ({exc})") from None
    if image.shape != tuple(shape) or image.dtype != pixel:
        raise FormatError(f"{codec_id}: decoded {image.dtype}{image.shape}, expected {np.dtype(pixel)}{tuple(shape)}")
    return image
