"""Stand-in for ``torchvision``: only the symbols nncodec touches at import time (bench/_standins)."""

from . import datasets, transforms  # noqa: F401
