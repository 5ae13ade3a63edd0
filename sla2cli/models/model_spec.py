"""The MODEL argument: a Hub id `org/name[@revision]`, a local folder, or the embedded model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sla2cli.errors import UserError

EMBEDDED = "embedded"
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from. kind: "hub" (repo_id, revision), "local" (path) or "embedded"."""

    kind: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    def describe(self) -> str:
        """How to show this source to a user."""
        if self.kind == "hub":
            return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)
        if self.kind == "local":
            return str(self.path)
        return "the embedded model"


def parse_model_spec(text: str | None) -> ModelSpec:
    """Read MODEL. An existing folder wins over a Hub id of the same spelling, as in diffusers."""
    if text is None or text == EMBEDDED:
        return ModelSpec(kind="embedded")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{text} is a file; MODEL must be a model folder or a Hub id org/name[@revision]")
        return ModelSpec(kind="local", path=path.resolve())
    match = HUB_ID.fullmatch(text)
    if match and not text.startswith((".", "/", "~")):
        return ModelSpec(kind="hub", repo_id=match.group("repo"), revision=match.group("revision"))
    raise UserError(f"{text} is neither an existing folder nor a Hub id of the form org/name[@revision]")
