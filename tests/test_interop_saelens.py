"""The SAELens format both ways, checked against the real sae-lens (6.x) running in its own venv.

sae-lens needs transformer-lens<4, which clashes with ours, so scripts/saelens_venv.sh builds it once into a
cache folder and tests/saelens_driver.py runs it as a subprocess (conftest's `saelens_python` and `run_driver`).
Without that venv the slow tests skip (and fail in CI, where scripts/install.sh --test builds it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lm_saes.errors import UserInputError
from lm_saes.interop import SAELensMetadata, read_saelens_metadata
from lm_saes.interop.saelens import SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE
from lm_saes.sae import SAEConfig, SparseAutoEncoder
from tests.conftest import run_driver

D_MODEL, D_SAE = 16, 64  # as in the driver
HOOK, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
METADATA = SAELensMetadata(model_name="tiny-test-model", context_size=32, dataset_path="tiny/dataset",
                           prepend_bos=True, exclude_special_tokens=True)


def fixed_inputs(folder: Path) -> Path:
    """x (tokens, d_model) and sparse non-negative latents (tokens, d_sae), the same for both libraries."""
    gen = torch.Generator().manual_seed(1)
    x_BD = torch.randn(32, D_MODEL, generator=gen) * 1.5
    latents_BS = torch.rand(32, D_SAE, generator=gen) * (torch.rand(32, D_SAE, generator=gen) < 0.1)
    path = folder / "inputs.safetensors"
    save_file({"x_BD": x_BD, "latents_BS": latents_BS}, str(path))
    return path


def our_outputs(sae: SparseAutoEncoder, inputs: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(inputs))
    with torch.no_grad(), sae.inference():
        latents_BS = sae.encode(tensors["x_BD"])
        return {"latents_BS": latents_BS, "reconstruction_BD": sae.decode(latents_BS),
                "decoded_BD": sae.decode(tensors["latents_BS"]), "forward_BD": sae(tensors["x_BD"])}


def assert_same_outputs(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    for key in ("latents_BS", "reconstruction_BD", "decoded_BD", "forward_BD"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


# --- (a) SAEs that SAELens creates and saves load here with SAELens's own outputs ---------------------------

IMPORTED = {  # driver arch -> our act_fn
    "standard": "relu", "standard_no_b_dec_input": "relu", "topk": "topk", "topk_rescaled": "topk",
    "topk_trained": "topk", "jumprelu": "jumprelu", "jumprelu_zero_threshold": "relu",
    "batchtopk_trained": "jumprelu", "matryoshka_trained": "jumprelu", "transcoder": "relu",
    "jumprelu_transcoder": "jumprelu", "pre6_standard": "relu", "pre6_topk": "topk", "gated": "gated",
}
REFUSED = {"standard_layer_norm": "normalize_activations", "jumprelu_mixed_threshold": "threshold",
           "skip_transcoder": "architecture"}


def write_pre6_folder(folder: Path, topk: bool) -> None:
    """A cfg.json in the flat pre-6 layout (as sae_lens's handle_pre_6_0_config reads it), random weights."""
    gen = torch.Generator().manual_seed(7 + topk)
    folder.mkdir()
    shapes = {"W_enc": (D_MODEL, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_MODEL), "b_dec": (D_MODEL,)}
    weights = {k: torch.randn(shape, generator=gen) * 0.4 for k, shape in shapes.items()}
    save_file(weights, str(folder / SAELENS_WEIGHTS_FILE))
    cfg = {"d_in": D_MODEL, "d_sae": D_SAE, "dtype": "float32", "hook_point": "blocks.1.hook_resid_post",
           "hook_point_layer": 1, "hook_point_head_index": None, "model_name": "gpt2", "context_size": 128,
           "dataset_path": "some/dataset", "normalize_activations": False, "apply_b_dec_to_input": True,
           "activation_fn_str": "topk" if topk else "relu", "sae_lens_training_version": "3.14.0"}
    if topk:
        cfg["activation_fn_kwargs"] = {"k": 5}
    (folder / SAELENS_CFG_FILE).write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def saelens_saved(saelens_python: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    folder = tmp_path_factory.mktemp("saelens_saved")
    inputs = fixed_inputs(folder)
    write_pre6_folder(folder / "pre6_standard", topk=False)
    write_pre6_folder(folder / "pre6_topk", topk=True)
    jobs: list[dict[str, Any]] = [{"op": "create", "arch": arch, "dir": str(folder / arch), "seed": i}
                                  for i, arch in enumerate([*IMPORTED, *REFUSED]) if not arch.startswith("pre6")]
    jobs += [{"op": "run", "dir": str(folder / arch), "inputs": str(inputs), "outputs": str(folder / f"{arch}.out")}
             for arch in IMPORTED]
    answers = run_driver(saelens_python, jobs, folder)
    assert not [a for a in answers if "error" in a], answers
    return folder, inputs, answers


@pytest.mark.slow
@pytest.mark.parametrize("arch", IMPORTED)
def test_a_saelens_saved_sae_loads_here_with_saelens_outputs(saelens_saved, arch: str) -> None:
    folder, inputs, _ = saelens_saved
    sae = SparseAutoEncoder.from_pretrained(folder / arch)
    assert sae.cfg.act_fn == IMPORTED[arch]
    assert sae.cfg.is_transcoder == ("transcoder" in arch)
    assert sae.cfg.hook_point_target == (HOOK_OUT if "transcoder" in arch else sae.cfg.hook_point_in)
    assert_same_outputs(our_outputs(sae, inputs), load_file(str(folder / f"{arch}.out")))


@pytest.mark.slow
@pytest.mark.parametrize("arch", REFUSED)
def test_what_we_cannot_represent_is_one_clear_error(saelens_saved, arch: str) -> None:
    folder = saelens_saved[0]
    with pytest.raises(UserInputError, match=f"cfg.json: {REFUSED[arch]}="):
        SparseAutoEncoder.from_pretrained(folder / arch)


@pytest.mark.slow
def test_saelens_metadata_is_read(saelens_saved) -> None:
    folder = saelens_saved[0]
    meta = read_saelens_metadata(folder / "transcoder")
    assert (meta.model_name, meta.hook_name, meta.hook_name_out, meta.context_size, meta.dataset_path) == (
        "tiny-test-model", HOOK, HOOK_OUT, 32, "tiny/dataset")
    assert read_saelens_metadata(folder / "pre6_topk").model_name == "gpt2"  # flat pre-6 layout


# --- (b) SAEs that we export load in SAELens (SAE.load_from_disk) with our outputs ---------------------------

EXPORTED = {  # name -> (act_fn, transcoder?, the class SAELens loads it as)
    "relu": ("relu", False, "StandardSAE"),
    "topk": ("topk", False, "TopKSAE"),
    "batchtopk": ("batchtopk", False, "JumpReLUSAE"),
    "jumprelu": ("jumprelu", False, "JumpReLUSAE"),
    "matryoshka_batchtopk": ("matryoshka_batchtopk", False, "JumpReLUSAE"),
    "gated": ("gated", False, "GatedSAE"),
    "relu_transcoder": ("relu", True, "Transcoder"),
    "jumprelu_transcoder": ("jumprelu", True, "JumpReLUTranscoder"),
    "batchtopk_transcoder": ("batchtopk", True, "JumpReLUTranscoder"),
}


def our_sae(act_fn: str, transcoder: bool = False, seed: int = 0) -> SparseAutoEncoder:
    """Non-trivial weights, biases, thresholds and normalisation factors (as after training), in eval mode."""
    torch.manual_seed(seed)
    cfg = SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK_OUT if transcoder else None, d_model=D_MODEL,
                    expansion_factor=D_SAE // D_MODEL, act_fn=act_fn, top_k=4)
    sae = SparseAutoEncoder(cfg)
    with torch.no_grad():
        sae.W_E.normal_(0, 0.5)
        sae.b_E.normal_(0, 0.3)
        sae.W_D.mul_(torch.rand(D_SAE, 1) * 1.5 + 0.25)
        sae.b_D.normal_(0, 0.3)
        sae.norm_factor_in.fill_(1.7)
        sae.norm_factor_out.fill_(0.6)
        if act_fn == "jumprelu":
            sae.activation_function.log_threshold.copy_((torch.rand(D_SAE) * 0.9 + 0.1).log())
        if act_fn in ("batchtopk", "matryoshka_batchtopk"):
            sae.activation_function.threshold.fill_(0.5)
            sae.activation_function.threshold_initialized.fill_(True)
        if act_fn == "gated":
            for name in ("b_gate", "b_mag", "r_mag"):
                getattr(sae.activation_function, name).normal_(0, 0.3)
    return sae.eval()


@pytest.fixture(scope="module")
def our_exports(saelens_python: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, dict]]:
    folder = tmp_path_factory.mktemp("our_exports")
    inputs = fixed_inputs(folder)
    for i, (name, (act_fn, transcoder, _)) in enumerate(EXPORTED.items()):
        our_sae(act_fn, transcoder, seed=i).save_pretrained(folder / name, format="saelens", metadata=METADATA)
    jobs = [{"op": "run", "dir": str(folder / name), "inputs": str(inputs), "outputs": str(folder / f"{name}.out")}
            for name in EXPORTED]
    answers = run_driver(saelens_python, jobs, folder)
    assert not [a for a in answers if "error" in a], answers
    return folder, inputs, dict(zip(EXPORTED, answers))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTED)
