"""The one error type for bad user input.

Library code raises `InputError("<file>: <problem>")`; the CLIs turn it into a one-line message and exit code 2.
"""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input: a file that is missing, unreadable or malformed. The message names the file."""

    def __init__(self, path: str | Path | None, problem: str | None = None):
        if problem is None:
            # Rebuilt by torch's DataLoader from a worker's error: `InputError(text)`, the text being the worker's
            # traceback, which ends in this error's own one-line message. Keep that line only.
            path, problem = None, _own_message(str(path))
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")

    def __reduce__(self):
        # Worker processes send their errors back pickled. Exception's default rebuilds InputError(message) and
        # fails in the parent's result thread, which left `crops --workers N` hanging on the first bad clip.
        return type(self), (self.path, self.problem)


def _own_message(text: str) -> str:
    """The message of the last `...InputError: message` line of a formatted traceback; the text's last line else."""
    lines = [line for line in text.splitlines() if line.strip()] or [text]
    for line in reversed(lines):
        head, separator, message = line.partition("InputError: ")
        if separator and (not head or head.endswith(".")):  # "avsprep.errors.InputError: ..."
            return message
    return lines[-1]
