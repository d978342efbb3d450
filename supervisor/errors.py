"""User-facing errors of the `trainsup` command and their exit codes (design.md)."""

from __future__ import annotations

import click

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2  # usage, invalid job/config, unusable path: the message names the fix
EXIT_GAVE_UP = 3  # restart budget spent or no progress
EXIT_LOCKED = 4  # the run dir is locked by another supervisor
EXIT_SAVED = 75  # stopped on request with a checkpoint saved


class UserError(click.ClickException):
    """Bad input from the user: printed as one line `Error: ...`, exit 2."""

    exit_code = EXIT_USAGE


class LockedError(click.ClickException):
    exit_code = EXIT_LOCKED
