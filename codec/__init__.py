"""jwt: neural-network weights as JPEG / JPEG XL tiles in a checked container.

Python API::

    import codec
    codec.save(model.state_dict(), "model.jwt", quality=20, row_shape=(28, 28))
    state_dict = codec.load("model.jwt")
    with codec.open("model.jwt") as f:      # lazy: reads the index only
        w = f.get("fc1.weight")
    codec.load_into(model, "model.jwt")     # model.load_state_dict; returns missing/unexpected keys
    codec.encode_model("bert/", "bert.jwt") # a .pt, .safetensors or model folder (files as attachments)
    codec.decode_model("bert.jwt", "out/")  # .pt, .safetensors or a folder transformers loads
    codec.save(model, "m.jwt", bits_per_weight=1.0, calibration=images)  # an nn.Module and unlabelled inputs

The format is specified in spec/format.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (BaseError, ChecksumError, EncodeError, FormatError, JwtError, LimitError, UnknownCodecError,
                     UsageError, VersionError)
from .limits import DEFAULT_LIMITS, Limits

__all__ = [
    "__version__",
    "save",
    "Note",
    "load",
    "open",
    "load_into",
    "encode_model",
    "decode_model",
    "verify",
    "calibrate",
    "Reader",
    "EncodeOptions",
    "Limits",
    "DEFAULT_LIMITS",
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


#: Subpackages reached as attributes after a plain ``import codec`` (imported on first use: ``codec.train`` imports
#: torch).
SUBPACKAGES = ("train", "rd", "update", "sources", "blobcodecs", "distributed")


def __getattr__(name: str):
    """Import lazily: numpy-only users never import torch (``save`` of a safetensors input does not either: see
    :mod:`codec.encode`), and ``jwt --version`` not even numpy."""
    if name == "Reader":
        from .reader import Reader

        return Reader
    if name == "verify":
        from .check import verify

        return verify
    if name == "EncodeOptions":
        from .tensorcodec import EncodeOptions

        return EncodeOptions
    if name in ("save", "Note"):  # torch-free for a safetensors file or folder (codec.encode)
        from . import encode

        return getattr(encode, name)
    if name in ("load", "open", "JwtFile", "read_state_dict"):
        from . import api

        return getattr(api, name)
    if name in ("load_into", "encode_model", "decode_model", "open_source", "read_tensors"):
        from . import io_formats

        return getattr(io_formats, name)
    if name == "calibrate":
        from .rd.calibrate import calibrate

        return calibrate
    if name in SUBPACKAGES:  # `import codec` then `codec.train.finetune(...)`, as the README writes it
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'codec' has no attribute {name!r}")
