"""A calibrated plan priced at what repair will code (:class:`RepairPrices`, :class:`RepairMenu`).

Repair (:mod:`codec.rd.repair`) does not code a weight's original values: it codes GPTQ's rounding of a ``quant``
weight and the JPEG-compensated values of a ``jpeg`` one (:func:`codec.rd.gptq.gptq_target`,
:func:`codec.rd.gptq.jpeg_target`), which code larger than the original at the same options and err less in the
layer's output. Keep-size then takes the difference back from the plan's options: on the bench BatchNorm CNN at
``-b 0.6`` the plan priced fc1 at JPEG q5.41 on its original's bytes, repair's target at q5.41 cost 2.7 times those
and fc1 was coded at q3.28, while the plan's split of the budget between tensors had been decided on prices not paid
(bench/JOURNAL.md, "small (twenty-ninth pass)" and "price (thirtieth pass)").

Here the search also measures, for each candidate of a priced codec of a tensor whose calibrated weighting has a
full ``H``, that candidate coding repair's target made from the original values and that ``H`` (no refit: that needs
the partly coded model), by its bytes and its output-space distortion against the original values. The search keeps
whichever point of the two serves the budget better; where it keeps a repaired one, the plan's file (the original
values) is under the budget by what the target costs more, and repair is given those bytes (its spare); where it
keeps the uncompensated point of a JPEG tensor, repair codes that tensor without compensation, as it was priced
(:data:`PLAIN_AS_PRICED`).
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from ..dtypes import DType
from ..tensorcodec import EncodeOptions, decode_encoded, encode_tensor
from .allocate import Distortion, Menu, RDPoint, entry_bytes

#: What a repaired candidate's label ends with (:class:`RepairMenu`); a refinement's label keeps it.
REPAIRED = " repaired"


#: Whether :meth:`RepairPrices.of` prices ``quant`` candidates at GPTQ's rounding too. Measured (bench/JOURNAL.md,
#: "price (thirtieth pass)"): it lowered the bench BatchNorm CNN's held-out KL at ``-b 0.6`` by 7.5-9.6 % (conv2 and
#: conv3 to GPTQ's 2 bits, their bytes to fc1), but raised the MLP's at ``-b 0.4`` by 7-11 % (its output layer 5 ->
#: 3 bits): off. JPEG's compensated candidates alone left the MLP's files as they were.
PRICE_GPTQ = False

#: Whether repair codes a ``jpeg`` tensor whose priced plan chose its uncompensated point without compensation, as the
#: plan priced it (:func:`codec.rd.allocate.plan_options`' ``plain``, ``RepairSettings.plain_jpeg``).
#: Measured (bench/JOURNAL.md, "refit (thirty-first pass)"): the bench BatchNorm CNN's plan at ``-b 0.6`` chose fc1's
#: uncompensated q6; repair compensated it anyway, which cost 2.1x q6's bytes (the refit itself 1.04x), and keep-size
#: coded it at q3.92; coded as priced it is q6.23. False: repair compensates every ``jpeg`` weight it can.
PLAIN_AS_PRICED = True


@dataclass(frozen=True)
class RepairPrices:
    """How repair will code the plan's lossy tensors (:func:`plan_options`'s ``price``): GPTQ for ``quant``
    (``quant``), JPEG compensation for ``jpeg`` (``jpeg``), both with damping ``damp`` of the mean diagonal (as
    :attr:`codec.rd.repair.RepairSettings.damp`)."""

    damp: float = 0.01
    jpeg: bool = True
    quant: bool = True
    #: Repair's codings measured so far (:func:`repaired_point`): one save's plans (its first and its replans)
    #: measure the same candidates of the same original values and ``H``, and making a target (the compensation)
    #: is most of a repaired point's cost. Keyed by the values' and ``H``'s digests too, so an instance used again
    #: for other values or other calibration makes its targets again.
    codings: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, settings) -> RepairPrices | None:
        """The prices a save uses for a :class:`codec.rd.repair.RepairSettings`: JPEG's compensated values where it
        compensates, GPTQ's rounding where it rounds by GPTQ and :data:`PRICE_GPTQ` says so; None where none of
        them is priced, or where repair does not keep the plan's size (the plan's prices are then the ones paid)."""
        jpeg, quant = bool(settings.compensate), bool(settings.gptq and PRICE_GPTQ)
        if not settings.keep_size or not (jpeg or quant):
            return None
        return cls(damp=settings.damp, jpeg=jpeg, quant=quant)

    def prices(self, codec: str) -> bool:
        return (codec == "jpeg" and self.jpeg) or (codec == "quant" and self.quant)


class RepairMenu(Menu):
    """A :class:`Menu` that offers, besides each candidate of a priced codec (:class:`RepairPrices`) of a tensor
    whose weighting has a full ``H``, the same options coding repair's target (:func:`repaired_point`): the search
    takes, per tensor, whichever of the two costs less for its error (the hull of both), the plan's options being
    the same. The search's refinement between JPEG qualities measures a repaired point's steps repaired too (its
    label kept)."""

    def __init__(self, menu: Menu, measure_by: Distortion, prices: RepairPrices):
        self.menu, self.measure_by, self.prices = menu, measure_by, prices
        self.fill_front = menu.fill_front
        self._lock = threading.Lock()
        self._held: tuple[str, np.ndarray, dict] | None = None  # the tensor measured now: (name, H, its factors)

    def _full(self, name: str, shape: tuple[int, ...]):
        """``name``'s weighting where it has a full ``H`` over a matrix's columns (not a transposed layer's), or
        None: only such a tensor is priced."""
        w = self.measure_by.weighting(name, shape) if len(shape) >= 2 else None
        if w is None or w.h is None or w.transposed is not None or np.ndim(w.h) != 2:
            return None
        return w

    def _h(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, dict] | None:
        """The full ``H`` of ``name``'s weighting (float64, :meth:`_full`) and the dict its factors are kept in (one
        tensor's at a time: the search measures a tensor's candidates together), or None."""
        w = self._full(name, shape)
        if w is None:
            return None
        with self._lock:
            if self._held is None or self._held[0] != name:
                self._held = None  # (the tensor before's H goes first)
                self._held = (name, np.asarray(w.h, np.float64), {})
            return self._held[1], self._held[2]

    def candidates(self, name: str, array: np.ndarray, dtype: DType, base: EncodeOptions,
                   rows: tuple[int, int] | None = None) -> list[tuple[str, EncodeOptions]]:
        items = self.menu.candidates(name, array, dtype, base, rows)
        if self._full(name, array.shape) is None:
            return items
        return [*items, *((label + REPAIRED, o) for label, o in items if self.prices.prices(o.codec))]

    def measure(self, name: str, array: np.ndarray, dtype: DType, label: str, options: EncodeOptions,
                rows: tuple[int, int] | None = None, offset_digits: int = 10,
                measure_by: Distortion | None = None, keep_decoded: bool = True
                ) -> tuple[RDPoint, np.ndarray | None]:
        measure_by = measure_by or self.measure_by
        held = self._h(name, array.shape) if REPAIRED in label and self.prices.prices(options.codec) else None
        if held is None:
            return self.menu.measure(name, array, dtype, label, options, rows, offset_digits, measure_by,
                                     keep_decoded)
        return repaired_point(name, array, dtype, label, options, rows, measure_by, held, self.prices.damp,
                              offset_digits, keep_decoded, codings=self.prices.codings)


def repaired_point(name: str, array: np.ndarray, dtype: DType, label: str, options: EncodeOptions,
                   rows: tuple[int, int] | None, measure_by: Distortion, held: tuple[np.ndarray, dict],
                   damp: float, offset_digits: int = 10, keep_decoded: bool = True, codings: dict | None = None
                   ) -> tuple[RDPoint, np.ndarray | None]:
    """The point of ``options`` coding repair's target for them (GPTQ's rounding of a ``quant`` tensor, the
    compensated values of a ``jpeg`` one; :func:`codec.rd.gptq.gptq_target`, :func:`codec.rd.gptq.jpeg_target`)
    made from the original values ``array`` and ``held``'s ``H`` (and the dict its factors are kept in): its bytes
    (with the index entry) and its distortion against ``array`` by ``measure_by``. ``codings`` (a dict, one save's:
    :attr:`RepairPrices.codings`) keeps each target's coding, so a later plan of the same save measures it again
    without making it again."""
    from .gptq import gptq_target, jpeg_target

    h, factors = held
    key = None
    if codings is not None:
        digest = hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8), digest_size=16)
        digest.update(np.ascontiguousarray(np.diagonal(h)).view(np.uint8))
        key = (name, tuple(array.shape), rows, options, damp, digest.digest())
    encoded = None if key is None else codings.get(key)
    if encoded is None:
        make = jpeg_target if options.codec == "jpeg" else gptq_target
        target, _ = make(array, dtype, options, h, damp=damp, factors=factors)
        encoded = encode_tensor(target, dtype, options)
        del target
        if key is not None:
            codings[key] = encoded
    decoded = decode_encoded(encoded, dtype, array.shape, name)
    weighted, plain, out_error = measure_by.measure(name, array, decoded, dtype, rows)
    nbytes = sum(map(len, encoded.blobs)) + entry_bytes(name, dtype, tuple(array.shape), encoded, offset_digits)
    return RDPoint(options, label, nbytes, weighted, math.sqrt(plain), out_error), decoded if keep_decoded else None
