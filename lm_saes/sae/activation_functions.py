"""Activation functions, one registry keyed by `SAEConfig.act_fn`.

Each one maps pre-activations to latents and declares what the SAE and the trainer ask of it (its sparsity
penalty, the most latents it selects, a sparse training path, parameters with a learning rate of their own),
so that adding a variant changes neither the model nor the trainer:

| act_fn    | latents                                   | sparsity penalty (x trainer.l1_coefficient) |
|-----------|-------------------------------------------|---------------------------------------------|
| relu      | relu(pre)                                 | sum_i f_i ||W_D[i]||  (decoder-norm-weighted L1) |
| topk      | the k largest relu(pre) per token         | none (AuxK on dead latents, see sae/model.py) |
| batchtopk | training: the k*batch largest over the batch; inference: pre where pre > learned threshold | none (AuxK) |
| jumprelu  | pre where pre > exp(log_threshold_i)      | tanh(c f_i ||W_D[i]||) or the L0 count, via a straight-through estimator |
| matryoshka_batchtopk | batchtopk; every nested prefix of the dictionary reconstructs too | none (AuxK) |
| gated     | 1[x W_E + b_gate > 0] relu(exp(r_mag) x W_E + b_mag) | sum_i relu(gate_i) ||W_D[i]||, plus the gate's reconstruction through a detached decoder |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lm_saes.sae.act_base import ActivationFunction
from lm_saes.sae.gated import Gated
from lm_saes.sae.jumprelu import JumpReLU
from lm_saes.sae.topk import BatchTopK, MatryoshkaBatchTopK, TopK

if TYPE_CHECKING:
    from lm_saes.sae.config import SAEConfig

__all__ = ["ACTIVATION_FUNCTIONS", "ActivationFunction", "build_activation_function"]


class ReLU(ActivationFunction):
    selects_sparse = True
    l1_of_latents = True

    def forward(self, pre_BS: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre_BS)

    def sparsity_loss(self, pre_BS: torch.Tensor, latents_BS: torch.Tensor, decoder_norms_S: torch.Tensor) -> torch.Tensor:
        return (latents_BS * decoder_norms_S).sum(dim=-1).mean()

    def activate_in_place(self, pre_BS: torch.Tensor) -> torch.Tensor:
        return torch.relu_(pre_BS)  # no method of relu's reads pre itself

    def sparse_cut(self) -> torch.Tensor:
        return torch.zeros(())  # a 0-dim CPU tensor: compared with a tensor on any device as a scalar

    def sparse_latents(self, pre_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre_N)

    def sparse_sparsity_loss(self, pre_N: torch.Tensor, values_N: torch.Tensor, cols_N: torch.Tensor,
                             decoder_norms_S: torch.Tensor, batch: int) -> torch.Tensor:
        return (values_N * decoder_norms_S[cols_N]).sum() / batch


ACTIVATION_FUNCTIONS: dict[str, type[ActivationFunction]] = {
    "relu": ReLU,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
    "matryoshka_batchtopk": MatryoshkaBatchTopK,
    "gated": Gated,
}


def build_activation_function(cfg: "SAEConfig") -> ActivationFunction:
    return ACTIVATION_FUNCTIONS[cfg.act_fn](cfg)
