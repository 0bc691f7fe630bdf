"""Evaluator: how much of the model an SAE keeps, with the SAE spliced in where it was trained.

For each batch of held-out contexts, one clean forward gives the logits and the activations at the SAE's
hooks; the SAE's output x_hat is then spliced in at `hook_point_out` (for a transcoder, computed from
`hook_point_in`) and, separately, the activation there is ablated (zeros, or its mean). Only text
positions are replaced and scored: BOS, EOS and padding positions keep their clean activations (the SAE
never saw them in training) and count in no metric.

    ce_loss_score = (CE_ablated - CE_sae) / (CE_ablated - CE_clean)      1: lossless, 0: as bad as ablation
    kl_div_score  = (KL_ablated - KL_sae) / KL_ablated                  KL of each run from the clean one
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from lm_saes import metrics
from lm_saes.activation.packing import batch_contexts
from lm_saes.config_base import BaseConfig
from lm_saes.language_model import TransformerLensLanguageModel
from lm_saes.sae import SparseAutoEncoder
from lm_saes.metrics import DENSE_FREQUENCY

DOWNSTREAM_KEYS = (
    "ce_loss_score", "ce_loss_clean", "ce_loss_sae", "ce_loss_ablated", "kl_div_score", "kl_div_sae", "kl_div_ablated",
)


class EvaluatorConfig(BaseConfig):
    n_contexts: int = Field(32, gt=0)
    """Held-out contexts to evaluate (each `context_size` tokens: 32 x 256 is ~8K tokens, ~1 min on 2 CPU cores)."""
    context_size: int | None = Field(None, ge=2)
    """Tokens per context; None means the run's activation_factory.context_size."""
    skip_tokens: int | None = Field(None, ge=0)
    """Text tokens to skip at the start of the corpus before the held-out contexts. None: on the run's own
    dataset, everything training could have read (see `lm_saes.runners.held_out.tokens_read_by_training`); on another dataset, 0."""
    ablation: Literal["zero", "mean"] = "zero"
    """What replaces the activation for CE_ablated/KL_ablated: zeros, or its mean over the evaluated text positions."""
    model_batch_size: int = Field(4, gt=0)
    """Contexts per forward pass; each holds three (B, T, vocab) float32 logits tensors at once."""


@dataclass
class EvalResult:
    """Scalar metrics (see README "Evaluate" for each key), the firing histogram, and what was evaluated."""

    metrics: dict[str, float | int | None]
    histogram: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    def downstream(self) -> dict[str, float | None]:
        return {k: self.metrics[k] for k in DOWNSTREAM_KEYS}  # type: ignore[misc]

    def to_json(self) -> dict[str, Any]:
        return {**self.metrics, "firing_frequency_histogram": self.histogram, **self.info}


