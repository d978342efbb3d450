"""User-facing errors of the `trainsup` command (the exit codes: train_core.contract, docs/contract.md)."""

from __future__ import annotations

import click

from train_core.contract import EXIT_LOCKED, EXIT_USAGE


class UserError(click.ClickException):
    """Bad input from the user: printed as one line `Error: ...`, exit 2."""

    exit_code = EXIT_USAGE


class LockedError(click.ClickException):
    exit_code = EXIT_LOCKED
