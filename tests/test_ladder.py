"""The finer JPEG quality ladder (codec.rd.ladder): table scales between two qualities, in the rate search's
refinement and in repair's keep-size."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

import codec
from click.testing import CliRunner
from jwt_cli.main import cli

from codec.blobcodecs.jpeg import ANNEX_K_LUMINANCE, quality_scale
from codec.dtypes import get_dtype
from codec.errors import EncodeError
from codec.rd import ladder
from codec.rd.allocate import _refine, measure
from codec.rd.repair import FINE_STEP, RepairSettings
from codec.rd.repair.budget import _code_within
from codec.rd.repair.slots import _slots
from codec.tensorcodec import EncodeOptions, encode_tensor
from codec.writer import Writer

F32 = get_dtype("float32")
Q5 = EncodeOptions(codec="jpeg", quality=5, table="flat", tile=(64, 64))


def weights(rows: int = 128, cols: int = 512, seed: int = 0) -> np.ndarray:
    """A smooth-plus-noise matrix: JPEG at low quality keeps part of it."""
    g = np.random.default_rng(seed)
    smooth = np.cumsum(g.standard_normal((rows, cols)), axis=1) / np.sqrt(cols)
    return (smooth + 0.3 * g.standard_normal((rows, cols))).astype(np.float32)


def coded(array: np.ndarray, opts: EncodeOptions, path=None) -> tuple[int, float]:
    """``(blob bytes, relative error as the plain reader decodes it)``; the file is written to ``path`` if given."""
    encoded = encode_tensor(array, F32, opts)
    buf = io.BytesIO()
    with Writer(buf) as writer:
        writer.add("w", F32, array.shape, encoded)
    if path is not None:
        path.write_bytes(buf.getvalue())
    decoded = codec.load(buf.getvalue())["w"].numpy()
    return sum(map(len, encoded.blobs)), float(np.linalg.norm(decoded - array) / np.linalg.norm(array))


def test_a_scale_between_two_qualities_codes_between_them_and_decodes_plainly(tmp_path):
    """q5 -> scale 900 -> q6 (scales 1000, 900, 833): bytes rise and the error falls in that order; the table is
    stored as its 64 entries with the coarser quality (``jwt info --json``), and a plain reader decodes it."""
    array = weights()
    (b5, e5), (b6, e6) = coded(array, Q5), coded(array, Q5.with_(quality=6))
    mid = ladder.at_scale(Q5, 900)
    assert mid.quality == 5 and mid.scale == 900 and ladder.text(mid) == "q5.56"
    nbytes, error = coded(array, mid, tmp_path / "m.jwt")
    assert b5 < nbytes < b6 and e5 > error > e6
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "m.jwt"), "--json"])
    assert result.exit_code == 0, result.output
    tensor = json.loads(result.output)["tensors"][0]
    assert tensor["codec"] == "jpeg" and tensor["params"] == {"quality": 5, "table": [144] * 64}  # 16 * 900 / 100


def test_scale_options_are_checked_and_a_quality_s_own_scale_is_its_name():
    assert EncodeOptions(codec="jpeg", quality=5, scale=1000).scale is None
    assert ladder.at_scale(Q5, quality_scale(7)) == Q5.with_(quality=7)
    with pytest.raises(EncodeError, match="scale 0 is not in"):
        EncodeOptions(codec="jpeg", quality=5, scale=0)
    for q in (1, 5, 20, 50, 90):  # a quality's own scale codes with the named table
        assert ladder.at_scale(Q5.with_(table="ramp2"), quality_scale(q)).image_codec("rows").table == "ramp2"
    assert ladder.at_scale(Q5.with_(table="jpeg"), 999).image_codec("rows").table == [
        min(255, max(1, (b * 999 + 50) // 100)) for b in ANNEX_K_LUMINANCE]


def test_the_ladder_is_fine_where_qualities_are_coarse_and_integer_where_they_are_not():
    steps = ladder.between(Q5, Q5.with_(quality=6))
    scales = [ladder.scale_of(s) for s in steps]
    assert scales == sorted(scales, reverse=True) and all(833 < s < 1000 for s in scales)
    ratios = np.array([1000, *scales]) / np.array([*scales, 833])
    assert len(steps) >= 5 and ratios.max() <= ladder.FINE_RATIO * 1.002
    assert [s.quality for s in ladder.between(Q5.with_(quality=60), Q5.with_(quality=63))] == [61, 62]
    assert ladder.between(Q5.with_(quality=6), Q5) == []
    finer = [ladder.scale_of(s) for s in ladder.between(Q5, Q5.with_(quality=6), 1.01)]
    assert len(finer) >= 3 * len(scales) and (np.array([1000, *finer]) / np.array([*finer, 833])).max() <= 1.01 * 1.002


def test_keep_size_pays_a_small_overrun_with_a_fine_step_not_a_whole_quality():
    """A weight planned at q5 that must give back 3 % of its bytes (the tensors before it overran) is coded at a
    table scale between q4's and q5's that fits, not at q4 (which would give back 15 % or more)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 64)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(weights(64, 1024)))
    plan = EncodeOptions(codec="jpeg", quality=5, tile=(32, 64))
    slot = _slots(model, {"0.weight": plan})["0.weight"]

    def size(opts):  # the blobs, and a list table's index bytes
        encoded = encode_tensor(slot.original, F32, opts)
        return sum(len(b) for b in encoded.blobs) + ladder.table_bytes(encoded.codec)

    planned, q4 = size(plan), size(plan.with_(quality=4))
    assert q4 < 0.85 * planned  # the premise: one quality is a coarse step here (5 times the overrun)
    overrun = planned * 3 // 100
    _, _, _, opts, credit, nbytes, _ = _code_within(slot, None, plan, RepairSettings(), None, -overrun)
    assert opts.quality == 4 and quality_scale(5) < opts.scale < quality_scale(4)
    assert q4 < nbytes == size(opts) <= planned - overrun and credit == planned - overrun - nbytes
    dearer = ladder.between(opts, plan, FINE_STEP)[:1] or [plan]  # the next step of keep-size's ladder up does not fit
    assert size(dearer[0]) > planned - overrun
    assert len(ladder.between(opts.with_(scale=None), plan, FINE_STEP)) > len(ladder.between(
        opts.with_(scale=None), plan))  # keep-size's steps are finer than the rate search's


