"""Rate-distortion allocation: spend bits where accuracy needs them.

Every tensor that may be coded lossily gets a menu of candidate settings
(:func:`candidates`: lossless; ``quant`` at 2..8 bits and ``jpeg`` with the
flat table at a ladder of qualities, each on 64x64 and 8x64 tiles; and, for
image-like rows, rows mode with the ramp and flat tables). Above 8 bits the
menu reaches ``quant`` at 10, 12 and 16 bits on 64x64 tiles
(:data:`HIGH_QUANT_BITS`; at those depths the per-tile parameters cost under
0.01 bits/weight, so shorter tiles gain little), measured only when they can
matter, so the menu's time stays that of the 2..8-bit menu for ordinary
targets: for a budget of at least :data:`HIGH_BITS_FROM` bits/weight, or a
maximum error that no point of the ordinary menu meets but lossless. Without
them ``-b 10`` landed at 7.6 bits/weight and ``--max-error 0.001`` at
lossless (27 bits/weight) where 12-bit quant meets it at 11.7. Each candidate is
encoded and decoded once to measure its exact rate (bytes, including the
index entry) and distortion. The allocator then picks one point per tensor:

- for a **bit budget**, by equal-slope (Lagrangian) allocation over the
  lower convex hull of each tensor's points, then intermediate qualities
  for the JPEG choices whose next step is worth most, then a greedy pass
  that spends what is left on the best remaining upgrades;
- for a **maximum error**, the cheapest point within the bound.

Distortion is data-free by default: the normalized squared error
``NMSE = ||W' - W||^2 / ||W||^2``, which for a linear layer with white
inputs is the relative perturbation of its output energy; perturbations of
successive layers add to first order, so the total is ``sum_t w_t *
NMSE_t`` with every ``w_t = 1``. Each layer matters as much as any other,
whatever its size, which protects small output layers that a per-weight
measure would starve.

Rows that are images -- the rows of ``row_shape``, or, data-free, those of
the model's first matrix when they are square (``C = k*k``, ``k >= 8``, not
a power of two: a first layer over image inputs) -- are measured under a
natural-image prior instead: each row's error, seen as an image, is
weighted in the 2-D Fourier domain by the power spectrum
``1 / (f^2 + 1/(h*w))``, so error where inputs carry little energy (high
frequencies) costs little. On the seed MLP this ranks candidates like the
true input covariance does, where plain NMSE prefers the flat table that
loses more accuracy.

The measure is pluggable (:class:`Distortion`): a tensor with a
:class:`Weighting` is scored in output space instead, by the relative error
it causes in its layer's output, ``tr(R dW H dW^T) / tr(R W H W^T)``,
times the layer's sensitivity. ``H`` and the sensitivity come from
calibration data (:mod:`codec.rd.calibrate`); the per-row weights ``R``
come from what the state_dict reveals, a BatchNorm or LayerNorm right after
the layer (:func:`norm_weightings`), with data or without
(:func:`merge_weightings`). A budget
search never leaves a tensor over :data:`DAMAGE` relative error when the
budget allows otherwise, and says so, naming the budget that would, when
it does not. A calibration hook (:func:`sensitivities`) replaces the
weights by measured score drops per unit distortion when the caller can
score a model, probed at about 1 % error and then again at the errors the
plan lands on (:mod:`codec.rd.probe`).

Pure numpy; knows nothing about torch or files.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import weakref
from contextvars import ContextVar
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..dtypes import SIGNIFICAND, DType, get_dtype, to_float64
from ..errors import EncodeError
from ..format import TensorEntry, compress_index
from ..parallel import INLINE, make_executor
from ..blobcodecs.zstd import release_scratch
from . import ladder
from ..tensorcodec import (Encoded, EncodeOptions, decode_encoded, decoded_bands, encode_tensor,
                           lossless_reason)

if TYPE_CHECKING:
    from .price import RepairPrices

__all__ = ["RDPoint", "Menu", "Weighting", "Distortion", "DATA_FREE", "DAMAGE", "WARNINGS_KEY", "norm_weightings",
           "pareto_front", "candidates", "Reparam", "reparametrized", "computed_shapes", "computed_values",
           "stored_weightings", "measure", "distortion", "image_side", "row_images", "lower_hull", "allocate_budget",
           "fill_budget", "spend_slack", "trade", "best_fill", "allocate_max_error", "sensitivities", "plan_options",
           "search_units", "merge_weightings", "packed_weightings", "PackedSymmetric", "high_bit_candidates",
           "with_row_images", "JPEG_QUALITIES", "QUANT_BITS", "HIGH_QUANT_BITS", "HIGH_BITS_FROM", "ROW_TABLES",
           "TILES"]

#: JPEG qualities on each tensor's menu.
JPEG_QUALITIES = (5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95, 98)
#: quant pixel bits on each tensor's menu.
QUANT_BITS = (2, 3, 4, 5, 6, 8)
#: Significand bits of the rounded lossless option on the menu of a tensor too small or thin for quant (biases,
#: norm layers' parameters, a 24x1x3x3 convolution): at most 2**-9 relative error an element, against the
#: tenths the lossy tensors beside them carry, for 45-55 % fewer bytes (float32 vectors of the bench's
#: Fashion-MNIST nets; 5-8 % of their files at 0.4-0.6 bits/weight). The search keeps them exact where the
#: budget allows; a user's ``lossless`` override keeps them exact always.
VECTOR_BITS = 8
#: quant pixel bits above 8, on 64x64 tiles, measured only for high targets (module docstring).
HIGH_QUANT_BITS = (10, 12, 16)
#: A budget of at least this many bits/weight measures :data:`HIGH_QUANT_BITS` (8-bit quant costs about 7.3
#: on Gaussian weights, so the equal-slope allocation may then give some tensors more than 8 bits).
HIGH_BITS_FROM = 6.0
#: JPEG tables tried for image-like rows: the prior-matched ramps and flat
#: (grid tiles use flat). Annex K is left out: the 1/f^2 prior ranks it
#: best at 1.2-1.5 bits/weight on the seed MLP, yet it loses 0.5-0.8 points
#: more accuracy there than ramp2 at the same size (it drops all high
#: frequencies, which Fashion-MNIST's edges do use).
ROW_TABLES = ("ramp1", "ramp2", "flat")
#: Grid tile shapes on each tensor's menu: square tiles, and short wide
#: ones whose own offset/scale follow outlier rows (measured on MiniLM:
#: at equal rate, 8x64 tiles cut the error of 64x64 ones by about 10 %).
TILES = ((64, 64), (8, 64))
#: Relative error (of the layer's output where known, else the allocation's
#: own measure; :attr:`RDPoint.damage`) above which a tensor counts as
#: destroyed: at 0.5 the error carries a quarter of the signal's energy, and
#: the issue-9 BatchNorm CNN fell to chance with tensors at 0.88-0.97. A
#: budget search avoids such points whenever the budget allows, and says so
#: otherwise.
DAMAGE = 0.5
#: Metadata key under which :func:`codec.save` stores the allocation's warnings ("; "-joined).
WARNINGS_KEY = "jwt.warnings"
#: Index bytes kept free for the warnings entry, beyond the notes' own JSON length.
NOTE_BYTES_RESERVE = len(json.dumps(WARNINGS_KEY)) + 4


def notes_room(damaged: Sequence[str], packed: bool = False) -> int:
    """Index bytes the warnings entry of ``damaged`` (its lines) takes: :data:`NOTE_BYTES_RESERVE` and the lines'
    JSON, or, in an index written zstd-compressed (``packed``), that JSON compressed on its own (the most it adds to
    the compressed index: the tensor names it repeats are in the index already). A small ViT's 25 damaged tensors
    at its smallest encoding: 4,240 bytes as JSON, 330 compressed."""
    text = json.dumps("; ".join(damaged)).encode()
    return NOTE_BYTES_RESERVE + (len(compress_index(text)) if packed else len(text))


#: Rate searches of :func:`plan_options`.
SEARCHES = ("fast", "exhaustive")


@dataclass
class RDPoint:
    """One measured candidate of one tensor."""

    options: EncodeOptions
    label: str
    nbytes: int  # blobs plus the tensor's index entry
    nmse: float  # the allocation's distortion measure (image-prior weighted for image rows)
    rel_error: float = 0.0  # plain relative RMS error ||W' - W|| / ||W||
    out_error: float | None = None  # relative RMS error of the layer's output, where a Weighting knows it

    @property
    def damage(self) -> float:
        """The relative error that says whether the tensor is destroyed (:data:`DAMAGE`): of the
        layer's output where known, else the square root of the allocation distortion."""
        return self.out_error if self.out_error is not None else math.sqrt(self.nmse)

    @property
    def bound_error(self) -> float:
        """The error ``max_error`` bounds: of the layer's output where known, else of the weights."""
        return self.out_error if self.out_error is not None else self.rel_error


def candidates(array: np.ndarray, dtype: DType, base: EncodeOptions,
               rows: tuple[int, int] | None = None) -> list[tuple[str, EncodeOptions]]:
    """The labelled settings worth measuring for one tensor (``rows``: its row image shape, if any)."""
    menu = [("lossless", base.with_(codec="lossless", significand_bits=None))]
    if lossless_reason(array, dtype, "quant") is not None:
        if VECTOR_BITS < SIGNIFICAND.get(dtype.name, 0):
            menu.append((f"lossless s{VECTOR_BITS}", base.with_(codec="lossless", significand_bits=VECTOR_BITS)))
        return menu
    if _two_valued(array):  # a 0/1 mask (torch.nn.utils.prune's weight_mask): 1-bit quant codes it exactly
        return menu + [(f"quant b1 {h}x{w}", base.with_(codec="quant", bits=1, row_shape=None, tile=(h, w)))
                       for h, w in TILES]
    menu += [(f"quant b{b} {h}x{w}", base.with_(codec="quant", bits=b, row_shape=None, tile=(h, w)))
             for h, w in TILES for b in QUANT_BITS]
    if lossless_reason(array, dtype, "jpeg") is None:
        cols = math.prod(array.shape[1:])
        menu += [(f"jpeg q{q} flat {h}x{w}", base.with_(codec="jpeg", quality=q, table="flat", row_shape=None,
                                                        tile=(h, w)))
                 for h, w in TILES for q in JPEG_QUALITIES]
        if rows is not None and rows[0] * rows[1] == cols:
            for table in ROW_TABLES:
                menu += [(f"jpeg q{q} {table} rows{rows[0]}x{rows[1]}",
                          base.with_(codec="jpeg", quality=q, table=table, row_shape=rows))
                         for q in JPEG_QUALITIES]
    return menu


