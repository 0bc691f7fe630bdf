"""Several SAEs trained on one activation stream: each batch is read once and every SAE takes its step on it.

Each SAE is a `trainer._Run`, the very object `Trainer.fit` drives, stepped by the same `_Run.advance`; only
the loop is shared. So each SAE ends with the weights it gets when trained alone on the same stream, and
keeps its own schedule, metrics, checkpoints and wandb run. Faults stay local: a run whose step raises
(divergence, say) drops out and the others go on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from rich.console import Console

from lm_saes import distributed
from lm_saes.activation import ActivationBatch
from lm_saes.checkpoint import Checkpoint
from lm_saes.formatting import format_value
from lm_saes.progress import TokenProgress
from lm_saes.sae import SparseAutoEncoder
from lm_saes.sae.sparse_step import release_recycled
from lm_saes.trainer import (
    Evaluate,
    Preempted,
    TrainerConfig,
    TrainingPlan,
    _next_batch,
    _peek_batch_size,
    _PreemptionSignals,
    _Run,
)


@dataclass
class Member:
    """One SAE of a group, with what `Trainer.fit` would be given for it, and what to do when it ends."""

    label: str
    """How its log lines are told apart (its run directory)."""
    cfg: TrainerConfig
    sae: SparseAutoEncoder
    finished: Callable[[dict[str, float | int]], None]
    """Called with the final metrics once it has done its steps."""
    failed: Callable[[BaseException], None]
    """Called inside the `except` block of the error that ended it (so it can record the traceback)."""
    resume_from: Checkpoint | None = None
    wandb_run: Any | None = None
    evaluate: Evaluate | None = None
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)


def fit_together(members: list[Member], stream: Iterator[ActivationBatch]) -> None:
    """Train every member on `stream`'s batches until each has done its steps (or the stream ends).

    Members that resume must all resume from checkpoints of the same step (the stream's position is theirs).
    A member whose step or final evaluation raises calls `failed` and drops out. After SIGTERM/SIGUSR1/SIGUSR2
    every member still training checkpoints at the same step and calls `failed(Preempted)`; then Preempted
    is raised.
    """
    stream = iter(stream)
    resumed = members[0].resume_from if members else None
    if resumed is None:
        batches, batch_size = _peek_batch_size(stream)
    else:
        batches, batch_size = stream, int(resumed.meta["batch_size"])
    runs: dict[int, _Run] = {}
    for m in members:
        try:  # loading a checkpoint's optimizer state, say
            runs[id(m)] = _labelled_run(m, batch_size, stream)
        except Exception as e:
            m.failed(e)
    active, preempted = [m for m in members if id(m) in runs], []
    preemption = _PreemptionSignals()
    try:
        preemption.install()
        while active:
            batch, n_global = _next_batch(batches)
            if batch is None:
                for m in active:
                    runs[id(m)].warn_stream_ended()
                    _finish(m, runs[id(m)])
                return
            # One reading of the signal per batch: every member checkpoints at the same step.
            signal = SimpleNamespace(signal_name=preemption.signal_name)
            active = [m for m in active if _advance(m, runs[id(m)], batch, n_global, signal, preempted)]
            if preempted:
                raise Preempted(f"received {signal.signal_name} at step {runs[id(preempted[0])].state.step}: "
                                f"{len(preempted)} job(s) saved a checkpoint; rerun the same command to resume",
                                signal_name=signal.signal_name)
    finally:
        preemption.restore()
        for run in runs.values():
            run.progress.close()
        release_recycled()


def _labelled_run(m: Member, batch_size: int, stream: Iterator[ActivationBatch]) -> _Run:
    m.sae.train()
    plan = TrainingPlan.of(m.cfg, batch_size)
    # Plain, labelled lines: one live progress bar per process is all a terminal can show.
    progress = _LabelledProgress(m.label, plan.total_steps * batch_size, distributed.is_main())
    return _Run(m.cfg, plan, m.sae, stream, m.resume_from, m.wandb_run, m.checkpoint_meta, progress)


def _advance(m: Member, run: _Run, batch: ActivationBatch, n_global: int, signal: Any,
             preempted: list[Member]) -> bool:
    """One step of `m`; whether it goes on training. A preempted member (it has checkpointed) joins `preempted`."""
    try:
        run.advance(batch, n_global, signal, m.evaluate)
    except Exception as e:
        if isinstance(e, Preempted):
            preempted.append(m)
        m.failed(e)
        return False
    if run.finished:
        _finish(m, run)
        return False
    return True


def _finish(m: Member, run: _Run) -> None:
    try:
        final = run.finish(run.last_log, m.evaluate)
    except Exception as e:
        m.failed(e)
        return
    m.finished(final)


class _LabelledProgress(TokenProgress):
    """TokenProgress without a bar, whose plain log lines name the run."""

    def __init__(self, label: str, total_tokens: int, enabled: bool) -> None:
        super().__init__(total_tokens, label, Console(file=sys.stderr, force_terminal=False, quiet=not enabled),
                         enabled)
        self.label = label

    def log(self, metrics: dict[str, Any]) -> None:
        if self.enabled:
            text = "  ".join(f"{k}={format_value(v)}" for k, v in metrics.items())
            print(f"[{self.label}: {self.tokens:,}/{self.total_tokens:,} tok] {text}", flush=True)
