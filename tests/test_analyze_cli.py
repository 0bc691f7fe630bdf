"""`lm-saes analyze` and `lm-saes dashboard` through the real command line, and their one-line mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lm_saes.cli import main
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


@pytest.mark.parametrize(
    ("verb", "args", "expected"),
    [
        ("analyze", [], "run_dir: missing; usage: lm-saes analyze RUN_DIR"),
        ("analyze", ["/no/such/run"], "run_dir='/no/such/run': no such directory"),
        ("analyze", ["/no/such/run", "analysis.n_token=5"], "analysis.n_token=5: unknown key; allowed in analysis: n_tokens,"),
        ("analyze", ["/no/such/run", "analysis.n_tokens=0"], "analysis.n_tokens=0: Input should be greater than 0"),
        ("analyze", ["NOT_A_RUN"], "no readable status.json: not a training run directory"),
        ("dashboard", [], "run_dir: missing; usage: lm-saes dashboard RUN_DIR"),
        ("dashboard", ["NOT_A_RUN"], "no analysis/analysis.json and features.safetensors; run `lm-saes analyze RUN_DIR` first"),
        ("dashboard", ["FUTURE"], "has format_version 7; this lm_saes reads version 1"),
        ("dashboard", ["NOT_A_RUN", "dashboard.n_top_examples=-1"],
         "dashboard.n_top_examples=-1: Input should be greater than or equal to 0"),
    ],
)
def test_analyze_and_dashboard_mistakes_are_one_line(verb, args, expected, tmp_path, capsys) -> None:
    (tmp_path / "not-a-run").mkdir()
    future = tmp_path / "future" / "analysis"
    future.mkdir(parents=True)
    (future / "analysis.json").write_text('{"format_version": 7}')
    (future / "features.safetensors").write_bytes(b"")
    paths = {"NOT_A_RUN": str(tmp_path / "not-a-run"), "FUTURE": str(tmp_path / "future")}
    assert main([verb, *[paths.get(a, a) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lm-saes {verb}: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "not-a-run").iterdir()) == []
    assert not Path("/no/such/run").exists()
