"""``jwt diff``: per-tensor error between two models, and the bits/weight of the .jwt side."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from .common import check_input, fail, handle_errors, update_base


def _shape(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def compare(a, b) -> tuple[float, float, float, float]:
    """(sum of squared differences, sum of squared reference values, max |difference|, elements) of b against a."""
    import torch

    a, b = a.detach().to("cpu").double().reshape(-1), b.detach().to("cpu").double().reshape(-1)
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = torch.where(a == b, torch.zeros_like(a), b - a)
    d = torch.where(both_nan, torch.zeros_like(d), d)
    a = torch.where(both_nan, torch.zeros_like(a), a)  # a NaN kept as NaN adds nothing to either norm
    if d.numel() == 0:
        return 0.0, 0.0, 0.0, 0
    return float((d * d).sum()), float((a * a).sum()), float(d.abs().max()), d.numel()


def _relative(err2: float, ref2: float) -> float:
    if ref2:
        return math.sqrt(err2 / ref2)
    return 0.0 if err2 == 0 else math.inf


def _jwt_costs(source) -> tuple[dict[str, tuple[str, float | None, int]], int] | None:
    """(name -> (codec, bits/weight, stored bytes), file bytes) for a .jwt source, from its index; None for
    other formats."""
    if source.format != "jwt":
        return None
    from codec.reader import Reader

    with Reader(str(source.path)) as reader:
        out = {}
        for e in reader.index.entries:
            if e.alias is not None:
                out[e.name] = (f"={e.alias}", None, 0)
            else:  # an update's entry is its base tensor as is ("unchanged") or plus a coded difference
                codec_id = e.codec.codec_id if e.base is None else "unchanged" if e.unchanged else \
                    f"{e.codec.codec_id}+base"
                out[e.name] = (codec_id, 8 * e.stored_bytes / e.numel if e.numel else 0.0, e.stored_bytes)
        return out, reader.size


def finite_json(value):
    """``value`` with every NaN or infinite float replaced by None (JSON has neither; spec/cli.md: null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def diff_models(path_a: str | Path, path_b: str | Path, base=None) -> dict:
    """The ``--json`` document: per-tensor errors of B against A, costs of the .jwt side(s), totals.

    ``base`` (a :class:`codec.update.Base`): what a side that is an update is decoded against; the costs
    of an update side are those of the update file."""
    from codec import io_formats

    with io_formats.open_source(path_a, base=base) as src_a, io_formats.open_source(path_b, base=base) as src_b:
        jwt_sides = {"a": _jwt_costs(src_a), "b": _jwt_costs(src_b)}
        costs = {side: None if found is None else found[0] for side, found in jwt_sides.items()}
        names_a, names_b = list(src_a.tensors), set(src_b.tensors)
        rows = []
        tot_err2 = tot_ref2 = tot_max = 0.0
        tot_bytes = {"a": 0, "b": 0}
        tot_numel = {"a": 0, "b": 0}
        for name in names_a:
            if name not in names_b:
                continue
            ta, tb = src_a.tensors[name], src_b.tensors[name]
            row = {"name": name, "shape": list(ta.shape), "dtype_a": str(ta.dtype).removeprefix("torch."),
                   "dtype_b": str(tb.dtype).removeprefix("torch."), "numel": ta.numel()}
            for side, cost in costs.items():
                if cost is not None:
                    codec_id, bits, stored = cost[name]
                    row[f"codec_{side}"], row[f"bits_per_weight_{side}"] = codec_id, bits
                    if bits is not None:
                        tot_bytes[side] += stored
                        tot_numel[side] += ta.numel()
            if tuple(ta.shape) != tuple(tb.shape):
                row.update(rel_error=None, max_error=None, note=f"shape {_shape(ta.shape)} vs {_shape(tb.shape)}")
            else:
                err2, ref2, worst, _ = compare(ta, tb)
                row.update(rel_error=_relative(err2, ref2), max_error=worst)
                tot_err2, tot_ref2, tot_max = tot_err2 + err2, tot_ref2 + ref2, max(tot_max, worst)
            rows.append(row)
        totals: dict = {"tensors": len(rows), "rel_error": _relative(tot_err2, tot_ref2), "max_error": tot_max}
        for side, cost in costs.items():
            if cost is not None:
                totals[f"bits_per_weight_{side}"] = 8 * tot_bytes[side] / tot_numel[side] if tot_numel[side] else 0.0
                totals[f"file_bytes_{side}"] = jwt_sides[side][1]
        return {"schema_version": 1, "a": str(path_a), "b": str(path_b), "tensors": rows,
                "only_in_a": [n for n in names_a if n not in names_b],
                "only_in_b": [n for n in src_b.tensors if n not in set(names_a)], "totals": totals}


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "rel":
        return "inf" if math.isinf(value) else f"{value:.3e}"
    if kind == "max":
        return f"{value:.3e}"
    return f"{value:.3f}"


def table(doc: dict) -> list[str]:
    """The aligned text table of a diff document, with a totals line."""
    sides = [s for s in ("a", "b") if f"bits_per_weight_{s}" in doc["totals"]]
    head = ["name", "shape", "dtype", "rel.err", "max.err"]
    for s in sides:
        head += [f"codec({s.upper()})", f"bits/w({s.upper()})"]
    rows = []
    for t in doc["tensors"]:
        dtype = t["dtype_a"] if t["dtype_a"] == t["dtype_b"] else f"{t['dtype_a']}/{t['dtype_b']}"
        row = [t["name"], _shape(t["shape"]), dtype,
               t.get("note") or _fmt(t["rel_error"], "rel"), "" if t.get("note") else _fmt(t["max_error"], "max")]
        for s in sides:
            bits = t[f"bits_per_weight_{s}"]
            row += [t[f"codec_{s}"], "-" if bits is None else _fmt(bits, "bits")]
        rows.append(row)
    tot = doc["totals"]
    total = [f"total ({tot['tensors']} tensors)", "", "", _fmt(tot["rel_error"], "rel"), _fmt(tot["max_error"], "max")]
    for s in sides:
        total += ["", _fmt(tot[f"bits_per_weight_{s}"], "bits")]
    right = {3, 4} | {6 + 2 * i for i in range(len(sides))}
    widths = [max(len(r[i]) for r in [head, *rows, total]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [line(head), *map(line, rows), "  ".join("-" * w for w in widths), line(total)]
    for s in sides:
        size = tot[f"file_bytes_{s}"]
        weights = sum(t["numel"] for t in doc["tensors"] if t[f"bits_per_weight_{s}"] is not None)
        out.append(f"{s.upper()} file: {size:,} bytes, {8 * size / weights if weights else 0:.3f} bits/weight "
                   "(index and attachments included)")
    for s in ("a", "b"):
        missing = doc[f"only_in_{s}"]
        if missing:
            out.append(f"only in {s.upper()} ({len(missing)}): {', '.join(missing[:20])}"
                       + (", ..." if len(missing) > 20 else ""))
    return out


@click.command()
@click.argument("a", type=str)
@click.argument("b", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document for scripts (spec/cli.md): valid "
              "JSON, NaN and infinite values as null.")
@click.option("--base", type=click.Path(path_type=Path), metavar="MODEL",
              help="When A or B (or both) is an update: the model it was made against (.jwt, .pt/.pth, "
                   ".safetensors or a folder); the update is compared as the new model it decodes to. A wrong "
                   "or modified base is refused, naming the first tensor that differs.")
@handle_errors
def diff(a: str, b: str, as_json: bool, base: Path | None = None) -> None:
    """Compare two models tensor by tensor: relative and max error of B against A.

    A and B are each a .pt, .safetensors, .jwt file, a model folder or
    the http(s):// URL of a .jwt file.
    The relative error is ||B - A|| / ||A|| per tensor, and over all
    tensors in the total line; bits/weight is the stored cost of a .jwt
    side, from its index. An update (made with jwt encode --base) is
    compared as the model it decodes to, against --base; its codec column
    reads "unchanged" or "CODEC+base" (a coded difference).

    \b
    Examples:
      jwt diff model.pt model.jwt
      jwt diff all-MiniLM-L6-v2/ minilm.jwt
      jwt diff v2.pt v2-update.jwt --base v1.jwt     (the update's error)
      jwt diff v1.jwt v2-update.jwt --base v1.jwt    (what the update changes)
    """
    for p in (a, b):
        check_input(p, folder_ok=True, what="a model")
    doc = diff_models(a, b, base=update_base([a, b], base))
    if as_json:
        click.echo(json.dumps(finite_json(doc), indent=1, ensure_ascii=False, allow_nan=False))
        return
    if not doc["tensors"]:
        raise fail(f"{a} and {b} have no tensor name in common")
    for text in table(doc):
        click.echo(text)
