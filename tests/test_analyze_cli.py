"""`lm-saes analyze` and `lm-saes dashboard` through the real command line, and their one-line mistakes."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_analyze_then_dashboard_through_the_cli(tiny_run) -> None:
    before = {p.name for p in tiny_run.rglob("*")}
    result = run_cli("analyze", str(tiny_run), "analysis.n_tokens=2000", "analysis.n_top_examples=5")
    assert result.returncode == 0, result.stderr
    assert "held-out tokens" in result.stdout and "dead (listed)" in result.stdout
    info = json.loads((tiny_run / "analysis" / "analysis.json").read_text())
    assert info["format_version"] == 1 and 2000 <= info["n_tokens"] < 2000 + 8 * 32
    assert info["skip_tokens"] == 2560 + 512 + 1024 + 8 * 32  # held out, as for lm-saes evaluate
    assert info["logit_effects_applicable"] is True and isinstance(info["dead_latents"], list)
    result = run_cli("dashboard", str(tiny_run))
    assert result.returncode == 0, result.stderr
    html = (tiny_run / "dashboard" / "index.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "https://" not in html
    dashboard = {p.name for p in (tiny_run / "dashboard").rglob("*")}
    assert {"index.html", "index.js", "blocks", "00000.js", "search", "0000.js"} <= dashboard
    new = {"analysis", "analysis.json", "features.safetensors", "dashboard"} | dashboard
    assert {p.name for p in tiny_run.rglob("*")} == before | new  # nothing else touched (no .hydra, no logs)

