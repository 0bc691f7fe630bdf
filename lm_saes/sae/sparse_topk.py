"""TopK's selection for its sparse step (sae/sparse_step.py, the step every sparse variant shares): each row's k
largest pre-activations, found by group maxima; and the decoder over (batch, k) selected latents that AuxK uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lm_saes.sae.sparse_step import SELECT_GROUP, recycle, spare_or_empty


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
    # the maxima into a recycled tensor: at 32x, batch 4,096, they are 38 MB, which glibc would map afresh
    maxima_BG = torch.amax(pre_BgG, dim=1, out=spare_or_empty((batch, n_groups), pre_BS))
    _, groups_BK = maxima_BG.topk(k, dim=-1, sorted=False)
    recycle(maxima_BG)
    members_BgK = pre_BgG.gather(2, groups_BK.unsqueeze(1).expand(batch, group, k))
    values_BK, slots_BK = members_BgK.flatten(1).topk(k, dim=-1, sorted=False)  # slot = member * k + group's place
    return values_BK, slots_BK.div(k, rounding_mode="floor") * n_groups + groups_BK.gather(1, slots_BK % k)


def sparse_decode(values_BK: torch.Tensor, indices_BK: torch.Tensor, W_D_SD: torch.Tensor) -> torch.Tensor:
    """sum_k values[b, k] * W_D[indices[b, k]]  (no bias). Under autocast the values may come in a lower
    precision than W_D; embedding_bag wants one dtype, and the gather is cheap at W_D's."""
    return F.embedding_bag(indices_BK, W_D_SD, per_sample_weights=values_BK.to(W_D_SD.dtype), mode="sum")
