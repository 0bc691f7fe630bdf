"""The interface every activation function implements: what the SAE and the trainer ask of a variant."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lm_saes.sae.config import SAEConfig
    from lm_saes.sae.sparse_step import Entries


class ActivationFunction(nn.Module):
    """(batch, d_sae) pre-activations -> (batch, d_sae) latents; plus the variant's sparsity penalty."""

    uses_aux_k = False
    """Whether dead latents are trained on the residual (AuxK; TopK-style variants)."""
    unit_decoder = False
    """The variant's default for `sae.unit_decoder_norm`: decoder rows held at unit norm while training (the
    TopK family, whose selection a free decoder norm would skew)."""

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__()
        self.cfg = cfg

    def sparsity_loss(self, pre_BS: torch.Tensor, latents_BS: torch.Tensor, decoder_norms_S: torch.Tensor) -> torch.Tensor:
        return pre_BS.new_zeros(())

    def set_progress(self, step: int, total_steps: int) -> None:
        """Told the step about to run (from 0) of `total_steps` (for schedules such as k annealing)."""

    @classmethod
    def max_k(cls, cfg: "SAEConfig") -> int | None:
        """The most latents per token it ever selects (sae.top_k, checked against d_sae when the SAE is built);
        None when it selects no fixed number."""
        return None

    l1_of_latents = False
    """Whether `sparsity_loss` is the decoder-norm-weighted L1 of the latents, mean_b sum_s f_bs ||W_D[s]||
    (relu's): a dense step then takes it from the decoder's own product, as one more column of W_D, sparing
    the passes over the (batch, d_sae) latents that it costs on its own (two forward, three backward)."""
    selects_sparse = False
    """Whether it has the sparse step (`sparse_cut` or `sparse_select`, and the two methods after them;
    sae/sparse_step.py)."""

    def sparse_step_on(self) -> bool:
        """Whether training steps go through the sparse step's switch (`sparse_cut` or `sparse_select`; else the
        variant's plain dense path): by default while `sae.sparse_max_density` is above 0."""
        return self.selects_sparse and self.cfg.sparse_max_density > 0

    def sparse_cut(self) -> torch.Tensor | None:
        """For a variant whose sparse step needs exactly the entries where pre > a cut (a scalar, or one per
        latent): that cut (without autograd history). The step then selects from x W_E against cut - b_E, adding
        the bias only at the entries (`sparse_step.select_above_cut`). None: `sparse_select` picks the entries."""
        return None

    def sparse_select(self, pre_BS: torch.Tensor, max_density: float) -> "Entries | None":
        """For a variant without a `sparse_cut`: the entries of pre_BS (rows ascending) of the latents a sparse
        step needs: those that fire, and any that have a gradient without firing. None: step densely on this batch
        (more than `max_density` of its latents would be needed). Called once per training step, before
        `sparse_latents`."""
        return None

    def sparse_firing(self, pre_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor | None:
        """For a variant whose selection also holds entries that do not fire (selected for a gradient that is not
        the latents'): the positions of those that do, ascending, which are all that the step's products read
        (`sparse_step.Firing`). None: every selected entry fires (no `nonzero`, which is a host sync on a GPU)."""
        return None

    def sparse_latents(self, pre_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
        """The latents at the selected entries (latent `cols_N`), from their pre-activations, with the gradient
        the dense forward gives them."""
        raise NotImplementedError

    def sparse_sparsity_loss(self, pre_N: torch.Tensor, values_N: torch.Tensor, cols_N: torch.Tensor,
                             decoder_norms_S: torch.Tensor, batch: int) -> torch.Tensor:
        """`sparsity_loss` from the selected entries alone (the others add neither value nor gradient)."""
        return pre_N.new_zeros(())

    def activate_in_place(self, pre_BS: torch.Tensor) -> torch.Tensor:
        """The latents from pre-activations the caller owns and reads no more (the dense step's); a variant
        whose other methods never read pre may overwrite them, saving a (batch, d_sae) allocation."""
        return self(pre_BS)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Adam parameter groups for those of its parameters that learn at a rate of their own (its other
        parameters, and the SAE's, learn at `lr`)."""
        return []

    def reconstruction_loss(self, pre_BS: torch.Tensor, latents_BS: torch.Tensor, W_D_SD: torch.Tensor,
                            b_D_D: torch.Tensor, target_BD: torch.Tensor) -> torch.Tensor | None:
        """A variant's own reconstruction loss on the dense latents (e.g. Matryoshka's sum over nested
        prefixes); None (the default): the squared error of the full reconstruction."""
        return None

    def auxiliary_loss(self, x_BD: torch.Tensor, pre_BS: torch.Tensor, W_D_SD: torch.Tensor, b_D_D: torch.Tensor,
                       target_BD: torch.Tensor) -> torch.Tensor:
        """A variant's own auxiliary loss, added with weight 1 (e.g. the gated SAE's); 0 by default."""
        return pre_BS.new_zeros(())

    def pre_activations(self, x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor) -> torch.Tensor:
        """What the latents are computed from: x W_E + b_E, unless a variant keeps biases of its own."""
        return x_BD @ W_E_DS + b_E_S
