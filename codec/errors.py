"""The errors jwt raises.

Every error is a :class:`JwtError`, itself a :class:`ValueError`, so callers
can catch one class. Messages name the file, the tensor (and tile or blob
where it matters) and both the expected and the found value, e.g.
``model.jwt: tensor 'fc1.weight': blob 3: stored crc32 0x1234abcd, computed
0x0badf00d``.
"""

from __future__ import annotations

__all__ = [
    "JwtError",
    "FormatError",
    "VersionError",
    "ChecksumError",
    "LimitError",
    "UnknownCodecError",
    "EncodeError",
    "UsageError",
    "BaseError",
]


class JwtError(ValueError):
    """Base class of every error raised by jwt."""


class FormatError(JwtError):
    """The bytes are not a well-formed .jwt file (or blob)."""


class VersionError(FormatError):
    """The file needs a newer reader: another major version, or a header flag of a later minor version."""


class ChecksumError(FormatError):
    """A stored checksum does not match the bytes it covers."""


class LimitError(JwtError):
    """A size or count exceeds a decoder limit (see :class:`codec.Limits`)."""


class UnknownCodecError(FormatError):
    """A tensor names a codec this reader does not know."""


class BaseError(JwtError):
    """An update's base is missing, or is not the base the update was made against (spec section 12)."""


class EncodeError(JwtError):
    """The input cannot be encoded (unsupported dtype, bad option, ...)."""


class UsageError(JwtError):
    """A call or output the library cannot honour, found before any data is decoded or written.

    E.g. ``codec.load(..., dtype=torch.int32)``, an unknown output suffix, or
    a folder output that exists and is not empty.
    """


def first_line(exc: BaseException, width: int = 200) -> str:
    """The first line of ``exc``'s message (its type name when it has none), cut to ``width`` characters: what a
    one-line error quotes of an exception raised by another library."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:width]
