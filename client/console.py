"""What every ccd command shares: exit codes, usage errors, messages on stderr."""
from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class UsageError(Exception):
    """A problem with the command line or its input files (exit code 2)."""


def say(message: str) -> None:
    """Prints a message for the user on stderr."""
    print(message, file=sys.stderr, flush=True)
