"""FeatureAnalyzer: stream contexts through the model and the SAE, and keep bounded per-latent statistics.

Per latent, in memory that does not grow with the tokens streamed:
- firing count, sum and max of its activation over text positions, and a histogram of its non-zero
  activations in fixed log-spaced bins ((d_sae, n_bins) counts);
- the top `n_top_examples` contexts by peak activation, and a uniform sample of `n_quantile_examples`
  contexts it fires on (both `ExampleReservoir`s), each with a token/activation window around the peak;
- its logit effects (`logit_effects.py`), when the SAE writes into the residual stream;
- its nearest neighbours by decoder cosine (`neighbours.py`), computed blockwise at the end.
Latents that never fired are listed as dead and left empty.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field

from lm_saes.activation.packing import batch_contexts
from lm_saes.analysis.logit_effects import final_norm_weight, logit_effects, not_applicable_reason
from lm_saes.analysis.neighbours import top_cosine
from lm_saes.analysis.top_examples import ExampleReservoir, Window, context_candidates
from lm_saes.config_base import BaseConfig
from lm_saes.language_model import TransformerLensLanguageModel
from lm_saes.progress import TokenProgress
from lm_saes.sae import SparseAutoEncoder


class AnalysisConfig(BaseConfig):
    n_tokens: int = Field(65_536, gt=0)
    """Text tokens to analyse (whole contexts: the last batch may pass it by less than one batch)."""
    context_size: int | None = Field(None, ge=2)
    """Tokens per context; None means the run's activation_factory.context_size."""
    skip_tokens: int | None = Field(None, ge=0)
    """Text tokens to skip first. None: on the run's dataset, everything training could have read; else 0."""
    model_batch_size: int = Field(8, gt=0)
    """Contexts per forward pass; the batch's dense latents are (batch, context, d_sae) float32."""
    n_top_examples: int = Field(20, gt=0)
    """Top-activating contexts kept per latent."""
    n_quantile_examples: int = Field(10, ge=0)
    """Uniformly sampled firing contexts kept per latent, shown sorted by activation (weak ones included)."""
    window_before: int = Field(15, ge=0)
    """Tokens kept before each example's peak."""
    window_after: int = Field(8, ge=0)
    """Tokens kept after it."""
    n_logit_tokens: int = Field(10, gt=0)
    """Most promoted and most suppressed tokens kept per latent."""
    histogram_bins: int = Field(48, gt=0)
    """Log-spaced activation bins between histogram_min and histogram_max (values outside go to the end bins)."""
    histogram_min: float = Field(1e-3, gt=0)
    histogram_max: float = Field(1e3, gt=0)
    n_neighbours: int = Field(10, ge=0)
    """Nearest latents by decoder cosine kept per latent (0: none). d_sae^2 * d_model work at the end."""
    seed: int = 0
    """Seeds the uniform sample of firing contexts."""


