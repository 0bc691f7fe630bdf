"""The scripts scripts/gpu_check.sh runs, on a CPU: they must not rot between the sessions that lend a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
                          check=False)


@pytest.mark.slow
def test_cli_smoke_trains_through_the_command_line_and_reports_ev() -> None:
    result = run_script("scripts/cli_smoke.py", "--device", "cpu", "--presets", "relu_8x", "--tokens", "3000")
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if "relu_8x" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[:2] == ["relu_8x", "0"] and 0.0 < float(cells[3]) <= 1.0 and float(cells[4]) > 0  # exit, EV, L0


@pytest.mark.slow
def test_bench_profile_lists_the_steps_ops_and_syncs_asks_for_cuda() -> None:
    result = run_script("scripts/bench_train.py", "--only", "profile", "--device", "cpu", "--d-model", "32",
                        "--widths", "8", "--batch", "128", "--steps", "1", "--act-fns", "topk", "--amp", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8x topk sparse float32" in result.stdout and "aten::addmm" in result.stdout
    result = run_script("scripts/bench_train.py", "--only", "syncs", "--device", "cpu")
    assert result.returncode == 2 and "needs --device cuda" in result.stderr
