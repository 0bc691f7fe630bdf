"""The train runner: TrainSAESettings -> model, data, activations, SAE, trainer -> a finished run directory.

`train_sae(settings)` is the seed's high-level API and what `lm-saes train` calls.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator
from rich.console import Console

from lm_saes import distributed
from lm_saes.activation import (
    ActivationBatch,
    ActivationFactory,
    ActivationFactoryActivationsSource,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
)
from lm_saes.activation.cache import CacheManifest, read_manifest
from lm_saes.activation.factory import check_cache_hook_points
from lm_saes.config_base import BaseConfig, check_device_available
from lm_saes.datasets import DatasetConfig, load_dataset
from lm_saes.errors import EmptyActivationStream, UserInputError
from lm_saes.runners.held_out import training_evaluation
from lm_saes.initializer import Initializer, InitializerConfig
from lm_saes.language_model import LanguageModelConfig, TransformerLensLanguageModel
from lm_saes.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    CheckpointError,
    latest_checkpoint_path,
    load_checkpoint,
    stream_section,
)
from lm_saes.run_dir import RUN_CONFIG_FILE, claim, is_finished, write_status, write_text_atomic
from lm_saes.sae import SAEConfig, SparseAutoEncoder
from lm_saes.trainer import Preempted, Trainer, TrainerConfig


class WandbConfig(BaseConfig):
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "lm-saes"
    entity: str | None = None


class TrainSAESettings(BaseConfig):
    sae: SAEConfig
    initializer: InitializerConfig = InitializerConfig()
    trainer: TrainerConfig
    model: LanguageModelConfig = LanguageModelConfig()
    model_name: str | None = None
    """A short label for the model (logs, wandb); defaults to the last part of model.model_name."""
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)
    """The corpora the activation factory's dataset sources name; none are needed when every source is an
    activation cache."""
    activation_factory: ActivationFactoryConfig
    sae_name: str = "sae"
    sae_series: str = "default"
    """A group of related runs (the wandb group)."""
    wandb: WandbConfig = WandbConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_hook_points(cls, data: Any) -> Any:
        """activation_factory.hook_points, when absent or None, are the SAE's: hook_point_in, and hook_point_out
        for a transcoder (the factory itself requires them)."""
        if not isinstance(data, dict) or not isinstance(data.get("activation_factory"), dict):
            return data
        factory, sae = data["activation_factory"], data.get("sae")
        if factory.get("hook_points") is not None or sae is None:
            return data
        get = sae.get if isinstance(sae, dict) else lambda key: getattr(sae, key, None)
        hooks = list(dict.fromkeys(h for h in (get("hook_point_in"), get("hook_point_out")) if h))
        return {**data, "activation_factory": {**factory, "hook_points": hooks}}

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSAESettings":
        for i, source in enumerate(self.activation_factory.sources):
            if isinstance(source, ActivationFactoryDatasetSource) and source.name not in self.datasets:
                raise UserInputError(
                    f"activation_factory.sources.{i}.name", source.name, f"not a dataset; datasets: {', '.join(self.datasets)}"
                )
        for key, hook in (("sae.hook_point_in", self.sae.hook_point_in), ("sae.hook_point_out", self.sae.hook_point_target)):
            if hook not in self.activation_factory.hook_points:
                raise UserInputError(
                    key, hook, f"must be one of activation_factory.hook_points: {', '.join(self.activation_factory.hook_points)}"
                )
        if self.trainer.total_training_tokens < self.activation_factory.batch_size:
            raise UserInputError(
                "trainer.total_training_tokens", self.trainer.total_training_tokens,
                f"must be at least one batch (activation_factory.batch_size={self.activation_factory.batch_size})",
            )
        return self

    @property
    def resolved_model_name(self) -> str:
        return self.model_name or self.model.model_name.rstrip("/").split("/")[-1].removeprefix("builtin:")


def train_sae(settings: TrainSAESettings) -> SparseAutoEncoder:
    """Train an SAE as `settings` say and leave a finished run directory at trainer.exp_result_path.

    If that directory holds checkpoints of the same settings, training continues from the last one.
    Started by torchrun (or as one SLURM task per GPU), every process calls this: they train one SAE on their
    shares of the data, with rank 0's settings (its run directory), and rank 0 alone writes the run directory.
    """
    with distributed.process_group(settings.sae.device):
        if distributed.world_size() > 1:  # rank 0's settings on every rank (its run directory, for one)
            settings = TrainSAESettings.model_validate_json(distributed.broadcast_object(settings.model_dump_json()))
        return _train(settings)


def _train(settings: TrainSAESettings) -> SparseAutoEncoder:
    """train_sae's body, on every rank; `main` (rank 0) alone writes."""
    run_dir = Path(settings.trainer.exp_result_path)
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    check_devices(settings)
    checkpoint_path = distributed.on_main(lambda: claim_run_dir(settings))  # every rank reads it: a shared disk
    wandb_run = None
    try:
        checkpoint = start_run(settings, checkpoint_path, world)
        caches = check_activation_caches(settings)
        datasets, model = load_inputs([settings])
        sae_cfg = checked_sae_config(settings, model, caches)
        stream_state = checkpoint.section(stream_section(rank, world)) \
            if checkpoint and checkpoint.meta.get("has_stream_state") else None
        evaluate = training_evaluation(settings, model, datasets, world, caches) \
            if settings.trainer.eval_frequency else None
        stream = ActivationFactory(settings.activation_factory).process(
            model=model, model_name=settings.resolved_model_name, datasets=datasets, state=stream_state,
            rank=rank, world_size=world, caches=caches,
        )
        sae = starting_sae(settings, sae_cfg, checkpoint, stream, datasets, model)
        if checkpoint is None:
            distributed.broadcast_module_(sae)  # every rank starts from rank 0's initialization
        if main:
            sae.cfg.save_hyperparameters(run_dir)
            wandb_run = _start_wandb(settings)
        final = Trainer(settings.trainer).fit(
            sae=sae, activation_stream=stream, wandb_run=wandb_run, evaluate=evaluate, resume_from=checkpoint,
            checkpoint_meta=checkpoint_meta(settings),
        )
        if main:
            finish_run(settings, sae, final)
        return sae
    except BaseException as e:
        if main:
            record_failure(run_dir, e)
        raise
    finally:
        if wandb_run is not None:
            wandb_run.finish()


