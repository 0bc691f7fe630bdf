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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lm_saes import distributed
from lm_saes.sae.sparse_topk import sparse_topk_encode

if TYPE_CHECKING:
    from lm_saes.sae.config import SAEConfig


class ActivationFunction(nn.Module):
    """(batch, d_sae) pre-activations -> (batch, d_sae) latents; plus the variant's sparsity penalty."""

    uses_aux_k = False
    """Whether dead latents are trained on the residual (AuxK; TopK-style variants)."""

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__()
        self.cfg = cfg

    def sparsity_loss(self, pre_BS: torch.Tensor, latents_BS: torch.Tensor, decoder_norms_S: torch.Tensor) -> torch.Tensor:
        return pre_BS.new_zeros(())

    def set_progress(self, fraction: float) -> None:
        """Told the fraction of training done before each step (for schedules such as k annealing)."""

    @classmethod
    def max_k(cls, cfg: "SAEConfig") -> int | None:
        """The most latents per token it ever selects (sae.top_k, checked against d_sae when the SAE is built);
        None when it selects no fixed number."""
        return None

    def sparse_encode(
        self, x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The training path that never forms the dense latents: (values, indices), each (batch, k), of the
        selected latents, with no sparsity penalty. None (the default): train on the dense latents."""
        return None

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Adam parameter groups for those of its parameters that learn at a rate of their own (its other
        parameters, and the SAE's, learn at `lr`)."""
        return []


class ReLU(ActivationFunction):
    def forward(self, pre_BS: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre_BS)

    def sparsity_loss(self, pre_BS: torch.Tensor, latents_BS: torch.Tensor, decoder_norms_S: torch.Tensor) -> torch.Tensor:
        return (latents_BS * decoder_norms_S).sum(dim=-1).mean()


class TopK(ActivationFunction):
    """Keep the k largest pre-activations per token (then ReLU). k may anneal from top_k_initial to top_k."""

    uses_aux_k = True

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__(cfg)
        self.k = cfg.top_k_initial or cfg.top_k

    def set_progress(self, fraction: float) -> None:
        start, end, span = self.cfg.top_k_initial, self.cfg.top_k, self.cfg.top_k_anneal_fraction
        if start is None or span <= 0:
            self.k = end
        else:
            t = min(fraction / span, 1.0)
            self.k = round(start + (end - start) * t)

    @classmethod
    def max_k(cls, cfg: "SAEConfig") -> int | None:
        return max(cfg.top_k, cfg.top_k_initial or 0)

    def sparse_encode(
        self, x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return sparse_topk_encode(x_BD, W_E_DS, b_E_S, self.k) if self.cfg.sparse_topk else None

    def select(self, pre_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each (batch, k): the kept latents, values after ReLU."""
        values_BK, indices_BK = pre_BS.topk(min(self.k, pre_BS.shape[-1]), dim=-1, sorted=False)
        return torch.relu(values_BK), indices_BK

    def forward(self, pre_BS: torch.Tensor) -> torch.Tensor:
        values_BK, indices_BK = self.select(pre_BS)
        return torch.zeros_like(pre_BS).scatter(-1, indices_BK, values_BK)


class BatchTopK(TopK):
    """Training: keep the k*batch largest pre-activations of the whole batch, so tokens share a budget.

    The smallest kept value is tracked (an exponential moving average) as a single threshold; at inference
    (eval mode) the SAE is per-token: a JumpReLU with that threshold for every latent.
    """

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=cfg.dtype, device=cfg.device))
        self.register_buffer("threshold_initialized", torch.zeros((), dtype=torch.bool, device=cfg.device))

    def sparse_encode(
        self, x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None  # tokens share the batch's budget: there is no per-token k to select

    def forward(self, pre_BS: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return pre_BS * (pre_BS > self.threshold)
        relu_BS = torch.relu(pre_BS)
        flat = relu_BS.flatten()
        n_keep = min(self.k * pre_BS.shape[0], flat.numel())
        values, indices = flat.topk(n_keep, sorted=False)
        latents_BS = torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_BS)
        if not torch.is_grad_enabled():  # a look without training (e.g. the initializer's search): no update
            return latents_BS
        with torch.no_grad():
            positive = values[values > 0]
            # Data-parallel ranks each see their own batch: they move the threshold by the mean of their
            # smallest kept values, so that it stays the same on every rank (a no-op in a single process).
            local = torch.stack([positive.min() if positive.numel() else positive.new_zeros(()),
                                 positive.new_tensor(float(positive.numel() > 0))])
            smallest_sum, n_ranks = distributed.all_reduce_sum(local)
            if n_ranks > 0:
                smallest = smallest_sum / n_ranks
                if bool(self.threshold_initialized):
                    self.threshold.lerp_(smallest, self.cfg.batchtopk_threshold_momentum)
                else:
                    self.threshold.copy_(smallest)
                    self.threshold_initialized.fill_(True)
        return latents_BS


def _save_for_kernel(ctx: Any, pre_BS: torch.Tensor, threshold_S: torch.Tensor, bandwidth: float) -> None:
    ctx.save_for_backward(pre_BS, threshold_S)
    ctx.bandwidth = bandwidth


def _rectangle_kernel(ctx: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre, theta, kernel): the straight-through estimate of the Dirac delta at the threshold, 1/eps where
    |pre - theta| < eps/2 and 0 elsewhere (eps the bandwidth); d/dtheta of both functions below goes through it."""
    pre_BS, threshold_S = ctx.saved_tensors
    eps = ctx.bandwidth
    return pre_BS, threshold_S, ((pre_BS - threshold_S).abs() < eps / 2).to(dtype) / eps


class _JumpReLUFunction(torch.autograd.Function):
    """pre * H(pre - theta); d/dtheta through the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre_BS: torch.Tensor, threshold_S: torch.Tensor, bandwidth: float) -> torch.Tensor:  # type: ignore[override]
        _save_for_kernel(ctx, pre_BS, threshold_S, bandwidth)
        return pre_BS * (pre_BS > threshold_S)

    @staticmethod
    def backward(ctx, grad_BS: torch.Tensor):  # type: ignore[override]
        pre_BS, threshold_S, kernel_BS = _rectangle_kernel(ctx, grad_BS.dtype)
        grad_pre = grad_BS * (pre_BS > threshold_S)
        return grad_pre, (-threshold_S * kernel_BS * grad_BS).sum(dim=0), None


class _StepFunction(torch.autograd.Function):
    """H(pre - theta), for the L0 penalty; d/dtheta through the same kernel."""

    @staticmethod
    def forward(ctx, pre_BS: torch.Tensor, threshold_S: torch.Tensor, bandwidth: float) -> torch.Tensor:  # type: ignore[override]
        _save_for_kernel(ctx, pre_BS, threshold_S, bandwidth)
        return (pre_BS > threshold_S).to(pre_BS.dtype)

    @staticmethod
    def backward(ctx, grad_BS: torch.Tensor):  # type: ignore[override]
        _, _, kernel_BS = _rectangle_kernel(ctx, grad_BS.dtype)
        return None, (-kernel_BS * grad_BS).sum(dim=0), None


class JumpReLU(ActivationFunction):
    """A learned per-latent threshold, stored as its log (Rajamanoharan et al., 2024)."""

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__(cfg)
        init = torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold), dtype=cfg.dtype, device=cfg.device)
        self.log_threshold = nn.Parameter(init)

    @property
    def threshold_S(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def forward(self, pre_BS: torch.Tensor) -> torch.Tensor:
        return _JumpReLUFunction.apply(pre_BS, self.threshold_S, self.cfg.jumprelu_bandwidth)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.log_threshold], "lr": lr * self.cfg.jumprelu_lr_factor}]

    def sparsity_loss(self, pre_BS: torch.Tensor, latents_BS: torch.Tensor, decoder_norms_S: torch.Tensor) -> torch.Tensor:
        if self.cfg.jumprelu_sparsity == "l0":
            return _StepFunction.apply(pre_BS, self.threshold_S, self.cfg.jumprelu_bandwidth).sum(dim=-1).mean()
        c = self.cfg.jumprelu_tanh_scale
        return torch.tanh(c * latents_BS * decoder_norms_S).sum(dim=-1).mean()


ACTIVATION_FUNCTIONS: dict[str, type[ActivationFunction]] = {
    "relu": ReLU,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
}


def build_activation_function(cfg: "SAEConfig") -> ActivationFunction:
    return ACTIVATION_FUNCTIONS[cfg.act_fn](cfg)
