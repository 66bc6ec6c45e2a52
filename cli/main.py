"""The ``jwt`` command group."""

from __future__ import annotations

import click

from codec import __version__

from .decode import decode
from .diff import diff
from .encode import encode
from .info import info
from .show import show


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jwt")
def cli() -> None:
    """jwt: ship neural-network weights as JPEG / JPEG XL tiles.

    Exit status: 0 ok, 1 failure (bad or corrupt input, I/O error), 2 usage error.
    """


cli.add_command(encode)
cli.add_command(decode)
cli.add_command(info)
cli.add_command(show)
cli.add_command(diff)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="jwt")
