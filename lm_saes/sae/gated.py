"""The gated SAE (Rajamanoharan et al., 2024): a gate decides which latents fire, a magnitude path how much."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lm_saes import metrics
from lm_saes.sae.act_base import ActivationFunction

if TYPE_CHECKING:
    from lm_saes.sae.config import SAEConfig


class Gated(ActivationFunction):
    """f = 1[pi_gate > 0] * relu(pi_mag), pi_gate = x W_E + b_gate, pi_mag = exp(r_mag) * (x W_E) + b_mag.

    The two paths share W_E (rescaled per latent by exp(r_mag)), as in the paper. The gate has no gradient
    through the step; it learns from the sparsity penalty (the decoder-norm-weighted L1 of relu(pi_gate))
    and from the auxiliary loss, the squared error of relu(pi_gate) decoded by a detached decoder. The gate
    and magnitude biases live here, so the SAE's own b_E stays zero and unused. They and r_mag learn at
    `sae.gated_lr_factor` times the trainer's rate (see SAEConfig).
    """

    unit_decoder = True
    """As in the paper: decoder rows of unit norm, so the gate's L1 and its auxiliary reconstruction pin the
    gate's scale (with free norms, W_E shrinks under the penalty faster than r_mag can make up for it)."""

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__(cfg)
        kw = {"dtype": cfg.dtype, "device": cfg.device}
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, **kw))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.r_mag, self.b_gate, self.b_mag], "lr": lr * self.cfg.gated_lr_factor}]

    def pre_activations(self, x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor) -> torch.Tensor:
        return x_BD @ W_E_DS

    def gate(self, pre_BS: torch.Tensor) -> torch.Tensor:
        return pre_BS + self.b_gate

    def forward(self, pre_BS: torch.Tensor) -> torch.Tensor:
        magnitude_BS = torch.relu(self.r_mag.exp() * pre_BS + self.b_mag)
        return (self.gate(pre_BS) > 0) * magnitude_BS

    def sparsity_loss(self, pre_BS: torch.Tensor, latents_BS: torch.Tensor, decoder_norms_S: torch.Tensor) -> torch.Tensor:
        return (torch.relu(self.gate(pre_BS)) * decoder_norms_S).sum(dim=-1).mean()

    def auxiliary_loss(self, x_BD: torch.Tensor, pre_BS: torch.Tensor, W_D_SD: torch.Tensor, b_D_D: torch.Tensor,
                       target_BD: torch.Tensor) -> torch.Tensor:
        reconstruction_BD = torch.relu(self.gate(pre_BS)) @ W_D_SD.detach() + b_D_D.detach()
        return metrics.mse(target_BD, reconstruction_BD)
