"""Shared pieces of the CLI: parameter types, error handling, progress."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from codec.errors import JwtError


class SizeType(click.ParamType):
    """An ``HxW`` size such as ``28x28`` (validated at the parameter boundary)."""

    name = "HxW"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        try:
            h, w = (int(v) for v in str(value).lower().split("x"))
        except ValueError:
            self.fail(f"{value!r} is not a size like 28x28", param, ctx)
        if not (1 <= h <= 4096 and 1 <= w <= 4096):
            self.fail(f"{value!r}: both sides must be in 1..4096", param, ctx)
        return h, w


SIZE = SizeType()


#: ``-j/--jobs N`` for the commands that code or decode tensors.
jobs_option = click.option(
    "-j", "--jobs", type=click.IntRange(min=0), default=None, metavar="N",
    help="Worker threads coding blobs in parallel (default: one per core; 1: none). "
         "The output does not depend on it.")


def is_url(text: str) -> bool:
    """True for an http:// or https:// argument."""
    from codec.sources.http import is_url as _is_url

    return _is_url(text)


def check_input(path: str, *, folder_ok: bool = False, what: str = "a .jwt file") -> None:
    """Fail (exit 1) naming ``path`` when it is neither a URL nor an existing file (or folder, if ``folder_ok``)."""
    if is_url(path):
        return
    p = Path(path)
    if p.is_dir() and not folder_ok:
        raise fail(f"{path}: is a folder, not {what}")
    if not p.exists():
        raise fail(f"{path}: no such file" + (" or folder" if folder_ok else ""))


def update_base(inputs: list[str], base: Path | None) -> Any:
    """The base an update among the .jwt ``inputs`` is decoded against (``--base``), decoded once, or None.

    A usage error (exit 2) when an input is an update and no ``--base`` was given; a note on stderr when
    ``--base`` was given and no input is an update; a missing base file fails (exit 1). A wrong base is
    refused later, when the update is opened with it (one line naming the first tensor that differs).
    """
    from codec import io_formats
    from codec.encode import as_base
    from codec.reader import Reader

    updates = []
    for path in inputs:
        if is_url(path) or (Path(path).is_file() and io_formats.detect_format(path) == "jwt"):
            with Reader(path) as reader:
                if reader.is_update:
                    updates.append((path, reader.index.base.sha256))
    if updates and base is None:
        path, digest = updates[0]
        raise click.UsageError(f"{path} is an update: give the model it was made against with --base MODEL "
                               f"(the one whose digest is sha256:{digest})")
    if base is None:
        return None
    if not base.exists():
        raise fail(f"{base}: no such file (--base)")
    if not updates:
        which = f"{inputs[0]} is" if len(inputs) == 1 else f"neither {' nor '.join(inputs)} is"
        click.echo(f"jwt: note: --base {base} is not used: {which} an update", err=True)
        return None
    return as_base(base)


def check_encode_options(options: dict[str, Any], rules: list[tuple[str, str]], searching: bool) -> None:
    """A usage error (exit 2) for options that contradict each other by themselves, before any work.

    ``options`` are the EncodeOptions fields as the command line gives them (defaults included: only the
    values that differ from the defaults count as given); ``rules`` the ``--set`` pairs.
    """
    from codec.tensorcodec import EncodeOptions, Overrides, given_options, option_conflicts

    problem = option_conflicts(given_options(options), searching=searching)
    if problem is None:
        try:
            Overrides(rules).check(EncodeOptions(**options))
        except JwtError as exc:
            problem = str(exc)
    if problem:
        raise click.UsageError(problem.replace("bits_per_weight / max_error", "--bits-per-weight / --max-error")
                               .replace("per-tensor settings", "--set"))


def fail(message: str) -> click.ClickException:
    """A one-line error that exits with status 1."""
    return click.ClickException(message.splitlines()[0] if message else "failed")


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library and OS errors into one-line messages with exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except BrokenPipeError:
            closed_stdout()
        except JwtError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise fail(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt:
            click.echo("jwt: interrupted; no output was written", err=True)
            sys.exit(130)
        except MemoryError:  # under ulimit -v or a cgroup: name the input, and what needs less
            where = f"{kwargs['input']}: " if kwargs.get("input") is not None else ""
            threads = kwargs.get("jobs")
            hint = (" (each coding thread holds its own tensors and buffers: -j 1 needs least)"
                    if "jobs" in kwargs and threads != 1 else "")
            raise fail(f"{where}out of memory{hint}") from None

    return wrapper


#: Exit status after stdout was closed by the reader (``jwt info x.jwt | head -3``): 128 + SIGPIPE, what
#: a Unix tool killed by SIGPIPE reports; nothing is printed.
EXIT_CLOSED_PIPE = 141


def closed_stdout() -> None:
    """Exit quietly because the reader of stdout went away (as ``cat`` or ``ls`` do under ``| head``).

    stdout is pointed at /dev/null first, so the interpreter's final flush does not fail again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. a captured stdout)
        pass
    sys.exit(EXIT_CLOSED_PIPE)


def same_file(a: str | Path, b: str | Path) -> bool:
    """True if two paths name the same file (or would)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


#: Seconds before a progress bar appears (quick runs show none).
BAR_DELAY = 2.0
#: Bar width when the terminal reports none (0 columns, or no size at all).
DEFAULT_COLUMNS = 80


def terminal_columns() -> int | None:
    """The width of the terminal on stderr, or None when it reports no usable width."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return None
    return columns or None


def progress_bar(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr counting work units (weights coded or measured), silent when quiet or not a
    terminal; :data:`DEFAULT_COLUMNS` wide where the terminal reports no width. The ETA averages the rate
    over the whole run (tqdm ``smoothing=0``): units are weighted by work, so the mean rate is the
    steadiest estimate; the bar shows after :data:`BAR_DELAY` seconds, when that mean means something
    (the first setting measured, with the imports warming up, made the first ETA five times too long).
    A bar that would not show is a :class:`NoBar`, so ``-q`` and pipes do not import tqdm."""
    if quiet or not sys.stderr.isatty():
        return NoBar()
    from tqdm import tqdm

    ncols = None if terminal_columns() else DEFAULT_COLUMNS
    return tqdm(total=total, desc=desc, unit="w", unit_scale=True, leave=False, file=sys.stderr, ncols=ncols,
                smoothing=0, delay=BAR_DELAY)


class NoBar:
    """The progress bar that shows nothing (:func:`progress_bar` when quiet or not on a terminal), without tqdm's
    import (tens of milliseconds of every run's start-up)."""

    disable = True

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units (ignored)."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
