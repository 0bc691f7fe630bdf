"""The `@hydra.main` functions, one line each: the submitit launcher pickles them with this module."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="pkg://lm_saes.conf", config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> None:
    from lm_saes.cli_config import run_train_job

    run_train_job(cfg)


@hydra.main(config_path="pkg://lm_saes.conf", config_name="generate", version_base="1.3")
def generate(cfg: DictConfig) -> None:
    from lm_saes.cli_cache import run_generate_job

    run_generate_job(cfg)


@hydra.main(config_path="pkg://lm_saes.conf", config_name="evaluate", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    from lm_saes.cli_config import run_dir_job

    run_dir_job("evaluate", cfg)


@hydra.main(config_path="pkg://lm_saes.conf", config_name="analyze", version_base="1.3")
def analyze(cfg: DictConfig) -> None:
    from lm_saes.cli_config import run_dir_job

    run_dir_job("analyze", cfg)


@hydra.main(config_path="pkg://lm_saes.conf", config_name="dashboard", version_base="1.3")
def dashboard(cfg: DictConfig) -> None:
    from lm_saes.cli_config import run_dir_job

    run_dir_job("dashboard", cfg)


@hydra.main(config_path="pkg://lm_saes.conf", config_name="report", version_base="1.3")
def report(cfg: DictConfig) -> None:
    from lm_saes.cli_config import run_dir_job

    run_dir_job("report", cfg)


APPS = {"train": train, "generate": generate, "evaluate": evaluate, "analyze": analyze, "dashboard": dashboard,
        "report": report}