def test_b_our_export_loads_in_saelens_with_our_outputs(our_exports, name: str) -> None:
    folder, inputs, answers = our_exports
    act_fn, transcoder, saelens_class = EXPORTED[name]
    assert answers[name]["class"] == saelens_class
    meta = answers[name]["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["context_size"], meta["dataset_path"], meta["prepend_bos"]) == (
        "tiny-test-model", HOOK, 32, "tiny/dataset", True)
    assert meta.get("hook_name_out") == (HOOK_OUT if transcoder else None)
    sae = our_sae(act_fn, transcoder, seed=list(EXPORTED).index(name))
    ours = our_outputs(sae, inputs)
    assert ours["latents_BS"].count_nonzero() > 0 and (ours["latents_BS"] == 0).any()  # sparse, not dead
    assert_same_outputs(ours, load_file(str(folder / f"{name}.out")))


# --- without sae-lens: our side of the format ------------------------------------------------------------

@pytest.mark.parametrize("name", EXPORTED)
def test_export_then_import_is_the_same_sae(tmp_path: Path, name: str) -> None:
    act_fn, transcoder, _ = EXPORTED[name]
    sae = our_sae(act_fn, transcoder)
    sae.save_pretrained(tmp_path, format="saelens")
    assert sorted(p.name for p in tmp_path.iterdir()) == [SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE]
    back = SparseAutoEncoder.from_pretrained(tmp_path)
    assert back.cfg.act_fn == ("jumprelu" if "batchtopk" in act_fn else act_fn)
    assert (back.cfg.hook_point_in, back.cfg.hook_point_target) == (sae.cfg.hook_point_in, sae.cfg.hook_point_target)
    inputs = fixed_inputs(tmp_path)
    assert_same_outputs(our_outputs(back, inputs), our_outputs(sae, inputs))


