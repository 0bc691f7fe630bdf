"""`lm-saes compare RUN_A RUN_B`: decoder-cosine matching of two SAEs' latents, checked on closed-form cases (an SAE
with itself, with a permuted copy, with an unrelated random SAE). Its user mistakes are rows of
tests/test_user_mistakes.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lm_saes.runners.compare import CompareSettings, compare_runs, match_latents
from tests.conftest import run_cli


def test_an_sae_matches_itself_at_cosine_one() -> None:
    W_D = torch.randn(300, 24)
    cosine, index = match_latents(W_D, W_D)
    assert torch.equal(index, torch.arange(300)) and torch.allclose(cosine, torch.ones(300), atol=1e-5)


def test_a_permutation_is_recovered_exactly() -> None:
    W_D = torch.randn(300, 24)
    perm = torch.randperm(300)
    cosine, index = match_latents(W_D, W_D[perm] * 3.0)  # scale is not direction
    assert torch.equal(index, torch.argsort(perm)) and torch.allclose(cosine, torch.ones(300), atol=1e-5)


def test_unrelated_random_saes_rarely_match() -> None:
    # In 64 dimensions a random cosine has sd 1/8: above 0.5 is 4 sd, above 0.9 is out of reach.
    torch.manual_seed(0)
    cosine, _ = match_latents(torch.randn(512, 64), torch.randn(1024, 64))
    assert int((cosine > 0.9).sum()) == 0 and float((cosine > 0.5).float().mean()) < 0.1


def _copy_run(run: Path, dest: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
              config: dict | None = None) -> Path:
    """A copy of a finished run with its SAE's weights (and config.json fields) changed."""
    shutil.copytree(run, dest)
    weights = dest / "sae_weights.safetensors"
    save_file({k: v.contiguous() for k, v in change(load_file(str(weights))).items()}, str(weights))
    if config:
        cfg = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def _permuted(perm: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def change(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**w, "W_D": w["W_D"][perm], "W_E": w["W_E"][:, perm], "b_E": w["b_E"][perm]}
    return change


def _wider(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Twice the latents: the first half the SAE's own latents, the second half random directions."""
    torch.manual_seed(1)
    W_D = torch.cat([w["W_D"], torch.randn_like(w["W_D"])])
    return {**w, "W_D": W_D, "W_E": W_D.T.clone(), "b_E": torch.zeros(len(W_D))}


def test_compare_recovers_a_permuted_copy_of_a_run(tiny_run, tmp_path, capsys) -> None:
    d_sae = load_file(str(tiny_run / "sae_weights.safetensors"))["W_D"].shape[0]
    perm = torch.randperm(d_sae, generator=torch.Generator().manual_seed(0))
    permuted = _copy_run(tiny_run, tmp_path / "permuted", _permuted(perm))
    result = compare_runs(CompareSettings(run_a=str(tiny_run), run_b=str(permuted)))
    assert torch.equal(result.best_index_A, torch.argsort(perm))
    assert result.matched(0.9) == d_sae and result.d_sae_b == d_sae
    saved = json.loads((tiny_run / "compare" / "permuted.json").read_text())
    assert [p[1] for p in saved["pairs"]] == torch.argsort(perm).tolist()
    assert [p[0] for p in saved["pairs"]] == list(range(d_sae)) and min(p[2] for p in saved["pairs"]) > 0.9999
    assert saved["matched_above"]["0.9"] == {"count": d_sae, "fraction": 1.0}
    assert not list((tiny_run / "compare").glob(".*"))  # the atomic write left no temporary file
    assert "100.0%" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_through_the_command_line_across_widths(tiny_run, tmp_path) -> None:
    """A run against itself, and against one with twice the latents (half of them its own, half random)."""
    result = run_cli("compare", str(tiny_run), str(tiny_run))
    assert result.returncode == 0, result.stderr
    itself = json.loads((tiny_run / "compare" / f"{tiny_run.name}.json").read_text())
    d_sae = itself["d_sae_a"]
    assert [p[:2] for p in itself["pairs"]] == [[i, i] for i in range(d_sae)]
    assert all(t["count"] == d_sae for t in itself["matched_above"].values())
    assert result.stdout.count("100.0%") == 3

    wide = _copy_run(tiny_run, tmp_path / "wide", _wider, {"expansion_factor": 8})
    out, before = tmp_path / "pairs" / "wide.json", sorted(wide.rglob("*"))
    result = run_cli("compare", str(wide), str(tiny_run), f"output={out}")
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert saved["d_sae_a"] == 2 * d_sae and saved["d_sae_b"] == d_sae
    assert [p[1] for p in saved["pairs"][:d_sae]] == list(range(d_sae))  # its own half: found, in place
    assert saved["matched_above"]["0.9"]["count"] == d_sae  # the random half: no match above 0.9 in 32 dims
    assert saved["matched_above"]["0.9"]["fraction"] == 0.5
    assert sorted(wide.rglob("*")) == before  # output= was used, and Hydra wrote nothing into the run
