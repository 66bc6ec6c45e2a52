"""Stand-in for ``torchvision.datasets``: nncodec subclasses ``ImageFolder`` at import time, never instantiates it."""


class _Unused:
    """A dataset class that can be subclassed but not created."""

    def __init__(self, *args, **kwargs) -> None:
        """Refuse: the bench does not load datasets through nncodec."""
        raise RuntimeError(f"torchvision stand-in: {type(self).__name__} cannot be created (bench/_standins)")


class ImageFolder(_Unused):
    """Stand-in for ``datasets.ImageFolder``."""


class CIFAR10(_Unused):
    """Stand-in for ``datasets.CIFAR10``."""


class CIFAR100(_Unused):
    """Stand-in for ``datasets.CIFAR100``."""


class VOCSegmentation(_Unused):
    """Stand-in for ``datasets.VOCSegmentation``."""
