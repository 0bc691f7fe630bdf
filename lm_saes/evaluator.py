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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from lm_saes import metrics
from lm_saes.activation.packing import batch_contexts, pack_documents
from lm_saes.config_base import BaseConfig
from lm_saes.datasets import DatasetConfig, load_dataset
from lm_saes.errors import UserInputError
from lm_saes.language_model import TransformerLensLanguageModel
from lm_saes.sae import SparseAutoEncoder
from lm_saes.trainer import DENSE_FREQUENCY

if TYPE_CHECKING:
    from lm_saes.runners.train import TrainSAESettings

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
    dataset, everything training could have read (see `tokens_read_by_training`); on another dataset, 0."""
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
        """Evaluate `sae` on `contexts` ((T,) token tensors, e.g. from `held_out_contexts`).

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


def held_out_contexts(
    texts: Iterable[str], model: TransformerLensLanguageModel, context_size: int, skip_tokens: int, n_contexts: int
) -> list[torch.Tensor]:
    """Pack `texts` exactly as training does, skip whole contexts until `skip_tokens` text tokens are passed,
    and return the next `n_contexts` (fewer if the corpus ends). Tokenizes the skipped part; runs no model."""
    special = torch.tensor(model.special_token_ids)
    contexts = pack_documents(texts, model.tokenizer, context_size)
    skipped = 0
    for context_T in contexts:
        if skipped >= skip_tokens:
            return [context_T] + [c for _, c in zip(range(n_contexts - 1), contexts)]
        skipped += int((~torch.isin(context_T, special)).sum())
    return []


def tokens_read_by_training(settings: TrainSAESettings, n_training_tokens: int | None = None, world_size: int = 1) -> int:
    """An upper bound on the text tokens a run's activation factory read from the start of its corpus.

    The trainer consumed `n_training_tokens` (default: the budget) plus the initializer's batches; beyond
    those, the shuffle buffer (or the re-batcher) held at most `buffer_size` (or one batch) unconsumed
    rows, and the forward pass in flight at most one chunk of model_batch_size contexts.
    With `world_size` data-parallel ranks, each holds its own buffer and forward chunk; since the ranks take
    turns at the chunks, one rank may be a chunk ahead of the others: one more chunk each is the margin.
    """
    factory = settings.activation_factory
    trained = settings.trainer.total_training_tokens if n_training_tokens is None else n_training_tokens
    initializer = settings.initializer.n_norm_estimation_batches * factory.batch_size
    held = factory.buffer_size if factory.buffer_size is not None else factory.batch_size // world_size
    chunk = factory.model_batch_size * factory.context_size
    return trained + initializer + world_size * (held + chunk) + (world_size - 1) * chunk


TRAINING_EVAL_CONTEXTS = 4
"""Held-out contexts for the evaluation during training: one forward batch, a few seconds on a CPU."""


@dataclass
class HeldOutPlan:
    """Where a run's held-out text is: `dataset`, past its first `skip_tokens` text tokens."""

    dataset: DatasetConfig
    skip_tokens: int
    context_size: int
    source_name: str | None
    """The run's dataset key, when the text is the run's own first dataset (not a cache's)."""


def held_out_plan(settings: TrainSAESettings, n_training_tokens: int | None = None, world_size: int = 1) -> HeldOutPlan:
    """The text a run (of `world_size` data-parallel ranks) never trained on: its first source's dataset past
    everything training could have read.
    For an activation cache, that is the dataset the cache was made from, past everything the cache holds of it
    (in the cache's context size)."""
    from lm_saes.activation.cache import read_manifest
    from lm_saes.activation.factory import ActivationFactoryActivationsSource

    factory = settings.activation_factory
    source = factory.sources[0]
    if isinstance(source, ActivationFactoryActivationsSource):
        manifest = read_manifest(source.path, "activation_factory.sources.0.path")
        first = manifest.sources[0]
        return HeldOutPlan(DatasetConfig.model_validate(first.dataset), first.rows, manifest.context_size, None)
    return HeldOutPlan(settings.datasets[source.name], tokens_read_by_training(settings, n_training_tokens, world_size),
                       factory.context_size, source.name)


def training_evaluation(
    settings: TrainSAESettings, model: TransformerLensLanguageModel, datasets: Mapping[str, Any], world_size: int = 1,
) -> Callable[[SparseAutoEncoder], dict[str, float | None]]:
    """The `evaluate` callable for `Trainer.fit`: downstream scores on a fixed batch of contexts that lie past
    everything the run (of `world_size` data-parallel ranks) will read from its first source (so never trained on)."""
    plan = held_out_plan(settings, world_size=world_size)
    if plan.source_name is not None:
        texts = (row["text"] for row in datasets[plan.source_name])
    else:
        texts = (row["text"] for row in load_dataset(plan.dataset, "the activation cache's dataset"))
    contexts = held_out_contexts(texts, model, plan.context_size, plan.skip_tokens, TRAINING_EVAL_CONTEXTS)
    if not contexts:
        raise UserInputError(
            "trainer.eval_frequency", settings.trainer.eval_frequency,
            f"needs held-out text, but the corpus ends within the {plan.skip_tokens:,} tokens training reads; use a "
            "larger corpus, a smaller trainer.total_training_tokens, or trainer.eval_frequency=0",
        )
    evaluator = Evaluator(EvaluatorConfig(n_contexts=len(contexts)))
    return lambda sae: evaluator.evaluate(sae, model, contexts).downstream()
