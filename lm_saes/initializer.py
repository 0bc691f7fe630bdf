"""Initializer: dataset-wise normalisation, W_E = W_D^T, and a grid search over the decoder row norm."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from pydantic import Field

from lm_saes.activation import ActivationBatch
from lm_saes.config_base import BaseConfig
from lm_saes.errors import EmptyActivationStream
from lm_saes.sae import SAEConfig, SparseAutoEncoder


class InitializerConfig(BaseConfig):
    grid_search_init_norm: bool = True
    """Pick the decoder row norm that minimises the initial MSE on real activations."""
    init_decoder_norm: float = Field(0.1, gt=0)
    """The decoder row norm when not searching."""
    n_norm_estimation_batches: int = Field(2, gt=0)
    """Batches used to estimate the activation-norm factors (and for the grid search)."""
    seed: int = 42


class Initializer:
    def __init__(self, cfg: InitializerConfig) -> None:
        self.cfg = cfg

    def initialize_sae_from_config(
        self, cfg: SAEConfig, activation_stream: Iterator[ActivationBatch] | None = None
    ) -> SparseAutoEncoder:
        """Build an SAE. With a stream, estimate normalisation and search the norm on its first batches.

        The batches used here are consumed from the stream (they are not trained on).
        """
        torch.manual_seed(self.cfg.seed)
        sae = SparseAutoEncoder(cfg)
        _set_decoder_norm(sae, self.cfg.init_decoder_norm)
        if activation_stream is None:
            return sae
        batches = [b for _, b in zip(range(self.cfg.n_norm_estimation_batches), activation_stream)]
        if not batches:
            raise EmptyActivationStream()
        x_in_ND = torch.cat([b[cfg.hook_point_in] for b in batches]).to(cfg.device, cfg.dtype)
        x_out_ND = torch.cat([b[cfg.hook_point_target] for b in batches]).to(cfg.device, cfg.dtype)
        with torch.no_grad():
            sae.norm_factor_in.fill_(norm_factor(x_in_ND))
            sae.norm_factor_out.fill_(norm_factor(x_out_ND))
        if self.cfg.grid_search_init_norm:
            _set_decoder_norm(sae, self._search_norm(sae, x_in_ND, x_out_ND))
        return sae

    @torch.no_grad()
    def _search_norm(self, sae: SparseAutoEncoder, x_in_ND: torch.Tensor, x_out_ND: torch.Tensor) -> float:
        """Coarse then fine log-spaced search of the decoder row norm for the lowest initial MSE."""

        def mse_at(norm: float) -> float:
            _set_decoder_norm(sae, norm)
            return sae.compute_loss(x_in_ND, x_out_ND, 0.0).mse.item()

        coarse = [10**e for e in torch.linspace(-3, 1, 17).tolist()]
        best = min(coarse, key=mse_at)
        fine = [best * 10**e for e in torch.linspace(-0.25, 0.25, 11).tolist()]
        return min(fine, key=mse_at)


def norm_factor(x_ND: torch.Tensor) -> float:
    """The scale that makes the mean activation norm sqrt(d_model)."""
    mean_norm = x_ND.float().norm(dim=-1).mean().item()
    if mean_norm == 0 or not math.isfinite(mean_norm):
        raise ValueError(f"cannot normalise activations with mean norm {mean_norm}")
    return math.sqrt(x_ND.shape[-1]) / mean_norm


@torch.no_grad()
def _set_decoder_norm(sae: SparseAutoEncoder, norm: float) -> None:
    """Scale every decoder row to `norm` and tie the encoder to it (W_E = W_D^T), biases to zero.

    An SAE that holds its decoder rows at unit norm gets unit rows and W_E = norm^2 W_D^T instead: the same
    initial reconstruction, so the search means the same thing for it.
    """
    sae.W_D.div_(sae.W_D.norm(dim=1, keepdim=True))
    if sae.unit_decoder_norm:
        sae.W_E.copy_(sae.W_D.T * norm**2)
    else:
        sae.W_D.mul_(norm)
        sae.W_E.copy_(sae.W_D.T)
    sae.b_E.zero_()
    sae.b_D.zero_()
