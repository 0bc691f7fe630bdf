"""Variants trained as their references train them: the k a TopK SAE ends with, autocast, AuxK's weight and
timing, unit-norm decoders, BatchTopK's inference threshold, and one set of trainer defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pydantic import ValidationError

from lm_saes import Initializer, InitializerConfig, SAEConfig, SparseAutoEncoder, Trainer, TrainerConfig
from lm_saes.sae.activation_functions import ACTIVATION_FUNCTIONS

D, N_FEATURES, BATCH = 16, 32, 256


def planted_stream(n_batches: int, seed: int = 0, batch: int = BATCH):
    """Sparse non-negative combinations of fixed random directions (~2.6 per row)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(N_FEATURES, D, generator=torch.Generator().manual_seed(7)), dim=1)
    for _ in range(n_batches):
        active = torch.rand(batch, N_FEATURES, generator=g) < 0.08
        codes = (0.5 + torch.rand(batch, N_FEATURES, generator=g)) * active
        yield {"h": codes @ directions * 4, "tokens": torch.zeros(batch, dtype=torch.long)}


def _sae(act_fn: str = "topk", **kw) -> SparseAutoEncoder:
    torch.manual_seed(0)
    cfg = SAEConfig(hook_point_in="h", d_model=D, expansion_factor=4, act_fn=act_fn, **{"top_k": 4, **kw})
    return Initializer(InitializerConfig()).initialize_sae_from_config(cfg, planted_stream(2, seed=99))


def _fit(sae: SparseAutoEncoder, steps: int, tmp_path: Path, seed: int = 1, **kw) -> dict:
    cfg = TrainerConfig(**{"total_training_tokens": BATCH * steps, "log_frequency": steps,
                           "exp_result_path": str(tmp_path), **kw})
    return Trainer(cfg).fit(sae, planted_stream(steps, seed=seed))


def test_a_reloaded_topk_sae_encodes_with_the_k_of_its_last_step(tmp_path) -> None:
    sae = _sae("topk", top_k_initial=20, top_k_anneal_fraction=0.5)
    _fit(sae, 8, tmp_path)
    sae.save_pretrained(tmp_path / "saved")
    loaded = SparseAutoEncoder.from_pretrained(tmp_path / "saved")
    x = next(planted_stream(1, seed=5))["h"]
    assert ((loaded.encode(x) > 0).sum(dim=-1) <= 4).all()
    torch.testing.assert_close(loaded(x), sae.eval()(x), rtol=1e-5, atol=1e-5)


# --- autocast ---
def _has_sparse_path(act_fn: str) -> bool:
    probe = ACTIVATION_FUNCTIONS[act_fn](SAEConfig(hook_point_in="h", d_model=4, act_fn=act_fn, top_k=4))
    return probe.selects_sparse


PATHS = [(act_fn, sparse) for act_fn in sorted(ACTIVATION_FUNCTIONS) for sparse in (False, True)
         if not sparse or _has_sparse_path(act_fn)]


@pytest.mark.parametrize(("act_fn", "sparse"), PATHS)
def test_bfloat16_autocast_trains_and_tracks_float32(act_fn: str, sparse: bool, tmp_path) -> None:
    losses = {}
    for amp in ("float32", "bfloat16"):
        # sparse: TopK's own path, or every step on the firing latents (sae/sparse_step.py); dense: the reference
        sae = _sae(act_fn, sparse_topk=sparse, sparse_max_density=1.0 if sparse else 0.0)
        final = _fit(sae, 30, tmp_path / amp, amp_dtype=amp, l1_coefficient=0.3, overwrite=True)
        losses[amp] = final["mse"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05), losses


def test_float16_autocast_is_refused_in_one_line() -> None:
    with pytest.raises(ValidationError, match="float16 gradients underflow"):
        TrainerConfig(amp_dtype="float16")


# --- AuxK ---
def test_aux_k_has_the_reference_weight_against_the_reconstruction() -> None:
    """loss = V (nmse + aux_k_coefficient nmse_aux), V the target's variance per token: the reference's loss
    (Gao et al. 2024) times V, whatever the scale of the activations."""
    sae = _sae("topk", aux_k=8)
    x = next(planted_stream(1, seed=3))["h"]
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[:20] = True
    out = sae.compute_loss(x, x, 0.0, dead_S=dead)
    target = out.target_BD
    V = target.var(dim=0, unbiased=False).sum()
    nmse = out.mse / V
    assert 0 < out.aux_k.item() and out.aux_k.item() <= 2
    assert out.loss.item() == pytest.approx((V * (nmse + sae.cfg.aux_k_coefficient * out.aux_k)).item(), rel=1e-5)