def _two_valued(array: np.ndarray) -> bool:
    """Whether ``array`` (storage form) holds exactly two distinct values: 1-bit quant maps them to the tile's
    extremes, exactly where the parameters represent them (0 and 1: offset 0, scale 1). At 2 bits and more the
    scale is rounded up to a parameter (1/3 -> 0.33398 in bfloat16), so a mask's ones would decode as 1.0020."""
    flat = array.reshape(-1)
    if flat.size < 2:
        return False
    lo, hi = flat.min(), flat.max()
    return bool(lo != hi and np.all((flat == lo) | (flat == hi)))


def high_bit_candidates(array: np.ndarray, dtype: DType, base: EncodeOptions) -> list[tuple[str, EncodeOptions]]:
    """The ``quant`` settings above 8 bits (64x64 tiles) for a tensor that quant may code, else none."""
    if lossless_reason(array, dtype, "quant") is not None:
        return []
    return [(f"quant b{b} 64x64", base.with_(codec="quant", bits=b, row_shape=None, tile=(64, 64)))
            for b in HIGH_QUANT_BITS]


def _wants_high_bits(points: list[RDPoint], bits_per_weight: float | None, max_error: float | None) -> bool:
    """Whether a tensor's menu should reach above 8 bits, after its ordinary menu gave ``points``."""
    if bits_per_weight is not None:
        return bits_per_weight >= HIGH_BITS_FROM
    lossy = [p.rel_error for p in points if p.options.codec != "lossless"]
    return max_error is not None and bool(lossy) and min(lossy) > max_error


def entry_bytes(name: str, dtype: DType, shape: tuple[int, ...], encoded: Encoded, offset_digits: int) -> int:
    """Bytes the tensor's index entry takes (offsets counted at ``offset_digits`` digits)."""
    entry = TensorEntry(name, dtype, shape, encoded.codec, encoded.tiling)
    doc = entry.to_json()
    doc["blobs"] = [[10 ** (offset_digits - 1), len(b), 0xFFFFFFFF] for b in encoded.blobs]
    return len(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()) + 1


def image_side(shape: tuple[int, ...]) -> int | None:
    """``k`` if a tensor's rows could be ``k x k`` images, else None.

    ``C = k*k`` with ``k >= 8`` and ``C`` not a power of two (hidden sizes
    such as 256 or 1024 are squares too, but powers of two; image sides such
    as MNIST's 28 are not).
    """
    if len(shape) < 2:
        return None
    cols = math.prod(shape[1:])
    k = math.isqrt(cols)
    return k if k >= 8 and k * k == cols and cols & (cols - 1) else None


def row_images(shape: tuple[int, ...], base: EncodeOptions, input_layer: bool) -> tuple[int, int] | None:
    """The image shape of a tensor's rows, for the image prior and rows-mode candidates, or None.

    The user's ``row_shape`` where it fits the rows; otherwise, data-free,
    only the model's input layer (its first matrix) whose rows are square
    (:func:`image_side`): a deeper layer's rows are feature maps or hidden
    units, not images, even when their count happens to be a square (a CNN's
    64 x 7 x 7 = 56^2 flattened features).
    """
    cols = math.prod(shape[1:]) if len(shape) >= 2 else 0
    if base.row_shape is not None and base.row_shape[0] * base.row_shape[1] == cols:
        return base.row_shape
    k = image_side(shape) if input_layer else None
    return (k, k) if k is not None else None


def _is_matrix(shape: tuple[int, ...], dtype: DType) -> bool:
    """Whether a tensor counts as a layer's matrix for the input-layer rule of :func:`row_images`: floating, two
    dimensions over 1. A vector held as a matrix (weight_norm's ``g``, ``[out, 1]`` or ``[out, 1, 1, 1]``, stored
    before its ``v``) is not the input layer: it took that place from the layer's ``v``, whose rows then lost the
    image prior and the row-image candidates (bench/JOURNAL.md, "fold (twenty-eighth pass)")."""
    return len(shape) >= 2 and dtype.floating and sum(d > 1 for d in shape) >= 2


def with_row_images(tensors: Iterable[tuple[str, np.ndarray, DType]],
                    base: EncodeOptions) -> Iterator[tuple[str, np.ndarray, DType, tuple[int, int] | None]]:
    """``(name, array, dtype, rows)`` for each tensor: ``rows`` is :func:`row_images` of a floating matrix,
    the first one (with two dimensions over 1) counting as the model's input layer; None for anything else."""
    seen_matrix = False
    for name, array, dtype in tensors:
        is_matrix = _is_matrix(array.shape, dtype)
        rows = row_images(array.shape, base, input_layer=not seen_matrix) if is_matrix else None
        seen_matrix |= is_matrix
        yield name, array, dtype, rows


def _prior_energy(matrix: np.ndarray, rows: tuple[int, int], row_weights: np.ndarray | None = None) -> float:
    """Energy of row images of shape ``rows`` weighted by the natural-image spectrum prior (and each row's by
    ``row_weights``, one per row of ``matrix``, where given)."""
    h, w = rows
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    weight = 1.0 / (fy**2 + fx**2 + 1.0 / (h * w))
    spectrum = np.fft.fft2(matrix.reshape(-1, h, w))
    if row_weights is None:
        return float(np.sum(weight * (spectrum.real**2 + spectrum.imag**2)))
    per_row = np.einsum("ijk,jk->i", spectrum.real**2 + spectrum.imag**2, weight)
    return float(per_row @ np.asarray(row_weights, np.float64))


def distortion(reference: np.ndarray, decoded: np.ndarray,
               rows: tuple[int, int] | None = None) -> tuple[float, float]:
    """``(allocation distortion, plain NMSE)`` of ``decoded`` against ``reference`` (float64).

    The allocation distortion is the image-prior weighted NMSE when the rows
    are images of shape ``rows``, else the plain NMSE.
    """
    diff = decoded - reference
    err, energy = float(np.sum(diff * diff)), float(np.sum(reference * reference))
    plain = err / energy if energy > 0 else (0.0 if err == 0 else math.inf)
    if rows is None:
        return plain, plain
    err, energy = _prior_energy(diff, rows), _prior_energy(reference, rows)
    return (err / energy if energy > 0 else (0.0 if err == 0 else math.inf)), plain


