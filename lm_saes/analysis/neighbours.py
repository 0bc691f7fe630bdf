"""Decoder-direction similarity: for each row of A, the k rows of B with the largest cosine.

Used for a latent's nearest neighbours within its SAE (A = B = W_D, the latent itself excluded) and for
matching the latents of two SAEs (`lm-saes compare`). The (rows of A, rows of B) cosine matrix is never held
whole: 262,144 latents would make it 256 GiB. It is computed `chunk` rows of A at a time, each chunk reduced
to its top k at once, so memory is about `max_elements` floats whatever the sizes.
"""

from __future__ import annotations

import torch

MAX_ELEMENTS = 2**25
"""Cosines held at once (128 MiB of float32): sets how many rows of A one chunk takes."""


def unit_rows(W_ND: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (a zero row stays zero, so its cosine with anything is 0)."""
    W_ND = W_ND.detach().float()
    return W_ND / W_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def top_cosine(
    A_ND: torch.Tensor, B_MD: torch.Tensor, k: int, exclude_self: bool = False, max_elements: int = MAX_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine_NK, index_NK): per row of A, the k largest cosines with rows of B, in descending order.

    `exclude_self` (A and B the same matrix) leaves each row's cosine with itself out. k is capped by the rows
    of B that are eligible; index_NK is int64.
    """
    if A_ND.shape[1] != B_MD.shape[1]:
        raise ValueError(f"rows of different widths: {A_ND.shape[1]} and {B_MD.shape[1]}")
    a_ND, b_MD = unit_rows(A_ND), unit_rows(B_MD)
    N, M = a_ND.shape[0], b_MD.shape[0]
    k = min(k, M - 1 if exclude_self else M)
    cos_NK = torch.empty(N, k)
    idx_NK = torch.empty(N, k, dtype=torch.int64)
    chunk = max(1, max_elements // max(M, 1))
    for start in range(0, N, chunk):
        cos_CM = a_ND[start : start + chunk] @ b_MD.T
        if exclude_self:
            rows = torch.arange(cos_CM.shape[0])
            cos_CM[rows, rows + start] = -torch.inf
        top = cos_CM.topk(k, dim=1)
        cos_NK[start : start + chunk], idx_NK[start : start + chunk] = top.values.cpu(), top.indices.cpu()
    return cos_NK, idx_NK
