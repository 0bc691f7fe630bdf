"""Other tools' formats: SAEs in and out (SAELens), SAEs in (sparsify), and SAE folders on the Hugging Face hub
(`hf://`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lm_saes.interop.hub import download_hub_folder, is_hub_reference, resolve_sae_path
from lm_saes.interop.saelens import (
    SAELensMetadata,
    is_saelens_folder,
    read_saelens,
    read_saelens_metadata,
    save_saelens,
)
from lm_saes.interop.sparsify import is_sparsify_folder, read_sparsify

if TYPE_CHECKING:
    import torch

    from lm_saes.sae.config import SAEConfig


def foreign_format(path: str | os.PathLike[str]) -> str | None:
    """"saelens" or "sparsify" for a folder in that tool's layout (both name their config cfg.json; the weights'
    file tells them apart), else None."""
    if is_saelens_folder(path):
        return "saelens"
    return "sparsify" if is_sparsify_folder(path) else None


def read_foreign_sae(
    path: str | os.PathLike[str], hook_point_in: str | None = None, hook_point_out: str | None = None,
) -> tuple["SAEConfig", dict[str, "torch.Tensor"], SAELensMetadata]:
    """A SAELens or sparsify folder as our SAEConfig, our state dict and what it records of its training
    (sparsify records nothing: an empty SAELensMetadata)."""
    if foreign_format(path) == "sparsify":
        return (*read_sparsify(path, hook_point_in, hook_point_out), SAELensMetadata())
    cfg, state = read_saelens(path, hook_point_in, hook_point_out)
    return cfg, state, read_saelens_metadata(path)


__all__ = [
    "SAELensMetadata",
    "download_hub_folder",
    "foreign_format",
    "is_hub_reference",
    "is_saelens_folder",
    "is_sparsify_folder",
    "read_foreign_sae",
    "read_saelens",
    "read_saelens_metadata",
    "read_sparsify",
    "resolve_sae_path",
    "save_saelens",
]
