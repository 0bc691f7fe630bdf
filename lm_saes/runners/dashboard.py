"""The dashboard runner: RUN_DIR/analysis/ -> RUN_DIR/dashboard/ (a folder that opens from disk), or one
self-contained RUN_DIR/dashboard.html with `dashboard.single_file=true`."""

from __future__ import annotations

import time
from pathlib import Path

from lm_saes.analysis.dashboard import DASHBOARD_DIR, DASHBOARD_FILE, DashboardConfig, write_dashboard
from lm_saes.analysis.files import load_analysis
from lm_saes.config_base import BaseConfig
from lm_saes.errors import UserInputError


class DashboardSettings(BaseConfig):
    run_dir: str
    """A run directory that `lm-saes analyze` has written analysis/ into."""
    output: str | None = None
    """Where to write; None means RUN_DIR/dashboard/ (or RUN_DIR/dashboard.html with dashboard.single_file)."""
    dashboard: DashboardConfig = DashboardConfig()


def dashboard_run(settings: DashboardSettings) -> Path:
    """Write the dashboard of the analysis in `settings.run_dir`; the path of the page to open."""
    run_dir = Path(settings.run_dir)
    if not run_dir.is_dir():
        raise UserInputError("run_dir", str(run_dir), "no such directory; give a run directory that was analysed")
    started = time.perf_counter()
    info, tensors = load_analysis(run_dir)
    cfg = settings.dashboard
    output = Path(settings.output) if settings.output else run_dir / (DASHBOARD_FILE if cfg.single_file else DASHBOARD_DIR)
    page = write_dashboard(info, tensors, output, cfg)
    size = sum(p.stat().st_size for p in output.rglob("*")) if output.is_dir() else output.stat().st_size
    first = page.stat().st_size + (0 if cfg.single_file else (output / "index.js").stat().st_size)
    print(f"wrote {output} ({size / 2**20:.1f} MiB in all, the first page {first / 2**20:.1f} MiB; "
          f"{info['d_sae'] - len(info['dead_latents']):,} live latents) in {time.perf_counter() - started:.0f} s; "
          f"open it in a browser: {page.resolve().as_uri()}")
    return page
