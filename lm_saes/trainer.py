"""Trainer: Adam, learning-rate and L1 schedules, metrics and logging over an activation stream."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from lm_saes import metrics
from lm_saes.activation import ActivationBatch
from lm_saes.config_base import BaseConfig, DType
from lm_saes.progress import TokenProgress
from lm_saes.sae import SparseAutoEncoder

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of tokens in a log window counts as dense."""


class TrainerConfig(BaseConfig):
    amp_dtype: DType = torch.float32
    """Autocast dtype for the SAE step; float32 disables autocast."""
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    total_training_tokens: int = Field(300_000_000, gt=0)
    """Training steps = total_training_tokens // batch size."""
    lr_warm_up_steps: float = Field(0.05, ge=0)
    """Linear warm-up length: a fraction of all steps if < 1, else a step count."""
    lr_cool_down_steps: float = Field(0.2, ge=0)
    """Linear cool-down to zero at the end: a fraction of all steps if < 1, else a step count."""
    l1_coefficient: float = Field(5e-3, ge=0)
    """Weight of sum_i f_i ||W_D[i]|| against the (normalised) squared error."""
    l1_coefficient_warmup_steps: float = Field(0.05, ge=0)
    """Linear ramp of the L1 coefficient from 0: a fraction of all steps if < 1, else a step count."""
    dead_feature_window: int = Field(1_000_000, gt=0)
    """A latent is dead once it has not fired for this many tokens (or ever, in a shorter run)."""
    log_frequency: int = Field(100, gt=0)
    """Steps between log lines (console and wandb)."""
    eval_frequency: int = Field(0, ge=0)
    """Steps between downstream evaluations (CE/KL with the SAE spliced into the model) on a fixed held-out
    batch, logged as eval/* and run once more after the last step into metrics.json. 0: off."""
    exp_result_path: str = "results"
    """The run directory: metrics.json here, and where train_sae saves the SAE."""
    overwrite: bool = False
    """Allow writing into a run directory that already holds a finished run."""


def _steps(value: float, total: int) -> int:
    return int(value * total) if value < 1 else int(value)


