"""SparseAutoEncoder: encode, decode, the training loss, and saving to a run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lm_saes.sae.activation_functions import get_activation_function
from lm_saes.sae.config import SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"


class SAELoss(NamedTuple):
    loss: torch.Tensor
    """mse + l1_coefficient * l1 (scalar)."""
    mse: torch.Tensor
    """Mean over the batch of the squared error summed over d_model, in normalised units (scalar)."""
    l1: torch.Tensor
    """Mean over the batch of sum_i f_i * ||W_D[i]|| (scalar)."""
    latents_BS: torch.Tensor
    target_BD: torch.Tensor
    """The normalised activation the SAE reconstructs."""
    reconstruction_BD: torch.Tensor
    """The normalised reconstruction."""


class SparseAutoEncoder(nn.Module):
    """x -> f = act(x W_E + b_E) -> x_hat = f W_D + b_D, on dataset-normalised activations.

    Inputs and outputs are raw activations: the dataset-wise scale factors (`norm_factor_in/out`, chosen so
    that the mean activation norm is sqrt(d_model)) are buffers saved with the weights, applied inside.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_sae = cfg.d_sae  # raises if d_model was never resolved
        d_model = cfg.d_model
        kw = {"dtype": cfg.dtype, "device": cfg.device}
        self.W_E = nn.Parameter(torch.empty(d_model, d_sae, **kw))
        self.b_E = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_D = nn.Parameter(torch.empty(d_sae, d_model, **kw))
        self.b_D = nn.Parameter(torch.zeros(d_model, **kw))
        self.register_buffer("norm_factor_in", torch.ones((), **kw))
        self.register_buffer("norm_factor_out", torch.ones((), **kw))
        nn.init.kaiming_uniform_(self.W_D)
        with torch.no_grad():
            self.W_E.copy_(self.W_D.T)
        self.activation_function = get_activation_function(cfg.act_fn)

    # --- the math, on normalised activations ---
    def encode_normalized(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.activation_function(x_BD @ self.W_E + self.b_E)

    def decode_normalized(self, latents_BS: torch.Tensor) -> torch.Tensor:
        return latents_BS @ self.W_D + self.b_D

    # --- the public face, on raw activations ---
    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.encode_normalized(x_BD * self.norm_factor_in)

    def decode(self, latents_BS: torch.Tensor) -> torch.Tensor:
        return self.decode_normalized(latents_BS) / self.norm_factor_out

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x_BD))

    def decoder_norms(self) -> torch.Tensor:
        return self.W_D.norm(dim=1)

    def compute_loss(self, x_in_BD: torch.Tensor, x_out_BD: torch.Tensor, l1_coefficient: float) -> SAELoss:
        """The training loss on raw activations `x_in` (read) and `x_out` (to reconstruct; == x_in for an SAE)."""
        target_BD = x_out_BD * self.norm_factor_out
        latents_BS = self.encode_normalized(x_in_BD * self.norm_factor_in)
        reconstruction_BD = self.decode_normalized(latents_BS)
        mse = (reconstruction_BD - target_BD).pow(2).sum(dim=-1).mean()
        l1 = (latents_BS * self.decoder_norms()).sum(dim=-1).mean()
        return SAELoss(mse + l1_coefficient * l1, mse, l1, latents_BS, target_BD, reconstruction_BD)

    # --- persistence ---
    def save_pretrained(self, save_path: str | os.PathLike[str]) -> Path:
        """Write `sae_weights.safetensors` and `config.json` (both atomically) into `save_path`."""
        from lm_saes.run_dir import atomic_path

        folder = Path(save_path)
        self.cfg.save_hyperparameters(folder)
        path = folder / WEIGHTS_FILE
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], device: str | None = None, dtype: torch.dtype | None = None
    ) -> "SparseAutoEncoder":
        """Load a folder written by `save_pretrained` (a run directory). Safetensors only, never pickle."""
        cfg = SAEConfig.from_pretrained(path)
        updates = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
        sae = cls(cfg.model_copy(update=updates) if updates else cfg)
        sae.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE), device=sae.cfg.device), strict=True)
        return sae
