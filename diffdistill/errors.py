"""User-facing errors: the CLI prints these as one line, no traceback.

Exit statuses: 2 for a usage error (``UserError``: bad input, found before anything is written),
3 for a run that started and then failed (``RunFailed``: divergence, an unreadable file met mid-run;
what was saved stays resumable), 128 + N for signal N.
"""

from __future__ import annotations

USAGE_ERROR, RUN_FAILED = 2, 3


class UserError(Exception):
    """Bad input from the user (a path, a flag value, a config field); the message names the bad value."""


class RunFailed(Exception):
    """A run failed after it started (one line naming the cause); its last good checkpoint stays resumable."""


class Terminated(BaseException):
    """SIGTERM arrived outside the training loop (which saves a checkpoint instead); ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def require(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds (never use assert for user input)."""
    if not condition:
        raise UserError(message)


def require_at_least(cfg, minimum: float, *names: str) -> None:
    """Each named field of ``cfg`` must be >= ``minimum``: one-line errors naming the flag."""
    for name in names:
        value = getattr(cfg, name)
        require(value >= minimum, f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
