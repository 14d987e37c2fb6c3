"""The one error type for bad user input.

Library code raises `InputError("<file>: <problem>")`; the CLIs turn it into a one-line message and exit code 2.
"""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input: a file that is missing, unreadable or malformed. The message names the file."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")

    def __reduce__(self):
        # Worker processes send their errors back pickled. Exception's default rebuilds InputError(message) and
        # fails in the parent's result thread, which left `crops --workers N` hanging on the first bad clip.
        return type(self), (self.path, self.problem)


def exits_cleanly(program: str, *error_types: type[Exception]):
    """Decorator for CLI commands: InputError (and `error_types`) end in one line on stderr and exit code 2."""
    import functools
    import sys

    import click

    caught = (InputError, *error_types)

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except caught as error:
                click.echo(f"{program}: error: {error}", err=True)
                sys.exit(2)

        return wrapper

    return decorate