def test_a_list_table_counts_its_compressed_bytes_in_a_compressed_index():
    """In a zstd-compressed index a table between two qualities adds a few bytes, not its JSON's 250: ``table_bytes``
    with ``compressed`` counts at least what it adds there (a flat table and libjpeg's, whose entries differ) and a
    small part of the JSON."""
    array = weights(64, 256)

    def index_bytes(opts: EncodeOptions) -> tuple[int, int, int]:  # (file less blobs, JSON count, compressed count)
        encoded = encode_tensor(array, F32, opts)
        buf = io.BytesIO()
        with Writer(buf, compress_index=True) as writer:
            writer.add("w", F32, array.shape, encoded)
        rest = len(buf.getvalue()) - sum(len(b) for b in encoded.blobs)
        return rest, ladder.table_bytes(encoded.codec), ladder.table_bytes(encoded.codec, compressed=True)

    for plan in (Q5, Q5.with_(table="jpeg", row_shape=(16, 16), tile=(64, 64))):
        named = index_bytes(plan.with_(quality=4))
        scaled = index_bytes(ladder.at_scale(plan, 1100))
        assert named[1:] == (0, 0) and scaled[1] > 200
        assert scaled[0] - named[0] <= scaled[2] <= scaled[1] // 3


def test_keep_size_counts_a_table_at_its_compressed_bytes_where_the_index_is_compressed():
    """Repair told that the index will be compressed (``index_zstd``) counts a fine step's table at its compressed
    bytes: with the same overrun to pay it keeps the rest of the credit (JSON-counted, about 230 bytes were lost)
    and codes at a scale at least as fine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 64)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(weights(64, 1024)))
    plan = EncodeOptions(codec="jpeg", quality=5, tile=(32, 64))
    chosen = {}
    for compressed in (False, True):
        slot = _slots(model, {"0.weight": plan})["0.weight"]
        slot.index_zstd = compressed
        planned = sum(len(b) for b in encode_tensor(slot.original, F32, plan).blobs)
        overrun = planned * 3 // 100
        _, _, _, opts, credit, nbytes, encoded = _code_within(slot, None, plan, RepairSettings(), None, -overrun)
        blobs = sum(len(b) for b in encoded.blobs)
        assert opts.scale is not None and nbytes == blobs + ladder.table_bytes(encoded.codec, compressed)
        assert credit == planned - overrun - nbytes >= 0
        chosen[compressed] = (ladder.scale_of(opts), credit)
    assert chosen[True][0] <= chosen[False][0]
    if chosen[True][0] == chosen[False][0]:
        assert chosen[True][1] > chosen[False][1] + 200


def test_refine_spends_the_slack_on_a_fine_step():
    """The rate search's refinement of a JPEG choice bisects the ladder between its quality and the menu's next:
    with slack for a fraction of q5 -> q6 it takes a table scale between them."""
    array = weights(256, 1024)
    point, up, q6 = (measure("w", array, F32, f"jpeg q{q} flat 64x64", Q5.with_(quality=q))[0] for q in (5, 10, 6))
    slack = (q6.nbytes - point.nbytes) // 2
    chosen = _refine(lambda names: iter([("w", array, F32)]), {"w": point}, {"w": [point, up]}, {},
                     point.nbytes + slack, {"w": None})
    got = chosen["w"]
    assert got.options.quality == 5 and quality_scale(6) < got.options.scale < quality_scale(5)
    assert point.nbytes < got.nbytes <= point.nbytes + slack and "~q5." in got.label
