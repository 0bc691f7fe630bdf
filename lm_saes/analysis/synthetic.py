"""A synthetic analysis of any number of latents, in `load_analysis`'s (info, tensors) shape, made in seconds.

For the dashboard's scale test and benchmark (262,144 latents without training or analysing such an SAE): the
values are random but well-formed (peaks sorted and at the window's centre, frequencies log-uniform over four
decades, every `dead_every`-th latent dead, neighbours and logit effects filled).
"""

from __future__ import annotations

from typing import Any

import torch

from lm_saes.analysis.top_examples import PAD_TOKEN


def synthetic_analysis(
    d_sae: int, n_top: int = 5, n_quantile: int = 2, window_before: int = 4, window_after: int = 3,
    vocab_size: int = 5000, n_logits: int = 5, n_neighbours: int = 10, histogram_bins: int = 48,
    dead_every: int = 7, seed: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    W, n_tokens = window_before + 1 + window_after, 10**6
    live_S = torch.arange(d_sae) % dead_every != dead_every - 1
    frequency_S = torch.where(live_S, 10 ** (-5 + 4 * torch.rand(d_sae, generator=g)), 0.0)
    fired_S = (frequency_S * n_tokens).round().to(torch.int64).clamp_min(live_S.long())
    max_S = torch.where(live_S, 1 + 9 * torch.rand(d_sae, generator=g), 0.0)
    tensors: dict[str, torch.Tensor] = {
        "fired": fired_S, "frequency": fired_S.double().div(n_tokens).float(), "max_activation": max_S,
        "mean_activation": max_S * 0.4,
        "histogram": torch.randint(0, 50, (d_sae, histogram_bins), generator=g, dtype=torch.int32) * live_S[:, None],
        "histogram_edges": torch.logspace(-3, 3, histogram_bins + 1),
    }
    for prefix, k in (("top", n_top), ("quantile", n_quantile)):
        peak_SK = (max_S[:, None] * torch.rand(d_sae, k, generator=g)).sort(dim=1, descending=True).values
        if prefix == "top" and k:
            peak_SK[:, 0] = max_S  # the top example's peak is the latent's max
        acts_SKW = peak_SK[..., None] * torch.rand(d_sae, k, W, generator=g) * 0.9
        acts_SKW[:, :, window_before] = peak_SK
        tokens_SKW = torch.randint(0, vocab_size, (d_sae, k, W), generator=g, dtype=torch.int32)
        tokens_SKW[:, :, 0] = PAD_TOKEN  # a context that started just before the window's end
        tensors[f"{prefix}_peak"], tensors[f"{prefix}_acts"], tensors[f"{prefix}_tokens"] = peak_SK, acts_SKW, tokens_SKW
        tensors[f"{prefix}_context"] = torch.randint(0, 10**5, (d_sae, k), generator=g)
    for which, sign in (("top", 1.0), ("bottom", -1.0)):
        tensors[f"logit_{which}_ids"] = torch.randint(0, vocab_size, (d_sae, n_logits), generator=g, dtype=torch.int32)
        tensors[f"logit_{which}_values"] = sign * torch.rand(d_sae, n_logits, generator=g).sort(dim=1, descending=True).values
    tensors["neighbour_ids"] = torch.randint(0, d_sae, (d_sae, n_neighbours), generator=g, dtype=torch.int32)
    tensors["neighbour_cosine"] = torch.rand(d_sae, n_neighbours, generator=g).sort(dim=1, descending=True).values
    dead = torch.nonzero(~live_S).flatten().tolist()
    info = {
        "format_version": 1, "n_tokens": n_tokens, "n_contexts": n_tokens // 128, "d_sae": d_sae,
        "hook_point_in": "blocks.6.hook_resid_post", "hook_point_out": "blocks.6.hook_resid_post", "act_fn": "relu",
        "window_before": window_before, "window_after": window_after, "logit_effects": "synthetic",
        "logit_effects_applicable": True, "quantile_examples": "a uniform sample (synthetic)", "dead_latents": dead,
        "dataset": "synthetic", "token_strings": {str(i): f" w{i}" for i in range(vocab_size)},
    }
    return info, tensors
