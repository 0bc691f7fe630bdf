"""The `@hydra.main` functions, one line each. They stay module-level functions: the submitit launcher pickles
them, with this module's globals, and the job process imports them back by name."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lm_saes.cli.jobs import train_job, verb_job
from lm_saes.cli.verbs import VERBS

_CONFIG = {"config_path": "pkg://lm_saes.conf", "version_base": "1.3"}


@hydra.main(config_name=VERBS["train"].config, **_CONFIG)
def train(cfg: DictConfig) -> None:
    train_job(cfg)


@hydra.main(config_name=VERBS["generate"].config, **_CONFIG)
def generate(cfg: DictConfig) -> None:
    verb_job("generate", cfg)


@hydra.main(config_name=VERBS["evaluate"].config, **_CONFIG)
def evaluate(cfg: DictConfig) -> None:
    verb_job("evaluate", cfg)


@hydra.main(config_name=VERBS["analyze"].config, **_CONFIG)
def analyze(cfg: DictConfig) -> None:
    verb_job("analyze", cfg)


@hydra.main(config_name=VERBS["dashboard"].config, **_CONFIG)
def dashboard(cfg: DictConfig) -> None:
    verb_job("dashboard", cfg)


@hydra.main(config_name=VERBS["report"].config, **_CONFIG)
def report(cfg: DictConfig) -> None:
    verb_job("report", cfg)


@hydra.main(config_name=VERBS["export"].config, **_CONFIG)
def export(cfg: DictConfig) -> None:
    verb_job("export", cfg)


APPS = {"train": train, "generate": generate, "evaluate": evaluate, "analyze": analyze, "dashboard": dashboard,
        "report": report, "export": export}
"""The Hydra application of each verb in the table."""
