"""The TopK family: TopK (Gao et al., 2024), BatchTopK (Bussmann et al., 2024) and Matryoshka BatchTopK
(Bussmann et al., 2025; Nabeshima, 2024)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lm_saes import distributed, metrics
from lm_saes.errors import UserInputError
from lm_saes.sae.act_base import ActivationFunction
from lm_saes.sae.sparse_step import Entries
from lm_saes.sae.sparse_topk import row_topk

if TYPE_CHECKING:
    from lm_saes.sae.config import SAEConfig


def _forget_host_k(module: TopK, incompatible_keys: object) -> None:
    module._k = None  # the loaded buffer holds the k now


class TopK(ActivationFunction):
    """Keep the k largest pre-activations per token (then ReLU). k may anneal from top_k_initial to top_k.

    The k in use is a buffer, so a saved or checkpointed SAE encodes with the k of its last step.
    """

    uses_aux_k = True
    unit_decoder = True

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__(cfg)
        self.register_buffer("k_current", torch.tensor(cfg.top_k_initial or cfg.top_k, device=cfg.device))
        self._k: int | None = None
        """k_current as the last `set_progress` set it, kept on the host: reading the buffer is a host sync on a
        GPU, once or twice a step. None before the first step and after a state dict is loaded."""
        self.register_load_state_dict_post_hook(_forget_host_k)

    @property
    def k(self) -> int:
        return self._k if self._k is not None else int(self.k_current)

    def set_progress(self, step: int, total_steps: int) -> None:
        start, end, span = self.cfg.top_k_initial, self.cfg.top_k, self.cfg.top_k_anneal_fraction
        if start is None or span <= 0:
            self._k = end
        else:
            t = min(step / total_steps / span, 1.0)
            self._k = round(start + (end - start) * t)
        self.k_current.fill_(self._k)

    @classmethod
    def max_k(cls, cfg: "SAEConfig") -> int | None:
        return max(cfg.top_k, cfg.top_k_initial or 0)

    selects_sparse = True

    def sparse_step_on(self) -> bool:
        return self.cfg.sparse_topk  # every step, whatever sae.sparse_max_density: k of d_sae is always sparse

    def sparse_select(self, pre_BS: torch.Tensor, max_density: float) -> Entries | None:
        values_BK, indices_BK = row_topk(pre_BS, self.k)
        batch, k = values_BK.shape
        rows_N = torch.arange(batch, device=pre_BS.device).repeat_interleave(k)
        return Entries(rows_N, indices_BK.flatten(), values_BK.flatten())

    def sparse_latents(self, pre_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre_N)

    def select(self, pre_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each (batch, k): the kept latents, values after ReLU."""
        values_BK, indices_BK = pre_BS.topk(min(self.k, pre_BS.shape[-1]), dim=-1, sorted=False)
        return torch.relu(values_BK), indices_BK

    def forward(self, pre_BS: torch.Tensor) -> torch.Tensor:
        values_BK, indices_BK = self.select(pre_BS)
        return torch.zeros_like(pre_BS).scatter(-1, indices_BK, values_BK)


