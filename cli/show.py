"""``jwt show``: a tensor's tiles as pictures, decoded beside the original and the error."""

from __future__ import annotations

import hashlib
import math
import re
import urllib.parse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .common import check_input, fail, handle_errors, is_url, update_base

if TYPE_CHECKING:  # numpy and codec.tiling are imported when the command runs, not for ``jwt --help``
    import numpy as np

    from codec.tiling import Tiling

#: Tile used to cut losslessly stored tensors for display.
DISPLAY_TILE = 64


def where(t: Tiling, i: int) -> str:
    """Where tile ``i`` lies in the matrix, in words."""
    if t.mode == "rows":
        return f"matrix row {i} as {t.tile_h}x{t.tile_w}"
    gc = t.grid[1]
    r0, c0 = (i // gc) * t.tile_h, (i % gc) * t.tile_w
    return f"rows {r0}..{min(r0 + t.tile_h, t.rows) - 1}, columns {c0}..{min(c0 + t.tile_w, t.cols) - 1}"


def tile_of(t: Tiling, matrix: np.ndarray, i: int) -> np.ndarray:
    """Tile ``i`` of ``matrix`` (edge tiles are smaller: padding is not data)."""
    if t.mode == "rows":
        return matrix[i].reshape(t.tile_h, t.tile_w)
    gc = t.grid[1]
    r0, c0 = (i // gc) * t.tile_h, (i % gc) * t.tile_w
    return matrix[r0 : r0 + t.tile_h, c0 : c0 + t.tile_w]


def matrix_view(values: np.ndarray) -> np.ndarray:
    """The ``[d0, d1*d2*...]`` matrix of a tensor (1-d: one row; scalar: 1x1)."""
    if values.ndim >= 2:
        return values.reshape(values.shape[0], -1)
    return values.reshape(1, -1)


def tile_view(entry, matrix: np.ndarray) -> Tiling:
    """The stored tiling of a lossy entry, or a display grid of 64x64 tiles for a lossless one."""
    from codec.tiling import plan_tiling

    t = getattr(entry, "tiling", None)
    return t if t is not None else plan_tiling(*matrix.shape, (DISPLAY_TILE, DISPLAY_TILE), None)


def rel_error(decoded: np.ndarray, original: np.ndarray) -> float:
    """||decoded - original|| / ||original|| (the absolute norm when the original is all zero)."""
    import numpy as np

    err = float(np.linalg.norm((decoded - original).ravel()))
    ref = float(np.linalg.norm(original.ravel()))
    return err / ref if ref else err


def _as_float64(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").double().numpy()


def _mosaic(tiles: list[np.ndarray], shape: tuple[int, int], cols: int, scales: list[tuple[float, float]] | None,
            symmetric: bool = False) -> np.ndarray:
    """Tiles on a grid with 1-pixel gaps (NaN); each scaled by its (low, high) to 0..1, or to -1..1."""
    import numpy as np

    th, tw = shape
    n_rows = -(-len(tiles) // cols)
    out = np.full((n_rows * (th + 1) - 1, cols * (tw + 1) - 1), np.nan)
    for k, tile in enumerate(tiles):
        if scales is not None:
            low, high = scales[k]
            span = (high - low) or 1.0
            tile = tile / span if symmetric else (tile - low) / span
        r, c = (k // cols) * (th + 1), (k % cols) * (tw + 1)
        out[r : r + tile.shape[0], c : c + tile.shape[1]] = tile
    return out


#: Picture formats ``-o`` may name, by suffix (matplotlib writes JPEG through Pillow); no suffix: PNG.
IMAGE_FORMATS = {"": "png", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}
#: Fonts tried after matplotlib's default for characters it lacks (CJK, emoji), where installed.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Source Han Sans", "WenQuanYi Zen Hei",
                  "Droid Sans Fallback", "AR PL UMing CN", "Noto Color Emoji", "Noto Emoji", "Symbola")


def image_format(output: Path) -> str:
    """matplotlib's format name for ``output``'s suffix; a usage error for a suffix it cannot mean."""
    fmt = IMAGE_FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise click.BadParameter(f"{str(output)!r}: cannot write a {output.suffix!r} picture (use "
                                 f"{', '.join(s for s in IMAGE_FORMATS if s)})", param_hint="-o/--output")
    return fmt


def _use_fallback_fonts(matplotlib) -> None:
    """Let text fall back to installed CJK / emoji fonts (matplotlib >= 3.6 takes a list of families)."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    extra = [name for name in FALLBACK_FONTS if name in installed]
    if extra:
        families = matplotlib.rcParams["font.sans-serif"]
        matplotlib.rcParams["font.sans-serif"] = [*families[:1], *extra, *families[1:]]


def render(name: str, title: str, view: Tiling, decoded: np.ndarray, original: np.ndarray | None,
           tile: int | None, count: int, output: Path) -> dict:
    """Draw one tile (``tile``) or the first ``count`` tiles; write the picture atomically (its format from
    the suffix, :data:`IMAGE_FORMATS`); return the errors shown (and ``missing_glyphs`` when a character
    of the title had no font: drawn as a box, without matplotlib's warnings)."""
    import matplotlib

    matplotlib.use("Agg")
    _use_fallback_fonts(matplotlib)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=r"Glyph .* missing from")
        facts = _draw(name, title, view, decoded, original, tile, count, output)
    for w in caught:
        if "missing from" in str(w.message):
            facts["missing_glyphs"] = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return facts


def _draw(name: str, title: str, view: Tiling, decoded: np.ndarray, original: np.ndarray | None,
          tile: int | None, count: int, output: Path) -> dict:
    """The figure of :func:`render`."""
    import matplotlib.pyplot as plt
    import numpy as np

    from codec.writer import atomic_output

    panels = 1 if original is None else 3
    facts: dict = {}
    if tile is not None:
        dec = tile_of(view, decoded, tile)
        orig = None if original is None else tile_of(view, original, tile)
        ref = dec if orig is None else orig
        low, high = float(ref.min()), float(ref.max())
        fig, axes = plt.subplots(1, panels, figsize=(max(7.0, 4.2 * panels), 4.6), squeeze=False)
        images = [("decoded", dec, "gray", low, high)]
        heading = f"{name}: tile {tile} of {view.n_tiles} ({where(view, tile)})"
        if orig is not None:
            err = dec - orig
            bound = float(np.abs(err).max()) or 1.0
            facts = {"rel_error": rel_error(dec, orig), "max_error": float(np.abs(err).max())}
            images += [("original", orig, "gray", low, high),
                       (f"error (decoded - original)\nmax |error| {facts['max_error']:.3g}", err, "RdBu_r",
                        -bound, bound)]
            heading += f"\nrelative error of the tile {facts['rel_error']:.2%}"
        for ax, (label, img, cmap, vmin, vmax) in zip(axes[0], images):
            shown = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    else:
        n = min(count, view.n_tiles)
        cols = max(1, math.ceil(math.sqrt(n)))
        shape = (view.tile_h, view.tile_w)
        dec_tiles = [tile_of(view, decoded, i) for i in range(n)]
        orig_tiles = None if original is None else [tile_of(view, original, i) for i in range(n)]
        ref_tiles = orig_tiles or dec_tiles
        scales = [(float(t.min()), float(t.max())) for t in ref_tiles]
        aspect = (-(-n // cols) * (view.tile_h + 1)) / (cols * (view.tile_w + 1))
        height = min(12.0, max(1.5, 4.0 * aspect)) + 1.3
        fig, axes = plt.subplots(1, panels, figsize=(max(7.0, 4.6 * panels), height), squeeze=False)
        images = [("decoded", _mosaic(dec_tiles, shape, cols, scales), "gray", 0.0, 1.0)]
        heading = f"{name}: first {n} of {view.n_tiles} tiles, each scaled to its own range"
        if orig_tiles is not None:
            errs = [d - o for d, o in zip(dec_tiles, orig_tiles)]
            shown_rel = rel_error(np.concatenate([d.ravel() for d in dec_tiles]),
                                  np.concatenate([o.ravel() for o in orig_tiles]))
            facts = {"rel_error": rel_error(decoded, original), "rel_error_shown": shown_rel,
                     "max_error": float(np.abs(decoded - original).max()) if decoded.size else 0.0}
            err_mosaic = _mosaic(errs, shape, cols, scales, symmetric=True)
            bound = float(np.nanmax(np.abs(err_mosaic))) if np.isfinite(err_mosaic).any() else 1.0
            images += [("original", _mosaic(orig_tiles, shape, cols, scales), "gray", 0.0, 1.0),
                       ("error / tile range", err_mosaic, "RdBu_r", -(bound or 1.0), bound or 1.0)]
            heading += (f"\nrelative error: {facts['rel_error_shown']:.2%} in these tiles, "
                        f"{facts['rel_error']:.2%} in the tensor; max |error| {facts['max_error']:.3g}")
        for ax, (label, img, cmap, vmin, vmax) in zip(axes[0], images):
            masked = np.ma.masked_invalid(img)
            shown = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_facecolor("#3b5b92")
            ax.set_title(label, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{heading}\n{title}", fontsize=9)
    fig.tight_layout()
    with atomic_output(output) as out:
        fig.savefig(out, format=image_format(output), dpi=110)
    plt.close(fig)
    return facts


def describe_codec(entry) -> str:
    """The codec and tiling of an entry in a few words."""
    if entry.alias is not None:
        return f"alias of {entry.alias!r}"
    ref = getattr(entry, "base", None)  # an update's entry: unchanged, or a difference from a base tensor
    if ref is not None and entry.codec is None:
        return f"unchanged from base tensor {ref.name!r}, {list(entry.shape)} {entry.dtype.name}"
    text = f"{entry.codec.codec_id} ({entry.codec.params_text(sep=', ')})"
    if ref is not None:
        text = f"base {ref.name!r} + difference {text}"
    if entry.tiling is not None:
        t = entry.tiling
        text += f", {t.mode} tiles {t.tile_h}x{t.tile_w}"
    else:
        text += f", shown in {DISPLAY_TILE}x{DISPLAY_TILE} tiles"
    bits = 8 * entry.stored_bytes / entry.numel if entry.numel else 0.0
    return f"{text}, {list(entry.shape)} {entry.dtype.name}, {bits:.3f} bits/weight"


#: Longest part of a default output name taken from the input's or the tensor's name (file names are
#: at most 255 bytes on common file systems); longer parts are cut and given a hash of the whole.
NAME_PART = 80


def _name_part(text: str, fallback: str) -> str:
    """``text`` as a safe, bounded file name part: runs of characters other than ``[A-Za-z0-9_.-]`` become
    ``_``; a part over :data:`NAME_PART` characters, or one that lost characters to the replacement (two
    CJK names would otherwise collide), ends in a hash of ``text``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    if safe and len(safe) <= NAME_PART and not re.sub(r"[A-Za-z0-9_./ :-]", "", text):
        return safe  # ASCII names: fc1.weight, blocks/0/w
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{(safe or fallback)[: NAME_PART - 9]}-{digest}"


def _default_output(input: str, tensor: str, tile: int | None) -> Path:
    """``INPUT.TENSOR[.tileN].png`` beside a local INPUT, in the current folder for a URL."""
    local = Path(urllib.parse.urlsplit(input).path if is_url(input) else input)
    folder = Path(".") if is_url(input) else local.parent
    stem = _name_part(local.stem, "model")
    return folder / (f"{stem}.{_name_part(tensor, 'tensor')}" + (f".tile{tile}" if tile is not None else "") + ".png")


@click.command()
@click.argument("input", type=str)
@click.argument("tensor")
@click.option("--tile", "tile", type=click.IntRange(min=0), help="Show this tile alone (index in tile order). "
              "Default: an overview of the first --count tiles.")
@click.option("--count", type=click.IntRange(1, 1024), default=64, show_default=True,
              help="Tiles in the overview.")
@click.option("--original", type=str,
              help="The original weights (.pt, .safetensors, model folder, .jwt or a .jwt URL): adds the original "
                   "and an error map.")
@click.option("--base", type=click.Path(path_type=Path), metavar="MODEL",
              help="When INPUT is an update: the model it was made against (.jwt, .pt/.pth, .safetensors or a "
                   "folder). The tensor is drawn as the new model has it (base + difference). A wrong or modified "
                   "base is refused, naming the first tensor that differs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Picture to write: .png, .jpg, .pdf or .svg (default: INPUT.TENSOR[.tileN].png beside INPUT, "
                   "long or non-ASCII names shortened with a hash; for a URL, in the current folder).")
@handle_errors
def show(input: str, tensor: str, tile: int | None, count: int, original: str | None,
         output: Path | None, base: Path | None = None) -> None:
    """Draw a tensor's tiles after decoding, as stored in the mosaic, into a PNG.

    A tile is a 64x64 block of the weight matrix in grid mode, or one
    matrix row reshaped (e.g. a 28x28 receptive field) in rows mode. With
    --original, the same tile of the original and the error map are drawn
    beside it, with the tile's relative error in the title. Without
    --tile, the first --count tiles are drawn as a grid, each scaled to its
    own range (as the codec maps each tile to its own pixel range).
    INPUT is a .jwt file or an http(s):// URL of one. An update (made
    with jwt encode --base) needs --base, its base model; with --original
    set to the base as well, the error map shows what the update changed.

    \b
    Examples:
      jwt show mlp.jwt fc1.weight --original mlp.pt -o fc1.png
      jwt show mlp.jwt fc1.weight --tile 7 --original mlp.pt -o fc1_7.jpg
      jwt show v2-update.jwt fc1.weight --base v1.jwt --original v2.pt
    """
    from codec import io_formats
    from codec.api import JwtFile

    if output is not None:
        image_format(output)  # a usage error before any work
    check_input(input, folder_ok=False)
    if original is not None:
        check_input(original, folder_ok=True)
    base_model = update_base([input], base)
    with JwtFile(input, base=base_model) as f:
        f.reader.name = str(input)
        if tensor not in f:
            near = [k for k in f.keys() if tensor.lower() in k.lower()][:5]
            raise click.UsageError(f"{input} has no tensor {tensor!r}"
                                   + (f" (similar: {', '.join(near)})" if near else ""))
        entry = f.reader.entry(tensor)
        stored = f.reader.entry(entry.alias) if entry.alias else entry
        decoded = matrix_view(_as_float64(f.get(tensor)))
        title = f"{Path(urllib.parse.urlsplit(input).path).name if is_url(input) else Path(input).name}: " \
                f"{describe_codec(entry)}"
    view = tile_view(stored, decoded)
    if tile is not None and tile >= view.n_tiles:
        raise click.BadParameter(f"{tile} is not a tile of {tensor!r}, which has {view.n_tiles} tiles "
                                 f"(0..{view.n_tiles - 1})", param_hint="--tile")
    reference = None
    if original is not None:
        with io_formats.open_source(original) as src:
            if tensor not in src.tensors:
                raise fail(f"{original}: no tensor named {tensor!r}")
            values = _as_float64(src.tensors[tensor])
        reference = matrix_view(values)
        if reference.shape != decoded.shape:
            raise fail(f"{original}: tensor {tensor!r} has shape {list(values.shape)}, the .jwt has "
                       f"{list(stored.shape)}")
    output = output or _default_output(input, tensor, tile)
    facts = render(tensor, title, view, decoded, reference, tile, count, output)
    what = f"tile {tile}" if tile is not None else f"first {min(count, view.n_tiles)} of {view.n_tiles} tiles"
    extra = f", relative error {facts['rel_error']:.2%}" if "rel_error" in facts else ""
    click.echo(f"{output}: {tensor}, {what}{extra}")
    if facts.get("missing_glyphs"):
        click.echo("jwt: note: no installed font has some characters of the names; they are drawn as boxes",
                   err=True)
