"""Rate-distortion: choosing each tensor's setting for a rate target.

:mod:`codec.rd.allocate` measures each tensor's menu of candidate settings
and allocates bits by equal slopes. Encoder side only: nothing here is
needed to decode a file.
"""
