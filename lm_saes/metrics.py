"""Reconstruction and sparsity metrics. One definition each, used by training and tests alike."""

from __future__ import annotations

import torch


def mse(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared error summed over features."""
    return (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()


def explained_variance(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """1 - SSE / total variance about the batch mean (not about zero).

    Predicting the batch mean for every row gives exactly 0; a perfect reconstruction gives 1.
    """
    x = x_BD.float()
    residual = (x - x_hat_BD.float()).pow(2).sum()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return 1 - residual / total


def l0(latents_BS: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero latents per row."""
    return (latents_BS != 0).float().sum(dim=-1).mean()


def firing_counts(latents_BS: torch.Tensor) -> torch.Tensor:
    """(d_sae,) number of rows on which each latent is non-zero."""
    return (latents_BS != 0).sum(dim=0)
