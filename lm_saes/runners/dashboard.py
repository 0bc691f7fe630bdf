"""The dashboard runner: RUN_DIR/analysis/ -> one self-contained RUN_DIR/dashboard.html."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from lm_saes.analysis.dashboard import DASHBOARD_FILE, render_dashboard
from lm_saes.analysis.files import load_analysis
from lm_saes.config_base import BaseConfig
from lm_saes.errors import UserInputError
from lm_saes.run_dir import write_text_atomic


class DashboardSettings(BaseConfig):
    run_dir: str
    """A run directory that `lm-saes analyze` has written analysis/ into."""
    output: str | None = None
    """Where to write the page; None means RUN_DIR/dashboard.html."""
    n_top_examples: int = Field(10, ge=0)
    """Top-activating examples shown per latent (at most what the analysis kept)."""
    n_quantile_examples: int = Field(5, ge=0)
    """Sampled (weaker) examples shown per latent (at most what the analysis kept)."""


def dashboard_run(settings: DashboardSettings) -> Path:
    run_dir = Path(settings.run_dir)
    if not run_dir.is_dir():
        raise UserInputError("run_dir", str(run_dir), "no such directory; give a run directory that was analysed")
    info, tensors = load_analysis(run_dir)
    html = render_dashboard(info, tensors, settings.n_top_examples, settings.n_quantile_examples)
    path = Path(settings.output) if settings.output else run_dir / DASHBOARD_FILE
    write_text_atomic(path, html)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB, {info['d_sae'] - len(info['dead_latents']):,} live latents); "
          f"open it in a browser: file://{path.resolve()}")
    return path
