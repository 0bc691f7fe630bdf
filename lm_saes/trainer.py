"""Trainer: Adam, learning-rate and L1 schedules, metrics and logging over an activation stream."""

from __future__ import annotations

import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from lm_saes import distributed, metrics
from lm_saes.activation import ActivationBatch
from lm_saes.checkpoint import (
    Checkpoint,
    flatten_optimizer,
    latest_checkpoint_path,
    save_checkpoint,
    stream_section,
    unflatten_optimizer,
)
from lm_saes.config_base import BaseConfig, DType
from lm_saes.errors import EmptyActivationStream
from lm_saes.progress import TokenProgress
from lm_saes.sae import SAELoss, SparseAutoEncoder

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
    """Weight of the variant's sparsity penalty against the (normalised) squared error: the decoder-norm-weighted
    L1 for relu, the tanh or L0 penalty for jumprelu; topk and batchtopk have none and ignore it."""
    l1_coefficient_warmup_steps: float = Field(0.05, ge=0)
    """Linear ramp of the sparsity coefficient from 0: a fraction of all steps if < 1, else a step count."""
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
    n_checkpoints: int = Field(0, ge=0)
    """Checkpoints spread evenly over training, each enough to resume exactly (weights, optimizer, counters,
    RNG states, the activation stream's position)."""
    resume: bool | None = None
    """None: continue from the run directory's last checkpoint if it has one. True: require one. False: refuse
    a run directory that has checkpoints (start elsewhere, or delete them)."""


def _param_groups(sae: SparseAutoEncoder, lr: float) -> list[dict[str, Any]]:
    """One group of every parameter at `lr`, then the activation function's own groups (JumpReLU's thresholds
    at their own rate)."""
    own = sae.activation_function.param_groups(lr)
    claimed = {id(p) for group in own for p in group["params"]}
    return [{"params": [p for p in sae.parameters() if id(p) not in claimed]}, *own]


def _steps(value: float, total: int) -> int:
    return int(value * total) if value < 1 else int(value)


