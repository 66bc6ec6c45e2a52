"""``jwt decode``."""

from __future__ import annotations

import sys
import urllib.parse
from pathlib import Path

import click

from .common import fail, handle_errors, is_url, jobs_option, progress_bar, same_file


def _default(jwt_path: str, metadata: dict[str, str]) -> str:
    """The default output (never an existing file or folder), saying so on stderr when the plain name is taken."""
    from codec import io_formats

    plain, fresh = (io_formats.default_output(jwt_path, metadata, fresh=f) for f in (False, True))
    if fresh != plain:
        click.echo(f"jwt: {plain} exists; writing {fresh} instead", err=True)
    return str(fresh) + ("/" if metadata.get(io_formats.SOURCE_FORMAT_KEY) == "folder" else "")


@click.command()
@click.argument("input", type=str)
@click.option("-o", "--output", type=str,
              help="Output: x.pt / x.pth, x.safetensors, or a folder (ending in /, or without a suffix) rebuilt "
                   "with model.safetensors and the attachments. Default: the kind of the original input "
                   "(INPUT.pt, INPUT.safetensors or the folder INPUT/; when that exists, INPUT.decoded.pt, "
                   "INPUT.decoded-2.pt, ...: a default output never replaces a file); required when INPUT is -.")
@click.option("--aliases", type=click.Choice(["clone", "drop"]), default="clone", show_default=True,
              help="Tensors that shared storage, in a .safetensors or folder output (which cannot share): write "
                   "a copy under every name, or drop the alias names (for loaders that re-tie weights).")
@click.option("--base", type=click.Path(path_type=Path), metavar="MODEL",
              help="For an update: the model it was made against (.jwt, .pt/.pth, .safetensors or a folder). "
                   "A wrong or modified base is refused before anything is written, naming the first tensor "
                   "that differs.")
@click.option("--max-shard-size", metavar="SIZE",
              help="Folder output: write the weights as safetensors shards of at most SIZE (e.g. 2GB, 500MB, "
                   "1.5GiB) with model.safetensors.index.json, as transformers saves large models.")
@jobs_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@handle_errors
def decode(input: str, output: str | None, aliases: str, base: Path | None, jobs: int | None, quiet: bool,
           max_shard_size: str | None = None) -> None:
    """Decode a .jwt container into a .pt state_dict, a .safetensors file or a model folder.

    A .pt loads with torch.load(path, weights_only=True), with every name,
    shape and dtype of the original and shared tensors shared again. A
    folder holds model.safetensors and every attachment (config, tokenizer,
    ...) so transformers / sentence-transformers load it as the original.
    Outputs are written to a temporary file or folder and renamed; an
    existing non-empty folder is refused. INPUT may be - to read from
    standard input, or an http(s):// URL (tensors are decoded as their
    bytes arrive; the default output is named after the URL's file, here).

    \b
    Examples:
      jwt decode model.jwt -o model.pt
      jwt decode model.jwt -o model.safetensors
      jwt decode minilm.jwt -o minilm/
      jwt decode big.jwt -o big/ --max-shard-size 2GB
      jwt decode https://example.org/models/minilm.jwt -o minilm.pt
      jwt decode v2-update.jwt --base v1.jwt -o v2.pt
    """
    from codec import io_formats
    from codec.parallel import jobs_default
    from codec.reader import Reader

    total = 0
    if input == "-":
        if output is None:
            raise click.UsageError("-o is required when reading from standard input")
        source, name = sys.stdin.buffer, "<stdin>"
    elif is_url(input):
        with Reader(input) as reader:
            local = Path(urllib.parse.urlsplit(input).path).name or "model.jwt"
            output = output or _default(local, reader.metadata)
            total = sum(e.numel for e in reader.index.entries)
        source, name = input, input
    else:
        if not Path(input).is_file():
            raise fail(f"{input}: no such file")
        with Reader(input) as reader:
            output = output or _default(input, reader.metadata)
            total = sum(e.numel for e in reader.index.entries)
        if same_file(input, output):
            raise fail(f"{output}: refusing to overwrite the input")
        source, name = Path(input), input
    kind = io_formats.output_format(output)
    if max_shard_size is not None:
        try:
            shard_bytes = io_formats.parse_size(max_shard_size)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-shard-size") from None
        if kind != "folder":
            raise click.UsageError(f"--max-shard-size needs a folder output (-o DIR/), not {output}")
    written: list[str] = []
    if base is not None and not base.exists():
        raise fail(f"{base}: no such file (--base)")
    if base is not None and same_file(base, output):
        raise fail(f"{output}: refusing to overwrite the base")

    with progress_bar(total, "decode", quiet) as bar:
        def progress(tensor: str, n: int) -> None:
            written.append(tensor)
            bar.update(n)

        with jobs_default(jobs):
            notes = io_formats.decode_model(source, output, aliases=aliases, name=name, progress=progress,
                                            base=base,
                                            max_shard_size=shard_bytes if max_shard_size is not None else None)
    for message in notes:
        click.echo(f"jwt: warning: {message}", err=True)
    if not quiet:
        click.echo(f"{output}: {len(written)} tensors" + (_folder_summary(Path(output)) if kind == "folder" else ""))


def _folder_summary(folder: Path) -> str:
    """`` in 3 shards and 4 attachments`` for a decoded folder: what it holds besides the tensors, as counted
    there (nothing said of none)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    shards = [p for p in files if p.parent == folder and p.suffix == ".safetensors"]
    others = [p for p in files if p not in shards and p.name != "model.safetensors.index.json"]
    text = f" in {len(shards)} shards" if len(shards) > 1 else ""
    return text + (f" and {len(others)} attachment{'s' if len(others) != 1 else ''}" if others else "")
