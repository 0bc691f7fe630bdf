"""`hf://OWNER/REPO[@REVISION]/PATH`: an SAE folder inside a Hugging Face hub repository.

Downloaded (only PATH's files) into the hub cache with huggingface_hub, which honours HF_HUB_CACHE and
HF_HUB_OFFLINE: offline, a folder already in the cache is used as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from lm_saes.errors import UserInputError

HUB_PREFIX = "hf://"


def is_hub_reference(path: str | os.PathLike[str]) -> bool:
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub_reference(reference: str) -> tuple[str, str | None, str]:
    """`hf://OWNER/REPO[@REV]/PATH` -> (repo_id, revision or None, PATH without slashes at its ends)."""
    parts = reference.removeprefix(HUB_PREFIX).strip("/").split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise UserInputError("path", reference, "a hub reference is hf://OWNER/REPO[@REVISION][/PATH]")
    repo, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}", revision or None, (parts[2] if len(parts) == 3 else "").strip("/")


def download_hub_folder(reference: str) -> Path:
    """The local folder holding PATH's files of the referenced repository (downloading what is missing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, revision, subfolder = parse_hub_reference(reference)
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except LocalEntryNotFoundError:
        raise UserInputError("path", reference, "not in the local hub cache and the hub cannot be reached "
                             "(offline, or HF_HUB_OFFLINE=1); download it once with a network") from None
    except (RepositoryNotFoundError, HFValidationError) as error:
        raise UserInputError("path", reference, f"no such hub repository ({type(error).__name__})") from None
    folder = Path(root) / subfolder
    if not folder.is_dir():
        raise UserInputError("path", reference, f"the repository has no folder {subfolder!r}")
    return folder


def resolve_sae_path(path: str | os.PathLike[str]) -> Path:
    """A local folder for `path`: itself, or the downloaded folder of an `hf://` reference."""
    return download_hub_folder(path) if is_hub_reference(path) else Path(path)