class Trainer:
    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg

    def fit(
        self,
        sae: SparseAutoEncoder,
        activation_stream: Iterator[ActivationBatch],
        wandb_run: Any | None = None,
        evaluate: Callable[[SparseAutoEncoder], dict[str, float | None]] | None = None,
        resume_from: Checkpoint | None = None,
        checkpoint_meta: dict[str, Any] | None = None,
    ) -> dict[str, float | int]:
        """Train `sae` in place; return the final metrics (also written to exp_result_path/metrics.json).

        `evaluate(sae)`, if given, runs every `eval_frequency` steps and once after the last step; the last
        result is merged into the final metrics.
        With `trainer.n_checkpoints`, the whole training state (and the stream's position, when the stream has
        a `state_dict`, as ActivationFactory's does) is saved periodically; `resume_from` continues from one.
        `checkpoint_meta` is stored with each checkpoint (the runner puts the settings there).

        Data-parallel (a torch.distributed process group, see lm_saes.distributed): every rank calls this with
        the same SAE and its own share of the batches; the step, the schedules and every metric are those of
        the global batch (all ranks' rows together), and only rank 0 prints, logs and writes files.
        """
        from lm_saes.run_dir import METRICS_FILE, write_json_atomic

        cfg, sae_cfg = self.cfg, sae.cfg
        world, main = distributed.world_size(), distributed.is_main()
        stream = iter(activation_stream)
        if resume_from is None:
            first = next(stream, None)
            n_first = torch.tensor([0 if first is None else len(first["tokens"]), int(first is None)])
            batch_size, n_empty = (int(v) for v in distributed.all_reduce_sum(n_first).tolist())  # the global batch
            if first is None or n_empty:  # every rank raises, rather than wait for the one that did
                raise EmptyActivationStream()
            batches: Iterator[ActivationBatch] = _chain_first(first, stream)
        else:
            batch_size = int(resume_from.meta["batch_size"])
            batches = stream
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

        optimizer = torch.optim.Adam(_param_groups(sae, cfg.lr), lr=cfg.lr, betas=cfg.betas)
        state = _State(sae_cfg.d_sae, sae_cfg.device)
        if resume_from is not None:
            sae.load_state_dict(resume_from.section("sae"))
            optimizer.load_state_dict(unflatten_optimizer(resume_from.section("optimizer"), resume_from.meta["param_groups"]))
            state.load(resume_from)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        with warnings.catch_warnings():  # replaying the schedule without optimizer steps is intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(state.step):  # the schedule is a pure function of the step: replay it
                scheduler.step()
        checkpoint_every = max(total_steps // (cfg.n_checkpoints + 1), 1) if cfg.n_checkpoints else 0
        run_dir = Path(cfg.exp_result_path)
        final: dict[str, float | int] = {}
        progress = TokenProgress(total_steps * batch_size, f"training {sae_cfg.act_fn} SAE", enabled=main)
        progress.advance(state.tokens_seen)
        sae.train()

        def save() -> Path | None:
            """Every rank calls this (each hands over its stream's position); rank 0 writes and returns the path.
            The rest of the state is the same on every rank."""
            has_stream_state = hasattr(stream, "state_dict")
            stream_state = getattr(stream, "state_dict", dict)()
            stream_states = distributed.gather_to_main({k: v.cpu() for k, v in stream_state.items()})
            if stream_states is None:
                return None
            tensors = {**{f"sae.{k}": v for k, v in sae.state_dict().items()}, **state.tensors()}
            opt_tensors, param_groups = flatten_optimizer(optimizer.state_dict())
            tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
            for rank, rank_state in enumerate(stream_states):
                tensors.update({f"{stream_section(rank, world)}.{k}": v for k, v in rank_state.items()})
            return save_checkpoint(run_dir, state.step, tensors, {
                **(checkpoint_meta or {}), "batch_size": batch_size, "param_groups": param_groups,
                "tokens_seen": state.tokens_seen, "has_stream_state": has_stream_state, "world_size": world,
            })

        preemption = _PreemptionSignals()
        try:
            preemption.install()
            for step in range(state.step, total_steps):
                batch = next(batches, None)
                n = 0 if batch is None else len(batch["tokens"])
                n_global, n_ended = distributed.all_reduce_sum(torch.tensor([n, int(batch is None)])).tolist()
                if n_ended:  # all ranks stop together once one rank's share of the stream ends
                    progress.console.print(
                        f"[yellow]warning: the activation stream ended after {state.tokens_seen:,} tokens, before the "
                        f"budget of {cfg.total_training_tokens:,}; use a larger corpus or a smaller budget"
                    )
                    break
                assert batch is not None
                x_in = batch[sae_cfg.hook_point_in].to(sae_cfg.device, sae_cfg.dtype)
                x_out = batch[sae_cfg.hook_point_target].to(sae_cfg.device, sae_cfg.dtype)
                l1_coefficient = cfg.l1_coefficient * min(1.0, (step + 1) / l1_warm) if l1_warm else cfg.l1_coefficient
                sae.activation_function.set_progress(step / total_steps)
                dead_S = state.tokens_since_fired_S >= cfg.dead_feature_window
                with torch.autocast(
                    device_type=torch.device(sae_cfg.device).type, dtype=cfg.amp_dtype,
                    enabled=cfg.amp_dtype != torch.float32,
                ):
                    out = sae.compute_loss(x_in, x_out, l1_coefficient, dead_S=dead_S)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                distributed.sum_gradients_(sae.parameters(), n / n_global)
                totals = _StepTotals(distributed.all_reduce_sum(
                    _step_totals(out, n, sae_cfg.d_sae, preempted=preemption.signal_name is not None)), sae_cfg.d_model)
                if totals.diverged:  # no update: every rank stops here, at the same step
                    last, loss = latest_checkpoint_path(run_dir), out.loss.item()
                    raise TrainingDiverged(
                        f"training diverged: the loss became {'non-finite on another rank' if math.isfinite(loss) else loss} "
                        f"at step {step}; " + (f"the last good checkpoint is {last}; " if last else "")
                        + "lower trainer.lr or check the activations"
                    )
                optimizer.step()
                scheduler.step()

                fired_S = state.window.add(totals) > 0
                state.tokens_since_fired_S += n_global
                state.tokens_since_fired_S[fired_S] = 0
                state.tokens_seen += n_global
                state.step = step + 1
                progress.advance(n_global)
                if state.step % cfg.log_frequency == 0 or state.step == total_steps:
                    final = state.window.summary(state.tokens_since_fired_S, min(cfg.dead_feature_window, state.tokens_seen))
                    final.update(lr=scheduler.get_last_lr()[0], l1_coefficient=l1_coefficient,
                                 n_training_tokens=state.tokens_seen, step=state.step)
                    progress.log(final)
                    if wandb_run is not None:
                        wandb_run.log({f"train/{k}": v for k, v in final.items()}, step=state.step)
                    state.window = _Window(sae_cfg.d_sae, sae_cfg.device)
                if checkpoint_every and state.step % checkpoint_every == 0 and state.step < total_steps:
                    save()
                if totals.preempted and state.step < total_steps:  # agreed by all ranks: they checkpoint together
                    saved = save()
                    received = f"received {preemption.signal_name}" if preemption.signal_name else \
                        "another rank received a preemption signal"
                    raise Preempted(
                        f"{received} at step {state.step}: saved {saved or 'a checkpoint (rank 0)'}; rerun the same "
                        "command (same trainer.exp_result_path) to resume", signal_name=preemption.signal_name,
                    )
                if evaluate is not None and main and cfg.eval_frequency and state.step % cfg.eval_frequency == 0 \
                        and state.step < total_steps:  # the last step gets the final evaluation below
                    _log_eval(evaluate(sae), state.step, progress, wandb_run)
        finally:
            preemption.restore()
            progress.close()
        if state.window.n_tokens:  # the stream ended between log lines
            final = state.window.summary(state.tokens_since_fired_S, min(cfg.dead_feature_window, state.tokens_seen))
            final.update(n_training_tokens=state.tokens_seen)
        final["tokens_per_second"] = progress.tokens_per_second
        final["world_size"] = world
        if evaluate is not None and main:
            downstream = evaluate(sae)
            _log_eval(downstream, int(final.get("step", total_steps)), progress, wandb_run)
            final.update({k: v for k, v in downstream.items() if v is not None})
        if main:
            write_json_atomic(run_dir / METRICS_FILE, final)
        return final


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


class Preempted(RuntimeError):
    """SIGTERM, SIGUSR1 or SIGUSR2 (a scheduler's preemption or time-limit notice) arrived; a checkpoint was
    written at the step's end."""

    def __init__(self, message: str, signal_name: str | None) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        """None on a data-parallel rank that stopped because another rank received the signal."""


class _PreemptionSignals:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 into a flag the training loop reads between steps, so the checkpoint it then
    writes is consistent (never mid-step). Only the main thread can install handlers; elsewhere this is inert.

    SIGTERM is what SLURM sends when it preempts or cancels; SIGUSR1 or SIGUSR2 what `sbatch --signal` sends
    before the time limit (submitit asks for SIGUSR2). The handlers that were installed before (submitit's,
    which requeue the job) are put back afterwards, and `lm-saes train` hands the signal on to them.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            if hasattr(signal, name):
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class _State:
    """The counters a checkpoint must hold besides the weights and the optimizer."""

    def __init__(self, d_sae: int, device: str) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.tokens_since_fired_S = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.window = _Window(d_sae, device)

    def tensors(self) -> dict[str, torch.Tensor]:
        w = self.window
        return {
            "state.tokens_since_fired": self.tokens_since_fired_S,
            "state.window_fired": w.fired_S,
            "state.window_sums": torch.tensor([w.n_tokens, *w.sums.values()], dtype=torch.float64),
            "rng.torch": torch.get_rng_state(),
            **({"rng.cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
        }

    def load(self, checkpoint: Checkpoint) -> None:
        t, device = checkpoint.tensors, self.tokens_since_fired_S.device
        self.step, self.tokens_seen = int(checkpoint.meta["step"]), int(checkpoint.meta["tokens_seen"])
        self.tokens_since_fired_S = t["state.tokens_since_fired"].to(device)
        self.window.fired_S = t["state.window_fired"].to(device)
        n_tokens, *sums = t["state.window_sums"].tolist()
        self.window.n_tokens = int(n_tokens)
        self.window.sums = dict(zip(self.window.sums, sums))
        torch.set_rng_state(t["rng.torch"])
        if "rng.cuda" in t and torch.cuda.is_available():
            torch.cuda.set_rng_state(t["rng.cuda"])


def _log_eval(result: dict[str, float | None], step: int, progress: TokenProgress, wandb_run: Any | None) -> None:
    progress.log({f"eval/{k}": v for k, v in result.items()})
    if wandb_run is not None:
        wandb_run.log({f"eval/{k}": v for k, v in result.items() if v is not None}, step=step)


def _chain_first(first: ActivationBatch, rest: Iterator[ActivationBatch]) -> Iterator[ActivationBatch]:
    yield first
    yield from rest


_TOTALS = ("n", "mse", "sparsity_loss", "aux_k_loss", "l0", "diverged", "preempted")
"""The scalars at the head of a step's totals: the row count, the step metrics times rows, and two flags."""


@torch.no_grad()
def _step_totals(out: SAELoss, n: int, d_sae: int, preempted: bool) -> torch.Tensor:
    """This rank's step as one float64 vector of sums over its rows, so that one all-reduce makes it the global
    batch's: the `_TOTALS` scalars, explained_variance_sums (d_model + 2), then the (d_sae,) firing counts."""
    means = torch.stack([out.mse.double(), out.sparsity.double(), out.aux_k.double(), out.l0().double()])
    flags = torch.stack([(~torch.isfinite(out.loss)).double(), means.new_tensor(float(preempted))])
    scalars = torch.cat([means.new_tensor([float(n)]), means * n, flags])
    ev_sums = metrics.explained_variance_sums(out.target_BD, out.reconstruction_BD)
    return torch.cat([scalars, ev_sums, out.firing_counts(d_sae).double()])


class _StepTotals:
    """A step's totals over the global batch (after the all-reduce), read back."""

    def __init__(self, totals: torch.Tensor, d_model: int) -> None:
        self.scalars = dict(zip(_TOTALS, totals[: len(_TOTALS)].tolist()))
        self.ev_sums = totals[len(_TOTALS) : len(_TOTALS) + d_model + 2]
        self.fired_S = totals[len(_TOTALS) + d_model + 2 :].long()
        self.diverged, self.preempted = self.scalars["diverged"] > 0, self.scalars["preempted"] > 0


class _Window:
    """Token-weighted sums of the step metrics between two log lines."""

    def __init__(self, d_sae: int, device: str) -> None:
        self.n_tokens = 0
        self.sums = {"mse": 0.0, "sparsity_loss": 0.0, "aux_k_loss": 0.0, "explained_variance": 0.0, "l0": 0.0}
        self.fired_S = torch.zeros(d_sae, dtype=torch.long, device=device)

    def add(self, totals: _StepTotals) -> torch.Tensor:
        """Accumulate one step; return its (d_sae,) firing counts."""
        n = int(totals.scalars["n"])
        self.n_tokens += n
        for key in ("mse", "sparsity_loss", "aux_k_loss", "l0"):
            self.sums[key] += totals.scalars[key]
        self.sums["explained_variance"] += metrics.explained_variance_from_sums(totals.ev_sums, n) * n
        self.fired_S += totals.fired_S
        return totals.fired_S

    def summary(self, tokens_since_fired_S: torch.Tensor, dead_window: int) -> dict[str, float | int]:
        result: dict[str, float | int] = {k: v / self.n_tokens for k, v in self.sums.items()}
        d_sae = len(self.fired_S)
        n_dead = int((tokens_since_fired_S >= dead_window).sum())
        result["dead_fraction"] = n_dead / d_sae
        result["n_dead"] = n_dead
        result["n_dense"] = int((self.fired_S > metrics.DENSE_FREQUENCY * self.n_tokens).sum())
        if not all(math.isfinite(float(v)) for v in result.values()):
            raise FloatingPointError(f"non-finite training metrics: {result}")
        return result
