"""The fast TopK path: with k of d_sae latents active, decode and backpropagate at k/d_sae of the dense cost.

The encoder's forward stays dense (every pre-activation is needed to pick the top k). Its backward touches
only the selected latents: the gradients are sparse (batch x k) matrices multiplied into dense ones, never a
tokens x k x d_model tensor. The decoder is an `embedding_bag` over the k selected rows of W_D, whose
backward PyTorch already computes row by row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lm_saes.sae.sparse_step import SELECT_GROUP, encoder_grads, pre_activations_once, recycle_pre


class _SparseTopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor, k: int):  # type: ignore[override]
        pre_BS = pre_activations_once(x_BD, W_E_DS, b_E_S)
        values_BK, indices_BK = row_topk(pre_BS, k)
        recycle_pre(pre_BS)  # the values are a copy
        values_BK = values_BK.relu()
        ctx.save_for_backward(x_BD, W_E_DS, values_BK, indices_BK)
        ctx.mark_non_differentiable(indices_BK)
        return values_BK, indices_BK

    @staticmethod
    def backward(ctx, grad_values_BK: torch.Tensor, _grad_indices: torch.Tensor | None):  # type: ignore[override]
        x_BD, W_E_DS, values_BK, indices_BK = ctx.saved_tensors
        grad_BK = grad_values_BK * (values_BK > 0)  # through the ReLU
        rows_N, offsets_B = topk_rows(indices_BK)
        return *encoder_grads(ctx.needs_input_grad, x_BD, W_E_DS, grad_BK.flatten(), rows_N, indices_BK.flatten(),
                              offsets_B), None


def row_topk(pre_BS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's k largest entries, in no order, as pre.topk(k) finds them.

    A row's k largest lie in its k groups (SELECT_GROUP strided latents, as in sparse_step.entries_above) with
    the largest maxima: every other group's maximum is below k of theirs, so below k entries. Top-k then runs over
    the group maxima and over those groups' k * SELECT_GROUP members, not over the whole row (on a CPU top-k of
    every row costs about 40% of the encoder's product at 8x). Ties between group maxima may pick another of
    equal entries, as topk's own choice among ties is arbitrary."""
    batch, d_sae = pre_BS.shape
    group = SELECT_GROUP
    if d_sae % group or k * group >= d_sae:
        return pre_BS.topk(k, dim=-1, sorted=False)
    n_groups = d_sae // group
    pre_BgG = pre_BS.view(batch, group, n_groups)
    _, groups_BK = pre_BgG.amax(dim=1).topk(k, dim=-1, sorted=False)
    members_BgK = pre_BgG.gather(2, groups_BK.unsqueeze(1).expand(batch, group, k))
    values_BK, slots_BK = members_BgK.flatten(1).topk(k, dim=-1, sorted=False)  # slot = member * k + group's place
    return values_BK, slots_BK.div(k, rounding_mode="floor") * n_groups + groups_BK.gather(1, slots_BK % k)


def topk_rows(indices_BK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, offsets) of (batch, k) selected indices read as a CSR list (sparse_step.SparseLatents)."""
    batch, k = indices_BK.shape
    rows_B = torch.arange(batch, device=indices_BK.device)
    return rows_B.repeat_interleave(k), rows_B * k


def sparse_topk_encode(
    x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices), each (batch, k): relu of the k largest pre-activations per token."""
    return _SparseTopKEncode.apply(x_BD, W_E_DS, b_E_S, k)


def sparse_decode(values_BK: torch.Tensor, indices_BK: torch.Tensor, W_D_SD: torch.Tensor) -> torch.Tensor:
    """sum_k values[b, k] * W_D[indices[b, k]]  (no bias). Under autocast the values may come in a lower
    precision than W_D; embedding_bag wants one dtype, and the gather is cheap at W_D's."""
    return F.embedding_bag(indices_BK, W_D_SD, per_sample_weights=values_BK.to(W_D_SD.dtype), mode="sum")
