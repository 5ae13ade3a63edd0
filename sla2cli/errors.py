"""User-facing errors: one line that says what to do; the CLI turns them into exit code 2."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for (bad path, bad option, bad file), not a bug.

    A ValueError, so that library callers can catch it as a bad value; the parameter checks of
    `sla2cli.ops.validation` raise it too. The CLI turns it into one line and exit code 2."""
