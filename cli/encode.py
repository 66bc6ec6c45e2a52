"""``jwt encode``."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from .common import SIZE, fail, handle_errors, progress_bar, same_file


def parse_meta(values: tuple[str, ...]) -> dict[str, str]:
    """Turn ``key=value`` strings into a dict."""
    meta = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--meta")
        meta[key] = value
    return meta


@click.command()
@click.argument("input", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output .jwt file (default: INPUT with the suffix .jwt).")
@click.option("--codec", "codec_name", type=click.Choice(["jpeg", "jpegxl", "lossless"]), default="jpeg",
              show_default=True, help="Image codec for weight matrices, or lossless for every tensor.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True,
              help="1..100: picks the JPEG quantization table scale (JPEG XL: libjxl's quality->distance map).")
@click.option("--table", type=click.Choice(["auto", "jpeg", "flat"]), default="auto", show_default=True,
              help="JPEG quantization table: jpeg (T.81 Annex K, for image-like rows), flat, or auto "
                   "(jpeg with --row-shape, flat for grid tiles).")
@click.option("--distance", type=click.FloatRange(0, 25), help="JPEG XL distance (overrides --quality).")
@click.option("--effort", type=click.IntRange(1, 9), default=3, show_default=True, help="JPEG XL encoder effort.")
@click.option("--tile", type=SIZE, default="64x64", show_default=True, help="Grid tile size HxW.")
@click.option("--row-shape", type=SIZE, help="Code every matrix row of H*W values as one HxW tile "
                                              "(e.g. 28x28 for a first layer over MNIST images).")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Free-form metadata to store (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@handle_errors
def encode(input: Path, output: Path | None, codec_name: str, quality: int, table: str, distance: float | None,
           effort: int, tile: tuple[int, int], row_shape: tuple[int, int] | None, meta: tuple[str, ...],
           quiet: bool) -> None:
    """Encode a PyTorch state_dict (.pt/.pth) into a .jwt container.

    Weight matrices (floating, 2-D or more, at least 16384 values) are cut
    into tiles, mapped per tile to 8-bit (JPEG) or 16-bit (JPEG XL) pixels
    and coded as mosaic images; everything else is stored losslessly.

    \b
    Examples:
      jwt encode mlp.pt --row-shape 28x28 --quality 20
      jwt encode model.pt -o model.jwt --codec jpegxl --quality 80
    """
    from codec import api

    output = output or input.with_suffix(".jwt")
    if input.exists() and same_file(input, output):
        raise fail(f"{output}: refusing to overwrite the input")
    if not input.is_file():
        raise fail(f"{input}: no such file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state_dict = api.read_state_dict(input)
    total = sum(t.numel() for t in state_dict.values())
    with progress_bar(total, "encode", quiet) as bar:
        notes = api.save(
            state_dict, output, metadata={**parse_meta(meta), "source": input.name},
            progress=lambda name, n: bar.update(n), codec=codec_name, quality=quality, table=table,
            distance=distance, effort=effort, tile=tile, row_shape=row_shape,
        )
    for message in [str(w.message) for w in caught] + notes:
        click.echo(f"jwt: warning: {message}", err=True)
    if not quiet:
        size, raw = output.stat().st_size, sum(t.numel() * t.element_size() for t in state_dict.values())
        click.echo(f"{output}: {len(state_dict)} tensors, {size:,} bytes "
                   f"({8 * size / max(total, 1):.3f} bits/weight, {raw / max(size, 1):.1f}x smaller than the input tensors)")
