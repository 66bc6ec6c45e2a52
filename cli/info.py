"""``jwt info``."""

from __future__ import annotations

import json
from collections import defaultdict

import click

from .common import check_input, handle_errors

#: Version of the ``--json`` document (spec/cli.md): raised only for a change that is not an addition.
SCHEMA_VERSION = 1


def describe(reader) -> dict:
    """The ``--json`` document: per-tensor facts read from the index alone."""
    from codec.stats import file_totals

    tensors = []
    for e in reader.index.entries:
        codec = "alias" if e.alias else "unchanged" if e.unchanged else e.codec.codec_id
        item = {
            "name": e.name, "shape": list(e.shape), "dtype": e.dtype.name, "codec": codec,
            "params": None if e.alias or e.unchanged else {k: v for k, v in e.codec.get_config().items() if k != "id"},
            "tiling": e.tiling.to_json() if e.tiling else None,
            "tiles": e.tiling.n_tiles if e.tiling else 0,
            "numel": e.numel, "nbytes": e.stored_bytes, "decoded_nbytes": 0 if e.alias else e.nbytes,
            "bits_per_weight": 8 * e.stored_bytes / e.numel if e.numel and not e.alias else 0.0,
        }
        if e.tiling is not None and e.blobs:  # the tile parameter blob: plain, or a zstd frame (format 1.4)
            item["params_nbytes"], item["params_zstd"] = e.blobs[0].length, e.params_zstd
        if e.alias:
            item["alias"] = e.alias
        if e.base is not None:  # an update's entry coded from a base tensor (a difference, or unchanged)
            item["base"] = e.base.name
        tensors.append(item)
    totals = file_totals(reader.index, reader.size)
    attachments = [{"name": a.name, "size": a.size, "nbytes": a.stored_bytes, "codec": a.codec.codec_id}
                   for a in reader.index.attachments]
    return {
        "schema_version": SCHEMA_VERSION,
        "file": reader.name, "format_version": f"1.{reader.index.minor}", "file_bytes": reader.size,
        "tensors": tensors, "attachments": attachments, "metadata": reader.metadata,
        "encoder": reader.index.encoder,
        "update": None if reader.index.base is None else {"base_sha256": reader.index.base.sha256,
                                                          "base_tensors": reader.index.base.tensors},
        "totals": {"tensors": len(tensors), "weights": totals.weights, "nbytes": reader.size,
                   "bits_per_weight": totals.bits_per_weight,
                   "ratio_to_fp32": 4 * totals.weights / reader.size if reader.size else 0.0,
                   "raw_bytes": totals.raw_bytes, "ratio": totals.ratio,
                   "attachments": len(attachments), "attachment_bytes": sum(a["nbytes"] for a in attachments),
                   "attachment_size": sum(a["size"] for a in attachments)},
    }


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


@click.command()
@click.argument("input", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document for scripts (documented in spec/cli.md).")
@handle_errors
def info(input: str, as_json: bool) -> None:
    """Show what a .jwt file holds, from its index alone (nothing is decoded).

    INPUT is a file or an http(s):// URL (then only the first bytes, the
    header and the index, are downloaded).
    """
    from codec.mapping import params_length
    from codec.reader import Reader
    from codec.stats import file_totals

    check_input(input)
    with Reader(input) as reader:
        doc = describe(reader)
    if as_json:
        click.echo(json.dumps(doc, indent=1, ensure_ascii=False))
        return
    def codec_text(t: dict) -> str:
        if t["codec"] == "alias":
            return f"={t['alias']}"
        if "base" in t and t["codec"] != "unchanged":
            return f"{t['codec']}+base" if t["base"] == t["name"] else f"{t['codec']}+base[{t['base']}]"
        return t["codec"] if t.get("base", t["name"]) == t["name"] else f"unchanged[{t['base']}]"

    rows = [(t["name"], _shape(t["shape"]), t["dtype"], codec_text(t),
             str(t["tiles"]), f"{t['nbytes']:,}", f"{t['bits_per_weight']:.3f}") for t in doc["tensors"]]
    head = ("name", "shape", "dtype", "codec", "tiles", "bytes", "bits/w")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {4, 5, 6}
    for r in [head, *rows]:
        click.echo("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    per_codec: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in doc["tensors"]:
        acc = per_codec[t["codec"]]
        acc[0] += 1
        acc[1] += t["numel"] if t["codec"] != "alias" else 0
        acc[2] += t["nbytes"]
    tot = doc["totals"]
    click.echo("")
    for name, (count, numel, nbytes) in sorted(per_codec.items()):
        bpw = f"{8 * nbytes / numel:.3f} bits/w" if numel else ""
        click.echo(f"{name:>8}: {count} tensors, {numel:,} weights, {nbytes:,} bytes {bpw}")
    click.echo(f"   total: {tot['tensors']} tensors, {tot['weights']:,} weights, {tot['nbytes']:,} bytes, "
               f"{file_totals(reader.index, reader.size).summary()} (format {doc['format_version']})")
    packed = [t for t in doc["tensors"] if t.get("params_zstd")]
    if packed:
        plain = sum(params_length(t["tiles"], t["tiling"]["params"]) for t in packed)
        click.echo(f"tile parameters: {len(packed)} tensors as zstd frames (flag params_zstd), "
                   f"{plain:,} -> {sum(t['params_nbytes'] for t in packed):,} bytes")
    if doc["update"]:
        click.echo(f"update: decode with --base, the model whose digest is sha256:{doc['update']['base_sha256']} "
                   f"({doc['update']['base_tensors']} tensors)")
    if doc["attachments"]:
        click.echo(f"attachments: {tot['attachments']} files, {tot['attachment_size']:,} bytes stored in "
                   f"{tot['attachment_bytes']:,}")
        width = max(len(a["name"]) for a in doc["attachments"])
        for a in doc["attachments"]:
            click.echo(f"  {a['name'].ljust(width)}  {a['size']:>12,}  {a['nbytes']:>12,}  {a['codec']}")
    for title, pairs in (("metadata", doc["metadata"]), ("encoder", doc["encoder"])):
        if pairs:
            click.echo(f"{title}:")
            width = max(len(k) for k in pairs)
            for k, v in pairs.items():  # a checkpoint's jwt.tree can be long: --json has every value whole
                click.echo(f"  {k.ljust(width)}  {v if len(v) <= 200 else f'{v[:200]}... ({len(v):,} characters)'}")
