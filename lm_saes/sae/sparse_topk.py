"""The fast TopK path: with k of d_sae latents active, decode and backpropagate at k/d_sae of the dense cost.

The encoder's forward stays dense (every pre-activation is needed to pick the top k). Its backward touches
only the selected latents: the gradients are sparse (batch x k) matrices multiplied into dense ones, never a
tokens x k x d_model tensor. The decoder is an `embedding_bag` over the k selected rows of W_D, whose
backward PyTorch already computes row by row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SparseTopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor, k: int):  # type: ignore[override]
        pre_BS = torch.addmm(b_E_S, x_BD, W_E_DS)
        values_BK, indices_BK = pre_BS.topk(k, dim=-1, sorted=False)
        values_BK = values_BK.relu()
        ctx.save_for_backward(x_BD, W_E_DS, values_BK, indices_BK)
        ctx.mark_non_differentiable(indices_BK)
        return values_BK, indices_BK

    @staticmethod
    def backward(ctx, grad_values_BK: torch.Tensor, _grad_indices: torch.Tensor | None):  # type: ignore[override]
        x_BD, W_E_DS, values_BK, indices_BK = ctx.saved_tensors
        grad_BK = (grad_values_BK * (values_BK > 0)).to(x_BD.dtype)  # through the ReLU; autocast: back to fp32
        batch, k = indices_BK.shape
        d_sae = W_E_DS.shape[1]
        grad_x = grad_W_E = grad_b_E = None
        if ctx.needs_input_grad[0]:
            # grad_x[b] = sum_k g[b, k] * W_E[:, idx[b, k]]: a weighted bag of W_E's columns.
            grad_x = F.embedding_bag(indices_BK, W_E_DS.T.contiguous(), per_sample_weights=grad_BK, mode="sum")
        if ctx.needs_input_grad[1]:
            # grad_W_E = x^T G with G the sparse (batch x d_sae) gradient: (G^T x)^T as a sparse-dense product.
            rows = torch.arange(batch, device=x_BD.device).repeat_interleave(k)
            G_T = torch.sparse_coo_tensor(
                torch.stack([indices_BK.flatten(), rows]), grad_BK.flatten(), (d_sae, batch), check_invariants=False
            )
            grad_W_E = torch.sparse.mm(G_T, x_BD).T
        if ctx.needs_input_grad[2]:
            grad_b_E = torch.zeros(d_sae, dtype=grad_BK.dtype, device=grad_BK.device)
            grad_b_E.index_add_(0, indices_BK.flatten(), grad_BK.flatten())
        return grad_x, grad_W_E, grad_b_E, None


def sparse_topk_encode(
    x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices), each (batch, k): relu of the k largest pre-activations per token."""
    return _SparseTopKEncode.apply(x_BD, W_E_DS, b_E_S, k)


def sparse_decode(values_BK: torch.Tensor, indices_BK: torch.Tensor, W_D_SD: torch.Tensor) -> torch.Tensor:
    """sum_k values[b, k] * W_D[indices[b, k]]  (no bias). Under autocast the values may come in a lower
    precision than W_D; embedding_bag wants one dtype, and the gather is cheap at W_D's."""
    return F.embedding_bag(indices_BK, W_D_SD, per_sample_weights=values_BK.to(W_D_SD.dtype), mode="sum")
