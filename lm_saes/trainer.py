"""Trainer: Adam with learning-rate and sparsity-coefficient schedules over an activation stream, with metrics,
logging, checkpoints, preemption and periodic evaluation."""

from __future__ import annotations

import functools
import itertools
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from lm_saes import distributed
from lm_saes.activation import ActivationBatch
from lm_saes.checkpoint import (
    Checkpoint,
    flatten_optimizer,
    latest_checkpoint_path,
    save_checkpoint,
    stream_section,
    unflatten_optimizer,
)
from lm_saes.config_base import BaseConfig, DType, warn_if_slow_dtype
from lm_saes.errors import EmptyActivationStream
from lm_saes.progress import TokenProgress
from lm_saes.run_dir import METRICS_FILE, write_json_atomic
from lm_saes.sae import SparseAutoEncoder
from lm_saes.sae.sparse_step import recycle_grads, release_recycled
from lm_saes.training_state import StepTotals, TrainingState, step_totals

Evaluate = Callable[[SparseAutoEncoder], dict[str, float | None]]
"""The downstream evaluation `fit` runs now and then (CE/KL with the SAE spliced in); wandb gets no None values."""


class TrainerConfig(BaseConfig):
    amp_dtype: DType = torch.float32
    """Autocast dtype for the SAE step: float32 (off) or bfloat16; float16, whose gradients underflow without
    a gradient scaler, is refused."""
    lr: float = Field(3e-3, gt=0)
    """Adam's learning rate, for the default short budget; for runs of many millions of tokens 1e-4 to 4e-4
    is the usual choice."""
    betas: tuple[float, float] = (0.9, 0.999)
    total_training_tokens: int = Field(300_000, gt=0)
    """Training steps = total_training_tokens // batch size."""
    lr_warm_up_steps: float = Field(0.05, ge=0)
    """Linear warm-up length: a fraction of all steps if < 1, else a step count."""
    lr_cool_down_steps: float = Field(0.2, ge=0)
    """Linear cool-down to zero at the end: a fraction of all steps if < 1, else a step count."""
    l1_coefficient: float = Field(3.0, ge=0)
    """Weight of the variant's sparsity penalty against the (normalised) squared error: the decoder-norm-weighted
    L1 for relu, the tanh or L0 penalty for jumprelu; topk and batchtopk have none and ignore it."""
    l1_coefficient_warmup_steps: float = Field(0.05, ge=0)
    """Linear ramp of the sparsity coefficient from 0: a fraction of all steps if < 1, else a step count."""
    dead_feature_window: float = Field(0.1, gt=0)
    """A latent is dead once it has not fired for this many tokens (or ever, in a shorter run): a fraction of
    total_training_tokens if < 1, else a token count. AuxK trains the dead latents, so it switches on once a
    latent has been silent this long."""
    log_frequency: int = Field(25, gt=0)
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

    @field_validator("amp_dtype")
    @classmethod
    def _no_float16(cls, value: torch.dtype) -> torch.dtype:
        if value == torch.float16:
            raise ValueError("float16 gradients underflow without a gradient scaler; use bfloat16 or float32")
        if value not in (torch.float32, torch.bfloat16):
            raise ValueError("allowed: float32 (autocast off) or bfloat16")
        return value


def lr_factor(step: int, total: int, warm: int, cool: int) -> float:
    """The learning rate's multiplier at `step` (from 0) of `total`: a linear warm-up over the first `warm`
    steps, then 1, then a linear cool-down to zero over the last `cool`."""
    if step < warm:
        return (step + 1) / warm
    if step >= total - cool:
        return max(total - step, 0) / max(cool, 1)
    return 1.0


def sparsity_coefficient(step: int, final: float, warm: int) -> float:
    """The sparsity penalty's weight at `step` (from 0): a linear ramp to `final` over the first `warm` steps."""
    return final * min(1.0, (step + 1) / warm) if warm else final


def _steps(value: float, total: int) -> int:
    """A length given as a fraction of `total` steps (< 1) or as a step count."""
    return int(value * total) if value < 1 else int(value)