class BatchTopK(TopK):
    """Training: keep the k*batch largest pre-activations of the whole batch, so tokens share a budget.

    At inference (eval mode) the SAE is per-token: a JumpReLU with one threshold for every latent, the
    smallest kept value of a training batch (the value that gives exactly k per token on that batch). It is
    a moving average while the weights still move, and over the last `sae.batchtopk_threshold_window` of
    training the plain mean of those batches' values, so it forgets the early steps.
    """

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=cfg.dtype, device=cfg.device))
        self.register_buffer("threshold_initialized", torch.zeros((), dtype=torch.bool, device=cfg.device))
        self._final_weight: float | None = None

    def set_progress(self, step: int, total_steps: int) -> None:
        super().set_progress(step, total_steps)
        final_start = total_steps - max(1, round(self.cfg.batchtopk_threshold_window * total_steps))
        self._final_weight = 1 / (step - final_start + 1) if step >= final_start else None

    def sparse_step_on(self) -> bool:
        return ActivationFunction.sparse_step_on(self)  # decided by sae.sparse_max_density, not sae.sparse_topk

    def sparse_select(self, pre_BS: torch.Tensor, max_density: float) -> Entries | None:
        if not self.training or self.k > max_density * pre_BS.shape[1]:
            return None
        return self._sparse_batch_topk(pre_BS, self.k)

    def forward(self, pre_BS: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return pre_BS * (pre_BS > self.threshold)
        return self.batch_select(pre_BS, self.k, learn_threshold=True)

    def batch_select(self, pre_BS: torch.Tensor, k: int, learn_threshold: bool = False) -> torch.Tensor:
        """The k*batch largest relu(pre) of the batch (dense); with `learn_threshold`, updates the threshold."""
        values, indices = self._batch_topk(pre_BS, k, learn_threshold)
        return torch.zeros_like(pre_BS).flatten().scatter(0, indices, values).view_as(pre_BS)

    def _sparse_batch_topk(self, pre_BS: torch.Tensor, k: int) -> Entries:
        """The entries, rows ascending, of the k*batch largest relu(pre), as `_batch_topk` selects them (the
        threshold learns from the same values).

        Candidates are each row's 4k largest; the batch's top k*batch among them are the batch's own unless some
        row kept a value no larger than its 4k-th (it may hold more above the cut than it offered): then, or
        when fewer than k*batch values are positive, the whole batch is searched. This costs about TopK's
        per-row selection (`row_topk`, by group maxima), not a comparison and a `nonzero` over every
        (batch, d_sae) entry.
        """
        batch, d_sae = pre_BS.shape
        n_keep = min(k * batch, pre_BS.numel())
        cand_BM, cols_BM = row_topk(pre_BS, min(4 * k, d_sae))
        values, picked = torch.relu(cand_BM).flatten().topk(n_keep, sorted=False)
        cut = values.min()
        # one host sync: whether the candidates hold the batch's own top k*batch
        if cand_BM.shape[1] == d_sae or bool((cut > 0) & (torch.relu(cand_BM.min(dim=-1).values) < cut).all()):
            if torch.is_grad_enabled():
                self._update_threshold(values.float())
            # the picked positions in row order: sorted, as a mask's `nonzero` would give them, whose size is a
            # host sync on a GPU (topk's indices are distinct, and there are n_keep of them)
            flat_N = picked.sort().values
            rows_N, slots_N = flat_N // cand_BM.shape[1], flat_N % cand_BM.shape[1]
            return Entries(rows_N, cols_BM[rows_N, slots_N], cand_BM[rows_N, slots_N])
        _, indices = self._batch_topk(pre_BS, k, learn_threshold=True)
        return Entries.from_flat(pre_BS, indices.sort().values)

    def _batch_topk(self, pre_BS: torch.Tensor, k: int, learn_threshold: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, flat indices) of the k*batch largest relu(pre); with `learn_threshold`, updates the threshold."""
        flat = torch.relu(pre_BS).flatten()
        values, indices = flat.topk(min(k * pre_BS.shape[0], flat.numel()), sorted=False)
        if learn_threshold and torch.is_grad_enabled():  # not on a look without training (the init search)
            self._update_threshold(values.detach().float())
        return values, indices

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        """Move the threshold toward the smallest positive kept value, on the device: no value is read back (a host
        sync on a GPU); a batch with no positive value leaves it as it was."""
        positive = kept > 0
        has_positive = positive.any()
        # Data-parallel ranks each see their own batch: they move the threshold by the mean of their
        # smallest kept values, so that it stays the same on every rank (a no-op in a single process).
        local = torch.stack([torch.where(positive, kept, kept.new_full((), float("inf"))).min()
                             .where(has_positive, kept.new_zeros(())), has_positive.to(kept.dtype)])
        smallest_sum, n_ranks = distributed.all_reduce_sum(local)
        smallest = (smallest_sum / n_ranks.clamp_min(1)).to(self.threshold.dtype)
        weight = self._final_weight if self._final_weight is not None else self.cfg.batchtopk_threshold_momentum
        moved = torch.where(self.threshold_initialized, torch.lerp(self.threshold, smallest, weight), smallest)
        self.threshold.copy_(torch.where(n_ranks > 0, moved, self.threshold))
        self.threshold_initialized.logical_or_(n_ranks > 0)


class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK whose nested prefixes of the dictionary (`sae.matryoshka_prefixes`) each reconstruct the input.

    As in Bussmann et al. (2025): one BatchTopK selection over the whole dictionary; prefix m reconstructs from
    the selected latents among its first m. Selecting k latents per prefix separately starves the later latents
    instead (most die: mean max cosine 0.88 on the planted features, 70% dead). The loss weighs each prefix's
    squared error (`sae.matryoshka_prefix_weights`), by default in proportion to its size: with the paper's
    equal weights every term rewards the first latents, and on the built-in corpus the SAE ends with twice the
    dense latents of a plain BatchTopK one (tests/test_embedded_training.py).
    """

    selects_sparse = False  # every prefix reconstructs from the dense latents

    def __init__(self, cfg: "SAEConfig") -> None:
        super().__init__(cfg)
        # Fixed by the config: worked out (and a mismatch refused) when the SAE is built, not at every step.
        d_sae = cfg.d_sae
        sizes = {round(p * d_sae) if p < 1 else int(p) for p in cfg.matryoshka_prefixes or []}
        self._sizes = sorted({min(max(s, 1), d_sae) for s in sizes} | {d_sae})
        weights = cfg.matryoshka_prefix_weights or self._sizes
        if len(weights) != len(self._sizes):
            raise UserInputError("sae.matryoshka_prefixes", cfg.matryoshka_prefixes, "distinct prefix sizes, one per "
                                 f"sae.matryoshka_prefix_weights (they give {self._sizes})")
        self._weights = [w / sum(weights) for w in weights]

    def prefix_sizes(self) -> list[int]:
        return self._sizes

    def prefix_weights(self) -> list[float]:
        """Each prefix's weight in the loss, in prefix_sizes() order, summing to 1."""
        return self._weights

    def reconstruction_loss(self, pre_BS: torch.Tensor, latents_BS: torch.Tensor, W_D_SD: torch.Tensor,
                            b_D_D: torch.Tensor, target_BD: torch.Tensor) -> torch.Tensor | None:
        loss, reconstruction_BD, start = 0.0, b_D_D.expand_as(target_BD), 0
        for m, weight in zip(self.prefix_sizes(), self.prefix_weights()):  # each group adds to the prefix before
            reconstruction_BD = reconstruction_BD + latents_BS[:, start:m] @ W_D_SD[start:m]
            loss = loss + weight * metrics.mse(target_BD, reconstruction_BD)
            start = m
        return loss
