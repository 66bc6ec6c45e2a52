"""``jwt decode``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import fail, handle_errors, progress_bar, same_file


@click.command()
@click.argument("input", type=str)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output .pt file (default: INPUT with the suffix .pt; required when INPUT is -).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@handle_errors
def decode(input: str, output: Path | None, quiet: bool) -> None:
    """Decode a .jwt container into a PyTorch state_dict (.pt).

    The result loads with torch.load(path, weights_only=True) and has every
    name, shape and dtype of the original. INPUT may be - to read from
    standard input (tensors are decoded as their bytes arrive).
    """
    import torch

    from codec import api
    from codec.writer import atomic_output

    if input == "-":
        if output is None:
            raise click.UsageError("-o is required when reading from standard input")
        source, name = sys.stdin.buffer, "<stdin>"
    else:
        if not Path(input).is_file():
            raise fail(f"{input}: no such file")
        output = output or Path(input).with_suffix(".pt")
        if same_file(input, output):
            raise fail(f"{output}: refusing to overwrite the input")
        source, name = Path(input), input
    with api.open(source) as f:
        f.reader.name = name
        total = sum(e.numel for e in f.reader.index.entries)
        with progress_bar(total, "decode", quiet) as bar:
            state_dict = {}
            for key, tensor in f.items():
                state_dict[key] = tensor
                bar.update(tensor.numel())
    with atomic_output(output) as out:
        torch.save(state_dict, out)
    if not quiet:
        click.echo(f"{output}: {len(state_dict)} tensors")