class Trainer:
    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg

    def fit(
        self, sae: SparseAutoEncoder, activation_stream: Iterator[ActivationBatch], wandb_run: Any | None = None,
        evaluate: Callable[[SparseAutoEncoder], dict[str, float | None]] | None = None,
    ) -> dict[str, float | int]:
        """Train `sae` in place; return the final metrics (also written to exp_result_path/metrics.json).

        `evaluate(sae)`, if given, runs every `eval_frequency` steps and once after the last step; the last
        result is merged into the final metrics.
        """
        from lm_saes.run_dir import METRICS_FILE, write_json_atomic

        cfg, sae_cfg = self.cfg, sae.cfg
        stream = iter(activation_stream)
        first = next(stream, None)
        if first is None:
            raise ValueError("the activation stream is empty: the corpus gave no tokens")
        batch_size = len(first["tokens"])
        if cfg.total_training_tokens < batch_size:
            raise ValueError(
                f"trainer.total_training_tokens={cfg.total_training_tokens} is smaller than one batch ({batch_size})"
            )
        total_steps = cfg.total_training_tokens // batch_size
        warm, cool = _steps(cfg.lr_warm_up_steps, total_steps), _steps(cfg.lr_cool_down_steps, total_steps)
        l1_warm = _steps(cfg.l1_coefficient_warmup_steps, total_steps)

        def lr_factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if step >= total_steps - cool:
                return max(total_steps - step, 0) / max(cool, 1)
            return 1.0

        optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        tokens_since_fired_S = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=sae_cfg.device)
        window = _Window(sae_cfg.d_sae, sae_cfg.device)
        final: dict[str, float | int] = {}
        progress = TokenProgress(total_steps * batch_size, f"training {sae_cfg.act_fn} SAE")
        batches = _chain_first(first, stream)
        tokens_seen = 0
        try:
            for step in range(total_steps):
                batch = next(batches, None)
                if batch is None:
                    progress.console.print(
                        f"[yellow]warning: the activation stream ended after {tokens_seen:,} tokens, before the "
                        f"budget of {cfg.total_training_tokens:,}; use a larger corpus or a smaller budget"
                    )
                    break
                x_in = batch[sae_cfg.hook_point_in].to(sae_cfg.device, sae_cfg.dtype)
                x_out = batch[sae_cfg.hook_point_target].to(sae_cfg.device, sae_cfg.dtype)
                l1_coefficient = cfg.l1_coefficient * min(1.0, (step + 1) / l1_warm) if l1_warm else cfg.l1_coefficient
                with torch.autocast(
                    device_type=torch.device(sae_cfg.device).type, dtype=cfg.amp_dtype,
                    enabled=cfg.amp_dtype != torch.float32,
                ):
                    out = sae.compute_loss(x_in, x_out, l1_coefficient)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"the loss became {out.loss.item()} at step {step}; lower trainer.lr")
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                scheduler.step()

                n = len(x_in)
                tokens_seen += n
                with torch.no_grad():
                    fired_S = metrics.firing_counts(out.latents_BS) > 0
                    tokens_since_fired_S += n
                    tokens_since_fired_S[fired_S] = 0
                    window.add(out, n)
                progress.advance(n)
                if (step + 1) % cfg.log_frequency == 0 or step + 1 == total_steps:
                    final = window.summary(tokens_since_fired_S, min(cfg.dead_feature_window, tokens_seen))
                    final.update(lr=scheduler.get_last_lr()[0], l1_coefficient=l1_coefficient, n_training_tokens=tokens_seen,
                                 step=step + 1)
                    progress.log(final)
                    if wandb_run is not None:
                        wandb_run.log({f"train/{k}": v for k, v in final.items()}, step=step + 1)
                    window = _Window(sae_cfg.d_sae, sae_cfg.device)
                if evaluate is not None and cfg.eval_frequency and (step + 1) % cfg.eval_frequency == 0 \
                        and step + 1 < total_steps:  # the last step gets the final evaluation below
                    _log_eval(evaluate(sae), step + 1, progress, wandb_run)
        finally:
            progress.close()
        if window.n_tokens:  # the stream ended between log lines
            final = window.summary(tokens_since_fired_S, min(cfg.dead_feature_window, tokens_seen))
            final.update(n_training_tokens=tokens_seen)
        final["tokens_per_second"] = progress.tokens_per_second
        if evaluate is not None:
            downstream = evaluate(sae)
            _log_eval(downstream, int(final.get("step", total_steps)), progress, wandb_run)
            final.update({k: v for k, v in downstream.items() if v is not None})
        write_json_atomic(Path(cfg.exp_result_path) / METRICS_FILE, final)
        return final


def _log_eval(result: dict[str, float | None], step: int, progress: TokenProgress, wandb_run: Any | None) -> None:
    progress.log({f"eval/{k}": v for k, v in result.items()})
    if wandb_run is not None:
        wandb_run.log({f"eval/{k}": v for k, v in result.items() if v is not None}, step=step)


def _chain_first(first: ActivationBatch, rest: Iterator[ActivationBatch]) -> Iterator[ActivationBatch]:
    yield first
    yield from rest


class _Window:
    """Token-weighted sums of the step metrics between two log lines."""

    def __init__(self, d_sae: int, device: str) -> None:
        self.n_tokens = 0
        self.sums = {"mse": 0.0, "l1": 0.0, "explained_variance": 0.0, "l0": 0.0}
        self.fired_S = torch.zeros(d_sae, dtype=torch.long, device=device)

    def add(self, out: Any, n: int) -> None:
        self.n_tokens += n
        self.sums["mse"] += out.mse.item() * n
        self.sums["l1"] += out.l1.item() * n
        self.sums["explained_variance"] += metrics.explained_variance(out.target_BD, out.reconstruction_BD).item() * n
        self.sums["l0"] += metrics.l0(out.latents_BS).item() * n
        self.fired_S += metrics.firing_counts(out.latents_BS)

    def summary(self, tokens_since_fired_S: torch.Tensor, dead_window: int) -> dict[str, float | int]:
        result: dict[str, float | int] = {k: v / self.n_tokens for k, v in self.sums.items()}
        d_sae = len(self.fired_S)
        n_dead = int((tokens_since_fired_S >= dead_window).sum())
        result["dead_fraction"] = n_dead / d_sae
        result["n_dead"] = n_dead
        result["n_dense"] = int((self.fired_S > DENSE_FREQUENCY * self.n_tokens).sum())
        if not all(math.isfinite(float(v)) for v in result.values()):
            raise FloatingPointError(f"non-finite training metrics: {result}")
        return result
