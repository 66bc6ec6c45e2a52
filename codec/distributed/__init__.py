"""Encoding on a cluster: :mod:`codec.distributed.ray` codes tensors on Ray workers."""
