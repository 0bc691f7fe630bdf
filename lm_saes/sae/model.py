"""SparseAutoEncoder: encode, decode, the training loss, folding the normalisation, and saving."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lm_saes import metrics
from lm_saes.errors import UserInputError
from lm_saes.sae.activation_functions import ACTIVATION_FUNCTIONS, ActivationFunction, build_activation_function
from lm_saes.sae.config import CONFIG_FILE, SAEConfig
from lm_saes.sae.sparse_step import (
    SparseLatents,
    dense_pre,
    pre_activations_once,
    recycle,
    row_norms,
    select_above_cut,
    sparse_pre,
)
from lm_saes.sae.sparse_topk import sparse_decode

if TYPE_CHECKING:
    from lm_saes.interop.saelens import SAELensMetadata

WEIGHTS_FILE = "sae_weights.safetensors"


class SAELoss(NamedTuple):
    loss: torch.Tensor
    """What is minimised (scalar): see `SparseAutoEncoder.compute_loss`."""
    mse: torch.Tensor
    """Mean over the batch of the squared error summed over d_model, in normalised units (scalar): the logged
    `mse`. Divided by the target's variance per token it is the reference's normalised MSE (1 - EV)."""
    sparsity: torch.Tensor
    """The variant's sparsity penalty before its coefficient (scalar; 0 for topk/batchtopk)."""
    aux_k: torch.Tensor
    """The normalised AuxK loss, the logged `aux_k_loss` (scalar; 1 explains nothing of the residual; 0 when no
    latent is dead or the variant has none)."""
    target_BD: torch.Tensor
    """The normalised activation the SAE reconstructs."""
    reconstruction_BD: torch.Tensor
    """The normalised reconstruction."""
    latents_BS: torch.Tensor | None
    """Dense latents; None on a sparse step, which has only the selected ones:"""
    sparse: SparseLatents | None = None

    def l0(self) -> torch.Tensor:
        if self.latents_BS is not None:
            return metrics.l0(self.latents_BS)
        assert self.sparse is not None
        return (self.sparse.values_N != 0).sum() / len(self.sparse.offsets_B)

    def firing_counts(self, d_sae: int) -> torch.Tensor:
        if self.latents_BS is not None:
            return metrics.firing_counts(self.latents_BS)
        assert self.sparse is not None
        return self.sparse.firing_counts(d_sae)


ROW_CHUNK_BYTES = 1 << 19
"""The unit-norm decoder's passes take W_D (and its gradient) in chunks of rows of about this size on a CPU, so
each chunk is read from memory once and its later passes hit the cache; whole-matrix expressions also wrote
W_D-sized temporaries (three per step, 42 MB each at 32x, mapped afresh by glibc): 7.5 vs 38.6 ms at 32x and
1.7 vs 2.4 ms at 8x for the gradient's projection (2-core Xeon). One chunk on a GPU."""


