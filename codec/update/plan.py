"""The encoder's side of updates: which base tensor each new tensor is coded from, and the search menu.

For every tensor of the new model, :class:`Matcher` finds its base tensor
(same name, else a bit-identical tensor of another name) and says how it
may be coded: *unchanged* (bit-identical: no blobs), as a *difference*
(same floating dtype and shape, finite values), or only *full*.

:class:`UpdateMenu` plugs into the rate-distortion search
(:func:`codec.rd.allocate.plan_options`): its candidates are the usual
full ones, the same settings applied to the difference, a zero difference
(an unchanged entry) and settings too coarse for a model but useful for a
small difference (``quant`` 1-bit, JPEG quality 1 to 3; for a vector, whose
difference only the lossless codec can hold, the difference with its
significands rounded to a few bits). Every candidate
is measured on the reconstructed new weights (``base + decoded
difference``), so the search trades bytes against the error that matters.
Pure numpy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..dtypes import SIGNIFICAND, DType, round_significand, to_float64
from ..format import BaseRef, TensorEntry
from ..rd import allocate
from ..tensorcodec import Encoded, EncodeOptions, decode_encoded, encode_tensor
from .base import Base, tensor_sha256
from .delta import add_difference, difference

__all__ = ["UpdateOptions", "Matcher", "UpdateMenu", "DELTA_QUALITIES", "DELTA_QUANT_BITS", "DELTA_SIGNIFICAND_BITS"]

#: JPEG qualities added to a difference's menu (below the model menu's lowest): the
#: flat table saturates at 255 below quality 7, so it gets the first only; the ramps differ.
DELTA_QUALITIES = (1, 2, 3)
#: quant pixel bits added to a difference's menu.
DELTA_QUANT_BITS = (1,)
#: Significand bits kept of a lossless difference (a vector's): about 2**-(bits+1) relative error an element.
DELTA_SIGNIFICAND_BITS = (1, 3, 6)


@dataclass(frozen=True)
class UpdateOptions(EncodeOptions):
    """Encoding options of one tensor of an update: ``mode`` is "full", "delta" or "unchanged" (a delta's
    ``significand_bits`` round the difference, :meth:`Matcher.delta_array`)."""

    mode: str = "full"


class Matcher:
    """Finds each new tensor's base tensor and what coding it allows."""

    def __init__(self, base: Base):
        self.base = base
        self._by_hash: dict | None = None
        #: Per new tensor name (its array does not change during one encode): identical ref, deltable.
        self._identical: dict[str, BaseRef | None] = {}
        self._deltable: dict[str, bool] = {}

    def ref(self, name: str) -> BaseRef:
        """The reference to base tensor ``name`` (its hash computed once)."""
        return BaseRef(name, self.base.sha256(name))

    def same_kind(self, name: str, array: np.ndarray, dtype: DType) -> bool:
        """True if the base has ``name`` with this dtype and shape."""
        return name in self.base and (self.base.dtype(name).name, self.base.array(name).shape) == (
            dtype.name, array.shape)

    def identical(self, name: str, array: np.ndarray, dtype: DType) -> BaseRef | None:
        """The base tensor bit-identical to ``array`` (the same name first, else any name), or None."""
        if name not in self._identical:
            if self.same_kind(name, array, dtype) and _same_bits(self.base.array(name), array):
                found: str | None = name
            else:
                if self._by_hash is None:
                    self._by_hash = self.base.by_hash()
                found = self._by_hash.get((tensor_sha256(array), dtype.name, tuple(array.shape)))
            self._identical[name] = None if found is None else self.ref(found)
        return self._identical[name]

    def can_delta(self, name: str, array: np.ndarray, dtype: DType) -> bool:
        """True if ``name`` may be coded as a difference: same floating dtype and shape, finite on both sides."""
        if name not in self._deltable:
            self._deltable[name] = bool(dtype.floating and self.same_kind(name, array, dtype)
                                        and np.isfinite(to_float64(array, dtype)).all()
                                        and np.isfinite(to_float64(self.base.array(name), dtype)).all())
        return self._deltable[name]

    def decide(self, name: str, array: np.ndarray, dtype: DType, options: EncodeOptions) -> tuple[str, BaseRef | None]:
        """``(mode, base ref)`` for one tensor: unchanged when bit-identical, else the options' mode
        (UpdateOptions, from the search), else a difference where allowed, else full."""
        same = self.identical(name, array, dtype)
        if same is not None:
            return "unchanged", same
        mode = getattr(options, "mode", None)
        if mode == "unchanged" and self.same_kind(name, array, dtype):
            return "unchanged", self.ref(name)
        if mode in (None, "delta") and self.can_delta(name, array, dtype):
            return "delta", self.ref(name)
        return "full", None

    def delta_array(self, name: str, array: np.ndarray, dtype: DType, options: EncodeOptions | None = None
                    ) -> np.ndarray:
        """What a difference entry codes: ``new - base`` rounded to the dtype (and to the options'
        ``significand_bits``)."""
        diff = difference(array, self.base.array(name), dtype)
        bits = getattr(options, "significand_bits", None)
        return diff if bits is None else round_significand(diff, dtype, bits)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """True if two storage arrays hold the same bytes (NaN payloads and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                               np.ascontiguousarray(b).reshape(-1).view(np.uint8)))


def _ref_bytes(ref: BaseRef) -> int:
    """Bytes a base reference adds to an entry: ``,"base":{...}``."""
    return len(json.dumps(ref.to_json(), ensure_ascii=False, separators=(",", ":")).encode()) + len(',"base":')


class UpdateMenu(allocate.Menu):
    """The search menu of an update (module docstring); full tensors keep the model menu."""

    fill_front = True

    def __init__(self, matcher: Matcher):
        self.matcher = matcher

    def candidates(self, name: str, array: np.ndarray, dtype: DType, base: EncodeOptions,
                   rows: tuple[int, int] | None = None) -> list[tuple[str, EncodeOptions]]:
        m = self.matcher
        if m.identical(name, array, dtype) is not None:
            return [("unchanged", UpdateOptions(**_fields(base.with_(codec="lossless")), mode="unchanged"))]
        full = [(f"full {label}", UpdateOptions(**_fields(o), mode="full"))
                for label, o in super().candidates(name, array, dtype, base, rows)]
        if not m.same_kind(name, array, dtype):
            return full
        menu = full + [("unchanged", UpdateOptions(**_fields(base.with_(codec="lossless")), mode="unchanged"))]
        if not m.can_delta(name, array, dtype):
            return menu
        delta = [(label, o) for label, o in super().candidates(name, array, dtype, base, rows) if o.codec != "lossless"]
        if delta:  # a matrix: add the settings only a small difference is worth
            delta += [(f"quant b{b} {h}x{w}", base.with_(codec="quant", bits=b, row_shape=None, tile=(h, w)))
                      for h, w in allocate.TILES for b in DELTA_QUANT_BITS]
            if any(o.codec == "jpeg" for _, o in delta):
                delta += [(f"jpeg q{q} flat {h}x{w}", base.with_(codec="jpeg", quality=q, table="flat",
                                                                  row_shape=None, tile=(h, w)))
                          for h, w in allocate.TILES for q in DELTA_QUALITIES[:1]]
                delta += [(f"jpeg q{q} {t} rows{rows[0]}x{rows[1]}", base.with_(codec="jpeg", quality=q, table=t,
                                                                                  row_shape=rows))
                          for t in allocate.ROW_TABLES if rows is not None
                          for q in (DELTA_QUALITIES[:1] if t == "flat" else DELTA_QUALITIES)]
        else:  # a vector or a small matrix: the difference losslessly (the sum rounds once), or rounded first
            lossless = UpdateOptions(**_fields(base.with_(codec="lossless")), mode="delta")
            return menu + [("delta lossless", lossless)] + [
                (f"delta lossless s{b}", UpdateOptions(**{**_fields(lossless), "mode": "delta", "significand_bits": b}))
                for b in DELTA_SIGNIFICAND_BITS if b < SIGNIFICAND.get(dtype.name, 0)]
        return menu + [(f"delta {label}", UpdateOptions(**_fields(o), mode="delta")) for label, o in delta]

    def measure(self, name: str, array: np.ndarray, dtype: DType, label: str, options: EncodeOptions,
                rows: tuple[int, int] | None = None, offset_digits: int = 10,
                measure_by: allocate.Distortion = allocate.DATA_FREE, keep_decoded: bool = True
                ) -> tuple[allocate.RDPoint, np.ndarray | None]:
        mode, ref = self.matcher.decide(name, array, dtype, options)
        if mode == "full":
            return super().measure(name, array, dtype, label, options, rows, offset_digits, measure_by, keep_decoded)
        base = self.matcher.base.array(ref.name)
        shape = tuple(array.shape)
        if mode == "unchanged":
            recon = base
            nbytes = len(json.dumps(TensorEntry(name, dtype, shape, base=ref).to_json(), ensure_ascii=False,
                                    separators=(",", ":")).encode()) + 1
        else:
            encoded: Encoded = encode_tensor(self.matcher.delta_array(name, array, dtype, options), dtype, options)
            recon = add_difference(base, decode_encoded(encoded, dtype, shape, name), dtype)
            nbytes = (sum(map(len, encoded.blobs)) + _ref_bytes(ref)
                      + allocate.entry_bytes(name, dtype, shape, encoded, offset_digits))
        as_float = to_float64 if dtype.floating else (lambda a, _: a.astype(np.float64))
        reference, values = as_float(array, dtype), as_float(recon, dtype)
        plain = allocate.distortion(reference, values)[1]
        weighted, out_error = measure_by(name, reference, values, rows)
        return allocate.RDPoint(options, label, nbytes, weighted, math.sqrt(plain), out_error), recon


def _fields(options: EncodeOptions) -> dict:
    """The fields of ``options`` (to rebuild them as UpdateOptions), without an update mode."""
    from dataclasses import fields

    return {f.name: getattr(options, f.name) for f in fields(EncodeOptions)}