class Evaluator:
    def __init__(self, cfg: EvaluatorConfig) -> None:
        self.cfg = cfg

    def evaluate(
        self, sae: SparseAutoEncoder, model: TransformerLensLanguageModel, contexts: Sequence[torch.Tensor]
    ) -> EvalResult:
        """Evaluate `sae` on `contexts` ((T,) token tensors, e.g. from `lm_saes.runners.held_out.held_out_contexts`).

        The SAE runs in inference mode (a BatchTopK SAE as its per-token JumpReLU), whatever mode it was in.
        """
        with sae.inference():
            return self._evaluate(sae, model, contexts)

    @torch.no_grad()
    def _evaluate(
        self, sae: SparseAutoEncoder, model: TransformerLensLanguageModel, contexts: Sequence[torch.Tensor]
    ) -> EvalResult:
        if not contexts:
            raise ValueError("no contexts to evaluate")
        hook_in, hook_out = sae.cfg.hook_point_in, sae.cfg.hook_point_target
        hooks = list(dict.fromkeys([hook_in, hook_out]))
        fill_D = self._ablation_fill(model, contexts, hook_out, sae.cfg.d_model or model.d_model)
        recon = metrics.ReconstructionStats()
        fired_S = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
        sums = {"l0": 0.0, "l1": 0.0, "ce_clean": 0.0, "ce_sae": 0.0, "ce_ablated": 0.0, "kl_sae": 0.0, "kl_ablated": 0.0}
        n_tokens = n_predictions = 0
        for tokens_BT in batch_contexts(contexts, self.cfg.model_batch_size):
            logits_clean_BTV, clean = model.run_with_capture(tokens_BT, hooks)
            mask_BT = clean.mask_BT
            x_out_BTD = clean.activations[hook_out]
            x_in_ND = clean.activations[hook_in][mask_BT].to(sae.cfg.device, sae.cfg.dtype)
            latents_NS = sae.encode(x_in_ND)
            x_hat_ND = sae.decode(latents_NS).to(x_out_BTD.device, x_out_BTD.dtype)

            n = len(x_in_ND)
            n_tokens += n
            recon.add(x_out_BTD[mask_BT], x_hat_ND)
            sums["l0"] += metrics.l0(latents_NS).item() * n
            sums["l1"] += latents_NS.float().abs().sum().item()
            fired_S += metrics.firing_counts(latents_NS).cpu()

            spliced_BTD = x_out_BTD.clone()
            spliced_BTD[mask_BT] = x_hat_ND
            ablated_BTD = x_out_BTD.clone()
            ablated_BTD[mask_BT] = fill_D.to(x_out_BTD.device, x_out_BTD.dtype)
            # Positions t predicting token t+1: t must be text (the last position has no next token).
            pred_mask_BT = mask_BT[:, :-1]
            n_predictions += int(pred_mask_BT.sum())
            sums["ce_clean"] += metrics.next_token_ce(logits_clean_BTV, clean.tokens_BT)[pred_mask_BT].sum().item()
            for name, acts_BTD in (("sae", spliced_BTD), ("ablated", ablated_BTD)):
                logits_BTV = model.run_with_replacement(clean.tokens_BT, hook_out, acts_BTD)
                sums[f"ce_{name}"] += metrics.next_token_ce(logits_BTV, clean.tokens_BT)[pred_mask_BT].sum().item()
                kl_BT = metrics.kl_divergence(logits_clean_BTV[:, :-1], logits_BTV[:, :-1])
                sums[f"kl_{name}"] += kl_BT[pred_mask_BT].sum().item()
                del logits_BTV
            del logits_clean_BTV
        if n_tokens == 0 or n_predictions == 0:
            raise ValueError("the contexts hold no text tokens to evaluate")
        return self._result(recon, sums, fired_S, n_tokens, n_predictions, len(contexts), sae)

    def _ablation_fill(
        self, model: TransformerLensLanguageModel, contexts: Sequence[torch.Tensor], hook: str, d_model: int
    ) -> torch.Tensor:
        """(d_model,) what ablation writes: zeros, or the mean activation over all evaluated text positions."""
        if self.cfg.ablation == "zero":
            return torch.zeros(d_model)
        total_D, count = torch.zeros(d_model, dtype=torch.float64), 0
        for tokens_BT in batch_contexts(contexts, self.cfg.model_batch_size):
            out = model.run_hooks(tokens_BT, [hook])  # stops after the hook's block: cheaper than a full pass
            acts_ND = out.activations[hook][out.mask_BT]
            total_D += acts_ND.double().sum(dim=0).cpu()
            count += len(acts_ND)
        return (total_D / max(count, 1)).float()

    def _result(
        self, recon: metrics.ReconstructionStats, sums: dict[str, float], fired_S: torch.Tensor, n_tokens: int,
        n_predictions: int, n_contexts: int, sae: SparseAutoEncoder,
    ) -> EvalResult:
        ce = {k: sums[f"ce_{k}"] / n_predictions for k in ("clean", "sae", "ablated")}
        kl = {k: sums[f"kl_{k}"] / n_predictions for k in ("sae", "ablated")}
        d_sae = len(fired_S)
        n_dead = int((fired_S == 0).sum())
        n_dense = int((fired_S > DENSE_FREQUENCY * n_tokens).sum())
        values: dict[str, float | int | None] = {
            **recon.summary(),
            "l0": sums["l0"] / n_tokens,
            "l1": sums["l1"] / n_tokens,
            "dead_fraction": n_dead / d_sae,
            "dense_fraction": n_dense / d_sae,
            "n_dead": n_dead,
            "n_dense": n_dense,
            "ce_loss_score": metrics.recovered_fraction(ce["ablated"], ce["sae"], ce["clean"]),
            "ce_loss_clean": ce["clean"],
            "ce_loss_sae": ce["sae"],
            "ce_loss_ablated": ce["ablated"],
            "kl_div_score": metrics.recovered_fraction(kl["ablated"], kl["sae"], 0.0),
            "kl_div_sae": kl["sae"],
            "kl_div_ablated": kl["ablated"],
        }
        bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite evaluation metrics {bad}: {values}")
        info = {
            "n_tokens": n_tokens, "n_prediction_positions": n_predictions, "n_contexts": n_contexts,
            "ablation": self.cfg.ablation, "hook_point_in": sae.cfg.hook_point_in,
            "hook_point_out": sae.cfg.hook_point_target, "d_sae": d_sae,
        }
        return EvalResult(values, metrics.firing_frequency_histogram(fired_S, n_tokens), info)