def _row_chunks(W_SD: torch.Tensor) -> Iterator[slice]:
    rows = len(W_SD) if W_SD.device.type != "cpu" else max(1, ROW_CHUNK_BYTES // (W_SD.shape[1] * W_SD.element_size()))
    for start in range(0, len(W_SD), rows):
        yield slice(start, start + rows)


class SparseAutoEncoder(nn.Module):
    """x -> f = act(x W_E + b_E) -> x_hat = f W_D + b_D, on dataset-normalised activations.

    Inputs and outputs are raw activations. While training, the dataset-wise scale factors
    (`norm_factor_in/out`, making the mean activation norm sqrt(d_model)) are buffers applied inside;
    `save_pretrained` folds them into the weights, so a saved SAE is plain weights on raw activations.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_sae = cfg.d_sae  # raises if d_model was never resolved
        d_model = cfg.d_model
        max_k = ACTIVATION_FUNCTIONS[cfg.act_fn].max_k(cfg)
        if max_k is not None and max_k > d_sae:
            raise UserInputError("sae.top_k", max_k, f"must be at most d_sae ({d_sae})")
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
        self.activation_function: ActivationFunction = build_activation_function(cfg)
        self._last_step_sparse = False
        """Whether the last training step went sparse (sae/sparse_step.py: it then reuses a recycled buffer)."""

    # --- the math, on normalised activations ---
    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.activation_function.pre_activations(x_BD, self.W_E, self.b_E)

    def encode_normalized(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.activation_function(self.pre_activations(x_BD))

    def decode_normalized(self, latents_BS: torch.Tensor) -> torch.Tensor:
        return latents_BS @ self.W_D + self.b_D

    # --- the public face, on raw activations ---
    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.encode_normalized(x_BD * self.norm_factor_in)

    def decode(self, latents_BS: torch.Tensor) -> torch.Tensor:
        return self.decode_normalized(latents_BS) / self.norm_factor_out

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x_BD))

    @contextlib.contextmanager
    def inference(self) -> Iterator["SparseAutoEncoder"]:
        """Run as at inference (a BatchTopK SAE as its per-token JumpReLU), then restore the mode it was in."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def decoder_norms(self) -> torch.Tensor:
        return row_norms(self.W_D)

    # --- training ---
    @property
    def unit_decoder_norm(self) -> bool:
        """Whether decoder rows are held at unit norm while training (sae.unit_decoder_norm, else the variant's
        default)."""
        flag = self.cfg.unit_decoder_norm
        return self.activation_function.unit_decoder if flag is None else flag

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the component of W_D's gradient along each row, so a step moves rows around the sphere:
        g -= (<g, w> / |w|^2) w, in place, over chunks of rows (`_row_chunks`)."""
        if self.unit_decoder_norm and self.W_D.grad is not None:
            for rows in _row_chunks(self.W_D):
                w_RD, g_RD = self.W_D[rows], self.W_D.grad[rows]
                along_R1 = torch.linalg.vecdot(g_RD, w_RD).unsqueeze(1)
                g_RD.addcmul_(w_RD, along_R1.div_(torch.linalg.vecdot(w_RD, w_RD).clamp_min_(1e-24).unsqueeze(1)),
                              value=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Put decoder rows back on the unit sphere (Adam's step is not exactly tangent to it)."""
        if self.unit_decoder_norm:
            for rows in _row_chunks(self.W_D):
                w_RD = self.W_D[rows]
                w_RD.div_(torch.linalg.vector_norm(w_RD, dim=1, keepdim=True).clamp_min_(1e-12))

    def compute_loss(
        self,
        x_in_BD: torch.Tensor,
        x_out_BD: torch.Tensor,
        sparsity_coefficient: float,
        dead_S: torch.Tensor | None = None,
    ) -> SAELoss:
        """The training loss on raw activations `x_in` (read) and `x_out` (to reconstruct; == x_in for an SAE).

        loss = mse + sparsity_coefficient * sparsity + aux_k_coefficient * V * aux_k + the variant's auxiliary
        loss, with V the batch's target variance per token (summed over d_model, detached). For TopK this is V
        times the reference's loss (normalised MSE + aux_k_coefficient * normalised AuxK MSE), so AuxK has the
        reference's relative weight, while the other penalties keep their scale against the squared error.
        `dead_S` marks dead latents; variants with AuxK train them to model the residual.
        """
        target_BD = x_out_BD * self.norm_factor_out
        x_BD = x_in_BD * self.norm_factor_in
        af = self.activation_function
        latents_BS = None
        extra = x_BD.new_zeros(())
        sparse, sparsity, pre_BS, decoded_BD = self._training_encode(x_BD)
        if sparse is not None:
            reconstruction_BD = decoded_BD + self.b_D
        else:
            if pre_BS is None:
                pre_BS = af.pre_activations(x_BD, self.W_E, self.b_E)
                latents_BS = af(pre_BS)
            else:  # the switch's own pre-activations
                latents_BS = af.activate_in_place(pre_BS)
            if af.l1_of_latents:
                reconstruction_BD, sparsity = self._decode_with_l1(latents_BS)
            else:
                reconstruction_BD = self.decode_normalized(latents_BS)
                sparsity = af.sparsity_loss(pre_BS, latents_BS, self.decoder_norms())
            extra = af.auxiliary_loss(x_BD, pre_BS, self.W_D, self.b_D, target_BD)
        mse = metrics.mse(target_BD, reconstruction_BD)
        own = None if sparse is not None else af.reconstruction_loss(pre_BS, latents_BS, self.W_D, self.b_D, target_BD)
        aux = self._aux_k_loss(x_BD, target_BD, reconstruction_BD, dead_S)
        loss = (mse if own is None else own) + sparsity_coefficient * sparsity + extra
        if aux is None:  # no AuxK this step (the common case): no pass for the variance either
            aux = x_BD.new_zeros(())
        else:
            variance = target_BD.detach().float().var(dim=0, unbiased=False).sum()
            loss = loss + self.cfg.aux_k_coefficient * variance * aux
        return SAELoss(loss, mse, sparsity, aux, target_BD, reconstruction_BD, latents_BS, sparse)

    def _decode_with_l1(self, latents_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, mean_b sum_s f_bs ||W_D[s]||) from one product with [W_D | norms]."""
        out_BE = latents_BS @ torch.cat([self.W_D, self.decoder_norms().unsqueeze(1)], dim=1)
        return out_BE[:, :-1] + self.b_D, out_BE[:, -1].mean()

    def _training_encode(
        self, x_BD: torch.Tensor
    ) -> tuple[SparseLatents | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(latents, sparsity penalty, None, their decoding without b_D) for a sparse step; (None, None,
        pre-activations, None) for a dense one whose pre-activations were computed to decide; all None for the
        variant's plain dense path."""
        af = self.activation_function
        if not af.sparse_step_on():
            return None, None, None, None
        # a buffer recycled by a sparse step is taken when this SAE's last step went sparse too, so that a dense
        # SAE does not take it from a sparse one of the same width stepping in turn with it (a grouped sweep)
        reuse, max_density, cut_S = self._last_step_sparse, self.cfg.sparse_max_density, af.sparse_cut()
        if cut_S is None:
            pre_BS = pre_activations_once(x_BD, self.W_E, self.b_E, reuse=reuse)
            entries = af.sparse_select(pre_BS, max_density)
        else:
            entries, pre_BS = select_above_cut(x_BD, self.W_E, self.b_E, cut_S, max_density, reuse)
        self._last_step_sparse = entries is not None
        if entries is None:
            return None, None, dense_pre(x_BD, self.W_E, self.b_E, pre_BS), None
        recycle(pre_BS)  # the entries are copies: the next step may write over it
        firing_M = af.sparse_firing(entries.pre_N, entries.cols_N)
        pre_N, rows_N, cols_N, offsets_B, firing = sparse_pre(x_BD, self.W_E, self.b_E, entries, firing_M)
        latents = SparseLatents(af.sparse_latents(pre_N, cols_N), rows_N, cols_N, offsets_B, firing)
        decoded_BD, decoder_norms_S = latents.decode_with_norms(self.W_D)
        sparsity = af.sparse_sparsity_loss(pre_N, latents.values_N, cols_N, decoder_norms_S, x_BD.shape[0])
        return latents, sparsity, None, decoded_BD

    def _aux_k_loss(self, x_BD: torch.Tensor, target_BD: torch.Tensor, reconstruction_BD: torch.Tensor,
                    dead_S: torch.Tensor | None) -> torch.Tensor | None:
        """AuxK (Gao et al., 2024): the top aux_k dead latents reconstruct the residual the live ones left.

        Normalised by the residual's variance, so 1 means "explains nothing". Only the dead latents' columns
        of W_E are multiplied, so it costs little while few latents are dead. None: no AuxK on this step (the
        residual is not even formed).
        """
        if not self.activation_function.uses_aux_k or dead_S is None or self.cfg.aux_k == 0 or not dead_S.any():
            return None
        residual_BD = (target_BD - reconstruction_BD).detach()
        dead_idx_N = torch.nonzero(dead_S).squeeze(1)
        pre_BN = x_BD @ self.W_E[:, dead_idx_N] + self.b_E[dead_idx_N]
        values_BK, local_BK = pre_BN.topk(min(self.cfg.aux_k, len(dead_idx_N)), dim=-1, sorted=False)
        aux_BD = sparse_decode(values_BK.relu(), dead_idx_N[local_BK], self.W_D)
        total = (residual_BD - residual_BD.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        return (aux_BD - residual_BD).pow(2).sum() / total

    # --- folding and persistence ---
    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights with the normalisation folded in: W_E' = a W_E, W_D' = W_D / c, b_D' = b_D / c.

        Pre-activations are unchanged by this (x W_E' = (a x) W_E), so the JumpReLU and BatchTopK
        thresholds, which act on pre-activations, carry over as they are.
        """
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.cfg.activation_norm_folded:
            return state
        a, c = state["norm_factor_in"], state["norm_factor_out"]
        state["W_E"] = state["W_E"] * a
        state["W_D"] = state["W_D"] / c
        state["b_D"] = state["b_D"] / c
        state["norm_factor_in"] = torch.ones_like(a)
        state["norm_factor_out"] = torch.ones_like(c)
        return state

    def fold_activation_norm(self) -> None:
        """Fold the normalisation into the weights in place (once; a second fold is refused)."""
        if self.cfg.activation_norm_folded:
            raise ValueError("the activation normalisation is already folded into these weights")
        self.load_state_dict(self.folded_state_dict())
        self.cfg = self.cfg.model_copy(update={"activation_norm_folded": True})

    def save_pretrained(
        self,
        save_path: str | os.PathLike[str],
        format: Literal["lm_saes", "saelens"] = "lm_saes",
        metadata: "SAELensMetadata | None" = None,
    ) -> Path:
        """Write `sae_weights.safetensors` (normalisation folded in) and `config.json`, both atomically.

        `format="saelens"` writes SAELens's cfg.json instead (lm_saes/interop/saelens.py; `metadata`: the
        model, dataset and context size it records), or refuses an SAE that SAELens cannot express.
        The SAE in memory is left as it is (unfolded while training), so training can go on.
        """
        from lm_saes.run_dir import atomic_path

        if format == "saelens":
            from lm_saes.interop.saelens import save_saelens

            return save_saelens(self, save_path, metadata)
        if format != "lm_saes":
            raise UserInputError("format", format, "one of lm_saes, saelens")
        folder = Path(save_path)
        self.cfg.model_copy(update={"activation_norm_folded": True}).save_hyperparameters(folder)
        path = folder / WEIGHTS_FILE
        tensors = {k: v.contiguous() for k, v in self.folded_state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], device: str | None = None, dtype: torch.dtype | None = None,
        hook_point_in: str | None = None, hook_point_out: str | None = None,
    ) -> "SparseAutoEncoder":
        """Load an SAE folder, in eval mode; never pickle. `path` is a folder written by `save_pretrained` (a run
        directory), a SAELens folder (cfg.json + sae_weights.safetensors), a sparsify folder (cfg.json +
        sae.safetensors), or `hf://OWNER/REPO/PATH`, a folder of any of them on the hub. `hook_point_in/out`
        name the hooks of a foreign folder that does not record them."""
        from lm_saes.interop import foreign_format, read_foreign_sae, resolve_sae_path

        path = resolve_sae_path(path)
        if not (Path(path) / CONFIG_FILE).exists() and foreign_format(path):
            cfg, state, _ = read_foreign_sae(path, hook_point_in, hook_point_out)
        else:
            cfg, state = SAEConfig.from_pretrained(path), load_file(str(Path(path) / WEIGHTS_FILE))
        updates = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
        sae = cls(cfg.model_copy(update=updates) if updates else cfg)
        sae.load_state_dict(state, strict=True)  # copies into the SAE's own dtype and device
        return sae.eval()
