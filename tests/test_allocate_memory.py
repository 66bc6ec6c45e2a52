"""Memory of the exhaustive rate search's measurements (issue 9: a calibrated encode's peak).

The exhaustive search (which every calibrated encode with a full ``H`` takes) measures each candidate of a
tensor in full; widening the whole tensor and its decoded values to float64 (and their difference and its
square) held about eight times the tensor's float32 bytes per candidate and per thread. The measure now
streams by bands of rows: these tests bound the peak with tracemalloc (numpy reports its buffers to it) and
check that the streamed figures are the whole-array ones.
"""

from __future__ import annotations

import contextlib
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

from codec.dtypes import get_dtype
from codec.rd import allocate
from codec.rd.allocate import Distortion, Weighting, distortion, measure
from codec.tensorcodec import EncodeOptions

F32 = get_dtype("float32")


def _matrix(rows: int = 2048, cols: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)


def _peak(fn) -> int:
    """Peak bytes traced while ``fn()`` runs, above what was traced before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("label,options", [
    ("quant b4 8x64", EncodeOptions(codec="quant", bits=4, tile=(8, 64))),
    ("jpeg q50 flat 64x64", EncodeOptions(codec="jpeg", quality=50, table="flat", tile=(64, 64))),
])
@pytest.mark.parametrize("calibrated", [False, True])
def test_measuring_a_candidate_holds_no_float64_copy_of_the_tensor(label, options, calibrated):
    """One candidate of an 8 MB float32 matrix: the decoded tensor (8 MB) plus bands and blobs, under 2.5x the
    tensor's bytes (whole float64 copies took 9x and more), with or without a calibrated full ``H`` (whose float32
    copy, made once per candidate, comes on top)."""
    w = _matrix()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, w.shape[1]))
    measure_by = Distortion({"w": Weighting(h=x.T @ x / len(x), scale=3.0)}) if calibrated else allocate.DATA_FREE
    measure("w", w, F32, label, options, measure_by=measure_by)  # warm up: imports, caches, H's float32 copy
    peak = _peak(lambda: measure("w", w, F32, label, options, measure_by=measure_by))
    h32 = 4 * w.shape[1] ** 2 if calibrated else 0
    assert peak < 2.5 * w.nbytes + h32, f"{(peak - h32) / w.nbytes:.1f} x the tensor's bytes"


@pytest.mark.parametrize("shape,options,rows", [
    ((4096, 512), EncodeOptions(codec="quant", bits=4, tile=(8, 64)), None),
    ((4096, 512), EncodeOptions(codec="jpeg", quality=50, table="flat", tile=(64, 64)), None),
    ((3000, 784), EncodeOptions(codec="jpeg", quality=50, table="ramp2", row_shape=(28, 28)), (28, 28)),
    ((64, 40000), EncodeOptions(codec="jpeg", quality=50, table="flat", tile=(64, 64)), None),  # blobs split columns
    ((4096, 512), EncodeOptions(codec="lossless"), None),
])
@pytest.mark.parametrize("calibrated", [False, True])
def test_measure_without_the_decoded_tensor_gives_the_same_point(shape, options, rows, calibrated, monkeypatch):
    """Measured a blob at a time (``keep_decoded=False``, the search's way unless sensitivity probes need the
    decoded values), a candidate gets the very point of the whole decoded tensor, whatever the tiling, with bands
    that do not line up with the blobs; nothing decoded is returned."""
    monkeypatch.setattr(allocate, "MEASURE_BAND", 7 * shape[1])
    w = _matrix(*shape)
    if options.codec != "lossless":
        from codec.tensorcodec import encode_tensor

        assert encode_tensor(w, F32, options).tiling.n_blobs > 1
    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, shape[1])) if shape[1] <= 1024 else None  # a full H; else a diagonal one
    h = np.mean(rng.standard_normal((256, shape[1])) ** 2, 0) if x is None else x.T @ x / len(x)
    weightings = {"w": Weighting(h=h, rows=rng.uniform(0.5, 2, shape[0]))} if calibrated else {}
    whole, decoded = measure("w", w, F32, "x", options, rows, measure_by=Distortion(weightings))
    streamed, none = measure("w", w, F32, "x", options, rows, measure_by=Distortion(weightings), keep_decoded=False)
    assert decoded is not None and none is None
    assert streamed == whole


@pytest.mark.parametrize("options", [EncodeOptions(codec="quant", bits=4, tile=(8, 64)),
                                     EncodeOptions(codec="jpeg", quality=50, table="flat", tile=(64, 64))])
def test_measure_without_the_decoded_tensor_holds_a_few_blobs(options):
    """A 32 MB float32 matrix of 8 blobs: measured a blob at a time, a candidate's peak stays under 0.75x the
    tensor's bytes (the coding's own bands and blobs); with the decoded tensor kept it is over 1x."""
    w = _matrix(16384, 512)
    measure("w", w, F32, "x", options, keep_decoded=False)  # warm up: imports, caches
    streamed = _peak(lambda: measure("w", w, F32, "x", options, keep_decoded=False))
    whole = _peak(lambda: measure("w", w, F32, "x", options))
    assert streamed < 0.75 * w.nbytes < w.nbytes < whole, (streamed / w.nbytes, whole / w.nbytes)


def test_lossless_candidate_keeps_no_plane_buffer():
    """The search's lossless candidate of a tensor leaves its thread no buffer of the tensor's byte planes (each
    coding thread of all-MiniLM-L6-v2's calibrated search held its embedding's 47 MB to the end)."""
    from codec.blobcodecs import zstd

    w = _matrix(1024, 1024)
    point, _ = measure("w", w, F32, "lossless", EncodeOptions(codec="lossless"), keep_decoded=False)
    assert point.nmse == 0 and point.nbytes < w.nbytes
    assert getattr(zstd._scratch_buffers, "buf", None) is None


def _whole(name, reference, decoded, weighting, rows):
    """The figures as the search measured them before it streamed: whole float64 arrays."""
    ref, dec = reference.astype(np.float64), decoded.astype(np.float64)
    weighted, plain = distortion(ref, dec, rows)
    if weighting is None:
        return weighted, plain, None
    m = ref.reshape(len(ref), -1)
    diff = dec.reshape(m.shape) - m
    rel = weighting.energy(diff) / weighting.energy(m)
    return weighting.scale * rel, plain, rel**0.5


@pytest.mark.parametrize("kind", ["plain", "image rows", "full H", "diagonal H and rows", "rows only"])
def test_streamed_measure_gives_the_whole_array_figures(kind, monkeypatch):
    """Bands of a few rows (smaller than the tensor, not dividing it) give the whole-array distortion, plain NMSE
    and output error, for every measure the search uses."""
    monkeypatch.setattr(allocate, "MEASURE_BAND", 5 * 28 * 28)  # 5 rows of 784 columns a band: 21 bands of 100 rows
    rng = np.random.default_rng(2)
    reference = _matrix(100, 28 * 28, seed=3)
    decoded = (reference + 0.003 * rng.standard_normal(reference.shape)).astype(np.float32)
    cols = reference.shape[1]
    x = rng.standard_normal((512, cols))
    rows, weighting = None, None
    if kind == "image rows":
        rows = (28, 28)
    elif kind == "full H":
        weighting = Weighting(h=x.T @ x / len(x), scale=2.0)
    elif kind == "diagonal H and rows":
        weighting = Weighting(h=np.mean(x * x, 0), rows=rng.uniform(0.1, 4, len(reference)), scale=0.5)
    elif kind == "rows only":
        weighting = Weighting(rows=rng.uniform(0.1, 4, len(reference)))
    measure_by = Distortion({} if weighting is None else {"w": weighting})
    got = measure_by.measure("w", reference, decoded, F32, rows)
    want = _whole("w", reference, decoded, weighting, rows)
    assert got[0] == pytest.approx(want[0], rel=1e-5)  # a full H is applied in float32, as before
    assert got[1] == pytest.approx(want[1], rel=1e-12)
    assert (got[2] is None) == (want[2] is None)
    if want[2] is not None:
        assert got[2] == pytest.approx(want[2], rel=1e-5)
    assert measure_by.measure("w", reference, decoded, F32, rows) == got  # the cached reference energy
    # the float64 call of the older interface agrees
    assert measure_by("w", reference.astype(np.float64), decoded.astype(np.float64), rows)[0] == pytest.approx(
        got[0], rel=1e-5)


def test_streamed_measure_of_integers_and_bfloat16():
    """Integer tensors are measured by value, bfloat16 ones through their float32 bits, as before."""
    ints = np.arange(-50, 50, dtype=np.int32).reshape(10, 10)
    got = allocate.DATA_FREE.measure("i", ints, ints + 1, get_dtype("int32"))
    assert got[0] == got[1] == pytest.approx(100 / float(np.sum(ints.astype(np.float64) ** 2)))
    values = _matrix(64, 64)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    noisy = bf16 ^ np.uint16(1)  # the lowest significand bit flipped
    as_f = lambda b: (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    got = allocate.DATA_FREE.measure("b", bf16, noisy, get_dtype("bfloat16"))
    assert got[1] == pytest.approx(distortion(as_f(bf16), as_f(noisy))[1], rel=1e-12)


def _embedding_model(vocabulary: int = 8192, width: int = 128, outputs: int = 16):
    """``(model, options, calibration batches)``: a model whose embedding holds most weights (JPEG), a quant layer
    (GPTQ) and a lossless bias (least squares)."""
    import torch
    from torch import nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(vocabulary, width), nn.Linear(width, outputs)

        def forward(self, x):
            return self.fc(self.emb(x))

    torch.manual_seed(0)
    model = Model().eval()
    options = {"emb.weight": EncodeOptions(codec="jpeg", quality=50, tile=(64, 64)),
               "fc.weight": EncodeOptions(codec="quant", bits=4, tile=(8, 64)),
               "fc.bias": EncodeOptions(codec="lossless")}
    data = [torch.randint(0, 8192, (8, 16), generator=torch.Generator().manual_seed(k)) for k in range(4)]
    return model, options, data


def test_repair_holds_no_copy_of_the_model_it_repairs():
    """Repair (the calibrated encode's second half) keeps views of the model's own tensors as the originals and
    returns its targets without copying them again; the model is left as it was. Measured with tracemalloc
    (numpy's copies are traced, torch's own tensors are not) on a model whose embedding holds most weights:
    5.1x the embedding's bytes before (a copy of every tensor, then of every target, then two ``tobytes``),
    3.8x at the fourth pass, 2.1x now (the embedding's target is a view, its decoded values become the working
    model's storage instead of being copied into a deep copy)."""
    import torch

    from codec.rd.repair import code_with_repair

    model, options, data = _embedding_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    code_with_repair(model, data, options)  # warm up
    result = []
    peak = _peak(lambda: result.append(code_with_repair(model, data, options)))
    assert peak < 3 * model.emb.weight.numel() * 4, f"{peak / (model.emb.weight.numel() * 4):.1f} x"
    targets = result[0][0]
    assert "fc.weight" in targets and "fc.bias" in targets  # GPTQ and the least-squares bias changed them
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_repair_hands_over_encodings_instead_of_keeping_targets():
    """Given ``encoded=``, repair hands each lossy tensor's encoding over as it codes it (what codec.save writes
    as it is) and keeps no float copy of its target to the end: the encodings are exactly what coding the targets
    gives, with the relative error a writer's check measures; only the lossless tensors it changed come back as
    arrays; what stays traced after it returns is the encodings' bytes, not a tensor's float32 copy."""
    import torch

    from codec.api import to_numpy
    from codec.rd.repair import code_with_repair
    from codec.tensorcodec import encode_tensor, relative_error

    model, options, data = _embedding_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets, notes, changed = code_with_repair(model, data, options)
    encoded: dict = {}
    result = []

    def run():
        result.append(code_with_repair(model, data, options, encoded=encoded))

    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run()
        kept = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    lossless, notes_2, changed_2 = result[0]
    assert set(encoded) == {"emb.weight", "fc.weight"} and notes_2 == notes and changed_2 == changed == {}
    assert set(lossless) == {"fc.bias"} and np.array_equal(lossless["fc.bias"], targets["fc.bias"])
    for name, enc in encoded.items():
        target = targets.get(name, to_numpy(model.state_dict()[name])[0])
        assert enc.blobs == encode_tensor(target, F32, options[name]).blobs, name
        assert enc.rel_error == pytest.approx(relative_error(target, F32, enc), rel=1e-9)
    blob_bytes = sum(len(b) for enc in encoded.values() for b in enc.blobs)
    assert kept < blob_bytes + 0.1 * model.emb.weight.numel() * 4, (kept, blob_bytes)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("tied", [False, True])
def test_repair_holds_only_the_embedding_rows_the_inputs_look_up(tied):
    """Without targets kept (codec.save's way), the working model holds a coded embedding's decoded values only at
    the rows the calibration inputs look up (the others are zeros no memory backs), and every tensor codes to the
    same bytes as with the whole; a weight also read another way (here tied to an output layer) is kept whole."""
    import torch

    from codec.rd.repair import repair

    model, options, data = _embedding_model()
    if tied:
        class Tied(type(model)):
            def forward(self, x):
                h = self.emb(x)
                return self.fc(h).sum() + h @ self.emb.weight.T  # every row read: logits over the vocabulary

        model.__class__ = Tied
    whole = repair(model, data, options)
    rows = repair(model, data, options, keep_targets=False)
    assert {n: e.blobs for n, e in rows.encoded.items()} == {n: e.blobs for n, e in whole.encoded.items()}
    assert rows.notes == whole.notes
    held, decoded = rows.model.emb.weight, whole.model.emb.weight
    ids = torch.cat([x.reshape(-1) for x in data]).unique()
    others = torch.ones(len(held), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(held[ids], decoded[ids])
    assert torch.equal(held[others], decoded[others] if tied else torch.zeros_like(decoded[others]))
    assert others.sum() > len(held) // 2 and decoded[others].abs().sum() > 0


def _resident_fraction(address: int, nbytes: int) -> float:
    """The fraction of the pages of ``[address, address + nbytes)`` that are resident (Linux ``mincore``)."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = address - address % page
    pages = -(-(address + nbytes - start) // page)
    vector = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vector) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vector) / pages


def test_sparse_zeros_keeps_unwritten_pages_out_of_memory():
    """``sparse_zeros`` gives writable C-contiguous zeros of which only the pages written become resident, in small
    pages: ``np.zeros`` of 4 MB or more is advised to take transparent huge pages, and writing a row then makes
    2 MB resident (all-MiniLM-L6-v2's coded embedding held at 920 rows: 44 of its 47 MB)."""
    import sys

    from codec.parallel import sparse_zeros

    if not sys.platform.startswith("linux"):
        pytest.skip("residency is read with Linux's mincore")
    rows = np.arange(0, 4096, 128)  # 32 rows of 4 KB, one every 512 KB
    array = sparse_zeros((4096, 1024), np.float32)
    assert array.shape == (4096, 1024) and array.dtype == np.float32 and array.flags.c_contiguous
    assert array.flags.writeable
    array[rows] = 1.0
    assert _resident_fraction(array.ctypes.data, array.nbytes) < 0.05  # (before reading it all: zero pages count)
    assert array.sum() == 32 * 1024 and np.array_equal(np.flatnonzero(array.any(1)), rows)
    small = sparse_zeros((3, 5), np.float64)
    assert small.shape == (3, 5) and small.flags.writeable and not small.any()


def test_coded_embedding_held_by_rows_keeps_the_other_pages_out_of_memory():
    """The rows of a coded embedding that repair holds (:class:`codec.rd.repair._Lookups`) are the only pages of
    its array that become resident (a 4096 x 1024 float32 embedding looked up at 40 rows: every page resident
    before, the array's 16 MB in huge pages), and the tensors code to the same bytes as with the whole."""
    import sys

    import torch

    from codec.rd.repair import repair

    if not sys.platform.startswith("linux"):
        pytest.skip("residency is read with Linux's mincore")
    model, options, _ = _embedding_model(4096, 1024, 8)
    data = [torch.arange(k, 4096, 409)[:10].reshape(2, 5) for k in range(4)]  # 40 rows, far apart
    rows = repair(model, data, options, keep_targets=False)
    whole = repair(model, data, options)
    assert {n: e.blobs for n, e in rows.encoded.items()} == {n: e.blobs for n, e in whole.encoded.items()}
    held = rows.model.emb.weight
    assert held.data_ptr() != whole.model.emb.weight.data_ptr()
    assert _resident_fraction(held.data_ptr(), held.numel() * 4) < 0.05


def test_working_model_shares_the_lossy_tensors_until_coded():
    """Repair's working model is no deep copy of the lossy tensors (on the CPU, with no distillation steps before
    they are coded): they share the caller's storage until their decoded values replace it; the lossless ones are
    copies, as repair writes into them (biases)."""
    import copy

    from codec.rd.repair.slots import _shared_lossy

    model, options, _ = _embedding_model()
    memo = _shared_lossy(model, options)
    work = copy.deepcopy(model, memo)
    assert work.emb.weight.data_ptr() == model.emb.weight.data_ptr()
    assert work.fc.weight.data_ptr() == model.fc.weight.data_ptr()
    assert work.fc.bias.data_ptr() != model.fc.bias.data_ptr()
    assert work.emb.weight is not model.emb.weight and isinstance(work.emb.weight, type(model.emb.weight))


def _whole_expression(h: np.ndarray) -> np.ndarray:
    """``U`` as GPTQ's factor was made before the tenth pass: ``cholesky(inv(L)^T inv(L))^T``, ``H = L L^T``."""
    inv = np.linalg.inv(np.linalg.cholesky(h))
    return np.linalg.cholesky(inv.T @ inv).T


@pytest.mark.parametrize("cols", [1, 127, 128, 300, 512])
def test_inverse_cholesky_is_made_in_the_damped_copy(cols):
    """GPTQ's and JPEG compensation's ``U`` (``H^-1 = U^T U``, upper, positive diagonal) is made in place in the
    damped copy of ``H`` (from the Cholesky factor of ``H`` with its columns reversed, a block of 128 columns at a
    time): the factor the whole expression gives within rounding, and a traced peak of the copy plus block
    temporaries (numpy's ``cholesky`` / ``inv`` of the whole held four ``cols^2`` arrays at once, with LAPACK
    copies tracemalloc does not see; all-MiniLM-L6-v2's FFN output: 19 MB each)."""
    from codec.rd.gptq import _inverse_cholesky_upper

    rng = np.random.default_rng(cols)
    x = rng.standard_normal((2 * cols + 16, cols)) * rng.uniform(0.1, 3.0, cols)
    h = x.T @ x / len(x)
    h[np.diag_indices(cols)] += 0.01
    expected = _whole_expression(h)
    got = []
    peak = _peak(lambda: got.append(_inverse_cholesky_upper(h.copy)))
    u = got[0]
    assert u.shape == h.shape and u.flags.c_contiguous
    assert np.array_equal(np.triu(u), u) and (np.diag(u) > 0).all()
    assert np.abs(u - expected).max() <= 1e-12 * np.abs(expected).max()
    inverse = np.linalg.inv(h)
    assert np.abs(u.T @ u - inverse).max() <= 1e-12 * np.abs(inverse).max()
    if cols >= 512:
        assert peak < 1.5 * h.nbytes, f"{peak / h.nbytes:.2f} x"


def test_inverse_cholesky_damps_a_singular_h_as_before():
    """A singular ``H`` takes extra damping (1e-6 of its mean diagonal, times ten each try) as the whole-expression
    form did, ``H`` being made again for each try (once: its mean diagonal is read before it is factored): the
    factor of ``H`` plus that damping."""
    from codec.rd.gptq import _inverse_cholesky_upper

    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 300))
    h = x.T @ x  # rank 16 of 300
    made = []

    def damped():
        made.append(1)
        return h.copy()

    got = _inverse_cholesky_upper(damped)
    expected, extra, tries = None, 0.0, 0
    while expected is None:
        tries += 1
        try:
            expected = _whole_expression(h + extra * np.eye(len(h)))
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))))
    assert extra > 0 and len(made) == tries > 1
    assert np.allclose(got, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_inverse_cholesky_refuses_what_damping_cannot_save():
    """A negative definite ``H`` (a block past the first) is no matrix damping makes positive definite: a
    LinAlgError after the tries, not a factor."""
    from codec.rd.gptq import _inverse_cholesky_upper

    h = np.eye(300)
    h[200:, 200:] *= -1.0
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        _inverse_cholesky_upper(h.copy)


def _torch_allocations(fn) -> list[tuple[str, int]]:
    """The (operator, bytes) of every allocation torch's CPU allocator makes while ``fn()`` runs (the profiler's
    memory records; tracemalloc does not see torch's tensors)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [(e.name, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage > 0]


def test_float32_products_are_summed_into_float64_without_a_widened_copy():
    """Repair's moment sums (:func:`codec.rd.repair._widen_into`): a float32 batch product added into its float64
    sum in the sum's own array, bit for bit what ``total.add_(value)`` gives, without the float64 copy of the
    product torch's ``add_`` makes first (all-MiniLM-L6-v2's FFN output: 19 MB per batch); a float64 value, or
    none summed yet, as before."""
    import torch

    from codec.rd.repair.fit import _widen_into

    gen = torch.Generator().manual_seed(0)
    products = [torch.randn(300, 200, generator=gen) @ torch.randn(200, 300, generator=gen) for _ in range(4)]
    products[1][0, :3] = torch.tensor([-0.0, float("inf"), 1e-45])
    expected = products[0].to(torch.float64, copy=True)
    for value in products[1:]:
        expected.add_(value)
    total = _widen_into(None, products[0])
    assert total.dtype == torch.float64 and total.data_ptr() != products[0].data_ptr()
    where = total.data_ptr()
    for value in products[1:-1]:
        assert _widen_into(total, value) is total
    assert _torch_allocations(lambda: _widen_into(total, products[-1])) == []
    assert total.data_ptr() == where and torch.equal(total, expected)
    assert torch.equal(_widen_into(total.clone(), expected), expected * 2)
    assert sum(b for _, b in _torch_allocations(lambda: products[0] @ products[0])) >= 300 * 300 * 4  # it sees them


def test_calibration_keeps_full_h_in_float32():
    """A full ``H`` is summed and kept in float32 (half the memory through calibration and the rate search),
    within 1e-6 of the float64 sum rounded once (what the search measured with before). The sensitivity noise's
    scale is the same float64 RMS as a whole-tensor mean for a weight of one chunk, without a float64 copy of
    larger ones."""
    import torch
    from torch import nn

    from codec.rd.calibrate import _RMS_CHUNK, _rms, calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(200, 48)
    layer = calibrate(model, x).layers["0.weight"]
    assert layer.h.dtype == np.float32 and layer.h.shape == (48, 48)
    summed = sum(b.T @ b for b in x.split(64)) / len(x)  # as calibrate sums its batches of 64
    assert np.array_equal(layer.h, summed.numpy())
    reference = (sum((b.T @ b).double() for b in x.split(64)) / len(x)).float().numpy()
    np.testing.assert_allclose(layer.h, reference, rtol=1e-6, atol=1e-6 * float(np.abs(reference).max()))
    w = torch.randn(300, 500)
    assert _rms(w) == w.pow(2).mean(dtype=torch.float64).sqrt().item()
    big = torch.randn(3 * _RMS_CHUNK // 1000 + 1, 1000)
    assert _rms(big) == pytest.approx(big.pow(2).mean(dtype=torch.float64).sqrt().item(), rel=1e-12)


def test_embedding_noise_drawn_by_rows_is_the_whole_draw(monkeypatch):
    """The sensitivity noise of an embedding is drawn a chunk of rows at a time, keeping the rows looked up: the
    same values as one draw of the whole weight (torch draws normal values 16 at a time), so the same
    sensitivities, without a noise tensor of the embedding's size."""
    import torch
    from torch import nn

    from codec.rd import calibrate as calibration

    weight = torch.randn(301, 48)
    ids = torch.tensor([0, 3, 40, 41, 150, 299, 300])
    for chunk in (48 * 7, 48 * 301, 1 << 20):  # 7 rows at a time, exactly the weight, more than it
        monkeypatch.setattr(calibration, "_RMS_CHUNK", chunk)
        noise = calibration._Noise(weight, torch.device("cpu"), seed=12)
        assert noise.by_rows and torch.equal(noise.rows(ids), noise.whole()[ids])
    monkeypatch.undo()
    assert not calibration._Noise(torch.randn(30, 20), torch.device("cpu"), 0).by_rows  # 20: not whole groups of 16

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(500, 32), nn.Linear(32, 8)

        def forward(self, ids):
            return self.fc(self.emb(ids)).mean(1)

    torch.manual_seed(0)
    model, ids = Tokens(), torch.randint(0, 500, (64, 10))
    by_rows = calibration.calibrate(model, ids).layers["emb.weight"].sensitivity
    monkeypatch.setattr(calibration._Noise, "error",
                        lambda self, module, x, size=None: calibration._weight_error(module, x, self.whole(), size))
    assert calibration.calibrate(model, ids).layers["emb.weight"].sensitivity == by_rows