# --- the steps of a run, which a group of runs sharing one stream takes too (lm_saes.runners.train_group) ---

def claim_run_dir(settings: TrainSAESettings) -> Path | None:
    """Mark the run directory running (refusing a finished run); the checkpoint to resume, if any."""
    run_dir = Path(settings.trainer.exp_result_path)
    checkpoint_path = _checkpoint_to_resume(settings, run_dir)
    claim(run_dir, settings.trainer.overwrite)
    return checkpoint_path


def start_run(settings: TrainSAESettings, checkpoint_path: Path | None, world: int) -> Checkpoint | None:
    """Write config.yaml (rank 0); load the checkpoint to resume, checked against the settings."""
    if distributed.is_main():
        write_text_atomic(Path(settings.trainer.exp_result_path) / RUN_CONFIG_FILE,
                          yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None:
        _check_same_settings(checkpoint, settings, world)
    return checkpoint


def load_inputs(group: list[TrainSAESettings]) -> tuple[dict[str, Any], TransformerLensLanguageModel | None]:
    """The datasets and the model that runs sharing one stream (the first's) need, each loaded once."""
    settings = group[0]
    # Datasets first: a wrong path should fail before the model spends time loading.
    names = dict.fromkeys(s.name for s in settings.activation_factory.sources if isinstance(s, ActivationFactoryDatasetSource))
    datasets = {name: load_dataset(settings.datasets[name], f"datasets.{name}.dataset_name_or_path") for name in names}
    # Training from activation caches alone needs no model (that is what they are for), unless it evaluates.
    needs_model = names or any(s.trainer.eval_frequency for s in group)
    return datasets, TransformerLensLanguageModel(settings.model) if needs_model else None


def checked_sae_config(settings: TrainSAESettings, model: TransformerLensLanguageModel | None,
                       caches: dict[int, CacheManifest]) -> SAEConfig:
    """The SAE's config with d_model filled in, once the model has the run's hook points and context size."""
    sae_cfg = _resolve_sae_config(settings.sae, model, caches)
    if model is not None:
        for hook, key in hook_point_keys(settings).items():
            model.check_hook_points([hook], key)
        model.check_context_size(settings.activation_factory.context_size, "activation_factory.context_size")
    return sae_cfg


def starting_sae(settings: TrainSAESettings, sae_cfg: SAEConfig, checkpoint: Checkpoint | None,
                 stream: Iterator[ActivationBatch], datasets: dict[str, Any],
                 model: TransformerLensLanguageModel | None) -> SparseAutoEncoder:
    """The SAE to train: initialized on the stream's first batches (which it consumes), or, when resuming, an
    empty one that the trainer fills from the checkpoint."""
    if checkpoint is not None:
        Console(file=sys.stderr, quiet=not distributed.is_main()).print(
            f"resuming from {checkpoint.path} (step {checkpoint.meta['step']})")
        return SparseAutoEncoder(sae_cfg)
    try:
        return Initializer(settings.initializer).initialize_sae_from_config(sae_cfg, activation_stream=stream)
    except EmptyActivationStream:
        raise _empty_stream_error(settings, datasets, model) from None


def checkpoint_meta(settings: TrainSAESettings) -> dict[str, Any]:
    return {"settings": _fingerprint(settings)}


def finish_run(settings: TrainSAESettings, sae: SparseAutoEncoder, final: dict[str, float | int]) -> None:
    """The finished run's weights and status (rank 0), and its one-line summary."""
    run_dir = Path(settings.trainer.exp_result_path)
    sae.save_pretrained(run_dir)
    write_status(run_dir, "ok", metrics=final)
    Console(file=sys.stderr).print(
        f"[green]done[/]: {run_dir}  explained_variance={final['explained_variance']:.3f}  l0={final['l0']:.1f}  "
        f"dead={final['dead_fraction']:.1%}  ({final['n_training_tokens']:,} tokens)"
        + (f"  ce_loss_score={final['ce_loss_score']:.3f}" if "ce_loss_score" in final else "")
    )


def record_failure(run_dir: Path, error: BaseException) -> None:
    """status.json after `error` ended a claimed run: preempted (resumable) or failed, with the error."""
    if isinstance(error, Preempted):
        write_status(run_dir, "preempted", error=str(error))
    else:
        write_status(run_dir, "failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())


def _empty_stream_error(settings: TrainSAESettings, datasets: dict[str, Any],
                        model: TransformerLensLanguageModel | None) -> UserInputError:
    """Why the stream gave no batch: an empty corpus, or one shorter than a single context (only full contexts
    are trained on). Counts the corpus's text tokens, which is cheap here: the stream has read all of it."""
    name, dataset = next(iter(datasets.items()), (None, None))
    if name is None or model is None:
        return UserInputError("activation_factory.sources", [s.model_dump() for s in settings.activation_factory.sources],
                              "the sources gave no activations")
    key, path = f"datasets.{name}.dataset_name_or_path", settings.datasets[name].dataset_name_or_path
    context_size = settings.activation_factory.context_size
    n_tokens = 0
    for row in dataset:
        n_tokens += len(model.tokenizer(row["text"], add_special_tokens=False)["input_ids"]) if row["text"].strip() else 0
        if n_tokens >= context_size:
            break
    if n_tokens == 0:
        return UserInputError(key, path, "the corpus is empty: it gave no text tokens")
    return UserInputError(key, path, f"the corpus holds only {n_tokens:,} text tokens, fewer than one context of "
                          f"activation_factory.context_size={context_size}; use a larger corpus or a smaller context_size")


def check_devices(settings: TrainSAESettings) -> None:
    """Every device the run puts something on exists on this machine (else a one-line UserInputError)."""
    shuffle = settings.activation_factory.buffer_shuffle
    for key, device in (("sae.device", settings.sae.device), ("model.device", settings.model.device),
                        ("activation_factory.buffer_shuffle.generator_device", shuffle.generator_device)):
        if device is not None:
            check_device_available(device, key)


def _checkpoint_to_resume(settings: TrainSAESettings, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, per trainer.resume; `overwrite` on a finished run starts afresh."""
    resume, latest = settings.trainer.resume, latest_checkpoint_path(run_dir)
    if settings.trainer.overwrite and is_finished(run_dir):
        shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        latest = None
    if resume is True and latest is None:
        raise UserInputError("trainer.resume", True, f"there is no checkpoint in {run_dir / CHECKPOINT_DIR} to resume")
    if resume is False and latest is not None:
        raise UserInputError(
            "trainer.resume", False, f"{run_dir} has checkpoints; resume them (leave trainer.resume unset) or pick "
            "another trainer.exp_result_path",
        )
    return latest


_VOLATILE_TRAINER_KEYS = ("exp_result_path", "overwrite", "resume", "log_frequency", "n_checkpoints", "eval_frequency")


def _fingerprint(settings: TrainSAESettings) -> dict[str, Any]:
    """What must not change between a checkpoint and its resumption."""
    data = settings.model_dump(mode="json", exclude={"wandb", "sae_name", "sae_series"})
    for key in _VOLATILE_TRAINER_KEYS:
        data["trainer"].pop(key, None)
    return data


def _check_same_settings(checkpoint: Checkpoint, settings: TrainSAESettings, world_size: int) -> None:
    if int(checkpoint.meta.get("world_size", 1)) != world_size:  # each rank resumes its own stream position
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written by {checkpoint.meta.get('world_size', 1)} data-parallel "
            f"processes, this run has {world_size}; resume with as many (torchrun --nproc_per_node)"
        )
    saved, now = checkpoint.meta.get("settings", {}), _fingerprint(settings)
    differing = [f"{section}.{key}" for section in sorted(set(saved) | set(now))
                 for key in sorted(set(_as_dict(saved.get(section))) | set(_as_dict(now.get(section))))
                 if _as_dict(saved.get(section)).get(key) != _as_dict(now.get(section)).get(key)]
    if differing:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written with different settings ({', '.join(differing)}); "
            "resume with the same settings, or pick another trainer.exp_result_path"
        )


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"": value}


def hook_point_keys(settings: TrainSAESettings) -> dict[str, str]:
    """Every hook point the run reads, with the key an error names it by: the SAE's own first, as
    sae.hook_point_in/out (the CLI copies them into activation_factory.hook_points, but the user typed them
    there), then the factory's others. TrainSAESettings checks that the SAE's are among the factory's, so
    checking these against the model, and against each cache, checks every hook point once."""
    keys = {settings.sae.hook_point_in: "sae.hook_point_in"}
    keys.setdefault(settings.sae.hook_point_target, "sae.hook_point_out")
    for hook in settings.activation_factory.hook_points:
        keys.setdefault(hook, "activation_factory.hook_points")
    return keys


def check_activation_caches(settings: TrainSAESettings) -> dict[int, CacheManifest]:
    """The manifests of the run's activation-cache sources, by source index, checked against the settings:
    each is complete, of the same model, holds the run's hook points, and has its context size and d_model
    (else a one-line UserInputError). Reads only the manifests: the CLI's pre-check runs it too."""
    factory, caches = settings.activation_factory, {}
    for i, source in enumerate(factory.sources):
        if not isinstance(source, ActivationFactoryActivationsSource):
            continue
        manifest = caches[i] = read_manifest(source.path, f"activation_factory.sources.{i}.path")
        if not _same_model(manifest.model_name, settings.model.model_name):
            raise UserInputError("model.model_name", settings.model.model_name, f"the activation cache {source.path} "
                                 f"holds activations of {manifest.model_name}; train with model.model_name={manifest.model_name}")
        check_cache_hook_points(manifest, source.path, hook_point_keys(settings))
        if manifest.context_size != factory.context_size:
            # Training would not mind, but evaluate and analyze read held-out text in contexts of this size.
            raise UserInputError("activation_factory.context_size", factory.context_size,
                                 f"the activation cache {source.path} was made with context_size {manifest.context_size}; "
                                 f"train with activation_factory.context_size={manifest.context_size}")
        if settings.sae.d_model is not None and settings.sae.d_model != manifest.d_model:
            raise UserInputError("sae.d_model", settings.sae.d_model,
                                 f"does not match the activation cache's d_model ({manifest.d_model})")
    return caches


def _same_model(a: str, b: str) -> bool:
    """The same model name, or two spellings of one local model folder."""
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def _resolve_sae_config(cfg: SAEConfig, model: TransformerLensLanguageModel | None,
                        caches: dict[int, CacheManifest]) -> SAEConfig:
    """Fill d_model from the model (or, without one, from the activation caches, which
    check_activation_caches has matched to the settings), or check it."""
    if model is None:
        return cfg.model_copy(update={"d_model": next(iter(caches.values())).d_model})
    if cfg.d_model is not None and cfg.d_model != model.d_model:
        raise UserInputError("sae.d_model", cfg.d_model, f"does not match the model's d_model ({model.d_model})")
    return cfg.model_copy(update={"d_model": model.d_model})


def _start_wandb(settings: TrainSAESettings) -> Any | None:
    if settings.wandb.mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=settings.wandb.project, entity=settings.wandb.entity, name=settings.sae_name, group=settings.sae_series,
        tags=[settings.resolved_model_name, settings.sae.act_fn], mode=settings.wandb.mode,
        dir=os.fspath(settings.trainer.exp_result_path),
        config=settings.model_dump(mode="json"),
        reinit="create_new",  # the jobs of a group (train_saes_together) each have a run open at once
    )
