"""Where a converted model's base weights come from, as recorded in a checkpoint's sla2_config.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES = ("hub", "local", "embedded", "memory")


@dataclass(frozen=True)
class BaseModelRef:
    """source: "hub" (repo_id + revision commit), "local" (folder), "embedded" (ships with sla2) or
    "memory" (a model built in Python with no known origin: saving it must include its weights)."""

    source: str
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None

    def describe(self) -> str:
        """One line for summaries and model cards."""
        if self.source == "hub":
            return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)
        if self.source == "local":
            return str(self.path)
        if self.source == "embedded":
            return "embedded model (ships with sla2)"
        return "a model built in memory"

    @property
    def referencable(self) -> bool:
        """Whether the weights can be found again from this record alone."""
        return self.source in ("hub", "local", "embedded")

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "repo_id": self.repo_id, "revision": self.revision, "path": self.path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseModelRef:
        if not isinstance(data, dict) or data.get("source") not in SOURCES:
            raise ValueError(f"base_model.source must be one of {SOURCES}")
        return cls(
            source=data["source"], repo_id=data.get("repo_id"), revision=data.get("revision"), path=data.get("path")
        )


def base_ref_from_name_or_path(name_or_path: str | None) -> BaseModelRef:
    """Best guess for a model loaded by the user: diffusers records `_name_or_path` (a folder or Hub id).

    A folder inside a Hugging Face cache snapshot maps back to its Hub id and commit.
    """
    if not name_or_path:
        return BaseModelRef(source="memory")
    path = Path(name_or_path)
    if path.is_dir():
        resolved = path.resolve()
        parts = resolved.parts
        if "snapshots" in parts:
            index = parts.index("snapshots")
            repo_folder = parts[index - 1] if index > 0 else ""
            if repo_folder.startswith("models--") and index + 1 < len(parts):
                repo_id = repo_folder[len("models--"):].replace("--", "/", 1)
                return BaseModelRef(source="hub", repo_id=repo_id, revision=parts[index + 1])
        return BaseModelRef(source="local", path=str(resolved))
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return BaseModelRef(source="hub", repo_id=name_or_path)
    return BaseModelRef(source="memory")