def test_aux_k_revives_latents_killed_on_purpose_within_a_short_run(tmp_path) -> None:
    revived = {}
    for aux_k in (0, 512):
        sae = _sae("topk", aux_k=aux_k)
        with torch.no_grad():
            sae.W_E[:, :16] *= 0.01  # these 16 latents never make the top 4
        _fit(sae, 150, tmp_path / str(aux_k), overwrite=True)
        x = torch.cat([b["h"] for b in planted_stream(4, seed=11)])
        with torch.no_grad():
            revived[aux_k] = int((sae.encode(x)[:, :16] > 0).any(dim=0).sum())
    assert revived[0] == 0 and revived[512] >= 6, revived


# --- unit-norm decoders ---
@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
def test_topk_family_keeps_decoder_rows_at_unit_norm(act_fn: str, tmp_path) -> None:
    sae = _sae(act_fn)
    _fit(sae, 30, tmp_path, lr=1e-2)
    norms = sae.W_D.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_the_decoder_gradient_is_projected_off_each_row() -> None:
    sae = _sae("topk")
    x = next(planted_stream(1))["h"]
    sae.compute_loss(x, x, 0.0).loss.backward()
    sae.before_optimizer_step()
    parallel = (sae.W_D.grad * sae.W_D.detach()).sum(dim=1)
    assert parallel.abs().max() < 1e-4 * sae.W_D.grad.norm()


@pytest.mark.parametrize("chunk_rows", [5, None])  # 5: chunks of 5 rows, the last one short; None: one chunk
def test_the_unit_norm_passes_over_row_chunks_match_the_whole_matrix(chunk_rows, monkeypatch) -> None:
    from lm_saes.sae import model

    sae = _sae("topk")
    if chunk_rows:
        monkeypatch.setattr(model, "ROW_CHUNK_BYTES", chunk_rows * sae.W_D.shape[1] * sae.W_D.element_size())
    assert len(list(model._row_chunks(sae.W_D))) == (-(-len(sae.W_D) // chunk_rows) if chunk_rows else 1)
    x = next(planted_stream(1))["h"]
    sae.compute_loss(x, x, 0.0).loss.backward()
    with torch.no_grad():
        sae.W_D.mul_(torch.rand(len(sae.W_D), 1) + 0.5)  # rows off the unit sphere, as after Adam's step
    w, g = sae.W_D.detach().clone(), sae.W_D.grad.clone()
    sae.before_optimizer_step()
    expected = g - (g * w).sum(dim=1, keepdim=True) / (w * w).sum(dim=1, keepdim=True) * w
    torch.testing.assert_close(sae.W_D.grad, expected)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_D.detach(), w / w.norm(dim=1, keepdim=True))


def test_relu_decoder_norms_stay_free(tmp_path) -> None:
    sae = _sae("relu")
    _fit(sae, 30, tmp_path, lr=1e-2)
    assert (sae.W_D.detach().norm(dim=1) - 1).abs().max() > 0.05


# --- BatchTopK at inference ---
def test_batchtopk_inference_threshold_gives_l0_within_5_percent_of_k(tmp_path) -> None:
    sae = _sae("batchtopk", top_k=4)
    _fit(sae, 150, tmp_path)
    x = torch.cat([b["h"] for b in planted_stream(8, seed=21)])
    with torch.no_grad(), sae.inference():
        l0 = (sae.encode(x) > 0).float().sum(dim=-1).mean().item()
    assert l0 == pytest.approx(4, rel=0.05)


# --- one set of defaults ---
def test_the_cli_trainer_defaults_are_the_python_defaults() -> None:
    cli = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "trainer" / "default.yaml"))
    python = TrainerConfig().model_dump(mode="json")
    cli.pop("exp_result_path")  # the CLI's: null, filled with Hydra's run directory
    assert {k: python[k] for k in cli} == {k: (list(v) if isinstance(v, tuple) else v) for k, v in cli.items()}
