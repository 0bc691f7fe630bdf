"""The plain-HF residual forward: the same activations as the bridge's, on the bridge's own weights, stopping at
the deepest block asked for; other hook points still go through the bridge."""

from __future__ import annotations

import pytest
import torch

from lm_saes import LanguageModelConfig, TransformerLensLanguageModel
from tests.conftest import save_tiny_model


def bridge_acts(model: TransformerLensLanguageModel, tokens_BT: torch.Tensor, hooks: list[str]) -> dict:
    fast, model.residual = model.residual, None
    try:
        return model.run_hooks(tokens_BT, hooks).activations
    finally:
        model.residual = fast


@pytest.mark.parametrize("architecture", ["llama", "gpt_neox"])
def test_residual_hooks_equal_the_bridges(architecture, tiny_model, tmp_path) -> None:
    model = tiny_model if architecture == "llama" else TransformerLensLanguageModel(
        LanguageModelConfig(model_name=str(save_tiny_model(tmp_path / "neox", architecture="gpt_neox"))))
    assert model.residual is not None
    tokens_BT = torch.randint(4, 50, (3, 16))
    hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_out"]
    assert model.residual.serves(hooks)
    fast = model.run_hooks(tokens_BT, hooks).activations
    slow = bridge_acts(model, tokens_BT, hooks)
    for hook in hooks:
        torch.testing.assert_close(fast[hook], slow[hook], rtol=1e-5, atol=1e-5)
    # resid_post of block 0 is resid_pre of block 1, read on two different hooks
    torch.testing.assert_close(fast["blocks.0.hook_out"], fast["blocks.1.hook_resid_pre"])


def test_it_shares_the_bridges_weights_and_stops_after_the_deepest_block(tiny_model) -> None:
    plain, hf = tiny_model.residual.plain, tiny_model.bridge.original_model
    plain_ptrs = {p.data_ptr() for p in plain.parameters()}
    assert plain_ptrs <= {p.data_ptr() for p in hf.parameters()}  # no second copy of the weights
    calls = []
    handle = tiny_model.residual.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        tiny_model.run_hooks(torch.randint(4, 50, (1, 8)), ["blocks.0.hook_resid_post"])
        assert calls == []  # block 1 never ran
        tiny_model.run_hooks(torch.randint(4, 50, (1, 8)), ["blocks.1.hook_resid_pre"])
        assert calls == [1]  # its input is read, then the pass stops
    finally:
        handle.remove()


def test_other_hook_points_go_through_the_bridge(tiny_model) -> None:
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    assert not tiny_model.residual.serves(hooks)
    tokens_BT = torch.randint(4, 50, (2, 8))
    out = tiny_model.run_hooks(tokens_BT, hooks).activations
    ref = bridge_acts(tiny_model, tokens_BT, hooks)
    for hook in hooks:
        torch.testing.assert_close(out[hook], ref[hook])


def test_a_bridge_it_cannot_rebuild_falls_back(tiny_model) -> None:
    class Opaque:  # no original_model: nothing to rebuild
        hook_dict: dict = {}

    from lm_saes.residual_forward import ResidualForward

    assert ResidualForward.of(Opaque()) is None
