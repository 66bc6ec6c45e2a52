"""The compiled byte-plane loops (numba, the ``fast`` extra) against the numpy path, bit for bit, and the fallbacks.

Comparisons need numba and are skipped without it; the fallback tests run either way.
"""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec.blobcodecs import Zstd, ZstdPlanes
from codec.blobcodecs import zstd as zstd_module
from codec.blobcodecs.zstd import _STEP, use_compiled
from codec.dtypes import get_dtype

try:
    import numba  # noqa: F401

    HAVE_NUMBA = True
except ImportError:
    HAVE_NUMBA = False
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed (pip install -e '.[fast]')")

RNG = np.random.default_rng(13)
#: (dtype, rotations): the reference encoder's and the edges of the range.
CASES = [("float16", (0, 1, 15)), ("bfloat16", (1, 3, 15)), ("float32", (0, 1, 3, 31)), ("float64", (0, 5, 63)),
         ("int16", (8,)), ("int32", (7,)), ("uint64", (33,))]
SIZES = [0, 1, 7, 1000, _STEP + 3]


@pytest.fixture
def state(monkeypatch):
    """A fresh choice of loops for the test (numpy's until the test says), the process's restored after it."""
    fresh = {"mode": False, "loops": None, "numpy_bytes": 0}
    monkeypatch.setattr(zstd_module, "_compiled_state", fresh)
    return fresh


def _bits(dtype: str, count: int) -> np.ndarray:
    """Random bit patterns of ``dtype`` in storage form."""
    storage = get_dtype(dtype).storage
    return RNG.integers(0, 256, count * storage.itemsize, dtype=np.uint8).view(storage)


def _both(state, fn):
    """``fn()`` by numpy, then by the compiled loops."""
    state["mode"] = False
    by_numpy = fn()
    assert use_compiled(True)
    return by_numpy, fn()


@needs_numba
@pytest.mark.parametrize("dtype,rotations", CASES)
@pytest.mark.parametrize("count", SIZES)
def test_compiled_loops_match_numpy_bit_for_bit(state, dtype, rotations, count):
    """Planes split from words and words joined from planes are numpy's bytes, every dtype, rotation and size; the
    codec's frames are byte-equal and decode to the input."""
    storage = get_dtype(dtype).storage
    k = storage.itemsize
    array = _bits(dtype, count)
    planes = RNG.integers(0, 256, k * count, dtype=np.uint8)
    for rotation in rotations:
        def split():
            return zstd_module._rotated_planes(array, rotation).copy()

        def join():
            out = np.full(count, 0x5A, storage)
            zstd_module._from_planes(planes, out.view(np.uint8), k, rotation)
            return out

        def frame():
            blob = ZstdPlanes(rotation).encode(array)
            return blob, ZstdPlanes(rotation).decode(blob, array.shape, storage).tobytes()

        a, b = _both(state, split)
        assert a.tobytes() == b.tobytes(), (rotation, "split")
        a, b = _both(state, join)
        assert a.tobytes() == b.tobytes(), (rotation, "join")
        a, b = _both(state, frame)
        assert a == b and b[1] == array.tobytes(), (rotation, "frame")


@needs_numba
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.sampled_from([2, 4, 8]), data=st.data())
def test_compiled_loops_match_numpy_on_any_words(monkeypatch, k, data):
    """Hypothesis: any words, any length, any rotation of their size."""
    monkeypatch.setattr(zstd_module, "_compiled_state", {"mode": False, "loops": None, "numpy_bytes": 0})
    t = np.dtype(f"<u{k}")
    words = np.array(data.draw(st.lists(st.integers(0, 2 ** (8 * k) - 1), max_size=300)), t)
    coder = ZstdPlanes(data.draw(st.integers(0, 8 * k - 1)))
    zstd_module._compiled_state["mode"] = False
    blob = coder.encode(words)
    back = coder.decode(blob, words.shape, t)
    assert use_compiled(True)
    assert coder.encode(words) == blob
    assert coder.decode(blob, words.shape, t).tobytes() == back.tobytes() == words.tobytes()


@needs_numba
def test_compiled_loops_fill_a_given_out_and_leave_other_layouts_to_numpy(state):
    """``decode(out=...)`` is filled in place; the format-1.0 shuffle (numpy's: no rotation) still codes, 1-byte
    and 16-byte elements too."""
    assert use_compiled(True)
    x = _bits("float32", 5000)
    blob = ZstdPlanes(3).encode(x)
    out = np.zeros(x.shape, np.float32)
    assert ZstdPlanes(3).decode(blob, x.shape, np.dtype(np.float32), out=out) is out
    assert out.tobytes() == x.tobytes()
    for array in (RNG.integers(0, 256, 999, dtype=np.uint8), _bits("float64", 202).view(np.complex128),
                  _bits("int32", 3001), _bits("float16", 77)):
        blob = Zstd(1, True).encode(array)
        assert Zstd(1, True).decode(blob, array.shape, array.dtype).tobytes() == array.tobytes()


