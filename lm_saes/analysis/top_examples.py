"""Bounded per-latent example stores: the top-activating contexts and a uniform sample of firing contexts.

Both are the same structure, an `ExampleReservoir` that keeps, for every latent at once, the `k` contexts
with the largest *key* seen so far, together with a window of tokens and activations around each context's
peak. Keyed by the peak activation it is the top-k; keyed by a fresh uniform random number per (latent,
context) it is a reservoir sample (the k largest of i.i.d. uniform keys over a stream are a uniform sample
of it), which shows weak activations in proportion to how often they occur. Memory is
(d_sae, k, window) whatever the number of tokens streamed; each batch is merged with one `torch.topk` over
the concatenation of the kept and the new candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_TOKEN = -1
"""Token id of a window position before the context's start or after its end."""


@dataclass(frozen=True)
class Window:
    before: int = 15
    """Tokens shown before the peak."""
    after: int = 8
    """Tokens shown after the peak."""

    @property
    def size(self) -> int:
        return self.before + 1 + self.after


class ExampleReservoir:
    """Per latent, the k candidates with the largest key, with their context id and token/activation windows."""

    def __init__(self, d_sae: int, k: int, window: Window) -> None:
        self.k, self.window = k, window
        self.keys_SK = torch.full((d_sae, k), -torch.inf)
        self.peaks_SK = torch.zeros(d_sae, k)
        self.context_SK = torch.full((d_sae, k), -1, dtype=torch.int64)
        self.tokens_SKW = torch.full((d_sae, k, window.size), PAD_TOKEN, dtype=torch.int32)
        self.acts_SKW = torch.zeros(d_sae, k, window.size)

    def state(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys_SK, "peaks": self.peaks_SK, "context": self.context_SK,
                "tokens": self.tokens_SKW, "acts": self.acts_SKW}

    def merge(
        self, keys_SC: torch.Tensor, peaks_SC: torch.Tensor, context_SC: torch.Tensor,
        tokens_SCW: torch.Tensor, acts_SCW: torch.Tensor,
    ) -> None:
        """Keep the k largest keys among the kept and the C new candidates of every latent (-inf: never kept)."""
        all_keys = torch.cat([self.keys_SK, keys_SC], dim=1)
        self.keys_SK, idx_SK = all_keys.topk(self.k, dim=1)
        self.peaks_SK = torch.cat([self.peaks_SK, peaks_SC], dim=1).gather(1, idx_SK)
        self.context_SK = torch.cat([self.context_SK, context_SC], dim=1).gather(1, idx_SK)
        idx_SKW = idx_SK.unsqueeze(-1).expand(-1, -1, self.window.size)
        self.tokens_SKW = torch.cat([self.tokens_SKW, tokens_SCW], dim=1).gather(1, idx_SKW)
        self.acts_SKW = torch.cat([self.acts_SKW, acts_SCW], dim=1).gather(1, idx_SKW)

    def sorted_by_peak(self) -> dict[str, torch.Tensor]:
        """The kept examples, per latent in descending order of peak activation; empty slots last (peak 0)."""
        peaks = torch.where(torch.isinf(self.keys_SK), torch.zeros_like(self.peaks_SK), self.peaks_SK)
        order_SK = peaks.argsort(dim=1, descending=True, stable=True)
        order_SKW = order_SK.unsqueeze(-1).expand(-1, -1, self.window.size)
        return {
            "peak": peaks.gather(1, order_SK),
            "context": torch.where(peaks > 0, self.context_SK, -1).gather(1, order_SK),
            "tokens": self.tokens_SKW.gather(1, order_SKW),
            "acts": self.acts_SKW.gather(1, order_SKW),
        }


def context_candidates(
    latents_BTS: torch.Tensor, tokens_BT: torch.Tensor, window: Window
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (latent, context) of a batch: the peak activation, and the windows around the peak position.

    Returns peaks_SB, pos_SB, tokens_SBW (PAD_TOKEN outside the context), acts_SBW. One candidate per
    context per latent, so a latent's top examples are distinct contexts rather than neighbouring positions.
    """
    B, T, S = latents_BTS.shape
    peaks_BS, pos_BS = latents_BTS.max(dim=1)
    peaks_SB, pos_SB = peaks_BS.T, pos_BS.T
    offsets_W = torch.arange(-window.before, window.after + 1)
    where_SBW = pos_SB.unsqueeze(-1) + offsets_W
    inside_SBW = (where_SBW >= 0) & (where_SBW < T)
    where_SBW = where_SBW.clamp(0, T - 1)
    row_SBW = torch.arange(B).view(1, B, 1).expand_as(where_SBW)
    latent_SBW = torch.arange(S).view(S, 1, 1).expand_as(where_SBW)
    tokens_SBW = torch.where(inside_SBW, tokens_BT[row_SBW, where_SBW].to(torch.int32), PAD_TOKEN)
    acts_SBW = torch.where(inside_SBW, latents_BTS[row_SBW, where_SBW, latent_SBW], 0.0)
    return peaks_SB, pos_SB, tokens_SBW, acts_SBW