@dataclass
class Weighting:
    """How one tensor's error reaches the model's output: its output-space distortion.

    The tensor, seen as a matrix ``W`` of rows (output units) by columns
    (``weight.reshape(out, -1)``), gets the relative output error
    ``tr(R dW H dW^T) / tr(R W W H^T)`` with ``H`` the second moment of the
    layer's inputs over the columns (``h``: full ``(C, C)``, its diagonal
    ``(C,)``, or None for white inputs) and ``R`` a diagonal of per-row
    weights (``rows``, or None for equal rows: e.g. a following
    BatchNorm's squared scale). The allocation distortion is that times
    ``scale``, the layer's measured sensitivity of the model's output.

    ``transposed`` (a transposed convolution's groups): the tensor is such a
    layer's weight ``[in, out/groups, *kernel]``, whose output error is that
    of the matrix ``[out, in/groups * prod(kernel)]`` with ``H`` over its
    columns (:func:`codec.rd.calibrate.transposed_matrix`): scored in that
    view, a whole tensor at once (its rows couple every stored row of a group).
    """

    h: np.ndarray | None = None
    rows: np.ndarray | None = None
    scale: float = 1.0
    #: With ``rows`` alone: on a tensor whose rows are images (:func:`row_images`), weigh the image prior's
    #: per-row energies by ``rows`` instead of measuring plain output space (a weight_norm layer's ``v`` in the
    #: input layer: its rows' factors and the prior both; :func:`stored_weightings`).
    prior: bool = False
    transposed: int | None = None

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether this weighting applies to a tensor of ``shape``."""
        if len(shape) < 2:
            return False
        if self.transposed is not None:
            groups = self.transposed
            cols = shape[0] // groups * math.prod(shape[2:])
            return (len(shape) >= 3 and shape[0] % groups == 0 and self.h is not None and self.h.shape[0] == cols
                    and (self.rows is None or len(self.rows) == shape[1] * groups))
        cols = math.prod(shape[1:])
        return ((self.h is None or self.h.shape[0] == cols) and (self.rows is None or len(self.rows) == shape[0]))

    def energy(self, matrix: np.ndarray) -> float:
        """``tr(R M H M^T)`` of a ``(rows, columns)`` float64 matrix."""
        return self.banded()(matrix, 0)

    def banded(self) -> Callable[[np.ndarray, int], float]:
        """:meth:`energy` of bands of one tensor's rows, ``f(band, first row)``, whose terms sum to the whole's.
        A full ``H`` is made float32 once for all bands (not per band, nor kept: it is calibration's size).
        ``transposed``: one band, the whole tensor's ``[in, rest]`` view."""
        if self.h is not None and self.h.ndim == 2:  # float32 product: the measure needs 3 digits, not 15
            h32 = (self.h.unpacked() if isinstance(self.h, PackedSymmetric) else self.h).astype(np.float32, copy=False)

        def energy(matrix: np.ndarray, first_row: int) -> float:
            if self.transposed is not None:
                if first_row != 0:
                    raise ValueError("a transposed convolution's weighting scores the whole tensor at once")
                groups, c_in = self.transposed, matrix.shape[0]
                kernel = self.h.shape[0] * groups // c_in
                matrix = np.ascontiguousarray(matrix.reshape(groups, c_in // groups, -1, kernel).transpose(
                    0, 2, 1, 3).reshape(-1, self.h.shape[0]))
            if self.h is None:
                per_row = np.einsum("ij,ij->i", matrix, matrix)
            elif self.h.ndim == 1:
                per_row = (matrix * matrix) @ self.h
            else:
                m32 = matrix.astype(np.float32)
                per_row = np.einsum("ij,ij->i", m32 @ h32, m32).astype(np.float64)
            return float(per_row @ self.rows[first_row : first_row + len(per_row)] if self.rows is not None
                         else per_row.sum())

        return energy


class PackedSymmetric:
    """A symmetric matrix held as its upper triangle, row after row: half the bytes of the whole.

    A calibrated search holds every layer's ``H`` from calibration to its end but reads one tensor's at a time
    (:meth:`Weighting.banded`, once per candidate measured): all-MiniLM-L6-v2's 36 float32 ``H`` take 74 MB whole,
    37 packed. :meth:`unpacked` gives the whole matrix back bit for bit, shared by the threads measuring the same
    tensor's candidates at once and freed when the last of them lets it go (a weak reference), so the search holds
    the packed triangles plus one whole ``H``. Also answers ``shape``, ``ndim``, ``dtype``, ``astype`` and indexing
    as the whole array does."""

    ndim = 2

    def __init__(self, full: np.ndarray):
        n = full.shape[0]
        self.shape, self.dtype = (n, n), full.dtype
        self.triangle = np.empty(n * (n + 1) // 2, full.dtype)
        offset = 0
        for i in range(n):
            self.triangle[offset:offset + n - i] = full[i, i:]
            offset += n - i
        self._whole: weakref.ref | None = None
        self._lock = threading.Lock()

    @staticmethod
    def packs(h: object) -> bool:
        """Whether ``h`` is a square float matrix equal to its transpose bit for bit (NaN: no), which packing
        keeps exactly."""
        return (isinstance(h, np.ndarray) and h.ndim == 2 and h.shape[0] == h.shape[1] and h.shape[0] > 1
                and h.dtype.kind == "f" and bool(np.array_equal(h, h.T)))

    def unpacked(self) -> np.ndarray:
        """The whole matrix (read only; the same array for every caller while one holds it)."""
        with self._lock:
            whole = self._whole() if self._whole is not None else None
            if whole is None:
                n = self.shape[0]
                whole = np.empty(self.shape, self.dtype)
                offset = 0
                for i in range(n):
                    row = self.triangle[offset:offset + n - i]
                    whole[i, i:] = row
                    whole[i:, i] = row
                    offset += n - i
                whole.flags.writeable = False
                self._whole = weakref.ref(whole)
            return whole

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return self.unpacked().astype(dtype, copy=copy)

    def __getitem__(self, key) -> np.ndarray:
        return self.unpacked()[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.unpacked()
        return whole if dtype is None else whole.astype(dtype)


def packed_weightings(weightings: Mapping[str, Weighting], *, in_place: bool = False) -> dict[str, Weighting]:
    """``weightings`` with each full ``H`` that is exactly symmetric held packed (:class:`PackedSymmetric`): the same
    measures bit for bit in half the memory, once the caller drops its own references to the whole matrices
    (:func:`codec.encode.save` drops the calibration it made).

    ``in_place`` (``weightings`` a dict the caller hands over): each entry is replaced as it is packed, so a whole
    ``H`` nothing else holds is freed before the next is packed, and the search's packed triangles never sit beside
    all the whole matrices (a BERT-base: 521 MB of float32 ``H`` and 260 MB packed at once before); the dict itself
    is returned."""
    out = weightings if in_place else {}
    for name in list(weightings):  # (names only: a list of the entries would hold every whole H to the end)
        w = weightings[name]
        out[name] = replace(w, h=PackedSymmetric(w.h)) if PackedSymmetric.packs(w.h) else w
    return out


#: Elements per band of rows when a candidate is measured (:meth:`Distortion.measure`): the float64 temporaries are
#: a band's, not the tensor's. Whole, all-MiniLM-L6-v2's 11.7 M-weight embedding took four float64 copies (375 MB)
#: per candidate and thread, which set the calibrated encode's peak (1.2 GB above the model).
MEASURE_BAND = 1 << 18


class Distortion:
    """The allocation's distortion measure: pluggable, one object for a whole model.

    Called as ``(name, reference, decoded, rows)`` on float64 arrays, it
    returns ``(allocation distortion, relative output error or None)``.
    Tensors with a :class:`Weighting` (from calibration, or what the
    state_dict reveals: :func:`norm_weightings`) are measured in output
    space; the others keep the data-free NMSE, or the image prior for
    image-like rows (``rows``), and give None as output error.
    """

    def __init__(self, weightings: Mapping[str, Weighting] | None = None):
        self.weightings = dict(weightings or {})
        self._reference: dict[str, float] = {}  # name -> tr(R W H W^T), computed once
        self._plain: dict[str, float] = {}  # name -> ||W||^2 (summed by bands as measure sums it), with the above
        self._keeping: str | None = None  # the tensor whose candidates are being measured (:meth:`keeping`)
        self._kept: tuple[str, Weighting, Callable[[np.ndarray, int], float]] | None = None
        self._lock = threading.Lock()

    @contextmanager
    def keeping(self, name: str) -> Iterator[None]:
        """While inside, every measure of tensor ``name`` uses one :meth:`Weighting.banded` (its float32 ``H``, a
        packed one unpacked once) instead of making it again per candidate; it is let go on leaving, so the search
        holds one tensor's whole ``H`` at a time, as it did while measuring one candidate. (A base-size model's
        3,072-column ``H`` was unpacked for each of its candidates: 38 MB of fresh pages, ~27 ms each.)"""
        self._keeping, self._kept = name, None
        try:
            yield
        finally:
            self._keeping = self._kept = None

    def _banded(self, name: str, w: Weighting) -> Callable[[np.ndarray, int], float]:
        if self._keeping != name:
            return w.banded()
        with self._lock:  # the threads measuring one tensor's candidates share it
            kept = self._kept
            if kept is None or kept[0] != name or kept[1] is not w:
                kept = self._kept = (name, w, w.banded())
            return kept[2]

    def weighting(self, name: str, shape: tuple[int, ...]) -> Weighting | None:
        """The weighting of tensor ``name`` if it has one that fits ``shape``."""
        w = self.weightings.get(name)
        return w if w is not None and w.fits(shape) else None

    def __call__(self, name: str, reference: np.ndarray, decoded: np.ndarray,
                 rows: tuple[int, int] | None = None) -> tuple[float, float | None]:
        weighted, _, out_error = self.measure(name, reference, decoded, _FLOAT64, rows)
        return weighted, out_error

    def measure(self, name: str, reference: np.ndarray, decoded: np.ndarray | Callable[[int, int], np.ndarray],
                dtype: DType, rows: tuple[int, int] | None = None) -> tuple[float, float, float | None]:
        """``(allocation distortion, plain NMSE, relative output error or None)`` of ``decoded`` against
        ``reference``, both in ``dtype``'s storage form, widened to float64 a band of :data:`MEASURE_BAND`
        elements (whole rows) at a time, so measuring a candidate holds no float64 copy of the tensor.
        ``decoded`` may also give those bands itself, ``decoded(first row, end row)`` of its ``[rows, cols]``
        view, asked for in order (:class:`_DecodedRows`: then not even the decoded tensor is held whole)."""
        if reference.size == 0:  # an empty tensor (shape (0, 5)): nothing to lose
            return 0.0, 0.0, None
        w = self.weighting(name, reference.shape)
        count = reference.shape[0] if reference.ndim else 1
        ref = reference.reshape(count, -1)
        dec = (lambda i0, i1, whole=decoded.reshape(count, -1): whole[i0:i1]) if isinstance(decoded, np.ndarray) \
            else decoded
        step = max(1, MEASURE_BAND // max(1, ref.shape[1])) if w is None or w.transposed is None else count
        w_energy = self._reference.get(name) if w is not None else None
        known = w_energy is not None
        err = w_err = 0.0
        # a weighted tensor's reference energies are summed once, as its first measure sums them (the same bits)
        energy = self._plain.get(name) if known else None
        plain_known = energy is not None
        energy = energy or 0.0
        w_energy = w_energy or 0.0
        band_energy = None if w is None else self._banded(name, w)
        for i in range(0, count, step):
            r, d = _widen(ref[i : i + step], dtype), _widen(dec(i, min(i + step, count)), dtype)
            diff = d - r
            err += float(np.sum(diff * diff))
            if not plain_known:
                energy += float(np.sum(r * r))
            if w is not None and w.prior and rows is not None:  # the prior's row energies, weighted
                part = w.rows[i : i + len(r)]
                w_err += _prior_energy(diff, rows, part)
                w_energy += 0.0 if known else _prior_energy(r, rows, part)
            elif w is not None:
                w_err += band_energy(diff, i)
                w_energy += 0.0 if known else band_energy(r, i)
            elif rows is not None:
                w_err += _prior_energy(diff, rows)
                w_energy += _prior_energy(r, rows)
        plain = _ratio(err, energy)
        if w is None:
            return (plain if rows is None else _ratio(w_err, w_energy)), plain, None
        if not known:
            self._reference[name], self._plain[name] = w_energy, energy
        rel = _ratio(w_err, w_energy)
        return w.scale * rel, plain, math.sqrt(rel)


_FLOAT64 = get_dtype("float64")


class _DecodedRows:
    """Rows ``(first, end)`` of the ``[rows, cols]`` matrix a reader decodes from a candidate's ``encoded``, asked
    for in increasing order (:meth:`Distortion.measure`'s bands): decoded a blob at a time and dropped once passed
    (:func:`codec.tensorcodec.decoded_bands`), so measuring a candidate holds a few blobs' rows, not the decoded
    tensor (all-MiniLM-L6-v2's embedding: 47 MB per coding thread). A lossless encoding decodes to ``array``'s own
    values: those are served."""

    def __init__(self, encoded: Encoded, array: np.ndarray, dtype: DType):
        count = array.shape[0] if array.ndim else 1
        self.bands = (decoded_bands(encoded, dtype, tuple(array.shape)) if encoded.codec.lossy
                      else iter([(0, array.reshape(count, array.size // count if count else 0))]))  # (0, 5) too
        self.parts: list[tuple[int, np.ndarray]] = []  # (first row, rows) decoded and not yet passed

    def __call__(self, first: int, end: int) -> np.ndarray:
        self.parts = [(r, a) for r, a in self.parts if r + len(a) > first]
        while not self.parts or self.parts[-1][0] + len(self.parts[-1][1]) < end:
            self.parts.append(next(self.bands))
        pieces = [a[max(0, first - r) : end - r] for r, a in self.parts if r < end]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _widen(array: np.ndarray, dtype: DType) -> np.ndarray:
    """A storage-form band as float64 (integers by value)."""
    return to_float64(array, dtype) if dtype.floating else array.astype(np.float64)


def _ratio(err: float, energy: float) -> float:
    return err / energy if energy > 0 else (0.0 if err == 0 else math.inf)


#: Data-free measure (NMSE, image prior for image rows).
DATA_FREE = Distortion()

#: Epsilon assumed for a BatchNorm's variance (PyTorch's default; the state_dict does not hold it).
BN_EPS = 1e-5


def norm_weightings(shapes: Mapping[str, tuple[int, ...]], get: Callable[[str], np.ndarray]) -> dict[str, Weighting]:
    """Data-free output weightings from what the state_dict reveals: the normalization after a layer.

    A BatchNorm right after a conv or linear layer divides each output
    channel by its running standard deviation and scales it by its gain, so
    channel ``i``'s error reaches the output multiplied by
    ``gamma_i / sqrt(running_var_i + eps)``: a channel with small weights
    (and variance) gets its error blown up, which weight NMSE cannot see.
    A LayerNorm (or RMSNorm) after a layer scales feature ``i`` by its gain.
    Either becomes per-row weights (squared) of that layer's weight.

    "Right after": the next module in state_dict order, under the same
    parent (``features.0.weight`` -> ``features.1.running_var``,
    ``conv1.weight`` -> ``bn1.running_var``,
    ``attention.output.dense.weight`` -> ``attention.output.LayerNorm.weight``),
    with one value per output row; a LayerNorm needs "norm" or "ln" in its
    name and a gain that is not constant. Pre-norm blocks (the norm of the
    next block under another parent) are left alone. A BatchNorm is also
    found by name in any order (``conv2`` -> ``bn2`` under the same parent),
    as a ``.safetensors`` file sorts the names; a LayerNorm only in module
    order. ``shapes`` maps names to shapes in state_dict order;
    ``get(name)`` returns a 1-D array.
    """
    modules: dict[str, dict[str, str]] = {}
    for name in shapes:
        prefix, _, leaf = name.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = name
    order = list(modules)
    pairs = list(itertools.pairwise(order))
    # a BatchNorm named like its layer (conv1 -> bn1): found in any order (a .safetensors file sorts names)
    for here in order:
        parent, _, leaf = here.rpartition(".")
        digits = leaf[len(leaf.rstrip("0123456789")):]
        if digits and leaf != digits and "weight" in modules[here]:
            pairs += [(here, other) for other in order if other != here and other.rpartition(".")[0] == parent
                      and "running_var" in modules[other] and other.endswith(digits)
                      and not other.rpartition(".")[2][:-len(digits)][-1:].isdigit()]
    out = {}
    for here, after in pairs:
        weight = modules[here].get("weight")
        if (weight is None or weight in out or len(shapes[weight]) < 2
                or here.rpartition(".")[0] != after.rpartition(".")[0]):
            continue
        params, rows = modules[after], shapes[weight][0]
        gain, var = params.get("weight"), params.get("running_var")
        if any(p is not None and shapes[p] != (rows,) for p in (gain, var)):
            continue
        if var is not None:
            scale = 1.0 / (get(var).astype(np.float64) + BN_EPS)
        elif gain is not None and ("norm" in after.lower() or "ln" in after.rpartition(".")[2].lower()):
            scale = np.ones(rows)
        else:
            continue
        if gain is not None:
            scale = scale * get(gain).astype(np.float64) ** 2
        if np.all(np.isfinite(scale)) and scale.max() > scale.min() >= 0 and scale.max() > 0:
            out[weight] = Weighting(rows=scale)
    return out


def merge_weightings(norms: Mapping[str, Weighting], calibrated: Mapping[str, Weighting],
                     get: Callable[[str], np.ndarray]) -> dict[str, Weighting]:
    """The weightings of a calibrated encode: ``norms`` (:func:`norm_weightings`) with ``calibrated`` (calibration's,
    ``H`` and a sensitivity) over them, keeping a normalization's per-row weights ``R`` beside calibration's ``H``.

    Calibration measures a layer's output error before the normalization
    after it, and its sensitivity with isotropic noise on the weight, which
    cannot tell that coding errors concentrate in the channels a BatchNorm
    amplifies. The merged weighting scores ``tr(R dW H dW^T)``, the error
    after the normalization, with ``R`` normalized to mean 1 and the scale
    chosen so that the allocation distortion is
    ``sensitivity * tr(R dW H dW^T) / tr(W H W^T)``: for the noise the
    sensitivity was measured with (``E[tr(R dW H dW^T)] = mean(R) E[tr(dW H
    dW^T)]``) the same as calibration's own. ``get(name)`` returns a weight
    as a float64 array.
    """
    out = {**norms, **calibrated}
    for name, norm in norms.items():
        calib = calibrated.get(name)
        # an embedding's rows are calibration's own; a transposed convolution's rows (output channels) are not the
        # stored tensor's first axis, which a norm's weighting was matched to
        if calib is None or calib.rows is not None or calib.transposed is not None:
            continue
        rows = norm.rows / norm.rows.mean()
        matrix = get(name).reshape(len(rows), -1)
        weighted, plain = Weighting(h=calib.h, rows=rows), Weighting(h=calib.h)
        if weighted.fits(matrix.shape) and (energy := plain.energy(matrix)) > 0:
            out[name] = Weighting(h=calib.h, rows=rows, scale=calib.scale * weighted.energy(matrix) / energy)
    return out


#: How a layer's weight computed by ``torch.nn.utils.parametrize`` shows in its state_dict: the tensors stored
#: under ``<layer>.parametrizations.<weight>.``, weight_norm's ``original0`` (g) and ``original1`` (v),
#: spectral_norm's ``original`` (and buffers ``0._u``, ``0._v``).
PARAMETRIZED = ".parametrizations."


@dataclass
class Reparam:
    """A stored tensor a layer's weight ``W`` is computed from, and how its error reaches ``W``.

    weight_norm: ``W = g * v / ||v||`` (the norm over every dimension of
    ``v`` but ``dim``, the one ``g`` runs along): an error ``dv`` moves
    ``W`` by ``(g / ||v||) (dv - v_hat (v_hat . dv))``, so to first order
    the element of ``v`` costs ``(g / ||v||)^2`` times ``W``'s (the radial
    part, one of ``v``'s many directions, is neglected). ``dim=0`` (the
    default; a conv's ``g`` is ``[out, 1, 1, 1]``) gives factors per row of
    the ``[rows, columns]`` view (``rows``), another ``dim`` per column
    (``cols``); both None: a uniform factor (``dim=None``), which a relative
    measure does not see. spectral_norm: ``W = original / sigma``, a uniform
    factor too: ``original``'s relative error is ``W``'s, both None.
    """

    stored: str
    rows: np.ndarray | None = None  # g / ||v|| per row of the [rows, columns] view
    cols: np.ndarray | None = None  # g / ||v|| per column
    matrix: bool = True  # the stored tensor is 2-D (a Linear's), not a convolution's


def reparametrized(shapes: Mapping[str, tuple[int, ...]], get: Callable[[str], np.ndarray]) -> dict[str, Reparam]:
    """The computed weights of a state_dict's parametrized layers (:data:`PARAMETRIZED`), by the name the weight
    has once ``remove_parametrizations`` is applied (``fc1.weight``): weight_norm's ``v`` (``original1`` beside
    an ``original0`` shaped like ``v`` with every dimension but at most one of size 1) and spectral_norm's
    ``original`` (an ``original`` alone, beside the buffers ``0._u`` and ``0._v``). Other parametrizations (several
    originals, or a ``g`` of another shape) are left out: their originals keep their own measure. The hook form of
    weight_norm (``torch.nn.utils.weight_norm``: ``fc1.weight_g`` and ``fc1.weight_v``, :data:`HOOK_V`) is taken
    as its parametrization is. ``get(name)`` returns a tensor as a float64 array.
    """
    out: dict[str, Reparam] = {}
    for name, shape in shapes.items():
        if name.rpartition(".")[2] == HOOK_V and name[:-len(HOOK_V)] + HOOK_G in shapes:  # the hook form
            found = _weight_norm(name, shape, name[:-len(HOOK_V)] + HOOK_G, shapes, get)
            if found is not None:
                out[name[:-2]] = found
            continue
        head, sep, tail = ("." + name).rpartition(PARAMETRIZED)  # (a top-level layer's: no head)
        head = head[1:]
        if not sep or "." not in tail:
            continue
        param, _, leaf = tail.partition(".")
        prefix = f"{head}{PARAMETRIZED}{param}.".lstrip(".")
        computed = f"{head}.{param}" if head else param
        siblings = [n for n in shapes if n.startswith(prefix) and n[len(prefix):].startswith("original")]
        if leaf == "original" and siblings == [name] and {prefix + "0._u", prefix + "0._v"} <= shapes.keys():
            out[computed] = Reparam(name)
        elif leaf == "original1" and sorted(siblings) == [prefix + "original0", name]:
            found = _weight_norm(name, shape, prefix + "original0", shapes, get)
            if found is not None:
                out[computed] = found
    return out


#: The stored tensors of ``torch.nn.utils.weight_norm`` (the hook form, deprecated by torch but what most published
#: HiFi-GAN / MelGAN checkpoints hold): ``<layer>.weight_g`` and ``<layer>.weight_v``, beside no ``<layer>.weight``.
HOOK_G, HOOK_V = "weight_g", "weight_v"


def _weight_norm(name: str, shape: tuple[int, ...], g_name: str, shapes: Mapping[str, tuple[int, ...]],
                 get: Callable[[str], np.ndarray]) -> Reparam | None:
    """weight_norm's :class:`Reparam` for its ``v`` (``name``) beside its ``g`` (``g_name``), either form; None where
    ``g``'s shape is not ``v``'s with every dimension but at most one of size 1, or a row of ``v`` is zero."""
    g_shape = shapes[g_name]
    if len(shape) < 2:
        return None
    if math.prod(g_shape) == 1:  # dim=None: one g (a uniform factor)
        return Reparam(name)
    if len(g_shape) != len(shape) or any(a not in (1, b) for a, b in zip(g_shape, shape)):
        return None
    axes = [i for i, (a, b) in enumerate(zip(g_shape, shape)) if a == b and a > 1]
    if len(axes) != 1:
        return None
    v = get(name).reshape(shape)
    g = get(g_name).reshape(g_shape)
    norm = np.sqrt(np.sum(v * v, axis=tuple(i for i in range(len(shape)) if i != axes[0]), keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.broadcast_to(g / norm, shape).reshape(shape[0], -1)
    if not np.all(np.isfinite(factor)) or not np.any(factor):  # a dead row (v_r = 0): v's own measure
        return None
    return Reparam(name, rows=factor[:, 0].copy(), matrix=len(shape) == 2) if axes[0] == 0 else \
        Reparam(name, cols=factor[0].copy(), matrix=len(shape) == 2)


def computed_shapes(shapes: Mapping[str, tuple[int, ...]], reparams: Mapping[str, Reparam]
                    ) -> dict[str, tuple[int, ...]]:
    """``shapes`` (state_dict order) with each parametrized layer's stored tensors replaced by its computed
    weight, in the place of the tensor it is computed from: the state_dict :func:`norm_weightings` reads the
    BatchNorm or LayerNorm after a layer from (a weight_norm conv before a BatchNorm)."""
    stored = {r.stored: name for name, r in reparams.items()}
    hook_g = {n[:-len(HOOK_V)] + HOOK_G for n in stored if n.rpartition(".")[2] == HOOK_V}
    return {stored.get(n, n): s for n, s in shapes.items()
            if n in stored or (PARAMETRIZED not in "." + n and n not in hook_g)}


def computed_values(name: str, reparams: Mapping[str, Reparam], get: Callable[[str], np.ndarray]) -> np.ndarray:
    """``get(name)``, or for a computed weight (:func:`reparametrized`) the weight up to a uniform factor (which
    a relative measure does not see): weight_norm's ``v`` times its factors, spectral_norm's ``original``."""
    r = reparams.get(name)
    if r is None:
        return get(name)
    v = get(r.stored)
    matrix = v.reshape(v.shape[0] if v.ndim else 1, -1)
    if r.rows is not None:
        return (matrix * r.rows[:, None]).reshape(v.shape)
    if r.cols is not None:
        return (matrix * r.cols[None, :]).reshape(v.shape)
    return v


def _transposed_factors(w: Weighting, r: Reparam) -> Weighting:
    """A transposed convolution's measured weighting (:attr:`Weighting.transposed`) with a weight_norm's factors
    folded into its matrix view ``[out, in/groups * prod(kernel)]`` (:func:`codec.rd.calibrate.transposed_matrix`):
    ``dim=0`` (``g`` per input channel, the stored rows) scales the view's columns of that channel (``H`` becomes
    ``D H D``). Before, the factored weighting was made in the stored view, fitted no tensor and was dropped: the
    layer was weighed data-free. Another ``dim`` (per output channel: the view's rows, which the Reparam's per-column
    factors do not name without the kernel's size), and groups (the pooled ``H`` is shared by every group), keep the
    measure unfactored."""
    if w.transposed != 1 or w.h is None:
        return w
    h, rows = w.h, w.rows
    if r.rows is not None and h.shape[0] % len(r.rows) == 0:
        d = np.repeat(r.rows, h.shape[0] // len(r.rows))
        h = h * d ** 2 if h.ndim == 1 else np.asarray(h, np.float64) * d[:, None] * d[None, :]
    return Weighting(h=h, rows=rows, scale=w.scale, transposed=w.transposed)


def stored_weightings(weightings: Mapping[str, Weighting], reparams: Mapping[str, Reparam]) -> dict[str, Weighting]:
    """``weightings`` with each computed weight's (:func:`reparametrized`: from a following norm, from
    calibration's measure of the layer, or none) moved to the stored tensor it is computed from, the
    :class:`Reparam`'s factors folded in: per row into ``R``, per column into ``H`` (a diagonal times them, a full
    one ``D H D``), so that ``v``'s relative measure is ``W``'s to first order and the search weighs ``v``'s
    rows as the weight they produce (as a BatchNorm's scale after a layer is weighed). A data-free ``v`` in the
    input layer keeps the image prior, its row energies weighted (:attr:`Weighting.prior`). A convolution's ``v``
    with no weighting of its own (data-free, no norm after it) keeps its own measure: on a weight_norm CNN the
    factors changed no file, and with ``v``'s rows rescaled 0.1-10x (the same model) they cost 22-30 points of
    accuracy at -b 1 / 2 where the MLP's gained 21-31 (bench/JOURNAL.md, "fold (twenty-eighth pass)")."""
    out = {n: w for n, w in weightings.items() if n not in reparams}
    for name, r in reparams.items():
        w = weightings.get(name)
        if w is None and not r.matrix:  # a conv's v with nothing measured or after it: its own measure (below)
            continue
        if r.rows is None and r.cols is None:
            if w is not None:
                out[r.stored] = w
            continue
        if w is not None and w.transposed is not None:  # a weight_norm transposed convolution, measured
            out[r.stored] = _transposed_factors(w, r)
            continue
        h = None if w is None else w.h
        if r.cols is not None:
            if h is None:
                h = r.cols ** 2
            elif h.ndim == 1:
                h = h * r.cols ** 2
            else:
                h = np.asarray(h, np.float64) * r.cols[:, None] * r.cols[None, :]
        rows = None if w is None else w.rows
        if r.rows is not None:
            rows = r.rows ** 2 if rows is None else rows * r.rows ** 2
        out[r.stored] = Weighting(h=h, rows=rows, scale=1.0 if w is None else w.scale,
                                  prior=w is None and h is None)
    return out


def measure(name: str, array: np.ndarray, dtype: DType, label: str, options: EncodeOptions,
            rows: tuple[int, int] | None = None, offset_digits: int = 10,
            measure_by: Distortion = DATA_FREE, keep_decoded: bool = True) -> tuple[RDPoint, np.ndarray | None]:
    """Encode and decode one candidate; return its point (distortion by ``measure_by``) and the decoded array
    (None without ``keep_decoded``: the decoded values are then measured a blob at a time, :class:`_DecodedRows`).
    A lossless coding keeps no plane buffer for the thread's next one (:func:`codec.blobcodecs.zstd.release_scratch`:
    the search codes one tensor losslessly among many lossy candidates)."""
    encoded = encode_tensor(array, dtype, options)
    if not encoded.codec.lossy:
        release_scratch()
    decoded = decode_encoded(encoded, dtype, array.shape, name) if keep_decoded else None
    weighted, plain, out_error = measure_by.measure(
        name, array, _DecodedRows(encoded, array, dtype) if decoded is None else decoded, dtype, rows)
    nbytes = sum(map(len, encoded.blobs)) + entry_bytes(name, dtype, tuple(array.shape), encoded, offset_digits)
    return RDPoint(options, label, nbytes, weighted, math.sqrt(plain), out_error), decoded


class Menu:
    """What the search measures for each tensor: its candidates, and how one is measured.

    The default codes the tensor itself (:func:`candidates`, :func:`measure`);
    an update's menu (:class:`codec.update.plan.UpdateMenu`) adds differences
    from a base tensor, measured on the reconstructed weights.
    """

    #: Let the final greedy pass take any Pareto point, not only hull points
    #: (worth it where a menu has big gaps: an update's "unchanged" and its
    #: cheapest difference).
    fill_front = False

    def candidates(self, name: str, array: np.ndarray, dtype: DType, base: EncodeOptions,
                   rows: tuple[int, int] | None = None) -> list[tuple[str, EncodeOptions]]:
        return candidates(array, dtype, base, rows)

    def measure(self, name: str, array: np.ndarray, dtype: DType, label: str, options: EncodeOptions,
                rows: tuple[int, int] | None = None, offset_digits: int = 10,
                measure_by: Distortion = DATA_FREE, keep_decoded: bool = True) -> tuple[RDPoint, np.ndarray | None]:
        return measure(name, array, dtype, label, options, rows, offset_digits, measure_by, keep_decoded)


def pareto_front(points: Sequence[RDPoint]) -> list[RDPoint]:
    """The points no other point beats in both rate and distortion, by increasing rate."""
    front: list[RDPoint] = []
    for p in sorted(points, key=lambda p: (p.nbytes, p.nmse)):
        if not front or p.nmse < front[-1].nmse:
            front.append(p)
    return front


def lower_hull(points: Sequence[RDPoint]) -> list[RDPoint]:
    """The points on the lower convex hull of (rate, distortion), by increasing rate."""
    hull: list[RDPoint] = []
    for p in pareto_front(points):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the chord a-p: drop it
            if (b.nmse - a.nmse) * (p.nbytes - a.nbytes) >= (p.nmse - a.nmse) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _pick(hull: list[RDPoint], weight: float, lam: float) -> int:
    costs = [weight * p.nmse + lam * p.nbytes for p in hull]
    return int(np.argmin(costs))


def allocate_budget(hulls: dict[str, list[RDPoint]], weights: dict[str, float], budget: int,
                    fill: bool = True) -> dict[str, RDPoint]:
    """Choose one point per tensor minimizing sum(w * D) with total bytes <= ``budget``.

    Equal-slope search over lambda, then (``fill``) a greedy pass spending
    the slack. Raises EncodeError when even the smallest choice does not fit.
    """
    smallest = sum(h[0].nbytes for h in hulls.values())
    if smallest > budget:
        raise EncodeError(f"budget of {budget} bytes is below the smallest encoding ({smallest} bytes)")

    def choose(lam: float) -> dict[str, RDPoint]:
        return {n: h[_pick(h, weights.get(n, 1.0), lam)] for n, h in hulls.items()}

    def total(choice: dict[str, RDPoint]) -> int:
        return sum(p.nbytes for p in choice.values())

    lo, hi = 1e-30, 1e30  # lambda: total(lo) is largest, total(hi) smallest
    if total(choose(lo)) <= budget:
        return choose(lo)
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if total(choose(mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            break
    chosen = choose(hi)
    return fill_budget(hulls, weights, chosen, budget) if fill else chosen


def _upgrades(hull: list[RDPoint], current: RDPoint) -> list[RDPoint]:
    return [p for p in hull if p.nbytes > current.nbytes and p.nmse < current.nmse]


def fill_budget(hulls: dict[str, list[RDPoint]], weights: dict[str, float], chosen: dict[str, RDPoint],
                budget: int) -> dict[str, RDPoint]:
    """Greedily take the upgrade with the best weighted slope that still fits, until none does."""
    chosen = dict(chosen)
    spent = sum(p.nbytes for p in chosen.values())
    while True:
        best = None
        for n, cur in chosen.items():
            w = weights.get(n, 1.0)
            for p in _upgrades(hulls[n], cur):
                extra = p.nbytes - cur.nbytes
                if spent + extra <= budget:
                    slope = w * (cur.nmse - p.nmse) / extra
                    if best is None or slope > best[0]:
                        best = (slope, n, p, extra)
        if best is None:
            return chosen
        _, n, p, extra = best
        chosen[n] = p
        spent += extra


def spend_slack(points: dict[str, list[RDPoint]], weights: dict[str, float], chosen: dict[str, RDPoint],
                budget: int, steps: int = 1024) -> dict[str, RDPoint]:
    """Spend what the equal-slope choice leaves under ``budget``: the set of upgrades (per tensor, any point
    that costs more and errs less) whose total drop of ``weights``-weighted distortion is largest and that fits.

    A multiple-choice knapsack over the slack, solved by dynamic
    programming on ``steps`` steps of the slack (each upgrade's extra bytes
    rounded up to whole steps, so the result always fits). The greedy pass
    of the exhaustive search (:func:`fill_budget`, best slope first) can
    take a cheap upgrade that leaves no room for a better, larger one; in
    the fast search that cost the bench CNN 4 % of its budget and 57 % more
    distortion.
    """
    chosen = dict(chosen)
    slack = budget - sum(p.nbytes for p in chosen.values())
    if slack <= 0:
        return chosen
    unit = -(-slack // steps)
    n = slack // unit
    best = np.zeros(n + 1)  # best[b]: the largest drop of distortion for at most b steps of extra bytes
    picks = []
    for name, cur in chosen.items():
        w = weights.get(name, 1.0)
        ups = [(-(-(p.nbytes - cur.nbytes) // unit), w * (cur.nmse - p.nmse), p) for p in points[name]
               if p.nbytes > cur.nbytes and p.nmse < cur.nmse]
        ups = [u for u in ups if u[0] <= n]
        if not ups:
            continue
        new, which = best.copy(), np.full(n + 1, -1, np.int32)
        for k, (cost, gain, _) in enumerate(ups):
            trial = best[: n + 1 - cost] + gain
            better = trial > new[cost:]
            new[cost:][better] = trial[better]
            which[cost:][better] = k
        best = new
        picks.append((name, ups, which))
    b = n
    for name, ups, which in reversed(picks):
        k = int(which[b])
        if k >= 0:
            cost, _, chosen[name] = ups[k]
            b -= cost
    return chosen


def trade(points: dict[str, list[RDPoint]], weights: dict[str, float], chosen: dict[str, RDPoint], budget: int,
          reach: int = 3, fronts: dict[str, list[RDPoint]] | None = None) -> dict[str, RDPoint]:
    """Move bytes between tensors while it lowers the total ``weights``-weighted distortion: the best pair of one
    tensor's step down and another's step up (within ``reach`` points of their Pareto fronts) that fits
    ``budget``, until none helps (``fronts``: each tensor's :func:`pareto_front`, if the caller has them).

    Equal slopes and the knapsack over the slack only add bytes; where one
    tensor holds most of the weights, its next quality may only fit by
    taking a few bytes from small tensors (a CNN's fc1 one JPEG quality up,
    its conv and head one quant bit down: 2.3 % less distortion).
    """
    chosen = dict(chosen)
    fronts = fronts or {n: pareto_front(pts) for n, pts in points.items()}
    spent = sum(p.nbytes for p in chosen.values())
    owner = {n: i for i, n in enumerate(chosen)}

    def moves(n: str) -> tuple[list, list]:
        """Tensor ``n``'s steps down, ``(bytes freed, weighted loss, n, point)``, and up, ``(extra bytes, weighted
        gain, n, point)``."""
        cur, front, w = chosen[n], fronts[n], weights.get(n, 1.0)
        k = next((i for i, p in enumerate(front) if p.nbytes >= cur.nbytes), len(front))
        return ([(cur.nbytes - p.nbytes, w * (p.nmse - cur.nmse), n, p)
                 for p in front[max(0, k - reach) : k] if p.nmse > cur.nmse],
                [(p.nbytes - cur.nbytes, w * (cur.nmse - p.nmse), n, p)
                 for p in front[k : k + reach + 1] if p.nbytes > cur.nbytes and p.nmse < cur.nmse])

    steps = {n: moves(n) for n in chosen}  # a trade changes two tensors' steps: only theirs are found again
    while True:
        downs = [d for n in chosen for d in steps[n][0]]
        ups = [u for n in chosen for u in steps[n][1]]
        if not downs or not ups:
            return chosen
        # Every pair at once: the first pair (downs, then ups, in order) of the largest net gain that fits.
        freed, loss, extra, gain = (np.array([d[i] for d in items]) for items, i in
                                    ((downs, 0), (downs, 1), (ups, 0), (ups, 1)))
        a_of, b_of = np.array([owner[d[2]] for d in downs]), np.array([owner[u[2]] for u in ups])
        net = gain[None, :] - loss[:, None]
        ok = (a_of[:, None] != b_of[None, :]) & (extra[None, :] - freed[:, None] <= budget - spent) & (net > 0)
        if not ok.any():
            return chosen
        i, j = divmod(int(np.argmax(np.where(ok, net, -np.inf))), len(ups))
        a, down, b, up = downs[i][2], downs[i][3], ups[j][2], ups[j][3]
        spent += down.nbytes - chosen[a].nbytes + up.nbytes - chosen[b].nbytes
        chosen[a], chosen[b] = down, up
        steps[a], steps[b] = moves(a), moves(b)


#: Tensors to plan, at most, for :func:`best_fill` to also solve the whole allocation as one knapsack (every
#: tensor from its smallest point, the whole budget as slack). With few tensors the equal-slope choice can sit
#: far from the optimum: the lower hull skips Pareto points, and the slack left is large against any one step.
KNAPSACK_TENSORS = 32
#: Relative weighted distortion the whole knapsack's plan must save to replace the other plans. The measure is a
#: proxy: on the bench recurrent models, calibrated, a plan 1.39 % lower (LSTM -b 2) lowered the logits' error 4.7 %
#: but one 0.20 % lower (bidirectional GRU -b 2.5) raised it 15 %.
KNAPSACK_MARGIN = 0.01
#: Steps of the budget in that knapsack: each tensor's bytes are rounded up to 1/KNAPSACK_STEPS of it.
KNAPSACK_STEPS = 1 << 14


def best_fill(points: dict[str, list[RDPoint]], weights: dict[str, float], chosen: dict[str, RDPoint],
              budget: int) -> dict[str, RDPoint]:
    """Spend the slack an equal-slope ``chosen`` leaves under ``budget``: the least weighted distortion of the
    greedy :func:`fill_budget`, the knapsack (:func:`spend_slack`) then byte trades (:func:`trade`), and trades
    first (the slack alone may fit no step of a large tensor that a small tensor's step down makes room for);
    with at most :data:`KNAPSACK_TENSORS` tensors, also the knapsack over every tensor's whole Pareto front
    and ``chosen``'s point (then trades), where it saves more than :data:`KNAPSACK_MARGIN` of the distortion."""
    fills = [fill_budget(points, weights, chosen, budget)]
    fronts = {n: pareto_front(pts) for n, pts in points.items()}
    for start in (chosen, trade(points, weights, chosen, budget, fronts=fronts)):
        fills.append(trade(points, weights, spend_slack(points, weights, start, budget), budget, fronts=fronts))
    # the whole front, with ``chosen``'s points where they are not among them (the exhaustive search's refined
    # JPEG qualities)
    pool = {n: pts if n not in chosen or any(p is chosen[n] for p in pts) else [*pts, chosen[n]]
            for n, pts in points.items()}

    def weighted(choice: dict[str, RDPoint]) -> float:
        return sum(weights.get(n, 1.0) * p.nmse for n, p in choice.items())

    best = min(fills, key=weighted)
    floor = {n: min(pts, key=lambda p: (p.nbytes, p.nmse)) for n, pts in pool.items() if pts}
    if len(floor) == len(points) <= KNAPSACK_TENSORS and sum(p.nbytes for p in floor.values()) <= budget:
        whole = spend_slack(pool, weights, floor, budget, steps=KNAPSACK_STEPS)
        whole = trade(points, weights, whole, budget, fronts=fronts)
        if weighted(whole) < (1 - KNAPSACK_MARGIN) * weighted(best):
            best = whole
    return best


def allocate_max_error(points: dict[str, list[RDPoint]], max_error: float) -> dict[str, RDPoint]:
    """Per tensor, the cheapest point whose relative RMS error is at most ``max_error``
    (of the layer's output where a :class:`Weighting` knows it, else of the weights)."""
    out = {}
    for name, pts in points.items():
        ok = [p for p in pts if p.bound_error <= max_error]
        out[name] = min(ok, key=lambda p: p.nbytes)  # lossless (error 0) is always there
    return out


def sensitivities(points: dict[str, list[RDPoint]], decoded: dict[str, dict[str, np.ndarray]],
                  score: Callable[[dict[str, np.ndarray]], float]) -> dict[str, float]:
    """Calibrated weights: score drop per unit NMSE, one probe per tensor.

    ``decoded[name][label]`` holds decoded arrays of some candidates;
    ``score(replacements)`` scores the model with those tensors replaced
    (higher is better). Each tensor is probed alone with its candidate
    closest to 1 % relative error; the weight is the score drop divided by
    that candidate's NMSE (at least a small positive floor, so no tensor is
    treated as free).
    """
    base = score({})
    weights = {}
    for name, pts in points.items():
        probes = [p for p in pts if p.nmse > 0 and p.label in decoded.get(name, {})]
        if not probes:
            weights[name] = 1.0
            continue
        probe = min(probes, key=lambda p: abs(math.log(p.rel_error / 0.01)))
        drop = base - score({name: decoded[name][probe.label]})
        weights[name] = max(drop, 1e-6 * max(abs(base), 1.0)) / probe.nmse
    return weights


#: ``tensors()`` yields ``(name, array, dtype)`` for each stored tensor; ``tensors(names)`` (a set) at least those
#: named, and a lazy source reads only those (the searches measure a few tensors a round).
TensorSource = Callable[[set[str] | None], Iterator[tuple[str, np.ndarray, DType]]]


def plan_options(
    tensors: TensorSource,
    base: EncodeOptions,
    fixed: Callable[[str], EncodeOptions | None],
    *,
    bits_per_weight: float | None = None,
    max_error: float | None = None,
    overhead_bytes: int | Callable[[], int] = 0,
    score: Callable[[dict[str, np.ndarray]], float] | None = None,
    progress: Callable[[str, int], None] | None = None,
    jobs: int | None = None,
    total_weights: int | None = None,
    menu: Menu | None = None,
    measure_by: Distortion | None = None,
    notes: list[str] | None = None,
    search: str = "fast",
    coded: dict | None = None,
    executor: Executor | None = None,
    packed: Callable[[], bool] | None = None,
    price: RepairPrices | None = None,
    surcharge: dict[str, int] | None = None,
    plain: set[str] | None = None,
) -> dict[str, EncodeOptions]:
    """Measure every tensor's menu and choose its options for a rate target.

    ``tensors()`` yields ``(name, array, dtype)`` for each stored tensor (it
    is called once; arrays may be loaded lazily). ``fixed(name)`` returns the
    options a user forced for a tensor (measured for its bytes only), or
    None. With ``bits_per_weight`` the whole file, ``overhead_bytes``
    (header, index skeleton, aliases; or a function that gives them, called
    once when the search needs them) included, lands at or under the
    budget; with ``max_error`` every free tensor gets the cheapest setting
    within that relative RMS error. ``score`` enables calibrated weights
    (probed at about 1 % error, then at the plan's errors: :func:`codec.rd.probe.replan_at_errors`).
    ``progress(name, n)`` is called with a tensor's size once per setting
    measured (:func:`search_units` predicts the sum), so it follows the work.
    ``jobs`` threads measure a tensor's candidates side by side. Given
    ``total_weights`` (the sum of the tensors' sizes), a budget that the
    tensors measured so far already cannot fit is refused at once.
    ``menu`` replaces what is measured per tensor (:class:`Menu`; updates).

    ``measure_by`` scores candidates (default: data-free, :data:`DATA_FREE`;
    a :class:`Distortion` with calibrated or state_dict-derived
    :class:`Weighting` s measures in output space). For a budget, no tensor
    is left with a relative error (:attr:`RDPoint.damage`) above
    :data:`DAMAGE` when the budget allows it; when it does not, the
    allocation goes ahead and a line per damaged tensor, naming the
    smallest budget that avoids it, is appended to ``notes`` (and
    :data:`NOTE_BYTES_RESERVE` plus the notes' length is kept free for the
    caller to store them in the file's metadata, :data:`WARNINGS_KEY`).

    ``search="fast"`` (the default) predicts a budget search's points from
    samples of the tensors (:mod:`codec.rd.fast`); ``"exhaustive"`` measures
    every candidate in full (and so do max-error searches, ``score``,
    weightings with a full ``H`` and update menus; a state_dict's norm
    weightings and budgets of :data:`HIGH_BITS_FROM` or more, with their
    high-bit quant, are predicted). The
    fast search may fill ``coded`` (a dict) with tensors it has coded with
    their chosen options (:func:`codec.rd.fast.plan_fast`), and runs its
    tasks on ``executor`` when one is given (a Ray cluster's,
    :class:`codec.distributed.ray.RayExecutor`); the other searches measure
    on ``jobs`` local threads whatever ``executor`` is. ``packed()`` (asked once the fixed bytes are known) says
    whether the index will be written compressed: the warnings' room is then counted compressed (:func:`notes_room`).
    ``price`` (a :class:`codec.rd.price.RepairPrices`: repair will code the plan) also measures, for a budget, each
    lossy candidate of a tensor with a full ``H`` coding what repair codes, GPTQ's rounding or JPEG's compensated
    values (:class:`codec.rd.price.RepairMenu`: an exhaustive search). ``surcharge`` (a dict) then gets, for each
    tensor whose chosen point codes repair's target, the bytes that point costs beyond the original values' coding
    with the same options: the plan's file (the original values) is that much under the budget, which repair spends.
    ``plain`` (a set) gets the ``jpeg`` tensors offered a repaired twin whose chosen point is the uncompensated one:
    repair codes them as priced, without compensation (:attr:`codec.rd.repair.RepairSettings.plain_jpeg`).
    """
    menu = menu or Menu()
    measure_by = measure_by or DATA_FREE
    if price is not None and bits_per_weight is not None:  # repair's codings offered too (an exhaustive search)
        from .price import RepairMenu

        menu = RepairMenu(menu, measure_by, price)
    if (bits_per_weight is None) == (max_error is None):
        raise EncodeError("give exactly one of bits_per_weight and max_error")
    if search not in SEARCHES:
        raise ValueError(f"search={search!r}: use one of {', '.join(map(repr, SEARCHES))}")
    fast = search == "fast" and bits_per_weight is not None
    if fast and score is None and type(menu) is Menu:  # the ordinary menu, a measure samples can predict
        from .fast import plan_fast, weighable

        if weighable(measure_by):
            return plan_fast(tensors, base, fixed, bits_per_weight=bits_per_weight, overhead_bytes=overhead_bytes,
                             progress=progress, jobs=jobs, total_weights=total_weights, measure_by=measure_by,
                             notes=notes, coded=coded, executor=executor, packed=packed)
    points: dict[str, list[RDPoint]] = {}
    forced: dict[str, EncodeOptions] = {}
    probes: dict[str, dict[str, np.ndarray]] = {}
    fixed_bytes, weights_total = overhead_bytes() if callable(overhead_bytes) else overhead_bytes, 0
    overhead = fixed_bytes

    def refuse() -> None:
        refuse_budget(bits_per_weight, tensors, base, fixed, overhead, menu,  # type: ignore[arg-type]
                      packed=bool(packed and packed()))

    images: dict[str, tuple[int, int] | None] = {}
    with make_executor(jobs) as executor:
        for name, array, dtype, rows in with_row_images(tensors(), base):
            weights_total += array.size
            images[name] = rows
            opts = fixed(name)
            if opts is not None:
                forced[name] = opts
                fixed_bytes += menu.measure(name, array, dtype, "fixed", opts)[0].nbytes
                if progress:
                    progress(name, array.size)
            else:
                pts, best_probe = [], None

                def trial(item: tuple[str, EncodeOptions]) -> tuple[RDPoint, np.ndarray | None]:
                    # the decoded candidate only serves the sensitivity probes of a score
                    return menu.measure(name, array, dtype, item[0], item[1], rows,  # noqa: B023
                                        measure_by=measure_by, keep_decoded=score is not None)  # noqa: B023

                items = menu.candidates(name, array, dtype, base, rows)
                with measure_by.keeping(name):  # one whole H for all of this tensor's candidates
                    for second in (False, True):  # the ordinary menu, then (if they can matter) the high bits
                        if second:
                            wanted = _wants_high_bits(pts, bits_per_weight, max_error)
                            items = high_bit_candidates(array, dtype, base) if wanted else []
                        # one result at a time, also without threads (INLINE's map would measure them all first)
                        for point, decoded in (map if executor is INLINE else executor.map)(trial, items):
                            pts.append(point)
                            if progress:
                                progress(name, array.size)
                            if decoded is not None and point.nmse > 0:
                                gap = abs(math.log(point.rel_error / 0.01))
                                if best_probe is None or gap < best_probe[0]:
                                    best_probe = (gap, point.label, decoded)
                points[name] = pts
                if best_probe is not None:
                    probes[name] = {best_probe[1]: best_probe[2]}
            if bits_per_weight is not None and total_weights:
                _check_feasible(bits_per_weight, total_weights, fixed_bytes, points, refuse)
    if max_error is not None:
        chosen = allocate_max_error(points, max_error)
    else:
        weights = sensitivities(points, probes, score) if score is not None else {}
        budget = int(bits_per_weight * weights_total / 8) - fixed_bytes  # type: ignore[operator]
        _check_feasible(bits_per_weight, weights_total, fixed_bytes, points, refuse)  # type: ignore[arg-type]
        safe = {n: [p for p in pts if p.damage <= DAMAGE] for n, pts in points.items()}
        safe_bytes = sum(min(p.nbytes for p in pts) for pts in safe.values())
        need = math.ceil(8000 * (fixed_bytes + safe_bytes) / weights_total) / 1000  # bits/weight avoiding damage
        allowed = safe if safe_bytes <= budget else points
        hulls = {n: lower_hull(p) for n, p in allowed.items()}
        fronts = {n: pareto_front(p) for n, p in allowed.items()} if menu.fill_front else hulls

        def allocate(budget: int, weights: dict[str, float]) -> dict[str, RDPoint]:
            chosen = allocate_budget(hulls, weights, budget, fill=False)
            chosen = _refine(tensors, chosen, hulls, weights, budget, images, measure_by, menu=menu)
            return best_fill(fronts, weights, chosen, budget)

        def settle(weights: dict[str, float]) -> tuple[dict[str, RDPoint], list[str]]:
            chosen = allocate(budget, weights)
            damaged = _damage_notes(chosen, need) if safe_bytes > budget else []
            if damaged:  # keep room for the notes in the file's metadata, then allocate again
                reserve = notes_room(damaged, bool(packed and packed()))
                if budget - reserve < sum(h[0].nbytes for h in hulls.values()):
                    raise EncodeError(f"{bits_per_weight} bits/weight leaves no room for the warning that tensors "
                                      f"would be destroyed; {need} bits/weight avoids it")
                chosen = allocate(budget - reserve, weights)
                damaged = _damage_notes(chosen, need)
            return chosen, damaged

        chosen, damaged = settle(weights)
        if score is not None:  # probe again at the errors the plan lands on (codec.rd.probe)
            from .probe import replan_at_errors

            first = {n: next(p for p in points[n] if p.label == label) for n, held in probes.items() for label in held}
            probes.clear()

            def code(name: str, array: np.ndarray, dtype: DType, point: RDPoint) -> np.ndarray:
                with measure_by.keeping(name):
                    return menu.measure(name, array, dtype, point.label, point.options, images[name],
                                        measure_by=measure_by)[1]

            chosen, damaged = replan_at_errors(tensors, (chosen, damaged), weights, settle, code, score, first)
        if price is not None:
            from . import price as priced  # (its PLAIN_AS_PRICED read at the call)

            if surcharge is not None:
                names = {n for n, p in chosen.items() if priced.REPAIRED in p.label}
                for n, array, dtype in tensors(names):
                    if n in names:
                        bare, _ = measure(n, array, dtype, "plain", chosen[n].options, images[n], keep_decoded=False)
                        surcharge[n] = chosen[n].nbytes - bare.nbytes
            if plain is not None and priced.PLAIN_AS_PRICED:
                plain.update(n for n, p in chosen.items() if p.options.codec == "jpeg"
                             and priced.REPAIRED not in p.label and any(priced.REPAIRED in q.label for q in points[n]))
        if notes is not None:
            notes.extend(damaged)
    return {**forced, **{n: p.options for n, p in chosen.items()}}


def _damage_notes(chosen: dict[str, RDPoint], need: float) -> list[str]:
    """One line per chosen point whose relative error is above :data:`DAMAGE`."""
    return [f"tensor {n!r}: relative error {p.damage:.2f} (over {DAMAGE}), the model may lose much of its "
            f"accuracy; {need} bits/weight or more avoids it" for n, p in chosen.items() if p.damage > DAMAGE]


def search_units(tensors: Iterable[tuple[str, tuple[int, ...], DType]], base: EncodeOptions,
                 fixed: Callable[[str], EncodeOptions | None], *, bits_per_weight: float | None = None,
                 max_error: float | None = None) -> int:
    """What :func:`plan_options` will report to ``progress`` in all, from names, shapes and dtypes alone:
    each tensor's size once per setting it measures (its menu, one for a fixed tensor). The high-bit
    settings a ``max_error`` may add depend on the data and are not counted."""
    total, seen_matrix = 0, False
    for name, shape, dtype in tensors:
        stand_in = np.broadcast_to(np.zeros((), np.uint8), shape)  # a shape without memory
        is_matrix = _is_matrix(shape, dtype)
        rows = row_images(shape, base, input_layer=not seen_matrix) if is_matrix else None
        seen_matrix |= is_matrix
        count = 1
        if fixed(name) is None:
            count = len(candidates(stand_in, dtype, base, rows))
            if bits_per_weight is not None and bits_per_weight >= HIGH_BITS_FROM:
                count += len(high_bit_candidates(stand_in, dtype, base))
        total += count * math.prod(shape)
    return total


def _check_feasible(bits_per_weight: float, total_weights: int, fixed_bytes: int, points: dict[str, list[RDPoint]],
                    refuse: Callable[[], None]) -> None:
    """``refuse()`` if the fixed bytes and the smallest points measured so far exceed the budget."""
    smallest = fixed_bytes + sum(min(p.nbytes for p in pts) for pts in points.values())
    if smallest > int(bits_per_weight * total_weights / 8):
        refuse()


def _level(o: EncodeOptions) -> int:
    """A setting's place in its family, cheapest lowest: JPEG's quality, the lossless codec's significand bits
    (exact: above any), else quant's bits."""
    if o.codec == "jpeg" and o.quality is not None:
        return o.quality
    if o.codec == "lossless":
        return 64 if o.significand_bits is None else o.significand_bits
    return o.bits


def floor_settings(items: Sequence[tuple[str, EncodeOptions]]) -> list[tuple[str, EncodeOptions]]:
    """Each family's cheapest setting among a menu's ``items``: the lowest JPEG quality, quant bits or rounded
    significand of each codec, tiling and table (and update mode). A tensor's smallest encoding is one of them."""
    floor: dict[tuple, tuple[str, EncodeOptions]] = {}
    for label, o in items:
        key = (type(o), getattr(o, "mode", None), o.codec, o.tile, o.row_shape, o.table)
        level = _level(o)
        if key not in floor or level < floor[key][0]:
            floor[key] = (level, (label, o))
    return [item for _, item in floor.values()]


def floor_encodings(tensors: TensorSource, base: EncodeOptions, fixed: Callable[[str], EncodeOptions | None]
                    ) -> Iterator[tuple[str, DType, tuple[int, ...], Encoded]]:
    """``(name, dtype, shape, Encoded)`` of each stored tensor coded at the cheapest of its menu's
    :func:`floor_settings` (its blobs and :func:`entry_bytes`; a forced one as forced): the file of the smallest
    encoding, whose index :func:`codec.encode._index_saving` compresses. Codes, does not decode."""
    for name, array, dtype, rows in with_row_images(tensors(None), base):
        opts = fixed(name)
        items = [opts] if opts is not None else [o for _, o in floor_settings(candidates(array, dtype, base, rows))]
        shape = tuple(array.shape)
        yield name, dtype, shape, min((encode_tensor(array, dtype, o) for o in items),
                                      key=lambda e: sum(map(len, e.blobs)) + entry_bytes(name, dtype, shape, e, 10))


#: What a refusal of too small a budget (:func:`refuse_budget`) adds for the model being saved ("": nothing): set by
#: :func:`codec.encode.save` at each budgeted save, e.g. that pruned layers' masks take about 1 bit per element.
REFUSAL_HINT: ContextVar[str] = ContextVar("refusal_hint", default="")


def refuse_budget(bits_per_weight: float, tensors: TensorSource, base: EncodeOptions,
                  fixed: Callable[[str], EncodeOptions | None], overhead: int, menu: Menu | None = None,
                  packed: bool = False) -> None:
    """Raise the EncodeError of a budget below the smallest encoding, with the whole model's smallest: every tensor
    at the cheapest of its menu's :func:`floor_settings` (a forced one as forced), plus ``overhead`` bytes and the
    room of the warnings that tensors so coded would be destroyed (compressed where the index is, ``packed``:
    :func:`notes_room`). Return if that smallest fits after all (a search that refuses on predictions).

    The searches call it as soon as a partial sum shows the budget cannot be met, which stops a hopeless search
    early; the figure it names is then still the one a user can ask for, not the part measured so far (a small
    convolutional network was told "about 0.70" at -b 0.6, then "about 1.21" at -b 1.0, and so on)."""
    menu = menu or Menu()
    weights, least, free = 0, overhead, {}  # free: the cheapest point of each tensor the search chooses for
    for name, array, dtype, rows in with_row_images(tensors(None), base):
        weights += array.size
        opts = fixed(name)
        items = [("fixed", opts)] if opts is not None else floor_settings(
            menu.candidates(name, array, dtype, base, rows))
        point = min((menu.measure(name, array, dtype, label, o, rows, keep_decoded=False)[0] for label, o in items),
                    key=lambda p: p.nbytes)
        least += point.nbytes
        if opts is None:
            free[name] = point
    notes = _damage_notes(free, 99.999)
    if notes:  # the room a damaged file's warnings take (plan_options), with the longest "need" the search writes
        least += notes_room(notes, packed)
    if least <= int(bits_per_weight * weights / 8):
        return
    raise EncodeError(f"{bits_per_weight} bits/weight is below the smallest encoding "
                      f"({math.ceil(8000 * least / max(weights, 1)) / 1000:.3f} bits/weight){REFUSAL_HINT.get()}")


def _refine(tensors: TensorSource, chosen: dict[str, RDPoint], hulls: dict[str, list[RDPoint]],
            weights: dict[str, float], budget: int, images: dict[str, tuple[int, int] | None],
            measure_by: Distortion = DATA_FREE, top: int = 3, menu: Menu | None = None) -> dict[str, RDPoint]:
    """Spend the slack the coarse quality ladder leaves: for the JPEG choices
    whose next step is worth most (weighted slope), try the qualities between, and the table scales between
    those where one quality is a coarse step (:mod:`codec.rd.ladder`), by bisection."""
    chosen = dict(chosen)
    slack = budget - sum(p.nbytes for p in chosen.values())

    def next_slope(n: str) -> float:
        ups = _upgrades(hulls[n], chosen[n])
        return weights.get(n, 1.0) * (chosen[n].nmse - ups[0].nmse) / (ups[0].nbytes - chosen[n].nbytes)

    jpeg = [n for n in chosen if chosen[n].options.codec == "jpeg" and _upgrades(hulls[n], chosen[n])]
    names = sorted(jpeg, key=next_slope, reverse=True)[:top]
    if not names or slack <= 0:
        return chosen
    arrays = {name: (array, dtype) for name, array, dtype in tensors(names) if name in names}
    for name in names:
        (array, dtype), point = arrays.pop(name), chosen[name]
        higher = [q for q in JPEG_QUALITIES if q > point.options.quality]
        steps = ladder.between(point.options, point.options.with_(quality=higher[0] if higher else 100))
        lo, hi, best = -1, len(steps), None
        with measure_by.keeping(name):
            while hi - lo > 1:  # the highest step of the ladder whose size still fits the slack
                mid = (lo + hi) // 2
                trial, _ = (menu or Menu()).measure(name, array, dtype, f"{point.label} ~{ladder.text(steps[mid])}",
                                                    steps[mid], images[name], measure_by=measure_by,
                                                    keep_decoded=False)
                if trial.nbytes - point.nbytes <= slack:
                    lo, best = mid, trial
                else:
                    hi = mid
        if best is not None:
            slack -= best.nbytes - point.nbytes
            chosen[name] = best
    return chosen