@needs_numba
def test_compiled_loops_code_from_threads_at_once(state):
    """The loops release the GIL (``nogil``): four threads coding at once get every tensor back bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    assert use_compiled(True)
    arrays = [_bits(dtype, 20_000 + i) for i, dtype in enumerate(["float32", "bfloat16", "float64", "float16"] * 3)]

    def round_trip(array):
        coder = ZstdPlanes(3)
        return coder.decode(coder.encode(array), array.shape, array.dtype).tobytes() == array.tobytes()

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(round_trip, arrays))


@needs_numba
def test_default_mode_loads_the_loops_after_enough_bytes(state, monkeypatch):
    """By default numpy moves the first ``_COMPILE_AFTER`` bytes of planes, the compiled loops the rest."""
    monkeypatch.setattr(zstd_module, "_COMPILE_AFTER", 100_000)
    state["mode"] = None
    x = _bits("float32", 10_000)  # 40 KB of planes per call
    coder = ZstdPlanes(3)
    blob = coder.encode(x)
    for _ in range(2):
        assert coder.decode(blob, x.shape, np.dtype(np.float32)).tobytes() == x.tobytes()
    assert state["loops"] is None and state["numpy_bytes"] == 120_000
    assert coder.decode(blob, x.shape, np.dtype(np.float32)).tobytes() == x.tobytes()
    assert state["loops"] is sys.modules["codec.blobcodecs._compiled"]
    assert coder.encode(x) == blob


def test_without_numba_everything_is_numpy(state, monkeypatch):
    """numba missing: ``use_compiled(True)`` says False, and the default mode codes by numpy past its threshold."""
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "codec.blobcodecs._compiled", raising=False)
    import codec.blobcodecs as package

    monkeypatch.delattr(package, "_compiled", raising=False)
    assert use_compiled(True) is False
    assert state["loops"] is False
    state.update(mode=None, loops=None, numpy_bytes=0)
    monkeypatch.setattr(zstd_module, "_COMPILE_AFTER", 0)
    x = _bits("bfloat16", 3000)
    blob = ZstdPlanes(3).encode(x)
    assert ZstdPlanes(3).decode(blob, x.shape, x.dtype).tobytes() == x.tobytes()
    assert state["loops"] is False


def test_broken_compiled_loops_warn_once_and_numpy_codes(state, monkeypatch):
    """A numba that fails (here: loops that raise) is reported by one RuntimeWarning; numpy then does the work."""
    def broken(*args):
        raise RuntimeError("no LLVM today")

    fake = types.ModuleType("codec.blobcodecs._compiled")
    fake.join = fake.split = {2: broken, 4: broken, 8: broken}
    monkeypatch.setitem(sys.modules, "codec.blobcodecs._compiled", fake)
    import codec.blobcodecs as package

    monkeypatch.setattr(package, "_compiled", fake, raising=False)
    with pytest.warns(RuntimeWarning, match="no LLVM today"):
        assert use_compiled(True) is False
    x = _bits("float32", 3000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blob = ZstdPlanes(3).encode(x)
        assert ZstdPlanes(3).decode(blob, x.shape, x.dtype).tobytes() == x.tobytes()


def test_numba_without_a_cache_directory_warns_and_numpy_codes(state, monkeypatch):
    """numba raises at decoration where it finds no writable cache directory: one warning, then numpy."""
    def njit(**options):
        raise RuntimeError("cannot cache function 'join_k': no locator available")

    fake_numba = types.ModuleType("numba")
    fake_numba.njit = njit
    monkeypatch.setitem(sys.modules, "numba", fake_numba)
    monkeypatch.delitem(sys.modules, "codec.blobcodecs._compiled", raising=False)
    import codec.blobcodecs as package

    monkeypatch.delattr(package, "_compiled", raising=False)
    state["mode"] = None
    monkeypatch.setattr(zstd_module, "_COMPILE_AFTER", 0)
    x = _bits("float64", 3000)
    with pytest.warns(RuntimeWarning, match="no locator available"):
        blob = ZstdPlanes(5).encode(x)
    assert state["loops"] is False
    assert ZstdPlanes(5).decode(blob, x.shape, x.dtype).tobytes() == x.tobytes()


def test_use_compiled_takes_true_false_or_none(state):
    with pytest.raises(TypeError, match="True, False or None"):
        use_compiled("yes")
    assert use_compiled(False) is False and state["mode"] is False


@needs_numba
def test_every_test_vector_decodes_the_same_by_the_compiled_loops(state):
    """Every valid test vector (formats 1.0-1.4: exponent_first, zstd_planes, byte shuffles) decodes to the same bits
    with the compiled loops as with numpy, so the optional extra keeps every old file decoding as before."""
    import json
    from pathlib import Path

    import codec

    vectors = Path(__file__).resolve().parent.parent / "fixtures" / "vectors"
    manifest = json.loads((vectors / "manifest.json").read_text(encoding="utf-8"))

    def decoded(path: Path) -> dict[str, bytes]:
        with codec.Reader(path) as reader:
            return {name: np.ascontiguousarray(reader.read(name)).tobytes() for name in reader.keys()}

    files = [vectors / item["file"] for item in manifest["valid"]]
    for path in files:
        by_numpy, by_loops = _both(state, lambda: decoded(path))
        assert by_loops == by_numpy, path.name
