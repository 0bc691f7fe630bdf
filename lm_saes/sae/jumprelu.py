"""JumpReLU (Rajamanoharan et al., 2024): a learned per-latent threshold trained through straight-through
estimators with a rectangle kernel."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lm_saes.sae.act_base import ActivationFunction

if TYPE_CHECKING:
    from lm_saes.sae.config import SAEConfig


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
        # sum_to_size: a (batch, d_sae) gradient sums over the batch; a sparse step's gathered (N,) one stays
        return grad_pre, (-threshold_S * kernel_BS * grad_BS).sum_to_size(threshold_S.shape), None


class _StepFunction(torch.autograd.Function):
    """H(pre - theta), for the L0 penalty; d/dtheta through the same kernel."""

    @staticmethod
    def forward(ctx, pre_BS: torch.Tensor, threshold_S: torch.Tensor, bandwidth: float) -> torch.Tensor:  # type: ignore[override]
        _save_for_kernel(ctx, pre_BS, threshold_S, bandwidth)
        return (pre_BS > threshold_S).to(pre_BS.dtype)

    @staticmethod
    def backward(ctx, grad_BS: torch.Tensor):  # type: ignore[override]
        _, threshold_S, kernel_BS = _rectangle_kernel(ctx, grad_BS.dtype)
        return None, (-kernel_BS * grad_BS).sum_to_size(threshold_S.shape), None


class JumpReLU(ActivationFunction):
    """A learned per-latent threshold, stored as its log.

    The paper states its initial threshold and bandwidth for inputs of unit mean squared norm; ours have mean
    norm sqrt(d_model), so both are taken in the paper's units and multiplied by sqrt(d_model) here.
    """

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__(cfg)
        assert cfg.d_model is not None
        self.scale = math.sqrt(cfg.d_model)
        init = math.log(cfg.jumprelu_init_threshold * self.scale)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), init, dtype=cfg.dtype, device=cfg.device))

    @property
    def threshold_S(self) -> torch.Tensor:
        return self.log_threshold.exp()

    @property
    def bandwidth(self) -> float:
        return self.cfg.jumprelu_bandwidth * self.scale

    selects_sparse = True

    def forward(self, pre_BS: torch.Tensor) -> torch.Tensor:
        return _JumpReLUFunction.apply(pre_BS, self.threshold_S, self.bandwidth)

    def sparse_cut(self) -> torch.Tensor:
        # The firing latents and those within the kernel's window below the threshold, whose gradient moves it.
        # The bound sits a thousandth of the window lower than theta - eps/2, far beyond the rounding of the
        # kernel's pre - theta, so no entry the kernel counts is missed (an extra one adds zero to everything).
        with torch.no_grad():
            return self.threshold_S - self.bandwidth * 0.501

    def sparse_firing(self, pre_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
        # The window below the threshold is most of the selection (at 8x, batch 4,096, ~400 entries per row
        # against ~50 firing); the same comparison as the forward's, so the products read exactly its non-zeros.
        with torch.no_grad():
            return (pre_N > self.threshold_S[cols_N]).nonzero().squeeze(1)

    def sparse_latents(self, pre_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
        return _JumpReLUFunction.apply(pre_N, self.threshold_S[cols_N], self.bandwidth)

    def sparse_sparsity_loss(self, pre_N: torch.Tensor, values_N: torch.Tensor, cols_N: torch.Tensor,
                             decoder_norms_S: torch.Tensor, batch: int) -> torch.Tensor:
        return self._penalty(pre_N, values_N, self.threshold_S[cols_N], decoder_norms_S[cols_N]).sum() / batch

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.log_threshold], "lr": lr * self.cfg.jumprelu_lr_factor}]

    def sparsity_loss(self, pre_BS: torch.Tensor, latents_BS: torch.Tensor, decoder_norms_S: torch.Tensor) -> torch.Tensor:
        return self._penalty(pre_BS, latents_BS, self.threshold_S, decoder_norms_S).sum(dim=-1).mean()

    def _penalty(self, pre: torch.Tensor, latents: torch.Tensor, threshold: torch.Tensor,
                 decoder_norms: torch.Tensor) -> torch.Tensor:
        """Each entry's penalty, dense (batch, d_sae) or at a sparse step's entries (N,): the L0 step through the
        kernel, or tanh(c f ||W_D||)."""
        if self.cfg.jumprelu_sparsity == "l0":
            return _StepFunction.apply(pre, threshold, self.bandwidth)
        return torch.tanh(self.cfg.jumprelu_tanh_scale * latents * decoder_norms)
