"""User-facing errors: the CLI prints these as one line and exits with status 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a path, a flag value, a config field); the message names the bad value."""


def require(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds (never use assert for user input)."""
    if not condition:
        raise UserError(message)


def require_at_least(cfg, minimum: float, *names: str) -> None:
    """Each named field of ``cfg`` must be >= ``minimum``: one-line errors naming the flag."""
    for name in names:
        value = getattr(cfg, name)
        require(value >= minimum, f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
