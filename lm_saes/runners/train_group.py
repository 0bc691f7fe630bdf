"""Train several SAEs (or transcoders) from one activation stream: `train_saes_together(settings_list)`.

A sweep over act_fn, k, expansion factor, sparsity coefficient or learning rate trains every SAE on the same
activations; running the model once for all of them is most of the saving. The jobs must share the stream:
the same model, datasets, activation_factory (hook_points aside: the stream reads the union of theirs) and
initializer.n_norm_estimation_batches (the batches the initializer takes before training). Each job keeps
its own run directory, exactly as `train_sae` writes it (config.yaml, config.json, weights, metrics.json,
status.json, checkpoints, wandb run), and ends with the weights `train_sae` gives it alone.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_saes.activation import ActivationBatch, ActivationFactory
from lm_saes.activation.cache import CacheManifest
from lm_saes.checkpoint import Checkpoint, stream_section
from lm_saes.distributed import launch_from_env
from lm_saes.errors import UserInputError
from lm_saes.group_trainer import Member, fit_together
from lm_saes.language_model import TransformerLensLanguageModel
from lm_saes.run_dir import is_finished
from lm_saes.runners.held_out import training_evaluation
from lm_saes.runners.train import (
    TrainSAESettings,
    _start_wandb,
    check_activation_caches,
    check_devices,
    checked_sae_config,
    checkpoint_meta,
    claim_run_dir,
    finish_run,
    load_inputs,
    record_failure,
    start_run,
    starting_sae,
)
from lm_saes.sae import SAEConfig, SparseAutoEncoder
from lm_saes.trainer import Preempted

Outcome = SparseAutoEncoder | BaseException
"""A job's result: its trained SAE, or the error that ended it (also in its status.json when it got that far)."""


def stream_key(settings: TrainSAESettings) -> dict[str, Any]:
    """What fixes a run's activation stream, as dotted keys: two runs with equal keys read the same batches."""
    data = settings.model_dump(mode="json")
    factory = {k: v for k, v in data["activation_factory"].items() if k != "hook_points"}
    key = {"model_name": settings.resolved_model_name,
           "initializer.n_norm_estimation_batches": settings.initializer.n_norm_estimation_batches}
    for section, value in (("model", data["model"]), ("datasets", data["datasets"]), ("activation_factory", factory)):
        key.update(_flat(section, value))
    return key


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    return {k: v for name, item in value.items() for k, v in _flat(f"{prefix}.{name}", item).items()}


def check_one_stream(group: list[TrainSAESettings]) -> None:
    """The jobs share one activation stream and have distinct run directories (else a one-line UserInputError
    naming the first key that differs)."""
    first = stream_key(group[0])
    for i, settings in enumerate(group[1:], 1):
        other = stream_key(settings)
        for key in dict.fromkeys([*first, *other]):
            if first.get(key) != other.get(key):
                raise UserInputError(
                    key, other.get(key), f"job {i} differs from job 0 ({first.get(key)!r}); jobs trained together "
                    "share one activation stream: the same model, datasets, activation_factory (hook_points aside) "
                    "and initializer.n_norm_estimation_batches")
    seen: dict[Path, int] = {}
    for i, settings in enumerate(group):
        run_dir = Path(settings.trainer.exp_result_path).resolve()
        if run_dir in seen:
            raise UserInputError("trainer.exp_result_path", settings.trainer.exp_result_path,
                                 f"job {i} has the run directory of job {seen[run_dir]}; give each job its own")
        seen[run_dir] = i


