"""The verbs' own steps between composing and running: train's way from the composed config to its settings,
and the pre-checks that read the inputs a run names (activation caches, run directories) without a model.

They are the verb table's entries (lm_saes.cli.verbs); each raises ConfigError, or UserInputError, with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lm_saes.cli.compose import ConfigError, data_with_datasets, group_options
from lm_saes.cli.slurm import check_cluster_reachable, uses_slurm
from lm_saes.errors import UserInputError


def train_data(cfg: DictConfig, run_dir: str | None) -> tuple[dict[str, Any], str]:
    """A composed `train` config as TrainSAESettings' data: an SAE preset is chosen, a cached source has its
    directory, and trainer.exp_result_path defaults to the Hydra job's output directory."""
    if "sae" not in cfg or cfg.sae is None:
        raise ConfigError(f"sae: missing; choose a preset with +sae=NAME, one of: {', '.join(group_options('sae'))}")
    data, name = data_with_datasets(cfg)
    factory = data.get("activation_factory") or {}
    if any(isinstance(s, dict) and "path" in s and s["path"] is None for s in factory.get("sources") or []):
        raise ConfigError("activation_cache: missing; activation_factory=cached trains from the activation cache at "
                          "activation_cache=DIR (make one with lm-saes generate DIR)")
    trainer = data.get("trainer") or {}
    if trainer.get("exp_result_path") is None:
        trainer["exp_result_path"] = run_dir or "results"
    return data, name


def train_inputs(settings: Any, cfg: DictConfig) -> None:
    """What a train run needs besides a model: its devices exist here, and its activation caches are usable."""
    from lm_saes.runners.train import check_devices

    check_devices(settings)
    activation_caches(settings, cfg)


def activation_caches(settings: Any | None, cfg: DictConfig) -> None:
    """The activation caches a train run reads, checked from their manifests, each read once (UserInputError).

    With the run's settings, all that check_activation_caches sees (complete, same model, hook points, context
    size); without (a sweep, whose jobs' values may differ), only that the shared cache is a complete one."""
    from lm_saes.activation.cache import read_manifest
    from lm_saes.runners.train import check_activation_caches

    if settings is not None:
        check_activation_caches(settings)
    elif cfg.get("activation_cache") is not None:
        read_manifest(cfg.activation_cache, "activation_cache")


def training_run(settings: Any, cfg: DictConfig) -> None:
    """settings.run_dir is a finished training run (evaluate, analyze), and the device it will run on exists."""
    from lm_saes.config_base import check_device_available
    from lm_saes.runners.run_loading import load_run_settings

    run = load_run_settings(Path(settings.run_dir))
    check_device_available(settings.device or run.model.device, "device")


def finished_run(settings: Any, cfg: DictConfig) -> None:
    """settings.run_dir is a finished training run (export)."""
    from lm_saes.runners.run_loading import load_run_settings

    load_run_settings(Path(settings.run_dir))


def generate_inputs(settings: Any, cfg: DictConfig) -> None:
    """The device the model of `lm-saes generate` runs on exists."""
    from lm_saes.config_base import check_device_available

    check_device_available(settings.model.device, "model.device")


def analysed_run(settings: Any, cfg: DictConfig) -> None:
    """settings.run_dir holds an analysis that this code reads (dashboard)."""
    from lm_saes.analysis.files import read_analysis_info

    read_analysis_info(Path(settings.run_dir))


def launcher(cfg_with_hydra: DictConfig) -> None:
    """A sweep for hydra/launcher=slurm has a cluster to go to."""
    if uses_slurm(cfg_with_hydra):
        try:
            check_cluster_reachable()
        except UserInputError as e:
            raise ConfigError(str(e)) from None
