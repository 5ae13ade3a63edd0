"""User-facing errors: one line that says what to do; the CLI turns them into exit code 2."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for (bad path, bad option, bad file), not a bug.

    A ValueError, like the parameter checks of `sla2cli.ops.validation`: library callers catch either
    as a bad value, and the CLI turns both into one line and exit code 2."""
