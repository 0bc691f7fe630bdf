import pytest
import torch
from pydantic import ValidationError

from lm_saes import SAEConfig, SparseAutoEncoder


def _cfg(**kw) -> SAEConfig:
    return SAEConfig(**{"hook_point_in": "blocks.0.hook_resid_post", "d_model": 16, "expansion_factor": 4, **kw})


def test_d_sae_is_derived_not_stored() -> None:
    cfg = _cfg()
    assert cfg.d_sae == 64
    assert "d_sae" not in cfg.model_dump()
    cfg.expansion_factor = 8
    assert cfg.d_sae == 128


def test_sae_versus_transcoder() -> None:
    assert not _cfg().is_transcoder and not _cfg(hook_point_out="blocks.0.hook_resid_post").is_transcoder
    tc = _cfg(hook_point_out="blocks.0.hook_mlp_out")
    assert tc.is_transcoder and tc.hook_point_target == "blocks.0.hook_mlp_out"


def test_unknown_act_fn_and_unknown_key_are_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown activation function; allowed: relu"):
        _cfg(act_fn="gelu")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        _cfg(expansion_factr=8)


def test_forward_is_relu_code_through_normalisation() -> None:
    torch.manual_seed(0)
    sae = SparseAutoEncoder(_cfg())
    with torch.no_grad():
        sae.norm_factor_in.fill_(2.0)
        sae.norm_factor_out.fill_(2.0)
        sae.b_E.normal_()
        sae.b_D.normal_()
    x = torch.randn(5, 16)
    latents = torch.relu(2 * x @ sae.W_E + sae.b_E)
    torch.testing.assert_close(sae.encode(x), latents)
    torch.testing.assert_close(sae(x), (latents @ sae.W_D + sae.b_D) / 2)
    loss = sae.compute_loss(x, x, sparsity_coefficient=0.5)
    expected_mse = ((latents @ sae.W_D + sae.b_D) - 2 * x).pow(2).sum(-1).mean()
    expected_l1 = (latents * sae.W_D.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(loss.mse, expected_mse)
    torch.testing.assert_close(loss.loss, expected_mse + 0.5 * expected_l1)


def test_save_and_load_round_trip_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    sae = SparseAutoEncoder(_cfg(hook_point_out="blocks.0.hook_mlp_out"))
    with torch.no_grad():
        sae.norm_factor_in.fill_(3.5)
        sae.norm_factor_out.fill_(0.25)
        sae.b_E.normal_()
    sae.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "sae_weights.safetensors"]
    loaded = SparseAutoEncoder.from_pretrained(tmp_path)
    assert loaded.cfg == sae.cfg.model_copy(update={"activation_norm_folded": True})
    for name, tensor in sae.folded_state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # Saving what was loaded changes nothing: the bytes of the weights round-trip exactly.
    loaded.save_pretrained(tmp_path / "again")
    again = SparseAutoEncoder.from_pretrained(tmp_path / "again")
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert again.cfg == loaded.cfg


def test_decoder_norms_have_autograds_gradient_with_one_pass() -> None:
    # _RowNorms' backward against autograd's own norm, a zero row included (its gradient is zero, not NaN)
    sae = SparseAutoEncoder(SAEConfig(hook_point_in="in", d_model=6, expansion_factor=2, dtype="float64"))
    with torch.no_grad():
        sae.W_D[3] = 0
    weights_S = torch.randn(12, dtype=torch.float64)
    (sae.decoder_norms() * weights_S).sum().backward()
    W_SD = sae.W_D.detach().clone().requires_grad_()
    (W_SD.norm(dim=1) * weights_S).sum().backward()
    torch.testing.assert_close(sae.decoder_norms(), W_SD.norm(dim=1))
    torch.testing.assert_close(sae.W_D.grad, W_SD.grad)
    assert sae.W_D.grad[3].abs().sum() == 0 and sae.W_D.grad.abs().sum() > 0
