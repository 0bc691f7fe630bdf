"""`lm-saes inspect RUN_DIR TEXT`: the text tokenized as packing does, each token's strongest latents, and
nothing written into the run. Its user mistakes are rows of tests/test_user_mistakes.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm_saes.runners.lens import InspectSettings, inspect_text, text_windows
from tests.conftest import run_cli


def _files(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


def test_windows_start_with_bos_and_hold_every_token_once(tiny_model) -> None:
    tokenizer = tiny_model.tokenizer
    text = " ".join(["the cat sees a dog"] * 14)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = text_windows(text, tokenizer, context_size=32)
    assert len(ids) == 70 and [len(w) for w in windows] == [32, 32, 9]  # 31 + 31 + 8 text tokens
    assert all(int(w[0]) == tokenizer.bos_token_id for w in windows)
    assert torch.cat([w[1:] for w in windows]).tolist() == ids
    assert text_windows("", tokenizer, 32) == []


def _expected_latents(run_dir: Path, model, token_ids: list[int]) -> torch.Tensor:
    """(T, d_sae) the SAE's latents on BOS + `token_ids`, computed here from the model and the SAE directly."""
    from lm_saes.sae import SparseAutoEncoder

    sae = SparseAutoEncoder.from_pretrained(run_dir)
    tokens_1T = torch.tensor([[model.tokenizer.bos_token_id, *token_ids]])
    acts_TD = model.run_hooks(tokens_1T, [sae.cfg.hook_point_in]).activations[sae.cfg.hook_point_in][0]
    with torch.no_grad():
        return sae.encode(acts_TD)


@pytest.mark.slow
def test_inspect_gives_each_text_token_its_strongest_latents(tiny_run, tiny_model, capsys) -> None:
    before = _files(tiny_run)
    rows = inspect_text(InspectSettings(run_dir=str(tiny_run), text="The cat<eos> sees a dog.", n_latents=3))
    ids = tiny_model.tokenizer("The cat<eos> sees a dog.", add_special_tokens=False)["input_ids"]
    eos = tiny_model.tokenizer.eos_token_id
    assert eos in ids and [r.token_id for r in rows] == [i for i in ids if i != eos]  # EOS skipped, BOS too
    assert [r.position for r in rows] == list(range(len(rows)))
    assert [r.token for r in rows] == ["The", "cat", "sees", "a", "dog", "."]
    latents_TS = _expected_latents(tiny_run, tiny_model, ids)[1:]  # BOS first, as packing puts it
    latents_TS = latents_TS[torch.tensor(ids) != eos]
    for row, latents_S in zip(rows, latents_TS):
        top = latents_S.topk(3)
        assert row.latents == top.indices[top.values > 0].tolist()
        assert row.activations == pytest.approx(top.values[top.values > 0].tolist(), rel=1e-5)
        assert row.n_fired == int((latents_S > 0).sum()) >= len(row.latents)
    out = capsys.readouterr().out
    assert "'sees'" in out and f"{rows[2].latents[0]} ({rows[2].activations[0]:.2f})" in out
    assert _files(tiny_run) == before  # nothing written into the run


@pytest.mark.slow
def test_inspect_through_the_command_line(tiny_run) -> None:
    before = _files(tiny_run)
    text = " ".join(["the cat sees a dog, x = 1"] * 6)  # longer than one context; a comma and an `=`
    result = run_cli("inspect", str(tiny_run), text, "n_latents=2")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(lines) == 54  # every text token, across two windows (31 + 23)
    assert "'dog'" in result.stdout and "top latents (activation)" in result.stdout
    assert _files(tiny_run) == before  # Hydra wrote nothing either (no .hydra/, no log)
