"""Logit effects: which tokens a latent's decoder direction promotes and suppresses, directly.

    effect_SV = (W_D_SD * w_ln_D) @ W_U_DV

W_D is the saved (folded, raw-units) decoder; w_ln is the final norm's weight (RMSNorm or LayerNorm
gain). The norm's division by the activation's scale is left out: it depends on the whole residual, not on
the direction, so the effect is up to a positive per-token factor. This is the *direct* path only (the
direction read by the unembedding as if nothing after the hook changed it), the usual "logit lens" view.

It applies when the SAE writes into the residual stream: a decoder targeting hook_resid_pre/mid/post, or
hook_attn_out/hook_mlp_out (which are added into the residual). For any other hook (an MLP's hidden
activations, a normalised input) the decoder direction is not in the unembedding's input space.
"""

from __future__ import annotations

from typing import Any

import torch

RESIDUAL_HOOKS = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    # TransformerLens 4 canonical names: the residual before / after block N, and what attn / mlp add to it.
    "hook_in", "hook_out", "attn.hook_out", "mlp.hook_out",
)


def writes_residual_stream(hook_point: str) -> bool:
    parts = hook_point.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return False
    return ".".join(parts[2:]) in RESIDUAL_HOOKS


def not_applicable_reason(hook_point: str) -> str | None:
    """None if logit effects apply to an SAE writing into `hook_point`; otherwise one line saying why not."""
    if writes_residual_stream(hook_point):
        return None
    return (f"not applicable: {hook_point} is not the residual stream (nor an attention/MLP output added into it), "
            "so the decoder directions are not in the unembedding's input space")


def final_norm_weight(bridge: Any, d_model: int) -> torch.Tensor:
    """(d_model,) the final norm's gain; ones if the model has none."""
    ln = getattr(bridge, "ln_final", None)
    module = getattr(ln, "_original_component", ln)
    weight = getattr(module, "weight", None)
    if weight is None:
        return torch.ones(d_model)
    return weight.detach().float().cpu()


@torch.no_grad()
def logit_effects(
    W_D_SD: torch.Tensor, ln_weight_D: torch.Tensor, W_U_DV: torch.Tensor, n_tokens: int = 10, chunk: int = 256
) -> dict[str, torch.Tensor]:
    """Per latent, the `n_tokens` most promoted (top) and most suppressed (bottom) tokens and their effects.

    Computed `chunk` latents at a time: the whole (d_sae, vocab) matrix is ~0.9 GB for SmolLM2's 8x SAE.
    """
    W_U_DV = W_U_DV.detach().float().cpu()
    ln_weight_D = ln_weight_D.float().cpu()
    n = min(n_tokens, W_U_DV.shape[1])
    out: dict[str, list[torch.Tensor]] = {"top_values": [], "top_ids": [], "bottom_values": [], "bottom_ids": []}
    for start in range(0, W_D_SD.shape[0], chunk):
        effect_CV = (W_D_SD[start : start + chunk].detach().float().cpu() * ln_weight_D) @ W_U_DV
        top = effect_CV.topk(n, dim=1)
        bottom = effect_CV.topk(n, dim=1, largest=False)
        out["top_values"].append(top.values)
        out["top_ids"].append(top.indices.to(torch.int32))
        out["bottom_values"].append(bottom.values)
        out["bottom_ids"].append(bottom.indices.to(torch.int32))
    return {f"logit_{k}": torch.cat(v) for k, v in out.items()}
