"""Stand-ins for modules that nncodec imports only for its dataset and image helpers.

nncodec (Fraunhofer's MPEG NNR coder) imports ``torchvision`` and ``cv2`` at import time for its CIFAR /
ImageNet / VOC loaders and image transforms, none of which its data-free ``compress`` / ``decompress`` path
uses. PyPI torchvision breaks transformers here and opencv is a large binary, so :func:`bench.peers` puts this
folder on ``sys.path`` while it imports nncodec, then removes it again (and the stand-ins from ``sys.modules``),
so nothing else in the process sees them. Every stand-in raises if actually used.
"""
