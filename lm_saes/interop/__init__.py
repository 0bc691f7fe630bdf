"""Other tools' formats: SAEs in and out (SAELens), and SAE folders on the Hugging Face hub (`hf://`)."""

from lm_saes.interop.hub import download_hub_folder, is_hub_reference, resolve_sae_path
from lm_saes.interop.saelens import (
    SAELensMetadata,
    is_saelens_folder,
    read_saelens,
    read_saelens_metadata,
    save_saelens,
)

__all__ = [
    "SAELensMetadata",
    "download_hub_folder",
    "is_hub_reference",
    "is_saelens_folder",
    "read_saelens",
    "read_saelens_metadata",
    "resolve_sae_path",
    "save_saelens",
]
