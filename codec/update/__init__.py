"""Updates: a model coded as differences from a base the receiver already holds (spec/format.md, section 12).

An update file (format 1.1, header flag ``update``) names its base by
content: each entry coded from a base tensor carries the SHA-256 of that
tensor's storage bytes as the receiver decodes it, and the index carries a
digest of the whole base tensor set. Decoding an entry is decoding its
blobs (the difference, coded with any codec) and adding them to the base
tensor; an *unchanged* entry has no blobs and takes the base tensor as is.

- :mod:`codec.update.base`: the base as the receiver holds it, its hashes
  and the check that refuses a wrong base before anything is decoded;
- :mod:`codec.update.delta`: the difference and the sum, rounded as the
  spec says (pure numpy, data-free);
- :mod:`codec.update.plan`: the encoder's menu for updates (difference,
  full, unchanged) for the rate-distortion search.
"""

from __future__ import annotations

from .base import Base, base_digest, check_base, tensor_sha256
from .delta import add_difference, difference

__all__ = ["Base", "base_digest", "check_base", "tensor_sha256", "add_difference", "difference"]