def test_the_cfg_json_is_laid_out_as_saelens_writes_it(tmp_path: Path) -> None:
    our_sae("topk").save_pretrained(tmp_path, format="saelens", metadata=METADATA)
    text = (tmp_path / SAELENS_CFG_FILE).read_text()
    cfg = json.loads(text)
    assert "\n" not in text  # json.dump, one line
    assert list(cfg) == ["d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                         "reshape_activations", "metadata", "k", "rescale_acts_by_decoder_norm", "architecture"]
    assert (cfg["architecture"], cfg["k"], cfg["apply_b_dec_to_input"]) == ("topk", 4, False)
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert set(load_file(str(tmp_path / SAELENS_WEIGHTS_FILE))) == {"W_enc", "b_enc", "W_dec", "b_dec"}


def test_a_topk_transcoder_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="sae.act_fn='topk': a topk transcoder has no SAELens 6 form"):
        our_sae("topk", transcoder=True).save_pretrained(tmp_path / "out", format="saelens")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserInputError, match="format='sparsify'"):
        our_sae("relu").save_pretrained(tmp_path / "out", format="sparsify")  # type: ignore[arg-type]


def edited_export(folder: Path, **changes: Any) -> Path:
    our_sae("relu").save_pretrained(folder, format="saelens")
    cfg = json.loads((folder / SAELENS_CFG_FILE).read_text())
    for key, value in changes.items():
        target = cfg["metadata"] if key.startswith("metadata_") else cfg
        target[key.removeprefix("metadata_")] = value
    (folder / SAELENS_CFG_FILE).write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"d_sae": 60}, "d_sae=60: must be a multiple of d_in"),
    ({"reshape_activations": "hook_z"}, "reshape_activations='hook_z': only 'none'"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in'"),
    ({"metadata_hook_head_index": 3}, "metadata.hook_head_index=3: one head.s SAEs"),
    ({"architecture": "temporal"}, "architecture='temporal': not importable"),
])
def test_unrepresentable_settings_are_refused(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        SparseAutoEncoder.from_pretrained(edited_export(tmp_path, **changes))


def test_a_missing_hook_is_an_error_unless_given(tmp_path: Path) -> None:
    folder = edited_export(tmp_path, metadata_hook_name=None)
    with pytest.raises(UserInputError, match="metadata.hook_name=None: no hook recorded; pass hook_point_in="):
        SparseAutoEncoder.from_pretrained(folder)
    loaded = SparseAutoEncoder.from_pretrained(folder, hook_point_in="blocks.0.hook_mlp_out")
    assert loaded.cfg.hook_point_in == "blocks.0.hook_mlp_out"


def test_an_unknown_tensor_is_refused_and_dtype_is_kept(tmp_path: Path) -> None:
    sae = our_sae("relu").to(torch.float64)
    sae.cfg = sae.cfg.model_copy(update={"dtype": torch.float64})
    sae.save_pretrained(tmp_path, format="saelens")
    assert json.loads((tmp_path / SAELENS_CFG_FILE).read_text())["dtype"] == "float64"
    assert SparseAutoEncoder.from_pretrained(tmp_path).W_E.dtype == torch.float64
    assert SparseAutoEncoder.from_pretrained(tmp_path, dtype=torch.float32).W_E.dtype == torch.float32
    weights = load_file(str(tmp_path / SAELENS_WEIGHTS_FILE))
    weights["W_skip"] = torch.zeros(D_MODEL, D_MODEL, dtype=torch.float64)
    save_file(weights, str(tmp_path / SAELENS_WEIGHTS_FILE))
    with pytest.raises(UserInputError, match="tensors=.*expected exactly"):
        SparseAutoEncoder.from_pretrained(tmp_path)


def test_metadata_comes_from_the_run_settings() -> None:
    from lm_saes.runners.train import TrainSAESettings

    settings = TrainSAESettings.model_validate({
        "sae": {"hook_point_in": HOOK, "hook_point_out": HOOK_OUT},
        "trainer": {"total_training_tokens": 4096},
        "model": {"model_name": "EleutherAI/pythia-70m"},
        "datasets": {"web": {"dataset_name_or_path": "Skylion007/openwebtext"}},
        "activation_factory": {"sources": [{"name": "web"}], "hook_points": [HOOK, HOOK_OUT], "context_size": 128},
    })
    meta = SAELensMetadata.from_settings(settings)
    assert meta == SAELensMetadata(model_name="EleutherAI/pythia-70m", hook_name=HOOK, hook_name_out=HOOK_OUT,
                                   context_size=128, dataset_path="Skylion007/openwebtext", prepend_bos=True,
                                   exclude_special_tokens=True)


# --- hf://OWNER/REPO/PATH, offline: the hub cache pointed at a local copy ----------------------------------

def fake_hub_cache(root: Path, repo_id: str, subfolder: str, sae_folder: Path) -> Path:
    """The layout huggingface_hub's cache has after a download: refs/main -> snapshots/COMMIT/..."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(sae_folder, repo / "snapshots" / commit / subfolder)
    return root


@pytest.mark.slow
def test_a_hub_reference_loads_from_the_hub_cache_offline(tmp_path: Path) -> None:
    sae = our_sae("jumprelu")
    sae.save_pretrained(tmp_path / "export", format="saelens")
    cache = fake_hub_cache(tmp_path / "hub", "someone/saes", "layer_1/width_64", tmp_path / "export")
    code = ("import torch; from lm_saes.sae import SparseAutoEncoder as S; "
            "x = torch.ones(2, 16); sae = S.from_pretrained('hf://someone/saes/layer_1/width_64'); "
            "print(sae.cfg.act_fn, sae(x).sum().item()); S.from_pretrained('hf://someone/other/x')")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    act_fn, total = proc.stdout.split()
    with torch.no_grad():
        assert act_fn == "jumprelu" and math.isclose(float(total), sae(torch.ones(2, 16)).sum().item(), rel_tol=1e-5)
    assert "path='hf://someone/other/x': not in the local hub cache" in proc.stderr  # the second load


# --- export_run: a real (tiny) training run of each exportable kind, exported, loaded by sae-lens ----------

RUN_KINDS = {"relu": ("relu", False), "topk": ("topk", False), "batchtopk": ("batchtopk", False),
             "jumprelu": ("jumprelu", False), "relu_transcoder": ("relu", True), "gated": ("gated", False),
             "matryoshka_batchtopk": ("matryoshka_batchtopk", False)}
RUN_HOOK, RUN_HOOK_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def train_tiny_run(run_dir: Path, tiny_model_dir: Path, corpus_file: Path, act_fn: str, transcoder: bool) -> None:
    from lm_saes.runners.train import TrainSAESettings, train_sae

    hook_in = RUN_HOOK if transcoder else "blocks.0.hook_resid_post"
    train_sae(TrainSAESettings.model_validate({
        "sae": {"hook_point_in": hook_in, "hook_point_out": RUN_HOOK_OUT if transcoder else None,
                "expansion_factor": 2, "act_fn": act_fn, "top_k": 8, "matryoshka_prefixes": [0.25]},
        "trainer": {"lr": 1e-3, "total_training_tokens": 256 * 6, "exp_result_path": str(run_dir)},
        "model": {"model_name": str(tiny_model_dir)},
        "datasets": {"synthetic": {"dataset_name_or_path": str(corpus_file)}},
        "activation_factory": {"sources": [{"name": "synthetic"}], "hook_points": [hook_in, RUN_HOOK_OUT],
                               "batch_size": 256, "context_size": 32, "model_batch_size": 4},
    }))


@pytest.fixture(scope="module")
def exported_runs(saelens_python: Path, tiny_model_dir: Path, corpus_file: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    from lm_saes.cli import main

    folder = tmp_path_factory.mktemp("exported_runs")
    x_BD = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)) * 3
    save_file({"x_BD": x_BD, "latents_BS": torch.zeros(64, 64)}, str(folder / "inputs.safetensors"))
    for name, (act_fn, transcoder) in RUN_KINDS.items():
        train_tiny_run(folder / f"run_{name}", tiny_model_dir, corpus_file, act_fn, transcoder)
        assert main(["export", str(folder / f"run_{name}"), str(folder / name)]) == 0  # the command line
    jobs = [{"op": "run", "dir": str(folder / name), "inputs": str(folder / "inputs.safetensors"),
             "outputs": str(folder / f"{name}.out")} for name in RUN_KINDS]
    answers = run_driver(saelens_python, jobs, folder)
    assert not [a for a in answers if "error" in a], answers
    return folder, dict(zip(RUN_KINDS, answers))


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_KINDS)
def test_an_exported_run_loads_in_saelens_with_our_reconstruction(exported_runs, tiny_model_dir, name: str) -> None:
    folder, answers = exported_runs
    meta = answers[name]["metadata"]
    assert (meta["model_name"], meta["context_size"], meta["prepend_bos"]) == (str(tiny_model_dir), 32, True)
    assert meta["dataset_path"].endswith("docs.jsonl")
    sae = SparseAutoEncoder.from_pretrained(folder / f"run_{name}")  # the run itself, our format
    ours = our_outputs(sae, folder / "inputs.safetensors")
    assert ours["latents_BS"].count_nonzero() > 0
    theirs = load_file(str(folder / f"{name}.out"))
    for key in ("latents_BS", "reconstruction_BD", "forward_BD"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_an_export_never_overwrites_an_lm_saes_folder(tmp_path: Path) -> None:
    sae = our_sae("relu")
    sae.save_pretrained(tmp_path)
    weights = (tmp_path / SAELENS_WEIGHTS_FILE).read_bytes()
    with pytest.raises(UserInputError, match="save_path=.*holds an lm_saes SAE"):
        sae.save_pretrained(tmp_path, format="saelens")
    assert (tmp_path / SAELENS_WEIGHTS_FILE).read_bytes() == weights and not (tmp_path / SAELENS_CFG_FILE).exists()


def test_hub_references_are_parsed() -> None:
    from lm_saes.interop.hub import parse_hub_reference

    assert parse_hub_reference("hf://jbloom/GPT2-Small-SAEs/blocks.8.hook_resid_pre") == (
        "jbloom/GPT2-Small-SAEs", None, "blocks.8.hook_resid_pre")
    assert parse_hub_reference("hf://o/r@v1.0/a/b/") == ("o/r", "v1.0", "a/b")
    assert parse_hub_reference("hf://o/r") == ("o/r", None, "")
    with pytest.raises(UserInputError, match="path='hf://onlyowner': a hub reference is hf://OWNER/REPO"):
        parse_hub_reference("hf://onlyowner")
