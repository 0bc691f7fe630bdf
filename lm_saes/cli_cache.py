"""The command line's side of the activation cache: `lm-saes generate`, and the pre-checks of a run, or a
sweep, that trains from a cache (`activation_factory=cached activation_cache=DIR`)."""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lm_saes.cli_config import ConfigError, datasets_from_cli, resolved_container, validate_settings
from lm_saes.errors import UserInputError


def check_train_inputs(settings: Any, cfg: DictConfig) -> None:
    """What the pre-check can see of a train run without a model: its activation caches (ConfigError with one
    line, naming `activation_cache` when that is what the user typed)."""
    from lm_saes.runners.train import check_activation_caches

    try:
        check_activation_caches(settings)
    except UserInputError as e:
        cache = cfg.get("activation_cache")
        if cache is not None and e.key.startswith("activation_factory.sources.") and e.value == cache:
            raise ConfigError(str(UserInputError("activation_cache", e.value, e.allowed))) from None
        raise ConfigError(str(e)) from None


def check_shared_cache(cfg: DictConfig) -> None:
    """A sweep's jobs share its activation_cache: a bad one fails before any job starts (ConfigError)."""
    cache = cfg.get("activation_cache")
    if cache is None:
        return
    from lm_saes.activation.cache import read_manifest

    try:
        read_manifest(cache, "activation_cache")
    except UserInputError as e:
        raise ConfigError(str(e)) from None


def generate_settings_from_config(cfg: DictConfig) -> Any:
    """Validate a composed `generate` config into GenerateSettings. Raises ConfigError with one line."""
    from lm_saes.runners.generate import GenerateSettings

    if OmegaConf.is_missing(cfg, "output_dir"):
        raise ConfigError("output_dir: missing; usage: lm-saes generate OUTPUT_DIR [KEY=VALUE ...]")
    data = resolved_container(cfg)
    name = datasets_from_cli(data)
    return validate_settings(GenerateSettings, data, dataset_name=name)


def run_generate_job(cfg: DictConfig) -> None:
    """The body of `lm-saes generate`'s Hydra job: validate, write the cache, report user mistakes as one line."""
    from lm_saes.runners.generate import generate_activations

    try:
        generate_activations(generate_settings_from_config(cfg))
    except (ConfigError, UserInputError) as e:
        print(f"lm-saes generate: {e}", file=sys.stderr)
        sys.exit(2)
