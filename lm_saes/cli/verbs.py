"""The table of verbs: for each `lm-saes VERB`, the config it composes, the settings that config validates
into, the runner that does the work, its positional argument, and what is checked before Hydra makes a directory.

Every entry that names code is a "module:name" string, imported only when the verb runs, so that
`lm-saes --help` stays free of torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lm_saes.cli.checks import activation_caches, launcher
from lm_saes.cli.compose import ConfigError, compose_single_run, validate_settings
from lm_saes.cli.keys import dataset_name, settable_overrides, typed_key_error
from lm_saes.errors import UserInputError


@dataclass(frozen=True)
class Verb:
    config: str
    """The config Hydra composes: conf/CONFIG.yaml."""
    settings: str
    """The settings class the composed config validates into."""
    runner: str
    """The function that takes those settings and does the work (the Python API calls it too)."""
    positional: tuple[str, ...] = ()
    """The config keys that the bare arguments fill, in order: `lm-saes evaluate DIR` is `run_dir='DIR'`."""
    check: str | None = None
    """A function of (settings, composed config) that raises UserInputError (or ConfigError) when a single run
    could not use its inputs; the pre-check runs it. It reads files, never loads a model."""
    to_data: str = "lm_saes.cli.compose:plain_data"
    """A function of (composed config, the job's output directory) to (what `settings` validates, the name the
    `dataset` group became, if the verb has one)."""
    data_parallel: bool = False
    """One job may be several processes (torchrun, or srun of several tasks)."""


VERBS: dict[str, Verb] = {
    "train": Verb("train", "lm_saes.runners.train:TrainSAESettings", "lm_saes.runners.train:train_sae",
                  check="lm_saes.cli.checks:train_inputs", to_data="lm_saes.cli.checks:train_data",
                  data_parallel=True),
    "generate": Verb("generate", "lm_saes.runners.generate:GenerateSettings",
                     "lm_saes.runners.generate:generate_activations", positional=("output_dir",),
                     check="lm_saes.cli.checks:generate_inputs", to_data="lm_saes.cli.compose:data_with_datasets"),
    "evaluate": Verb("evaluate", "lm_saes.runners.evaluate:EvaluateSettings", "lm_saes.runners.evaluate:evaluate_run",
                     positional=("run_dir",), check="lm_saes.cli.checks:training_run"),
    "analyze": Verb("analyze", "lm_saes.runners.analyze:AnalyzeSettings", "lm_saes.runners.analyze:analyze_run",
                    positional=("run_dir",), check="lm_saes.cli.checks:training_run"),
    "dashboard": Verb("dashboard", "lm_saes.runners.dashboard:DashboardSettings",
                      "lm_saes.runners.dashboard:dashboard_run", positional=("run_dir",),
                      check="lm_saes.cli.checks:analysed_run"),
    "export": Verb("export", "lm_saes.runners.export:ExportSettings", "lm_saes.runners.export:export_run",
                   positional=("run_dir", "out_dir"), check="lm_saes.cli.checks:finished_run"),
    "report": Verb("report", "lm_saes.runners.report:ReportSettings", "lm_saes.runners.report:report_run",
                   positional=("run_dir",)),
}


def load(target: str) -> Any:
    """The object a "module:name" entry names."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def settings_from_config(cfg: DictConfig, run_dir: str | None = None, verb: str = "train") -> Any:
    """Validate a composed config of `verb` into its settings; `run_dir` is the Hydra job's output directory
    (train's default trainer.exp_result_path). Raises ConfigError with one line."""
    spec = VERBS[verb]
    for key in spec.positional:
        if OmegaConf.is_missing(cfg, key):
            usage = " ".join(k.upper() for k in spec.positional)
            raise ConfigError(f"{key}: missing; usage: lm-saes {verb} {usage} [KEY=VALUE ...]")
    data, dataset_name = load(spec.to_data)(cfg, run_dir)
    return validate_settings(load(spec.settings), data, dataset_name=dataset_name)


def precheck(verb: str, overrides: list[str], multirun: bool) -> list[str]:
    """Compose and check what `verb` would run, before Hydra makes a directory (ConfigError with one line); return
    the overrides to hand to Hydra (settings fields the presets lack set with `++`, see lm_saes.cli.keys).

    A sweep is checked for its structure (its first job composes) and what its jobs share (the activation cache,
    the launcher) only: a job whose values are wrong records `failed`, and the others go on."""
    spec = VERBS[verb]
    overrides = settable_overrides(overrides, spec.config, load(spec.settings))
    if multirun:
        composed = compose_single_run([a for a in overrides if not a.startswith("-")], spec.config, sweep=True)
        try:
            activation_caches(None, composed)
        except UserInputError as e:
            raise ConfigError(str(e)) from None
        launcher(composed)
        return overrides
    composed = compose_single_run(overrides, spec.config)
    settings = settings_from_config(composed, None, verb)
    if spec.check is not None:
        try:
            load(spec.check)(settings, composed)
        except UserInputError as e:
            raise ConfigError(str(typed_key_error(e, composed, dataset_name(composed)))) from None
    return overrides
