"""Stand-in for ``cv2``: nncodec's transforms module imports it for image loading the bench never does."""

INTER_CUBIC = 2


def __getattr__(name: str):
    """Any other use is an error: the bench does not load images through nncodec."""
    raise AttributeError(f"cv2.{name}: the bench's cv2 stand-in only lets nncodec import (bench/_standins)")
