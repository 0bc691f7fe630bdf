"""Multirun sweeps keep going past a failed job, and `lm-saes report` gathers every job, failed ones included."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
import yaml

from lm_saes.cli import main
from lm_saes.report import find_jobs, frontier_series, varying_keys
from tests.conftest import run_cli, tiny_overrides


def _fake_job(root: Path, num: int, overrides: list[str], status: str, metrics: dict | None, act_fn: str) -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "status.json").write_text(json.dumps({"status": status, **({"error": "ValueError: boom\ntrace"} if status != "ok" else {})}))
    (job / "config.yaml").write_text(f"sae:\n  act_fn: {act_fn}\n")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_jobs_are_gathered_in_job_order_with_their_axes(tmp_path) -> None:
    for num, (ef, act, status) in enumerate([(8, "relu", "ok"), (16, "relu", "ok"), (8, "topk", "failed"), (16, "topk", "ok")]):
        metrics = {"explained_variance": 0.5 + num / 10, "l0": 10.0 * (num + 1)} if status == "ok" else None
        _fake_job(tmp_path, num, ["+sae=relu_8x", f"sae.expansion_factor={ef}", f"sae.act_fn={act}"], status, metrics, act)
    _fake_job(tmp_path, 10, ["+sae=relu_8x", "sae.expansion_factor=32", "sae.act_fn=relu"], "ok",
              {"explained_variance": 0.9, "l0": 5.0}, "relu")
    rows = find_jobs(tmp_path)
    assert [r.job for r in rows] == ["0", "1", "2", "3", "10"]  # numeric order, not 0, 1, 10, 2
    assert varying_keys(rows) == ["sae.expansion_factor", "sae.act_fn"]
    assert rows[2].status == "failed" and rows[2].error == "ValueError: boom" and rows[2].metrics == {}
    assert rows[3].act_fn == "topk" and rows[3].metrics["l0"] == 40.0


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_writes_csv_and_frontier_and_lists_failures(tmp_path, capsys) -> None:
    _fake_job(tmp_path, 0, ["sae.act_fn=relu"], "ok", {"explained_variance": 0.8, "l0": 30.0}, "relu")
    _fake_job(tmp_path, 1, ["sae.act_fn=topk"], "ok", {"explained_variance": 0.85, "l0": 32.0, "ce_loss_score": 0.9}, "topk")
    _fake_job(tmp_path, 2, ["sae.act_fn=jumprelu"], "failed", None, "jumprelu")
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "ValueError: boom" in out and "2 ok, 1 not ok" in out
    with (tmp_path / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok", "ok", "failed"]
    assert table[1]["ce_loss_score"] == "0.9" and table[2]["error"] == "ValueError: boom"
    width, height = _png_size(tmp_path / "frontier.png")
    assert width > height > 100  # two panels side by side: EV and CE score


def test_the_frontier_has_a_series_for_every_preset_variant(tmp_path) -> None:
    presets = sorted((Path(__file__).resolve().parents[1] / "conf" / "sae").glob("*.yaml"))
    act_fns = sorted({yaml.safe_load(p.read_text())["sae"]["act_fn"] for p in presets})
    assert {"gated", "matryoshka_batchtopk"} <= set(act_fns)
    for num, act_fn in enumerate(act_fns):
        _fake_job(tmp_path, num, [f"sae.act_fn={act_fn}"], "ok", {"explained_variance": 0.8, "l0": 10.0 + num}, act_fn)
    series = frontier_series(find_jobs(tmp_path), "explained_variance")
    assert {a: [(x, j) for x, _, j in s] for a, s in series.items()} == {
        a: [(10.0 + n, str(n))] for n, a in enumerate(act_fns)}
    assert main(["report", str(tmp_path)]) == 0 and (tmp_path / "frontier.png").exists()


def test_report_of_a_folder_without_runs_is_a_user_error(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no run directories" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_sweep_survives_a_failing_job_and_reports_it(tiny_model_dir, corpus_file, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_model_dir, corpus_file, tmp_path / "unused") if not o.startswith("hydra.run")]
    # top_k=100 exceeds d_sae=32*2=64 for the 2x topk job only: that job fails, the three others run.
    result = run_cli("train", "-m", "+sae=relu_8x", *overrides, "sae.expansion_factor=2,4", "sae.act_fn=relu,topk",
                     "+sae.top_k=100", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    assert "sae.top_k=100" in result.stderr
    rows = find_jobs(sweep)
    failed = [r for r in rows if r.status != "ok"]
    assert len(rows) == 4 and len(failed) == 1
    assert failed[0].overrides["sae.act_fn"] == "topk" and failed[0].overrides["sae.expansion_factor"] == "2"
    assert "sae.top_k=100: must be at most d_sae (64)" in failed[0].error
    assert all("explained_variance" in r.metrics for r in rows if r.status == "ok")
    report = run_cli("report", str(sweep))
    assert report.returncode == 0, report.stderr
    assert (sweep / "report.csv").exists() and (sweep / "frontier.png").exists()
    assert "3 ok, 1 not ok" in report.stdout
