"""`lm-saes` through the real command line: help, a full training run, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_saes.cli import main
from tests.conftest import run_cli, tiny_overrides


def test_help_lists_verbs_without_importing_torch() -> None:
    code = "import sys; from lm_saes.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "+sae=relu_8x" in out
    assert out.strip().endswith("False")


def test_unknown_verb(capsys) -> None:
    assert main(["trian"]) == 2
    assert "unknown verb 'trian'; available: train" in capsys.readouterr().err


@pytest.mark.slow
def test_train_end_to_end_through_the_cli(tiny_model_dir, corpus_file, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "+sae=relu_8x", *tiny_overrides(tiny_model_dir, corpus_file, run_dir), "trainer.lr=3e-3"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "sae_weights.safetensors", "config.yaml", "metrics.json", "status.json"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_training_tokens"] == 2560
    config = json.loads((run_dir / "config.json").read_text())
    assert config["d_model"] == 32 and config["expansion_factor"] == 4  # d_model resolved from the model
    resolved = (run_dir / "config.yaml").read_text()
    assert "lr: 0.003" in resolved and "${" not in resolved  # resolved, with the override applied
    # A second run into the same directory refuses to clobber it.
    again = run_cli(*args)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_train_on_the_embedded_default(tmp_path) -> None:
    """The issue's acceptance command, on the real SmolLM2 and the built-in corpus, offline."""
    run_dir = tmp_path / "run"
    result = run_cli("train", "+sae=relu_8x", "trainer.total_training_tokens=50000", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "sae_weights.safetensors", "config.yaml", "metrics.json", "status.json"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_training_tokens"] == 48 * 1024  # 50,000 // 1024 steps of 1024 tokens
    assert metrics["explained_variance"] > 0.3  # a real, if short, reconstruction


@pytest.mark.slow
def test_the_walkthrough_script_runs_with_embedded_names(tmp_path) -> None:
    script = Path(__file__).parents[1] / "scripts" / "walkthrough.py"
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, str(script), "--tokens", "10240", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    from lm_saes import SparseAutoEncoder

    sae = SparseAutoEncoder.from_pretrained(out)
    assert sae.cfg.d_sae == 576 * 8
    assert json.loads((out / "metrics.json").read_text())["n_training_tokens"] == 10240


# --- lm-saes evaluate ----------------------------------------------------------------------------------------

EVAL_KEYS = {
    "mse", "explained_variance", "cosine_similarity", "l2_ratio", "relative_reconstruction_bias",
    "l0", "l1", "dead_fraction", "dense_fraction", "firing_frequency_histogram",
    "ce_loss_clean", "ce_loss_sae", "ce_loss_ablated", "ce_loss_score", "kl_div_sae", "kl_div_ablated", "kl_div_score",
}


@pytest.mark.slow
def test_evaluate_end_to_end_through_the_cli(tiny_run) -> None:
    before = {p.name for p in tiny_run.rglob("*")}
    result = run_cli("evaluate", str(tiny_run), "evaluator.n_contexts=8", "evaluator.ablation=mean")
    assert result.returncode == 0, result.stderr
    assert "ce_loss_score" in result.stdout and "explained_variance" in result.stdout  # the table
    report = json.loads((tiny_run / "eval.json").read_text())
    assert EVAL_KEYS <= set(report), EVAL_KEYS - set(report)
    assert report["ablation"] == "mean" and report["n_contexts"] == 8
    # Held out: past the 2,560 trained + 512 initializer + 1,024 buffer + 4 x 32 in-flight tokens.
    assert report["skip_tokens"] == 2560 + 512 + 1024 + 8 * 32
    assert 0 <= report["kl_div_sae"] and report["ce_loss_clean"] > 0
    assert {p.name for p in tiny_run.rglob("*")} == before | {"eval.json"}  # nothing else touched