def _rss_mb() -> float:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_release_memory_hands_free_heap_pages_back():
    """Freed blocks inside the C heap (holes below live blocks, which glibc does not trim by itself) go back to
    the system: resident memory falls by most of what was freed."""
    import sys

    from codec.parallel import release_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("resident memory is read from /proc")
    blocks = [np.ones(64 * 1024 // 8) for _ in range(1600)]  # 100 MB of 64 KB blocks, below the mmap threshold
    keep = blocks[1::2]  # every other block stays alive, so the freed ones are holes, not the heap's top
    del blocks
    before = _rss_mb()
    if not release_memory():
        pytest.skip("no malloc_trim in this C library")
    assert before - _rss_mb() > 25, "less than half the 50 MB freed went back"
    assert all(float(b[0]) == 1.0 for b in keep)


def test_bound_heap_hands_freed_blocks_back_at_once():
    """With the mmap threshold fixed (what calibrated encodes do), blocks of a megabyte or more get mappings of their
    own and go back to the system when freed, with no trim: glibc's adaptive threshold would have put them in the
    heap after the first mapped block was freed, where freed ones stay resident. Run in a fresh process each way
    (the setting is the process's, and the heap's history matters)."""
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("resident memory is read from /proc")
    script = """
import sys
import numpy as np
from codec.parallel import MMAP_THRESHOLD, bound_heap

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "bound" and not bound_heap():
    print("skip")
    sys.exit()
first = np.ones(4 * MMAP_THRESHOLD // 8)
del first  # freeing a mapped block is what raises glibc's own threshold
blocks, small = [], []
for _ in range(40):  # 80 MB of 2 MB blocks, each followed by a small live block (holes, were they in the heap)
    blocks.append(np.ones(2 * MMAP_THRESHOLD // 8))
    small.append(np.ones(1024))
before = rss()
del blocks
print(before - rss())
"""
    drops = {}
    for mode in ("bound", "adaptive"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        if out.stdout.strip() == "skip":
            pytest.skip("no mallopt in this C library")
        drops[mode] = float(out.stdout)
    assert drops["bound"] > 60, drops  # the freed 80 MB went back
    assert drops["adaptive"] < 20, drops  # the premise: glibc's own threshold keeps them


@pytest.mark.parametrize("label,options,limit", [
    ("jpeg grid", EncodeOptions(codec="jpeg", quality=60, tile=(8, 64)), 2.5),
    ("jpeg rows", EncodeOptions(codec="jpeg", quality=60, tile=(64, 64), row_shape=(16, 32)), 5),
    ("quant", EncodeOptions(codec="quant", bits=4, tile=(8, 64)), 8),
])
def test_compensation_and_gptq_hold_few_weight_sized_arrays(label, options, limit):
    """JPEG compensation and GPTQ keep the tiles' bounds per element in float32 or gather them per column, without
    permuted copies in the natural order: traced peak within ``H``'s factor (two ``cols^2``) and ``limit`` float64
    copies of the weight (10.5 / 8.6 / 13.2 copies before the ninth pass; all-MiniLM-L6-v2's FFN output: 4.5 MB
    each). Grid tiles: the bounds a column of tiles at a time, the pinned elements as positions (3.0 copies before
    the eighteenth pass, 1.8 after)."""
    from codec.rd.gptq import gptq_target, jpeg_target

    rng = np.random.default_rng(0)
    rows, cols = 256, 512
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x = rng.standard_normal((1024, cols))
    h = x.T @ x / len(x)
    fn = gptq_target if options.codec == "quant" else jpeg_target
    peak = _peak(lambda: fn(w, F32, options, h))
    assert peak < 2 * h.nbytes + limit * w.size * 8, f"{label}: {(peak - 2 * h.nbytes) / (w.size * 8):.1f} copies"


def _symmetric(cols: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((3 * cols, cols)).astype(np.float32)
    h = x.T @ x / len(x)
    return h + h.T  # float32, equal to its transpose bit for bit (x.T @ x need not be: then it is not packed)


@pytest.mark.parametrize("cols", [2, 7, 384])
def test_packed_symmetric_gives_the_matrix_back_bit_for_bit(cols):
    h = _symmetric(cols, seed=cols)
    assert allocate.PackedSymmetric.packs(h)
    packed = allocate.PackedSymmetric(h)
    assert packed.triangle.nbytes == h.itemsize * cols * (cols + 1) // 2  # about half the whole
    whole = packed.unpacked()
    assert whole.dtype == h.dtype and whole.tobytes() == h.tobytes()
    assert packed.unpacked() is whole  # shared while held
    assert packed.shape == h.shape and packed.ndim == 2
    assert packed[1:, :1].tobytes() == h[1:, :1].tobytes()
    assert packed.astype(np.float64).tobytes() == h.astype(np.float64).tobytes()
    with pytest.raises(ValueError):
        whole[0, 0] = 1.0  # read only: every caller sees the same matrix


def test_packed_symmetric_refuses_what_it_cannot_keep_exactly():
    h = _symmetric(16)
    skew = h.copy()
    skew[0, 1] = np.nextafter(skew[0, 1], np.inf)  # one ulp from symmetric
    nan = h.copy()
    nan[2, 2] = np.nan
    for bad in (skew, nan, h[:, :8], h[0], np.ones((1, 1), np.float32), np.arange(16).reshape(4, 4) * 0):
        assert not allocate.PackedSymmetric.packs(bad)
    weightings = allocate.packed_weightings({"a": Weighting(h=skew), "b": Weighting(h=h, scale=2.0),
                                             "c": Weighting(rows=np.ones(3))})
    assert weightings["a"].h is skew and weightings["c"].h is None
    assert isinstance(weightings["b"].h, allocate.PackedSymmetric) and weightings["b"].scale == 2.0


def test_packing_in_place_frees_each_whole_h_before_the_next_is_packed(monkeypatch):
    """packed_weightings(in_place=True) replaces each entry of the dict it is handed as it packs it: a whole H that
    nothing else holds is gone before the next one is packed (a BERT-base held its 521 MB of whole H and the 260 MB
    packed at once), with the same packed triangles as a packing into a new dict; without in_place the dict handed
    in is left as it was."""
    import gc
    import weakref

    names = ["a", "b", "c", "d"]
    alive_at_each: list[list[bool]] = []
    refs: dict[str, weakref.ref] = {}
    real = allocate.PackedSymmetric

    class Watched(real):
        def __init__(self, full):
            gc.collect()
            alive_at_each.append([refs[n]() is not None for n in names])
            super().__init__(full)

    def made() -> dict:
        out = {}
        for i, name in enumerate(names):
            h = _symmetric(32 + 8 * i, seed=i)
            refs[name] = weakref.ref(h)
            out[name] = Weighting(h=h, scale=1.0 + i)
        out["rows"] = Weighting(rows=np.ones(5))
        return out

    expected = {n: w.h.triangle.copy() for n, w in allocate.packed_weightings(made()).items() if w.h is not None}
    kept = made()
    copy = allocate.packed_weightings(kept)
    assert all(isinstance(w.h, np.ndarray) for n, w in kept.items() if n != "rows")  # not in place: kept as it was
    assert copy is not kept
    del copy, kept
    monkeypatch.setattr(allocate, "PackedSymmetric", Watched)
    weightings = made()
    out = allocate.packed_weightings(weightings, in_place=True)
    assert out is weightings and out["rows"].h is None
    # while the i-th is packed, the ones before it are freed and the ones after it still held
    assert alive_at_each == [[j >= i for j in range(len(names))] for i in range(len(names))], alive_at_each
    for name in names:
        assert isinstance(out[name].h, real) and out[name].scale == 1.0 + names.index(name)
        assert np.array_equal(out[name].h.triangle, expected[name])
    gc.collect()
    assert all(refs[n]() is None for n in names)


def test_packed_h_measures_every_candidate_the_same_and_frees_the_whole_matrix():
    import gc
    import weakref

    cols, rows = 256, 96
    h = _symmetric(cols)
    array = _matrix(rows, cols)
    whole = Distortion({"w": Weighting(h=h, rows=np.linspace(0.5, 2.0, rows), scale=0.7)})
    packed = Distortion(allocate.packed_weightings(whole.weightings))
    for label, options in [("q", EncodeOptions(codec="quant", bits=3)), ("j", EncodeOptions(codec="jpeg", quality=30))]:
        a, _ = measure("w", array, F32, label, options, measure_by=whole, keep_decoded=False)
        b, _ = measure("w", array, F32, label, options, measure_by=packed, keep_decoded=False)
        assert (a.nmse, a.rel_error, a.out_error, a.nbytes) == (b.nmse, b.rel_error, b.out_error, b.nbytes)
    held = packed.weightings["w"].h
    gc.collect()
    assert held._whole is not None and held._whole() is None  # unpacked for each measure, not kept after


def test_calibrated_save_holds_packed_h_through_the_search_with_the_same_file(tmp_path, monkeypatch):
    from torch import nn

    import codec
    from codec import encode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    batches = [torch.randn(128, 256) for _ in range(4)]
    seen: list = []
    real = encode._plan

    def plan(*args, measure_by=None, **kwargs):
        seen.append(sorted(type(w.h).__name__ for w in measure_by.weightings.values() if w.h is not None))
        return real(*args, measure_by=measure_by, **kwargs)

    monkeypatch.setattr(encode, "_plan", plan)
    codec.save(model, tmp_path / "packed.jwt", bits_per_weight=4.0, calibration=batches, repair=False)
    packed, seen[:] = list(seen), []
    monkeypatch.setattr(allocate, "packed_weightings", lambda w, **_: dict(w))  # the whole matrices, as before
    codec.save(model, tmp_path / "whole.jwt", bits_per_weight=4.0, calibration=batches, repair=False)
    # every plan of each save (a small model's may be planned again: encode.REPLANS)
    assert packed and all(kinds == ["PackedSymmetric"] * 2 for kinds in packed)
    assert len(seen) == len(packed) and all(kinds == ["ndarray"] * 2 for kinds in seen)
    assert (tmp_path / "packed.jwt").read_bytes() == (tmp_path / "whole.jwt").read_bytes()


def test_a_calibrated_save_lets_go_of_the_h_matrices_when_each_stage_is_done(monkeypatch):
    """The whole H matrices go once packed (before the search), the packed ones once the plan is made (before
    repair): a name kept for either held MiniLM's calibrated encode at 252-280 MB above resident instead of 181."""
    import gc
    import io
    import weakref

    from torch import nn

    import codec
    from codec import api, encode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    batches = [torch.randn(32, 64) for _ in range(4)]
    whole, packed, checked = [], [], []
    real_calibrated, real_plan, real_repaired = api.calibrated, encode._plan, api.repaired_arrays

    def calibrated(*args, **kwargs):
        inputs, calib = real_calibrated(*args, **kwargs)
        whole.extend(weakref.ref(stats.h) for stats in calib.layers.values())
        return inputs, calib

    def plan(*args, measure_by=None, **kwargs):
        gc.collect()
        checked.append(("search", [ref() is None for ref in whole]))
        packed.append(weakref.ref(measure_by))
        return real_plan(*args, measure_by=measure_by, **kwargs)

    def repaired(*args, **kwargs):
        gc.collect()
        checked.append(("repair", [ref() is None for ref in packed]))
        return real_repaired(*args, **kwargs)

    monkeypatch.setattr(api, "calibrated", calibrated)
    monkeypatch.setattr(encode, "_plan", plan)
    monkeypatch.setattr(api, "repaired_arrays", repaired)
    codec.save(model, io.BytesIO(), bits_per_weight=4.0, calibration=batches)
    stages = [stage for stage, _ in checked]  # (a small model may be planned again before repair: REPLANS)
    assert whole and stages[-1] == "repair" and set(stages[:-1]) == {"search"}, checked
    assert all(all(dead) for _, dead in checked), checked


@pytest.mark.parametrize("weighting", ["h", "rows"])
def test_a_weighted_tensors_reference_energy_is_summed_once_with_the_same_figures(weighting, monkeypatch):
    """Distortion.measure sums a weighted tensor's reference energies (plain and weighted) on its first measure and
    keeps them: a later candidate's figures equal those a fresh measure (summing them again) gives, bit for bit, and
    the reference's squares are not made again."""
    rows, cols = 700, 96  # several bands of MEASURE_BAND
    monkeypatch.setattr(allocate, "MEASURE_BAND", 64 * cols)
    reference = _matrix(rows, cols, seed=3)
    rng = np.random.default_rng(4)
    spec = Weighting(h=_symmetric(cols), scale=0.3) if weighting == "h" else \
        Weighting(rows=rng.uniform(0.1, 2.0, rows), scale=0.3)
    kept = Distortion({"w": spec})
    candidates = [(reference + rng.standard_normal(reference.shape).astype(np.float32) * s).astype(np.float32)
                  for s in (0.01, 0.1, 0.3)]
    for decoded in candidates:
        fresh = Distortion({"w": spec}).measure("w", reference, decoded, F32)
        assert kept.measure("w", reference, decoded, F32) == fresh
    squares = []
    real_sum = np.sum
    monkeypatch.setattr(allocate.np, "sum", lambda a, *k, **kw: squares.append(a.shape) or real_sum(a, *k, **kw))
    kept.measure("w", reference, candidates[0], F32)
    assert len(squares) == -(-rows // 64)  # one sum a band: the difference's, not the reference's too


@pytest.mark.parametrize("jobs", [1, 3])
def test_the_search_unpacks_a_packed_h_once_per_tensor_with_the_same_figures(jobs, monkeypatch):
    """plan_options keeps a tensor's whole H (Distortion.keeping) while its candidates are measured: every candidate's
    figures equal those of a measure that unpacks H for itself, H is unpacked once per tensor (not per candidate),
    the choice is the same, and the whole H is let go when the search is done with the tensor."""
    import gc

    from codec.dtypes import get_dtype as dtype_of

    cols, rows = 128, 48
    arrays = {n: _matrix(rows, cols, seed=i) for i, n in enumerate(("a", "b"))}
    weights = {n: Weighting(h=_symmetric(cols, seed=10 + i), rows=np.linspace(0.5, 2.0, rows), scale=0.7)
               for i, n in enumerate(arrays)}

    def tensors(names=None):
        return ((n, a, dtype_of("float32")) for n, a in arrays.items() if names is None or n in names)

    unpacks: list[str] = []
    real_unpacked = allocate.PackedSymmetric.unpacked

    def unpacked(self):
        unpacks.append(next(n for n, w in kept.weightings.items() if w.h is self))
        return real_unpacked(self)

    monkeypatch.setattr(allocate.PackedSymmetric, "unpacked", unpacked)
    alive: list = []
    real_banded = Weighting.banded

    def banded(self):
        energy = real_banded(self)
        alive.append(weakref.ref(energy))  # the function holds the float32 H
        return energy

    monkeypatch.setattr(Weighting, "banded", banded)
    seen: dict[str, list] = {}
    real_measure = Distortion.measure

    def measure(self, name, reference, decoded, dtype, rows=None):
        got = real_measure(self, name, reference, decoded, dtype, rows)
        if self is kept:
            seen.setdefault(name, []).append(got)
        return got

    monkeypatch.setattr(Distortion, "measure", measure)
    base = EncodeOptions(codec="jpeg", quality=50)
    kept = Distortion(allocate.packed_weightings(weights))
    plan = allocate.plan_options(tensors, base, lambda n: None, bits_per_weight=3.0, measure_by=kept, jobs=jobs,
                                 search="exhaustive")
    counted = {n: len(v) for n, v in seen.items()}
    assert all(c > 3 for c in counted.values()), counted
    assert unpacks == ["a", "b"], unpacks  # once a tensor (13 candidates each here)
    assert kept._kept is None and kept._keeping is None
    gc.collect()
    assert all(ref() is None for ref in alive)  # nothing holds a whole H once the search is done

    unpacks.clear()
    monkeypatch.setattr(Distortion, "keeping", lambda self, name: contextlib.nullcontext())  # as before: per measure
    fresh = Distortion(allocate.packed_weightings(weights))
    kept, seen_kept, seen = fresh, seen, {}
    again = allocate.plan_options(tensors, base, lambda n: None, bits_per_weight=3.0, measure_by=fresh, jobs=jobs,
                                  search="exhaustive")
    assert len(unpacks) == sum(counted.values())  # one unpacking a candidate without keeping
    assert again == plan
    assert {n: sorted(v) for n, v in seen.items()} == {n: sorted(v) for n, v in seen_kept.items()}  # bit for bit