@dataclass(frozen=True)
class TrainingPlan:
    """The run's fixed numbers: the config's, resolved against the global batch size."""

    batch_size: int
    """Rows per step, all data-parallel ranks together."""
    total_steps: int
    lr_warm_up: int
    lr_cool_down: int
    l1_warm_up: int
    dead_window: int
    """Tokens without firing after which a latent counts as dead."""
    checkpoint_every: int
    """Steps between checkpoints; 0: none."""

    @classmethod
    def of(cls, cfg: TrainerConfig, batch_size: int) -> TrainingPlan:
        if cfg.total_training_tokens < batch_size:
            raise ValueError(
                f"trainer.total_training_tokens={cfg.total_training_tokens} is smaller than one batch ({batch_size})"
            )
        total = cfg.total_training_tokens // batch_size
        return cls(
            batch_size, total, _steps(cfg.lr_warm_up_steps, total), _steps(cfg.lr_cool_down_steps, total),
            _steps(cfg.l1_coefficient_warmup_steps, total),
            max(int(cfg.dead_feature_window * cfg.total_training_tokens) if cfg.dead_feature_window < 1
                else int(cfg.dead_feature_window), 1),
            max(total // (cfg.n_checkpoints + 1), 1) if cfg.n_checkpoints else 0,
        )


def _param_groups(sae: SparseAutoEncoder, lr: float) -> list[dict[str, Any]]:
    """One group of every parameter at `lr`, then the activation function's own groups (JumpReLU's thresholds
    at their own rate)."""
    own = sae.activation_function.param_groups(lr)
    claimed = {id(p) for group in own for p in group["params"]}
    return [{"params": [p for p in sae.parameters() if id(p) not in claimed]}, *own]


class Trainer:
    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg

    def fit(
        self,
        sae: SparseAutoEncoder,
        activation_stream: Iterator[ActivationBatch],
        wandb_run: Any | None = None,
        evaluate: Evaluate | None = None,
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
        cfg = self.cfg
        stream = iter(activation_stream)
        if resume_from is None:
            batches, batch_size = _peek_batch_size(stream)
        else:
            batches, batch_size = stream, int(resume_from.meta["batch_size"])
        run = _Run(cfg, TrainingPlan.of(cfg, batch_size), sae, stream, resume_from, wandb_run, checkpoint_meta)
        sae.train()
        preemption = _PreemptionSignals()
        try:
            preemption.install()
            while not run.finished:
                batch, n_global = _next_batch(batches)
                if batch is None:  # all ranks stop together once one rank's share of the stream ends
                    run.warn_stream_ended()
                    break
                run.advance(batch, n_global, preemption, evaluate)
        finally:
            preemption.restore()
            run.progress.close()
            release_recycled()
        return run.finish(run.last_log, evaluate)


class _Run:
    """One call of `Trainer.fit`: the SAE, its optimizer and schedule, the counters, the console and wandb."""

    def __init__(
        self, cfg: TrainerConfig, plan: TrainingPlan, sae: SparseAutoEncoder, stream: Iterator[ActivationBatch],
        resume_from: Checkpoint | None, wandb_run: Any | None, checkpoint_meta: dict[str, Any] | None,
        progress: TokenProgress | None = None,
    ) -> None:
        """`progress`: where its lines go (None: a progress bar of the whole run)."""
        self.cfg, self.plan, self.sae, self.stream, self.wandb_run = cfg, plan, sae, stream, wandb_run
        self.checkpoint_meta = checkpoint_meta or {}
        self.run_dir, self.world, self.main = Path(cfg.exp_result_path), distributed.world_size(), distributed.is_main()
        # fused: one pass over each parameter instead of about ten (a dense 8x step's Adam: 230 -> 60 ms on a CPU)
        self.optimizer = torch.optim.Adam(_param_groups(sae, cfg.lr), lr=cfg.lr, betas=cfg.betas,
                                          fused=torch.device(sae.cfg.device).type in ("cpu", "cuda"))
        self.state = TrainingState(sae.cfg.d_sae, sae.cfg.device)
        if self.main:
            warn_if_slow_dtype("sae.dtype", sae.cfg.dtype, sae.cfg.device)
            warn_if_slow_dtype("trainer.amp_dtype", cfg.amp_dtype, sae.cfg.device)
        if resume_from is not None:
            sae.load_state_dict(resume_from.section("sae"))
            self.optimizer.load_state_dict(
                unflatten_optimizer(resume_from.section("optimizer"), resume_from.meta["param_groups"]))
            self.state.load(resume_from)
        self.scheduler = _lr_scheduler(self.optimizer, plan, self.state.step)
        self.progress = progress if progress is not None else TokenProgress(
            plan.total_steps * plan.batch_size, f"training {sae.cfg.act_fn} SAE", enabled=self.main)
        self.progress.advance(self.state.tokens_seen)
        self.last_log: dict[str, float | int] = {}
        """The last log line's metrics: the final metrics, unless steps were done after it."""

    @property
    def finished(self) -> bool:
        return self.state.step >= self.plan.total_steps

    def due(self, every: int) -> bool:
        """Whether the step just done closes a period of `every` steps (never, when 0)."""
        return every > 0 and self.state.step % every == 0

    def sparsity_coefficient(self, step: int) -> float:
        return sparsity_coefficient(step, self.cfg.l1_coefficient, self.plan.l1_warm_up)

    def step(self, batch: ActivationBatch, n_global: int, preempted: bool) -> StepTotals:
        """One optimizer step on the global batch of `n_global` rows (`batch` is this rank's share); its totals
        over all ranks. When the loss is not finite on some rank, every rank raises TrainingDiverged instead of
        updating."""
        cfg, sae_cfg, step = self.cfg, self.sae.cfg, self.state.step
        x_in_BD = batch[sae_cfg.hook_point_in].to(sae_cfg.device, sae_cfg.dtype)
        x_out_BD = batch[sae_cfg.hook_point_target].to(sae_cfg.device, sae_cfg.dtype)
        self.sae.activation_function.set_progress(step, self.plan.total_steps)
        dead_S = self.state.tokens_since_fired_S >= self.plan.dead_window
        with torch.autocast(
            device_type=torch.device(sae_cfg.device).type, dtype=cfg.amp_dtype, enabled=cfg.amp_dtype != torch.float32,
        ):
            out = self.sae.compute_loss(x_in_BD, x_out_BD, self.sparsity_coefficient(step), dead_S=dead_S)
        recycle_grads(self.sae.parameters())  # last step's, used: the sparse backward writes into them again
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        n = len(batch["tokens"])
        distributed.sum_gradients_(self.sae.parameters(), n / n_global)
        totals = StepTotals(distributed.all_reduce_sum(step_totals(out, n, sae_cfg.d_sae, preempted)), sae_cfg.d_model,
                            n_global)
        if totals.diverged:  # no update: every rank stops here, at the same step
            loss, last = out.loss.item(), latest_checkpoint_path(self.run_dir)
            raise TrainingDiverged(
                f"training diverged: the loss became {'non-finite on another rank' if math.isfinite(loss) else loss} "
                f"at step {step}; " + (f"the last good checkpoint is {last}; " if last else "")
                + "lower trainer.lr or check the activations"
            )
        self.sae.before_optimizer_step()
        self.optimizer.step()
        self.sae.after_optimizer_step()
        self.scheduler.step()
        return totals

    def advance(self, batch: ActivationBatch, n_global: int, preemption: _PreemptionSignals,
                evaluate: Evaluate | None) -> None:
        """A step and what follows it: the counters, a log line, a checkpoint, a periodic evaluation; after a
        preemption signal, a checkpoint and Preempted (all ranks agree on it, so they checkpoint together).
        `fit` calls this once per batch, and so does a group of runs sharing one stream (lm_saes.group_trainer)."""
        totals = self.step(batch, n_global, preempted=preemption.signal_name is not None)
        self.record(totals)
        if self.due(self.cfg.log_frequency) or self.finished:
            self.last_log = self.log_window()
        if self.due(self.plan.checkpoint_every) and not self.finished:
            self.save_checkpoint()
        if totals.preempted and not self.finished:
            raise self.preempted(preemption.signal_name)
        if evaluate is not None and self.main and self.due(self.cfg.eval_frequency) and not self.finished:
            self.log_eval(evaluate(self.sae))  # the last step gets the final evaluation, in finish

    def record(self, totals: StepTotals) -> None:
        """The bookkeeping after a step: the counters, the log window's sums, the progress bar."""
        self.state.record(totals)
        self.progress.advance(totals.n)

    def log_window(self) -> dict[str, float | int]:
        """Log the metrics of the steps since the last log line (console, wandb), return them, start afresh."""
        state = self.state
        result = state.window_summary(self.plan.dead_window)
        result.update(lr=self.scheduler.get_last_lr()[0], l1_coefficient=self.sparsity_coefficient(state.step - 1),
                      n_training_tokens=state.tokens_seen, step=state.step)
        self.progress.log(result)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in result.items()}, step=state.step)
        state.start_window()
        return result

    def log_eval(self, result: dict[str, float | None], step: int | None = None) -> None:
        self.progress.log({f"eval/{k}": v for k, v in result.items()})
        if self.wandb_run is not None:
            self.wandb_run.log({f"eval/{k}": v for k, v in result.items() if v is not None},
                               step=self.state.step if step is None else step)

    def warn_stream_ended(self) -> None:
        self.progress.console.print(
            f"[yellow]warning: the activation stream ended after {self.state.tokens_seen:,} tokens, before the "
            f"budget of {self.cfg.total_training_tokens:,}; use a larger corpus or a smaller budget"
        )

    def save_checkpoint(self) -> Path | None:
        """Every rank calls this (each hands over its stream's position); rank 0 writes and returns the path.
        The rest of the state is the same on every rank."""
        has_stream_state = hasattr(self.stream, "state_dict")
        stream_state = getattr(self.stream, "state_dict", dict)()
        stream_states = distributed.gather_to_main({k: v.cpu() for k, v in stream_state.items()})
        if stream_states is None:
            return None
        tensors = {**{f"sae.{k}": v for k, v in self.sae.state_dict().items()}, **self.state.tensors()}
        opt_tensors, param_groups = flatten_optimizer(self.optimizer.state_dict())
        tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
        for rank, rank_state in enumerate(stream_states):
            tensors.update({f"{stream_section(rank, self.world)}.{k}": v for k, v in rank_state.items()})
        return save_checkpoint(self.run_dir, self.state.step, tensors, {
            **self.checkpoint_meta, "batch_size": self.plan.batch_size, "param_groups": param_groups,
            "tokens_seen": self.state.tokens_seen, "has_stream_state": has_stream_state, "world_size": self.world,
        })

    def preempted(self, signal_name: str | None) -> Preempted:
        """Checkpoint (on every rank, together), then the error to stop with."""
        saved = self.save_checkpoint()
        received = f"received {signal_name}" if signal_name else "another rank received a preemption signal"
        return Preempted(
            f"{received} at step {self.state.step}: saved {saved or 'a checkpoint (rank 0)'}; rerun the same "
            "command (same trainer.exp_result_path) to resume", signal_name=signal_name,
        )

    def finish(self, final: dict[str, float | int], evaluate: Evaluate | None) -> dict[str, float | int]:
        """The final metrics: the last log line's (or the steps' since, when the stream ended between log lines),
        throughput, and the final evaluation; rank 0 writes them to metrics.json."""
        if self.state.window.n_tokens:
            final = self.state.window_summary(self.plan.dead_window)
            final.update(n_training_tokens=self.state.tokens_seen)
        final["tokens_per_second"] = self.progress.tokens_per_second
        final["world_size"] = self.world
        if evaluate is not None and self.main:
            downstream = evaluate(self.sae)
            self.log_eval(downstream, int(final.get("step", self.plan.total_steps)))
            final.update({k: v for k, v in downstream.items() if v is not None})
        if self.main:
            write_json_atomic(self.run_dir / METRICS_FILE, final)
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


