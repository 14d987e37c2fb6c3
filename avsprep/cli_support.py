"""What the command lines share: one error path, one progress bar, and the logging switch.

`avsprep` and `avstrain` are each a `CommandGroup`, a one-command tool (`tools/convert_avsbench_checkpoint.py`) a
`Command`: any `InputError` (or an error type the program names, such as `avstrain`'s `ConfigError`) raised by any
command ends in one line on stderr, `<program>: error: <message>`, and exit code 2. Commands never catch these
themselves.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

import click

from avsprep.errors import InputError


class OneErrorPath:
    """Mixin for click commands: bad input (InputError, `error_types`) is one line on stderr and exit code 2."""

    def __init__(self, *args, program: str, error_types: tuple[type[Exception], ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.program = program
        self.error_types = (InputError, *error_types)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except self.error_types as error:
            click.echo(f"{self.program}: error: {error}", err=True)
            ctx.exit(2)


class CommandGroup(OneErrorPath, click.Group):
    """A click group whose commands share one error path: bad input is one line and exit code 2."""


class Command(OneErrorPath, click.Command):
    """A single click command with the same error path."""


def command_group(program: str, *error_types: type[Exception]) -> Callable[[Callable], CommandGroup]:
    """Decorator: the program's top-level group, with `-v/--verbose` for INFO logging."""

    def decorate(function: Callable) -> CommandGroup:
        function = click.option("-v", "--verbose", is_flag=True, help="Log progress details.")(function)
        return click.group(cls=CommandGroup, program=program, error_types=error_types)(function)

    return decorate


def command(program: str, *error_types: type[Exception]) -> Callable[[Callable], Command]:
    """Decorator: a program of one command, with `-v/--verbose` for INFO logging (passed as `verbose`)."""

    def decorate(function: Callable) -> Command:
        function = click.option("-v", "--verbose", is_flag=True, help="Log progress details.")(function)
        return click.command(cls=Command, program=program, error_types=error_types)(function)

    return decorate


def configure_logging(verbose: bool) -> None:
    """INFO with `--verbose`, WARNING otherwise; one format for both programs."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@contextlib.contextmanager
def progress(label: str, total: int | None = None, show: bool = True) -> Iterator[Callable[..., None]]:
    """A progress callback `advance(n, total=None)` for library functions, drawn as a click bar on stderr.

    `n` is how many items were newly done (an increment); `total` may be given up front or with any call (the bar
    is created on the first call that knows it). The bar is always closed, also on error. `show=False` draws nothing
    (e.g. on ranks other than 0 under torchrun).
    """
    bar = None

    def advance(n: int = 1, total: int | None = total) -> None:
        nonlocal bar
        if not show:
            return
        if bar is None:
            bar = click.progressbar(length=total or 0, label=label, file=sys.stderr)
            bar.__enter__()
        if total is not None:
            bar.length = total
        bar.update(n)

    try:
        yield advance
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