@dataclass
class _Job:
    settings: TrainSAESettings
    outcome: Outcome | None = None
    checkpoint: Checkpoint | None = None
    caches: dict[int, CacheManifest] | None = None
    sae_cfg: SAEConfig | None = None
    wandb_run: Any | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.trainer.exp_result_path)

    def fail(self, error: BaseException, claimed: bool = True) -> None:
        """Record `error` as this job's end (in status.json once its directory is claimed); call it inside the
        `except` block, for the traceback."""
        self.outcome = error
        if claimed:
            record_failure(self.run_dir, error)
        if not isinstance(error, Preempted):
            print(f"failed: {self.run_dir}: {type(error).__name__}: {error}", file=sys.stderr)
        self._close_wandb()

    def succeed(self, sae: SparseAutoEncoder, final: dict[str, float | int]) -> None:
        finish_run(self.settings, sae, final)
        self.outcome = sae
        self._close_wandb()

    def _close_wandb(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def train_saes_together(group: list[TrainSAESettings]) -> list[Outcome]:
    """Train the SAEs of `group` from one activation stream, in this process; each job's outcome, in order.

    Each job's run directory ends as `train_sae` leaves it, with the same weights. A job that fails its checks
    (a finished run directory, a hook point the model lacks, a checkpoint of other settings) or fails while
    training (a diverging loss) gets its error as outcome, and `failed` in status.json; the others go on. Jobs
    with checkpoints resume from them: jobs whose checkpoints are at different steps are trained one step
    position after another, each from its own stream. After a preemption signal every unfinished job is
    checkpointed (status `preempted`) and Preempted is raised: call again to resume. Settings that do not
    share a stream are a UserInputError naming the differing key, before anything is written.
    """
    if not group:
        return []
    check_one_stream(group)
    launch = launch_from_env()
    if launch.world_size > 1:
        raise UserInputError("WORLD_SIZE", launch.world_size, "a group of jobs trains in one process; run it "
                             "without torchrun/srun tasks (data-parallel training is for single jobs: train_sae)")
    jobs = [_Job(settings) for settings in group]
    for job in jobs:
        _open(job)
    try:
        inputs = _shared_inputs([j for j in jobs if j.outcome is None])
        for _, part in itertools.groupby(sorted((j for j in jobs if j.outcome is None), key=_resume_step),
                                         key=_resume_step):
            _train_part(list(part), *inputs)
    except BaseException as e:  # shared by every job still open: a missing model, a preemption
        for job in jobs:
            if job.outcome is None:
                job.fail(e)
        raise
    return [job.outcome for job in jobs]  # type: ignore[misc]


def _open(job: _Job) -> None:
    """The job's own checks and start, as train_sae does them; a failure ends only this job."""
    try:
        check_devices(job.settings)
        checkpoint_path = claim_run_dir(job.settings)
    except Exception as e:  # before the claim: a finished run's status.json stays as it is
        job.fail(e, claimed=not is_finished(job.run_dir))
        return
    try:
        job.checkpoint = start_run(job.settings, checkpoint_path, 1)
        job.caches = check_activation_caches(job.settings)
    except Exception as e:
        job.fail(e)


def _shared_inputs(jobs: list[_Job]) -> tuple[dict[str, Any], TransformerLensLanguageModel | None]:
    """The datasets and the model, loaded once; then each job's checks against the model."""
    if not jobs:
        return {}, None
    datasets, model = load_inputs([j.settings for j in jobs])
    for job in jobs:
        try:
            job.sae_cfg = checked_sae_config(job.settings, model, job.caches or {})
        except Exception as e:
            job.fail(e)
    return datasets, model


def _resume_step(job: _Job) -> int:
    return -1 if job.checkpoint is None else int(job.checkpoint.meta["step"])


def _train_part(jobs: list[_Job], datasets: dict[str, Any], model: TransformerLensLanguageModel | None) -> None:
    """Train `jobs`, which start at the same step (all fresh, or all resuming from one step), on one stream."""
    jobs = [j for j in jobs if j.outcome is None]
    if not jobs:
        return
    first = jobs[0]
    hook_points = list(dict.fromkeys(h for j in jobs for h in j.settings.activation_factory.hook_points))
    checkpoint = first.checkpoint
    state = checkpoint.section(stream_section(0, 1)) if checkpoint and checkpoint.meta.get("has_stream_state") else None
    stream = ActivationFactory(first.settings.activation_factory.model_copy(update={"hook_points": hook_points})).process(
        model=model, model_name=first.settings.resolved_model_name, datasets=datasets, state=state,
        caches=first.caches,
    )
    init_batches: list[ActivationBatch] = [] if checkpoint is not None else \
        [b for _, b in zip(range(first.settings.initializer.n_norm_estimation_batches), stream)]
    members = [m for m in (_member(j, datasets, model, init_batches) for j in jobs) if m is not None]
    if members:
        fit_together(members, stream)


def _member(job: _Job, datasets: dict[str, Any], model: TransformerLensLanguageModel | None,
            init_batches: list[ActivationBatch]) -> Member | None:
    """The job's SAE (initialized on the shared first batches, or to be loaded from its checkpoint), its run
    directory's config.json and wandb run, as a member of the group; None if that failed."""
    settings = job.settings
    try:
        assert job.sae_cfg is not None
        sae = starting_sae(settings, job.sae_cfg, job.checkpoint, iter(init_batches), datasets, model)
        sae.cfg.save_hyperparameters(job.run_dir)
        evaluate = training_evaluation(settings, model, datasets, 1, job.caches or {}) \
            if settings.trainer.eval_frequency else None
        job.wandb_run = _start_wandb(settings)
    except Exception as e:
        job.fail(e)
        return None
    return Member(
        label=str(job.run_dir), cfg=settings.trainer, sae=sae, resume_from=job.checkpoint, wandb_run=job.wandb_run,
        evaluate=evaluate, checkpoint_meta=checkpoint_meta(settings),
        finished=lambda final: job.succeed(sae, final), failed=job.fail,
    )
