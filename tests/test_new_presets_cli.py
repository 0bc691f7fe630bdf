"""The Matryoshka BatchTopK and gated presets go through the CLI like every other: train, reload exactly,
evaluate, analyze, export to SAELens."""

from __future__ import annotations

import json

import pytest
import torch

from lm_saes import SparseAutoEncoder
from tests.conftest import run_cli, tiny_overrides


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["matryoshka_batchtopk_8x", "gated_8x"])
def test_preset_trains_reloads_evaluates_and_analyzes(preset: str, tiny_model_dir, corpus_file, tmp_path) -> None:
    run_dir = tmp_path / preset
    result = run_cli("train", f"+sae={preset}", *tiny_overrides(tiny_model_dir, corpus_file, run_dir))
    assert result.returncode == 0, result.stderr
    sae = SparseAutoEncoder.from_pretrained(run_dir)
    assert sae.cfg.act_fn == preset.removesuffix("_8x")
    x = torch.randn(16, sae.cfg.d_model)
    again = SparseAutoEncoder.from_pretrained(run_dir)
    assert torch.equal(sae(x), again(x))
    result = run_cli("evaluate", str(run_dir), "evaluator.n_contexts=4")
    assert result.returncode == 0, result.stderr
    assert "explained_variance" in json.loads((run_dir / "eval.json").read_text())
    result = run_cli("analyze", str(run_dir), "analysis.n_tokens=1000", "analysis.n_top_examples=3")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "analysis" / "analysis.json").exists()
    result = run_cli("export", str(run_dir), str(tmp_path / "saelens"))
    assert result.returncode == 0, result.stderr
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == {"gated_8x": "gated", "matryoshka_batchtopk_8x": "jumprelu"}[preset]
