"""User-facing errors: one line that says what to do; the CLI turns them into exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (bad path, bad option, bad file), not a bug."""
