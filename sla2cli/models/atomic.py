"""Write a whole output folder atomically: build it under a hidden temporary name, then rename it.

Readers (and an interrupted run) never see half a checkpoint: either the old folder or the new one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sla2cli.errors import UserError


def check_output_folder(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing output unless overwriting; call before any expensive work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file; choose another --out")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")


@contextmanager
def atomic_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out` (replacing it if allowed)."""
    out = Path(out).absolute()
    check_output_folder(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if out.exists():
        retired = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(out, retired)
        os.replace(temporary, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, out)
