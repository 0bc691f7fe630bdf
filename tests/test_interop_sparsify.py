"""sparsify's format read here, checked against the real eai-sparsify running in the peer venv (the one that
holds sae-lens: scripts/saelens_venv.sh), driven by tests/sparsify_driver.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lm_saes.errors import UserInputError
from lm_saes.interop import foreign_format, read_sparsify
from lm_saes.interop.sparsify import hooks_of_hookpoint
from lm_saes.sae import SparseAutoEncoder
from tests.conftest import REPO, run_cli, run_driver

DRIVER = REPO / "tests" / "sparsify_driver.py"
D_IN, D_SAE, K = 16, 64, 4
FOLDERS = {  # folder (its name is sparsify's hookpoint) -> the driver's create job
    "sae/layers.1": {"transcode": False},
    "transcoder/layers.1.mlp": {"transcode": True},
    "unnamed/embed_tokens": {"transcode": False},
    "groupmax/layers.1": {"activation": "groupmax"},
    "skip/layers.1": {"skip_connection": True, "transcode": True},
}


@pytest.fixture(scope="module")
def sparsify_folders(saelens_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sparsify")
    gen = torch.Generator().manual_seed(1)
    save_file({"x_BD": torch.randn(32, D_IN, generator=gen) * 1.5}, str(folder / "inputs.safetensors"))
    jobs = [{"op": "create", "dir": str(folder / name), "seed": i, "d_in": D_IN, "num_latents": D_SAE, "k": K, **job}
            for i, (name, job) in enumerate(FOLDERS.items())]
    jobs += [{"op": "run", "dir": str(folder / name), "inputs": str(folder / "inputs.safetensors"),
              "outputs": str(folder / f"{name.split('/')[0]}.out.safetensors")} for name in FOLDERS if "/layers" in name
             and not name.startswith(("groupmax", "skip"))]
    answers = run_driver(saelens_python, jobs, folder, DRIVER)
    assert [a["op"] for a in answers] == ["create"] * len(FOLDERS) + ["run"] * 2, answers
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sae/layers.1", "transcoder/layers.1.mlp"])
def test_a_sparsify_saved_coder_loads_here_with_its_outputs(sparsify_folders: Path, name: str) -> None:
    folder = sparsify_folders / name
    assert foreign_format(folder) == "sparsify"
    sae = SparseAutoEncoder.from_pretrained(folder)
    theirs = load_file(str(sparsify_folders / f"{name.split('/')[0]}.out.safetensors"))
    x_BD = load_file(str(sparsify_folders / "inputs.safetensors"))["x_BD"]
    with torch.no_grad(), sae.inference():
        latents_BS = sae.encode(x_BD)
        torch.testing.assert_close(latents_BS, theirs["latents_BS"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(latents_BS), theirs["recon_BD"], rtol=1e-5, atol=1e-5)
    assert (latents_BS > 0).sum(-1).max() <= K and sae.cfg.act_fn == "topk" and sae.cfg.d_sae == D_SAE


@pytest.mark.slow
def test_hooks_come_from_the_folder_name_or_the_caller(sparsify_folders: Path) -> None:
    sae_cfg, _ = read_sparsify(sparsify_folders / "sae/layers.1")
    tc_cfg, _ = read_sparsify(sparsify_folders / "transcoder/layers.1.mlp")
    assert (sae_cfg.hook_point_in, sae_cfg.is_transcoder) == ("blocks.1.hook_resid_post", False)
    assert (tc_cfg.hook_point_in, tc_cfg.hook_point_out) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    with pytest.raises(UserInputError, match=r"hookpoint.*embed_tokens.*pass hook_point_in="):
        read_sparsify(sparsify_folders / "unnamed/embed_tokens")
    named, _ = read_sparsify(sparsify_folders / "unnamed/embed_tokens", hook_point_in="hook_embed")
    assert named.hook_point_in == "hook_embed"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "key"), [("groupmax/layers.1", "activation"), ("skip/layers.1", "skip_connection")])
def test_what_we_cannot_represent_is_one_clear_error(sparsify_folders: Path, name: str, key: str) -> None:
    with pytest.raises(UserInputError, match=key):
        SparseAutoEncoder.from_pretrained(sparsify_folders / name)


@pytest.mark.parametrize(("hookpoint", "transcoder", "hooks"), [
    ("layers.6", False, ("blocks.6.hook_resid_post", None)),
    ("model.layers.6", False, ("blocks.6.hook_resid_post", None)),
    ("h.3", False, ("blocks.3.hook_resid_post", None)),
    ("gpt_neox.layers.2.mlp", False, ("blocks.2.hook_mlp_out", None)),
    ("layers.6", True, ("blocks.6.hook_resid_pre", "blocks.6.hook_resid_post")),
    ("layers.6.self_attn", False, None),
])
def test_hookpoints_map_to_transformer_lens_hooks(hookpoint: str, transcoder: bool, hooks: tuple | None) -> None:
    assert hooks_of_hookpoint(hookpoint, transcoder) == hooks


@pytest.mark.slow
def test_evaluate_runs_on_a_sparsify_folder(saelens_python: Path, tmp_path: Path) -> None:
    """At SmolLM2's width, in a folder named as sparsify names layer 6's residual stream: the embedded model
    (the folder records none), the hook from the name, k latents per token."""
    sae_dir = tmp_path / "layers.6"
    run_driver(saelens_python, [{"op": "create", "dir": str(sae_dir), "seed": 0, "d_in": 576, "num_latents": 1152,
                                 "k": 8}], tmp_path, DRIVER)
    result = run_cli("evaluate", str(sae_dir), "evaluator.n_contexts=2", "evaluator.context_size=32")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((sae_dir / "eval.json").read_text())
    assert (evaluation["hook_point_in"], evaluation["d_sae"], evaluation["l0"]) == ("blocks.6.hook_resid_post", 1152, 8)