def _lr_scheduler(optimizer: torch.optim.Optimizer, plan: TrainingPlan, step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a scheduler, at `step` (a resumed run's): the schedule is a pure function of the step, so
    it is replayed."""
    factor = functools.partial(lr_factor, total=plan.total_steps, warm=plan.lr_warm_up, cool=plan.lr_cool_down)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    with warnings.catch_warnings():  # stepping the schedule without optimizer steps is intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    return scheduler


def _peek_batch_size(stream: Iterator[ActivationBatch]) -> tuple[Iterator[ActivationBatch], int]:
    """The stream with its first batch put back, and the global batch size (all ranks' rows of it)."""
    first = next(stream, None)
    n_first = torch.tensor([0 if first is None else len(first["tokens"]), int(first is None)])
    batch_size, n_empty = (int(v) for v in distributed.all_reduce_sum(n_first).tolist())
    if first is None or n_empty:  # every rank raises, rather than wait for the one that did
        raise EmptyActivationStream()
    return itertools.chain([first], stream), batch_size


def _next_batch(batches: Iterator[ActivationBatch]) -> tuple[ActivationBatch | None, int]:
    """This rank's next batch and the global batch's row count; None on every rank once any rank's share ended."""
    batch = next(batches, None)
    n = 0 if batch is None else len(batch["tokens"])
    n_global, n_ended = distributed.all_reduce_sum(torch.tensor([n, int(batch is None)])).tolist()
    return (None if n_ended else batch), int(n_global)
