import math

import torch

from lm_saes import Initializer, InitializerConfig, SAEConfig


def _stream(scale: float, n_batches: int = 3, d: int = 16):
    g = torch.Generator().manual_seed(0)
    for _ in range(n_batches):
        x = torch.randn(256, d, generator=g) * scale + 1.0
        yield {"h": x, "tokens": torch.zeros(256, dtype=torch.long)}


def test_encoder_is_decoder_transpose_and_norms_are_set() -> None:
    cfg = SAEConfig(hook_point_in="h", d_model=16, expansion_factor=4)
    sae = Initializer(InitializerConfig(grid_search_init_norm=False, init_decoder_norm=0.3)).initialize_sae_from_config(cfg)
    assert torch.equal(sae.W_E, sae.W_D.T)
    torch.testing.assert_close(sae.W_D.norm(dim=1), torch.full((64,), 0.3))


def test_normalisation_makes_mean_norm_sqrt_d_model() -> None:
    cfg = SAEConfig(hook_point_in="h", d_model=16, expansion_factor=4)
    stream = _stream(scale=50.0)
    sae = Initializer(InitializerConfig(n_norm_estimation_batches=2)).initialize_sae_from_config(cfg, stream)
    x = torch.cat([b["h"] for b in _stream(scale=50.0, n_batches=2)])
    mean_norm = (x * sae.norm_factor_in).norm(dim=-1).mean().item()
    assert abs(mean_norm - math.sqrt(16)) < 1e-3
    assert len(list(stream)) == 1  # the initializer consumed exactly the two batches it used


def test_grid_search_beats_a_poor_fixed_norm() -> None:
    cfg = SAEConfig(hook_point_in="h", d_model=16, expansion_factor=4)
    x = torch.cat([b["h"] for b in _stream(scale=1.0, n_batches=2)])
    searched = Initializer(InitializerConfig(grid_search_init_norm=True)).initialize_sae_from_config(cfg, _stream(1.0))
    fixed = Initializer(InitializerConfig(grid_search_init_norm=False, init_decoder_norm=5.0)).initialize_sae_from_config(
        cfg, _stream(1.0)
    )
    with torch.no_grad():
        assert searched.compute_loss(x, x, 0).mse < fixed.compute_loss(x, x, 0).mse
    assert torch.equal(searched.W_E, searched.W_D.T)
