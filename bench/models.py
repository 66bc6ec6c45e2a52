"""Small Fashion-MNIST reference models used to exercise the ``jwt`` codec.

The module provides:

* :func:`load_fashion_mnist` - reads the gzipped IDX files shipped by the
  ``dataset-fashion-mnist`` apt package into numpy arrays;
* :func:`preprocess` - the single place where the input normalisation is
  defined: ``uint8`` pixels are scaled to ``float32`` in ``[0, 1]`` (``x / 255``)
  and reshaped to ``[N, 1, 28, 28]``. No mean/std standardisation is applied;
* :class:`MLP` (784-512-10), :class:`CNN` (2 conv + 2 linear) and :class:`BNCNN`
  (3 conv-BatchNorm-ReLU blocks + 2 linear, BatchNorm after ``fc1`` too) models;
* :func:`model_class`, :func:`make_model`, :func:`train`, :func:`accuracy` and
  :func:`evaluate_state_dict` helpers.

Training is deterministic for a given seed on a given machine/thread count:
:func:`make_model` seeds the weight initialisation and :func:`train` seeds
``torch.manual_seed`` plus a dedicated shuffling generator, using 2 CPU threads.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
IMAGE_SIZE = 28
NUM_CLASSES = 10
NUM_THREADS = 2
EVAL_BATCH_SIZE = 1000

ModelKind = Literal["mlp", "cnn", "bncnn"]
StateDict = Mapping[str, Tensor]
ModelOrStateDict = Union[nn.Module, tuple[type[nn.Module], StateDict]]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped big-endian IDX file, checking its magic number."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {path}. "
            "Install the dataset with `apt-get install -y dataset-fashion-mnist` "
            "or pass the directory holding the *-ubyte.gz files as `root`."
        )
    with gzip.open(path, "rb") as f:
        data = bytearray(f.read())  # writable buffer -> writable arrays
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {magic}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def load_fashion_mnist(split: str, root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Load split "train" or "test" as (uint8 images [N,28,28], int64 labels [N])."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = _read_idx(root / f"{prefixes[split]}-images-idx3-ubyte.gz", IMAGES_MAGIC)
    labels = _read_idx(root / f"{prefixes[split]}-labels-idx1-ubyte.gz", LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        raise ValueError(f"inconsistent shapes: images {images.shape}, labels {labels.shape}")
    return images, labels.astype(np.int64)


def preprocess(images: np.ndarray) -> Tensor:
    """Convert uint8 images [N,28,28] to the model input: float32 x/255 of shape [N,1,28,28]."""
    array = np.asarray(images, dtype=np.uint8).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return torch.from_numpy(array.astype(np.float32) / 255.0)


class MLP(nn.Module):
    """784-512-10 perceptron with a ReLU hidden layer (layers ``fc1``, ``fc2``)."""

    def __init__(self) -> None:
        """Create the two linear layers."""
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 512)
        self.fc2 = nn.Linear(512, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Map preprocessed images [N,1,28,28] to logits [N,10]."""
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class CNN(nn.Module):
    """Two 3x3 conv + max-pool stages (32, 64 channels) then 3136-128-10 (``conv1, conv2, fc1, fc2``)."""

    def __init__(self) -> None:
        """Create the convolutional and linear layers."""
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Map preprocessed images [N,1,28,28] to logits [N,10]."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BNCNN(nn.Module):
    """A CNN whose layers are each followed by BatchNorm: the case where weight error hides layer sensitivity.

    ``conv1`` (1->32) - BN - ReLU - pool, ``conv2`` (32->64) - BN - ReLU - pool, ``conv3`` (64->64) - BN - ReLU,
    then ``fc1`` (3136->128) - BN - ReLU and ``fc2`` (128->10). A BatchNorm rescales each output channel of the
    layer before it by ``gamma / sqrt(running_var)``, so the same weight error costs very different amounts of
    output error per channel: a data-free search scoring weight NMSE cannot see that (issue 9).
    """

    def __init__(self) -> None:
        """Create the convolutional, linear and BatchNorm layers."""
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 7 * 7, 128, bias=False)
        self.bn4 = nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Map preprocessed images [N,1,28,28] to logits [N,10]."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc2(F.relu(self.bn4(self.fc1(x.flatten(1)))))


MODEL_CLASSES: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "bncnn": BNCNN}


def model_class(kind: ModelKind) -> type[nn.Module]:
    """Return the model class for ``"mlp"``, ``"cnn"`` or ``"bncnn"``, raising ValueError otherwise."""
    if kind not in MODEL_CLASSES:
        raise ValueError(f"kind must be one of {sorted(MODEL_CLASSES)}, got {kind!r}")
    return MODEL_CLASSES[kind]


def make_model(kind: ModelKind, seed: int) -> nn.Module:
    """Build a freshly initialised ``"mlp"``, ``"cnn"`` or ``"bncnn"`` with weights seeded by ``seed``."""
    model_cls = model_class(kind)
    torch.manual_seed(seed)
    return model_cls()


def train(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    seed: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    threads: int = NUM_THREADS,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy (deterministic given ``seed``) on ``threads`` threads;
    return it."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = preprocess(images)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for batch in order.split(batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def accuracy(model: ModelOrStateDict, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of a module (set to eval mode) or a ``(model_cls, state_dict)`` pair."""
    if isinstance(model, tuple):
        model_cls, state_dict = model
        model = model_cls()
        model.load_state_dict(state_dict)
    torch.set_num_threads(NUM_THREADS)
    model.eval()
    inputs = preprocess(images)
    targets = torch.as_tensor(labels, dtype=torch.int64)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(inputs), EVAL_BATCH_SIZE):
            logits = model(inputs[start : start + EVAL_BATCH_SIZE])
            correct += int((logits.argmax(1) == targets[start : start + EVAL_BATCH_SIZE]).sum())
    return 100.0 * correct / len(inputs)


def evaluate_state_dict(
    kind: ModelKind, state_dict: StateDict, images: np.ndarray, labels: np.ndarray
) -> float:
    """Accuracy in percent of a ``"mlp"``, ``"cnn"`` or ``"bncnn"`` state_dict on the given images."""
    return accuracy((model_class(kind), state_dict), images, labels)