@dataclass
class FeatureAnalysis:
    """What `FeatureAnalyzer.analyze` found: per-latent tensors (first dimension d_sae) and plain-JSON info."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dead_latents(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.tensors["fired"] == 0).flatten()]


class AnalysisState:
    """The running statistics: every tensor here has a size fixed by d_sae and the config, never by tokens."""

    def __init__(self, d_sae: int, cfg: AnalysisConfig) -> None:
        window = Window(cfg.window_before, cfg.window_after)
        self.fired_S = torch.zeros(d_sae, dtype=torch.int64)
        self.sum_S = torch.zeros(d_sae, dtype=torch.float64)
        self.max_S = torch.zeros(d_sae)
        self.hist_SH = torch.zeros(d_sae, cfg.histogram_bins, dtype=torch.int64)
        self.edges_H1 = torch.logspace(math.log10(cfg.histogram_min), math.log10(cfg.histogram_max), cfg.histogram_bins + 1)
        self.top = ExampleReservoir(d_sae, cfg.n_top_examples, window)
        self.sample = ExampleReservoir(d_sae, max(cfg.n_quantile_examples, 1), window)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.n_tokens = self.n_contexts = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        own = {"fired": self.fired_S, "sum": self.sum_S, "max": self.max_S, "hist": self.hist_SH}
        return {**own, **{f"top.{k}": v for k, v in self.top.state().items()},
                **{f"sample.{k}": v for k, v in self.sample.state().items()}}

    def add(self, latents_BTS: torch.Tensor, mask_BT: torch.Tensor, tokens_BT: torch.Tensor) -> None:
        latents_NS = latents_BTS[mask_BT]
        S = latents_NS.shape[1]
        fires_NS = latents_NS > 0
        self.fired_S += fires_NS.sum(dim=0)
        self.sum_S += latents_NS.sum(dim=0, dtype=torch.float64)
        self.max_S = torch.maximum(self.max_S, latents_NS.max(dim=0).values)
        # Histogram of the firing values only: bucketize them and count (latent, bin) pairs in one bincount.
        token_idx, latent_idx = torch.nonzero(fires_NS, as_tuple=True)
        bins = (torch.bucketize(latents_NS[token_idx, latent_idx], self.edges_H1) - 1).clamp(0, self.hist_SH.shape[1] - 1)
        flat = latent_idx * self.hist_SH.shape[1] + bins
        self.hist_SH += torch.bincount(flat, minlength=self.hist_SH.numel()).view_as(self.hist_SH)

        peaks_SB, _, tokens_SBW, acts_SBW = context_candidates(latents_BTS, tokens_BT, self.top.window)
        context_SB = (self.n_contexts + torch.arange(len(tokens_BT))).expand(S, -1)
        fired_SB = peaks_SB > 0
        top_keys = torch.where(fired_SB, peaks_SB, -torch.inf)
        self.top.merge(top_keys, peaks_SB, context_SB, tokens_SBW, acts_SBW)
        random_SB = torch.rand(peaks_SB.shape, generator=self.generator)
        self.sample.merge(torch.where(fired_SB, random_SB, -torch.inf), peaks_SB, context_SB, tokens_SBW, acts_SBW)
        self.n_tokens += len(latents_NS)
        self.n_contexts += len(tokens_BT)


class FeatureAnalyzer:
    def __init__(self, cfg: AnalysisConfig) -> None:
        self.cfg = cfg
        self.state: AnalysisState | None = None
        """The running statistics of the last `analyze` (kept for inspection, e.g. by the memory test)."""

    def analyze(
        self, sae: SparseAutoEncoder, model: TransformerLensLanguageModel, contexts: Iterable[torch.Tensor],
        progress: TokenProgress | None = None,
    ) -> FeatureAnalysis:
        """Analyse `sae` on `contexts` ((T,) token tensors, consumed lazily) until `cfg.n_tokens` text tokens.

        The SAE runs in inference mode (BatchTopK as its per-token JumpReLU), whatever mode it was in.
        `progress`, if given, is advanced by the text tokens of each batch.
        """
        hook = sae.cfg.hook_point_in
        state = self.state = AnalysisState(sae.cfg.d_sae, self.cfg)
        started = time.perf_counter()
        with sae.inference(), torch.no_grad():
            for tokens_BT in batch_contexts(contexts, self.cfg.model_batch_size):
                if state.n_tokens >= self.cfg.n_tokens:
                    break
                out = model.run_hooks(tokens_BT, [hook])
                mask_BT = out.mask_BT
                x_ND = out.activations[hook][mask_BT].to(sae.cfg.device, sae.cfg.dtype)
                # BOS/EOS/padding keep zero latents: the SAE never saw them; BOS's huge norm would top every list.
                latents_BTS = torch.zeros(*mask_BT.shape, sae.cfg.d_sae)
                latents_BTS[mask_BT.cpu()] = sae.encode(x_ND).float().cpu()
                state.add(latents_BTS, mask_BT.cpu(), out.tokens_BT.cpu())
                if progress is not None:
                    progress.advance(len(x_ND))
            if state.n_tokens == 0:
                raise ValueError("the contexts hold no text tokens to analyse")
            stream_seconds = time.perf_counter() - started  # the token loop; _result adds logit effects, neighbours
            result = self._result(sae, model, state)
            result.info["stream_seconds"] = round(stream_seconds, 3)
            return result

    def _result(self, sae: SparseAutoEncoder, model: TransformerLensLanguageModel, state: AnalysisState) -> FeatureAnalysis:
        n = state.n_tokens
        tensors: dict[str, torch.Tensor] = {
            "fired": state.fired_S,
            "frequency": state.fired_S.double().div(n).float(),
            "max_activation": state.max_S,
            "mean_activation": (state.sum_S / state.fired_S.clamp_min(1)).float(),
            "histogram": state.hist_SH.to(torch.int32),
            "histogram_edges": state.edges_H1,
        }
        for prefix, reservoir in (("top", state.top), ("quantile", state.sample)):
            for key, value in reservoir.sorted_by_peak().items():
                tensors[f"{prefix}_{key}"] = value
        if self.cfg.n_quantile_examples == 0:
            for key in [k for k in tensors if k.startswith("quantile_")]:
                tensors[key] = tensors[key][:, :0]
        reason = not_applicable_reason(sae.cfg.hook_point_target)
        if reason is None:
            live = torch.nonzero(state.fired_S > 0).flatten()
            effects = logit_effects(sae.W_D[live], final_norm_weight(model.bridge, model.d_model), model.bridge.W_U,
                                    self.cfg.n_logit_tokens)
            for key, value_LN in effects.items():
                full = torch.full((sae.cfg.d_sae, value_LN.shape[1]), -1 if key.endswith("ids") else 0, dtype=value_LN.dtype)
                full[live] = value_LN
                tensors[key] = full
        if self.cfg.n_neighbours > 0 and sae.cfg.d_sae > 1:
            cosine_SK, ids_SK = top_cosine(sae.W_D, sae.W_D, self.cfg.n_neighbours, exclude_self=True)
            tensors["neighbour_ids"], tensors["neighbour_cosine"] = ids_SK.to(torch.int32), cosine_SK
        info = {
            "n_tokens": n, "n_contexts": state.n_contexts, "d_sae": sae.cfg.d_sae,
            "hook_point_in": sae.cfg.hook_point_in, "hook_point_out": sae.cfg.hook_point_target,
            "act_fn": sae.cfg.act_fn, "window_before": self.cfg.window_before, "window_after": self.cfg.window_after,
            "logit_effects": reason or "direct effect: W_D row x final-norm weight @ W_U (up to the norm's scale)",
            "logit_effects_applicable": reason is None,
            "quantile_examples": "a uniform sample of the contexts the latent fires on, sorted by peak activation",
        }
        result = FeatureAnalysis(tensors, info)
        result.info["dead_latents"] = result.dead_latents
        return result
