"""Hugging Face Hub access: fetch only the files a command needs, through huggingface_hub's own cache.

huggingface_hub reads HF_HOME, HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE itself and shows its own
progress bars; this module adds the `--offline` switch, narrows downloads to safetensors and configs
(never pickled weights), and turns the Hub's exceptions into one-line UserErrors.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from sla2cli.errors import UserError
from sla2cli.sources.folders import CONFIG

MODEL_INDEX = "model_index.json"


class HubRepoUnavailable(UserError):
    """The Hub repository was not found, not reachable, or not cached offline: the id may be no Hub id at
    all (a mistyped folder), so callers may add what else was tried."""



def hub_offline(offline: bool) -> bool:
    """True when the user asked for no network, by flag or by HF_HUB_OFFLINE."""
    return bool(offline or constants.HF_HUB_OFFLINE)


def config_patterns() -> list[str]:
    """The small json files that say what a repository holds."""
    return [MODEL_INDEX, CONFIG, f"*/{CONFIG}"]


def weight_patterns(components: tuple[str, ...]) -> list[str]:
    """A component's config and safetensors weights (single or sharded), nothing pickled."""
    patterns: list[str] = []
    for component in components:
        prefix = f"{component}/" if component else ""
        patterns += [f"{prefix}{CONFIG}", f"{prefix}*.safetensors", f"{prefix}*.safetensors.index.json"]
    return patterns


def fetch_snapshot(repo_id: str, revision: str | None, patterns: list[str], *, offline: bool) -> Path:
    """Download (or find in the cache) the files of `repo_id` matching `patterns`; return the snapshot folder.

    The folder's name is the commit hash, which is what a checkpoint records as the base revision.
    """
    local_only = hub_offline(offline)
    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            local_files_only=local_only,
        )
    except GatedRepoError:
        raise UserError(f"{shown} is gated: accept its licence on the Hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubRepoUnavailable(
            f"Hub repository {shown} was not found; check the id (private repositories need HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"revision {revision!r} does not exist in {repo_id}") from None
    except IncompleteSnapshotError:
        raise UserError(
            f"the cached copy of {shown} is incomplete; run once without --offline to finish the download"
        ) from None
    except LocalEntryNotFoundError:
        if local_only:
            raise HubRepoUnavailable(
                f"{shown} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub is off "
                "(--offline or HF_HUB_OFFLINE=1); download it once online or point HF_HUB_CACHE at its cache"
            ) from None
        raise HubRepoUnavailable(
            f"could not reach the Hub for {shown} and it is not cached; check the network"
        ) from None
    except HFValidationError:
        raise HubRepoUnavailable(f"{repo_id} is not a valid Hub repository id") from None
    except HfHubHTTPError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"the Hub request for {shown} failed: {first_line}") from None
    return Path(folder)


def commit_of(snapshot: Path) -> str:
    """The commit hash a snapshot folder stands for (huggingface_hub names the folder after it)."""
    return snapshot.name
