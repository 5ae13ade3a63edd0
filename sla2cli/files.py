"""Writing outputs without ever losing a user's files.

Files and folders are built under a hidden temporary name next to their destination and renamed into
place, so readers (and an interrupted run) see either the old output or the new one, never half of one.

An existing folder is replaced only when sla2 wrote everything in it: `--overwrite` means "replace my
previous output", never "delete whatever is there". `replacement_refusal` holds that rule for every
command that writes a folder (convert, calibrate, finetune, `sla2cli.save`).
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sla2cli.checkpoint.format import CHECKPOINT_FILES, CONFIG_FILE, TRAINING_ENTRIES
from sla2cli.errors import UserError

# What diffusers' save_pretrained writes into a component subfolder of a checkpoint with base weights.
COMPONENT_FILE_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json")
SHOWN_ENTRIES = 3


def _protected(folder: Path) -> str | None:
    """Why `folder` (resolved) may never be replaced, whatever it holds: it holds the user's shell or files."""
    cwd = Path.cwd().resolve()
    if folder == cwd:
        return "the current folder"
    if folder in cwd.parents:
        return "a parent of the current folder"
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no user entry (some containers): there is no home folder to protect
        return None
    return "the home folder" if folder == home else None


def _component_names(config_path: Path) -> set[str]:
    """Component subfolders a checkpoint's config lists (base weights live there); none if unreadable."""
    try:
        components = json.loads(config_path.read_text(encoding="utf-8")).get("components")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return set()
    return set(components) if isinstance(components, dict) else set()


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _foreign_in_component(folder: Path) -> list[str]:
    """Entries of a component subfolder that diffusers' save_pretrained does not write."""
    return [
        f"{folder.name}/{path.relative_to(folder)}"
        for path in sorted(folder.rglob("*"))
        if not (_is_plain_file(path) and any(fnmatch.fnmatch(path.name, p) for p in COMPONENT_FILE_PATTERNS))
    ]


def foreign_entries(folder: Path) -> list[str]:
    """Entries of the checkpoint `folder` that sla2 did not write (relative names, sorted).

    sla2 writes the checkpoint files, the component subfolders its config lists, and fine-tuning's
    training state and metrics (TRAINING_ENTRIES), taken as wholly its own.
    """
    components = _component_names(folder / CONFIG_FILE)
    foreign: list[str] = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name in TRAINING_ENTRIES or (name in CHECKPOINT_FILES and _is_plain_file(entry)):
            continue
        if name in components and entry.is_dir() and not entry.is_symlink():
            foreign += _foreign_in_component(entry)
        else:
            foreign.append(name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return foreign


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_ENTRIES])
    return shown if len(names) <= SHOWN_ENTRIES else f"{shown} and {len(names) - SHOWN_ENTRIES} more"


def replacement_refusal(folder: Path) -> str | None:
    """Why the existing folder `folder` (symlinks resolved) must not be replaced, and what to do; None
    when it may be.

    It may be replaced when it is empty, or an sla2 checkpoint (it has sla2_config.json) holding nothing
    but what sla2 wrote there. The current folder, its parents and the home folder never are.
    """
    protected = _protected(folder)
    if protected is not None:
        return f"it is {protected}; give a new folder name for --out"
    if not any(folder.iterdir()):
        return None
    if not (folder / CONFIG_FILE).is_file():
        return (f"it is not empty and not an sla2 checkpoint (no {CONFIG_FILE}), and --overwrite replaces "
                "only sla2's own output; choose another --out")
    foreign = foreign_entries(folder)
    if foreign:
        return (f"besides the sla2 checkpoint it holds {_listing(foreign)}, which sla2 did not write; "
                "move that out or choose another --out")
    return None


def check_output_folder(out: Path, *, overwrite: bool) -> Path:
    """The folder to write, symlinks resolved; a UserError when it may not be (re)placed there.

    Call before any expensive work. An existing folder needs `overwrite` and must pass
    `replacement_refusal`.
    """
    given = Path(out).expanduser()
    if given.is_symlink() and not given.exists():
        raise UserError(f"{out} is a symbolic link to {os.readlink(given)}, which does not exist; "
                        "remove the link or choose another --out")
    folder = given.resolve()
    if not folder.exists():
        return folder
    if not folder.is_dir():
        raise UserError(f"{out} exists and is a file; choose another --out")
    refusal = replacement_refusal(folder)
    if refusal is not None:
        raise UserError(f"{out} cannot be replaced: {refusal}")
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    return folder


@contextmanager
def atomic_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it becomes `out` (replacing it if allowed).

    The rule is checked again just before the swap: files may have been put there during a long run.
    """
    out = check_output_folder(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    temporary.mkdir()
    try:
        yield temporary
        check_output_folder(out, overwrite=overwrite)
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


def check_output_file(option: str, path: Path | None, suffixes: tuple[str, ...]) -> None:
    """A file named on the command line (--csv out.csv): the user chose it, so an existing file is
    replaced, but it must carry the right suffix and not be a folder. Call before any expensive work."""
    if path is None:
        return
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` (same suffix) that replaces `path` once the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _strict_json(value: Any) -> Any:
    """`value` with every NaN and infinity replaced by None: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def write_json_file(path: Path, document: Any, *, sort_keys: bool = False) -> None:
    """Write `document` atomically as indented, strict JSON (non-finite numbers become null)."""
    text = json.dumps(_strict_json(document), indent=2, sort_keys=sort_keys)
    with atomic_path(path) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")


def write_csv_file(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write `rows` atomically as CSV under `columns` (a cell a row lacks is empty): a run killed mid-write
    leaves the previous file whole."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
