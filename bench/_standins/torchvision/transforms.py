"""Stand-in for ``torchvision.transforms``: nncodec builds transform pipelines at import time, never runs them."""


class _Unused:
    """A transform that can be built but not applied."""

    def __init__(self, *args, **kwargs) -> None:
        """Accept any arguments (nncodec's module-level pipelines)."""

    def __call__(self, *args, **kwargs):
        """Refuse to run: the bench codes state_dicts, it does not transform images."""
        raise RuntimeError(f"torchvision stand-in: {type(self).__name__} cannot run (bench/_standins)")


class Compose(_Unused):
    """Stand-in for ``transforms.Compose``."""


class Resize(_Unused):
    """Stand-in for ``transforms.Resize``."""


class CenterCrop(_Unused):
    """Stand-in for ``transforms.CenterCrop``."""


class RandomCrop(_Unused):
    """Stand-in for ``transforms.RandomCrop``."""


class RandomHorizontalFlip(_Unused):
    """Stand-in for ``transforms.RandomHorizontalFlip``."""


class ToTensor(_Unused):
    """Stand-in for ``transforms.ToTensor``."""


class Normalize(_Unused):
    """Stand-in for ``transforms.Normalize``."""
