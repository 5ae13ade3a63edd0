"""The MODEL argument: a Hub id `org/name[@revision]`, a local folder, or the embedded model."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sla2cli.errors import UserError

EMBEDDED = "embedded"
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from. kind: "hub" (repo_id, revision), "local" (path) or "embedded".

    `missing_folder`: for a Hub id typed by the user, the folder of the same spelling that does not
    exist (`mymodels/wan` may be either), so that a failed Hub lookup can say both.
    """

    kind: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None
    missing_folder: Path | None = None

    def describe(self) -> str:
        """How to show this source to a user."""
        if self.kind == "hub":
            return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)
        if self.kind == "local":
            return str(self.path)
        return "the embedded model"


def looks_local(text: str) -> bool:
    """Whether MODEL can only be a path: it starts like one (`.`, `/`, `~`), ends in a separator, uses the
    system's own separator where that is not `/`, or has more than one `/` before any `@revision` (a Hub id
    is exactly org/name)."""
    name = text.split("@", 1)[0]
    separators = {os.sep, os.altsep or os.sep} - {"/"}
    return (
        text.startswith((".", "/", "~"))
        or text.endswith(("/", os.sep))
        or any(separator in text for separator in separators)
        or name.count("/") > 1
    )


def parse_model_spec(text: str | None) -> ModelSpec:
    """Read MODEL. An existing folder wins over a Hub id of the same spelling, as in diffusers; a missing
    one that can only be a path is a "no such folder" error, never a Hub lookup."""
    if text is None or text == EMBEDDED:
        return ModelSpec(kind="embedded")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{text} is a file; MODEL must be a model folder or a Hub id org/name[@revision]")
        return ModelSpec(kind="local", path=path.resolve())
    if looks_local(text):
        raise UserError(f"no such folder {text}; MODEL is a diffusers or SLA2 checkpoint folder, or a Hub id "
                        "org/name[@revision]")
    match = HUB_ID.fullmatch(text)
    if match:
        return ModelSpec(kind="hub", repo_id=match.group("repo"), revision=match.group("revision"),
                         missing_folder=path)
    raise UserError(f"no such folder {text}, and {text} is not a Hub id of the form org/name[@revision]")
