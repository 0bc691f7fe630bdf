"""The keys a command-line user types, and the settings' keys behind them.

Two directions:
- `settable_overrides`: a field of the settings (say `sae.top_k_initial`) that the chosen preset does not spell
  out is still set with plain `key=value`, as the README documents it: such overrides become Hydra's `++key=value`
  (add or override) before composing. A key that is no field stays as typed and fails as an unknown key.
- `typed_key_error`: an error raised deep in a runner names the settings' key (`datasets.NAME.dataset_name_or_path`,
  `sae.device`); the line the user reads names the key they typed (`dataset.dataset_name_or_path`, `device`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lm_saes.cli.compose import GROUPS, LAUNCHER_GROUP, compose_single_run, model_at
from lm_saes.errors import UserInputError

DEVICE_KEYS = ("sae.device", "model.device")
"""Settings keys that the presets fill from the top-level `device` (`${device}`)."""


def settable_overrides(overrides: list[str], config_name: str, settings_cls: Any) -> list[str]:
    """`overrides` with every plain `a.b=v` whose key is a settings field missing from the composed presets
    turned into `++a.b=v`; flags and everything else unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args = [a for a in overrides if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return overrides  # the pre-check reports it
    plain = [o for o in parsed if _is_plain_key(o)]
    if not plain:
        return overrides
    groups = [o.input_line for o in parsed if o.key_or_group in (*GROUPS, LAUNCHER_GROUP)]
    try:
        base = compose_single_run(groups, config_name, sweep=True)
    except Exception:  # a bad preset: the pre-check reports it
        return overrides
    missing = {o.input_line for o in plain if _missing_field(base, o.key_or_group, settings_cls)}
    return [f"++{a}" if a in missing else a for a in overrides]


def _is_plain_key(override: Any) -> bool:
    key = override.key_or_group
    return ("." in key and not key.startswith("hydra.") and override.package is None
            and not (override.is_add() or override.is_force_add() or override.is_delete()))


def _missing_field(base: DictConfig, key: str, settings_cls: Any) -> bool:
    """`key` is absent from `base`, its parent is there, and the settings have a field at `key`."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(base, parent_key)
    if not isinstance(parent, DictConfig) or leaf in parent.keys():
        return False
    path = parent_key.split(".")
    if path[0] == "dataset":  # the CLI's `dataset` group is the settings' `datasets: {name: ...}`
        path = ["datasets", "", *path[1:]]
    model = model_at(settings_cls, path)
    return model is not settings_cls and leaf in model.model_fields


def typed_key_error(error: UserInputError, cfg: DictConfig, dataset_name: str | None) -> UserInputError:
    """`error` as the command-line user would name its key (itself when they typed that key)."""
    key = error.key
    if dataset_name is not None and key.startswith(f"datasets.{dataset_name}."):
        key = "dataset." + key.removeprefix(f"datasets.{dataset_name}.")
    elif key in DEVICE_KEYS and cfg.get("device") is not None and str(cfg.get("device")) == str(error.value):
        key = "device"
    elif key.startswith("activation_factory.sources.") and cfg.get("activation_cache") == error.value:
        key = "activation_cache"
    return error if key == error.key else UserInputError(key, error.value, error.allowed)


def dataset_name(cfg: DictConfig) -> str | None:
    """The name the composed `dataset` group takes in the settings' `datasets` (None: the verb has no dataset)."""
    dataset = cfg.get("dataset")
    return (dataset.get("name") or "dataset") if isinstance(dataset, DictConfig) else None
