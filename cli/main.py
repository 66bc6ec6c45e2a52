"""The ``jwt`` command group.

Subcommands are imported when they run (or when ``--help`` lists them), and
``--version`` reads :data:`codec.__version__` alone, so ``jwt --version``,
``jwt --help`` and ``jwt info`` start without importing torch.
"""

from __future__ import annotations

import importlib

import click

from codec import __version__

#: command name -> (module of this package, function name), in the order ``--help`` lists them.
COMMANDS = {
    "encode": ("encode", "encode"),
    "decode": ("decode", "decode"),
    "verify": ("verify", "verify"),
    "info": ("info", "info"),
    "show": ("show", "show"),
    "diff": ("diff", "diff"),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS) + [c for c in super().list_commands(ctx) if c not in COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attr = COMMANDS[cmd_name]
        return getattr(importlib.import_module(f".{module}", __package__), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jwt")
def cli() -> None:
    """jwt: ship neural-network weights as JPEG / JPEG XL tiles.

    Exit status: 0 ok, 1 failure (bad or corrupt input, I/O error), 2 usage error.
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="jwt")
