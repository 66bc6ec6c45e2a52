"""``jwt verify``: decode everything, check every CRC, write nothing."""

from __future__ import annotations

import sys

import click

from .common import check_input, fail, handle_errors, jobs_option, progress_bar


@click.command()
@click.argument("input", type=str)
@jobs_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; only the verdict (and the exit status).")
@handle_errors
def verify(input: str, jobs: int | None, quiet: bool) -> None:
    """Check a .jwt file: decode every tensor and attachment, check every CRC-32 and the file size; write nothing.

    Prints one line: OK with the counts (exit 0), or FAILED with the first
    problem, naming the tensor and blob (exit 1). INPUT is a file, an
    http(s):// URL or - (standard input).

    \b
    Examples:
      jwt verify model.jwt
      curl -s https://example.org/m.jwt | jwt verify -
    """
    from codec.check import verify as verify_file
    from codec.errors import JwtError
    from codec.reader import Reader

    if input != "-":
        check_input(input)
    source = sys.stdin.buffer if input == "-" else input
    try:
        total = 0
        if input != "-":
            with Reader(input) as reader:
                total = sum(e.numel for e in reader.index.entries)
        with progress_bar(total, "verify", quiet or input == "-") as bar:
            result = verify_file(source, jobs=jobs, progress=lambda name, n: bar.update(n))
    except (JwtError, OSError) as exc:
        name = "<stdin>" if input == "-" else input
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(f"FAILED: {text if text.startswith(name) else f'{name}: {text}'}") from None
    click.echo(str(result))
