"""Every inspecting verb on an SAE folder that is not a run of ours (lm_saes.runners.run_loading.InspectedSAE).

The slow tests take SAELens-saved folders (the real sae-lens, in its own venv: conftest's `saelens_python`) at
SmolLM2's width and run `lm-saes evaluate`, `analyze` and `dashboard` on them through the real command line, with
the embedded model: one model load per architecture for evaluate, one for analyze. The quick ones read our own
exports (the same format) and check what the folder's metadata implies, without a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lm_saes.analysis.dashboard import DASHBOARD_DIR, INDEX_FILE
from lm_saes.datasets import BUILTIN_CORPUS
from lm_saes.errors import UserInputError
from lm_saes.interop import SAELensMetadata
from lm_saes.interop.saelens import SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE
from lm_saes.runners.held_out import FROM_CORPUS_START, HeldOutRunSettings, _check_model_fits
from lm_saes.runners.run_loading import DEFAULT_MODEL, is_foreign_sae_folder, load_inspected_sae
from lm_saes.sae import SAEConfig, SparseAutoEncoder
from tests.conftest import run_cli, run_driver

EMBEDDED, HOOK, D_MODEL, D_SAE, K = "builtin:smollm2-135m", "blocks.6.hook_resid_post", 576, 1152, 4
META = {"model_name": EMBEDDED, "hook_name": HOOK, "context_size": 64, "dataset_path": BUILTIN_CORPUS,
        "prepend_bos": True}
FOLDERS = {  # name -> the driver's create job (tests/saelens_driver.py)
    "standard": {"arch": "standard", "identity": True, "metadata": META},  # reconstructs x exactly
    "topk": {"arch": "topk", "metadata": {"context_size": 64}},  # no model, hook or corpus: defaults and hook_point_in=
    "jumprelu": {"arch": "jumprelu", "metadata": META},
    "not_offline": {"arch": "standard", "metadata": {**META, "model_name": "nobody/not-offline"}},
}
OVERRIDES = {"standard": [], "topk": [f"hook_point_in={HOOK}"], "jumprelu": []}


@pytest.fixture(scope="module")
def saelens_folders(saelens_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saelens_folders")
    jobs = [{"op": "create", "dir": str(folder / name), "seed": i, "d_in": D_MODEL, "d_sae": D_SAE, **job}
            for i, (name, job) in enumerate(FOLDERS.items())]
    answers = run_driver(saelens_python, jobs, folder)
    assert [a.get("class") for a in answers] == ["StandardSAE", "TopKSAE", "JumpReLUSAE", "StandardSAE"], answers
    return folder


def saelens_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE)}


@pytest.mark.slow
@pytest.mark.parametrize("name", OVERRIDES)
def test_evaluate_runs_on_a_saelens_folder(saelens_folders: Path, name: str) -> None:
    sae_dir = saelens_folders / name
    before = saelens_files(sae_dir)
    result = run_cli("evaluate", str(sae_dir), "evaluator.n_contexts=2", *OVERRIDES[name])
    assert result.returncode == 0, result.stderr
    assert FROM_CORPUS_START in " ".join(result.stdout.split())  # the table's title, wrapped to the terminal
    evaluation = json.loads((sae_dir / "eval.json").read_text())
    info = {k: evaluation[k] for k in ("hook_point_in", "dataset", "skip_tokens", "context_size", "held_out", "d_sae")}
    assert info == {"hook_point_in": HOOK, "dataset": BUILTIN_CORPUS, "skip_tokens": 0, "context_size": 64,
                    "held_out": FROM_CORPUS_START, "d_sae": D_SAE}
    assert evaluation["n_tokens"] == 2 * 63  # two contexts of 64 tokens, one of them BOS
    assert all(math.isfinite(evaluation[k]) for k in ("explained_variance", "mse", "ce_loss_sae", "kl_div_sae"))
    if name == "standard":  # relu(x - b) - relu(b - x) + b = x: one latent of each pair fires
        assert evaluation["explained_variance"] == pytest.approx(1, abs=1e-6)
        assert evaluation["ce_loss_score"] == pytest.approx(1, abs=1e-4)
        assert evaluation["l0"] == D_MODEL
    elif name == "topk":
        assert evaluation["l0"] == K
    else:
        assert 0 < evaluation["l0"] < D_SAE
    assert saelens_files(sae_dir) == before  # the SAE itself is untouched


@pytest.mark.slow
def test_analyze_then_dashboard_run_on_a_saelens_folder(saelens_folders: Path) -> None:
    sae_dir = saelens_folders / "jumprelu"
    result = run_cli("analyze", str(sae_dir), "analysis.n_tokens=256", "analysis.model_batch_size=4")
    assert result.returncode == 0, result.stderr
    info = json.loads((sae_dir / "analysis" / "analysis.json").read_text())
    assert (info["act_fn"], info["d_sae"], info["hook_point_in"], info["held_out"]) == (
        "jumprelu", D_SAE, HOOK, FROM_CORPUS_START)
    assert info["n_tokens"] >= 256 and len(info["dead_latents"]) < D_SAE
    result = run_cli("dashboard", str(sae_dir))
    assert result.returncode == 0, result.stderr
    page = (sae_dir / DASHBOARD_DIR / INDEX_FILE).read_text()
    assert "<html" in page[:500].lower()
    assert SparseAutoEncoder.from_pretrained(sae_dir).cfg.act_fn == "jumprelu"  # still a SAELens folder


@pytest.mark.slow
def test_a_model_or_hook_that_is_not_there_is_one_line(saelens_folders: Path) -> None:
    result = run_cli("evaluate", str(saelens_folders / "not_offline"), "evaluator.n_contexts=1")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model.model_name='nobody/not-offline': the model" in result.stderr
    assert "hf download nobody/not-offline" in result.stderr and "model.model_name=FOLDER" in result.stderr
    result = run_cli("analyze", str(saelens_folders / "topk"))  # no hook recorded: the pre-check, no model
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "metadata.hook_name=None: no hook recorded; pass hook_point_in=" in result.stderr


# --- without sae-lens or a model: what a folder's metadata implies --------------------------------------

def export(folder: Path, metadata: SAELensMetadata | None = None, d_model: int = 16) -> Path:
    cfg = SAEConfig(hook_point_in="blocks.0.hook_resid_post", d_model=d_model, expansion_factor=2)
    SparseAutoEncoder(cfg).save_pretrained(folder, format="saelens", metadata=metadata)
    return folder


def settings(folder: Path, **overrides: object) -> HeldOutRunSettings:
    return HeldOutRunSettings.model_validate({"run_dir": str(folder), **overrides})


def test_a_saelens_folder_is_read_from_its_metadata(tmp_path: Path) -> None:
    folder = export(tmp_path / "sae", SAELensMetadata(model_name="gpt2-small", context_size=128,
                                                      dataset_path="corpus.jsonl"))
    assert is_foreign_sae_folder(folder)
    source = load_inspected_sae(settings(folder))
    assert source.train is None and source.model.model_name == "gpt2"  # TransformerLens's alias, as its hub id
    assert "TransformerLens's name for it" in (source.model_origin or "")
    assert (source.context_size, source.dataset.dataset_name_or_path) == (128, "corpus.jsonl")  # type: ignore[union-attr]
    assert source.sae.hook_point_in == "blocks.0.hook_resid_post" and source.sae.d_model == 16
    overridden = load_inspected_sae(settings(folder, model={"model_name": "/models/gpt2", "dtype": "bfloat16"}))
    assert (overridden.model.model_name, overridden.model.dtype, overridden.model_origin) == (
        "/models/gpt2", torch.bfloat16, None)


def test_a_folder_that_records_nothing_gets_the_default_model_only_if_it_fits(tmp_path: Path) -> None:
    folder = export(tmp_path / "sae")
    source = load_inspected_sae(settings(folder))
    assert (source.model.model_name, source.dataset, source.context_size) == (DEFAULT_MODEL, None, None)
    with pytest.raises(UserInputError, match=r"evaluator.context_size=None: .*records no context size"):
        source.resolve_context_size(None, "evaluator.context_size")
    assert source.resolve_context_size(32, "evaluator.context_size") == 32
    sae = SparseAutoEncoder.from_pretrained(folder)
    embedded = SimpleNamespace(d_model=576, check_hook_points=lambda names, key: None)  # SmolLM2's width
    with pytest.raises(UserInputError, match=r"model.model_name='builtin:smollm2-135m': the default, as the SAE "
                                             r"records no model: its d_model is 576, the SAE's is 16; give the SAE's"):
        _check_model_fits(embedded, sae, source)  # type: ignore[arg-type]


def test_a_bare_sae_folder_of_ours_is_foreign_but_a_run_directory_is_not(tmp_path: Path) -> None:
    cfg = SAEConfig(hook_point_in="blocks.0.hook_mlp_out", d_model=16, expansion_factor=2)
    SparseAutoEncoder(cfg).save_pretrained(tmp_path / "bare")
    source = load_inspected_sae(settings(tmp_path / "bare"))
    assert (source.sae.hook_point_in, source.model.model_name, source.train) == ("blocks.0.hook_mlp_out",
                                                                                 DEFAULT_MODEL, None)
    SparseAutoEncoder(cfg).save_pretrained(tmp_path / "unfinished")
    (tmp_path / "unfinished" / "config.yaml").write_text("{}")  # a run that never wrote status.json
    assert not is_foreign_sae_folder(tmp_path / "unfinished")
    with pytest.raises(UserInputError, match="no readable status.json: not a training run directory"):
        load_inspected_sae(settings(tmp_path / "unfinished"))
