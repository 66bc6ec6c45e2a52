"""Shared fixtures; the header names the codec library versions in use."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"


def pytest_report_header(config):
    """Print the library versions that produce and decode the bytes."""
    from codec.api import encoder_versions

    return "jwt encoder libraries: " + ", ".join(f"{k} {v}" for k, v in encoder_versions().items())


@pytest.fixture(scope="session")
def mlp_state_dict():
    """The bundled Fashion-MNIST MLP (784-512-10)."""
    import torch

    return torch.load(FIXTURES / "mlp_fmnist.pt", weights_only=True)


@pytest.fixture(scope="session")
def fmnist_subset():
    """The bundled labelled Fashion-MNIST test subset: (images uint8, labels)."""
    import numpy as np

    data = np.load(FIXTURES / "fmnist_test_subset.npz")
    return data["images"], data["labels"]


class Stream(io.RawIOBase):
    """A non-seekable binary stream over bytes (like a socket or a pipe), with a name."""

    def __init__(self, data: bytes, name: str):
        self._buf = io.BytesIO(data)
        self.name = name

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._buf.readinto(b)
