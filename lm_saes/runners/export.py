"""The export runner: a finished run directory -> its SAE in another tool's format (SAELens).

`export_run(settings)` is what `lm-saes export RUN_DIR OUT_DIR` is to call. The metadata SAELens keeps (model,
hooks, context size, dataset, prepend_bos) comes from the run's own settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lm_saes.config_base import BaseConfig
from lm_saes.interop.saelens import SAELensMetadata
from lm_saes.sae import SparseAutoEncoder


class ExportSettings(BaseConfig):
    run_dir: str
    """A finished training run directory (status.json says ok)."""
    out_dir: str
    """Where the export is written (created if needed); an export there is replaced, an lm_saes SAE refused."""
    format: Literal["saelens"] = "saelens"
    """The target format: SAELens 6.x's cfg.json + sae_weights.safetensors."""


def export_run(settings: ExportSettings) -> Path:
    """Write the run's SAE in `settings.format`; returns the weights' path. Refuses an SAE the format cannot
    express (a UserInputError), before writing anything."""
    from lm_saes.runners.run_loading import load_run_settings

    run_dir = Path(settings.run_dir)
    train = load_run_settings(run_dir)
    sae = SparseAutoEncoder.from_pretrained(run_dir)
    return sae.save_pretrained(settings.out_dir, format=settings.format, metadata=SAELensMetadata.from_settings(train))
