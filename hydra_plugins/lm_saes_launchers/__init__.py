"""lm_saes' Hydra launchers: a sweep's jobs grouped by activation stream, each group trained in one process.

Hydra finds launchers only in the `hydra_plugins` namespace package; the work is in lm_saes.cli.grouping,
imported when a sweep launches (Hydra imports this module at every start: it stays light).

- `hydra/launcher=grouped`: the groups run here, one after another.
- `hydra/launcher=slurm hydra.launcher.grouped=true`: one SLURM array task per group, split to fit mem_gb.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig


@dataclass
class GroupedLauncherConf:
    _target_: str = "hydra_plugins.lm_saes_launchers.GroupedLauncher"


@dataclass
class GroupedSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.lm_saes_launchers.GroupedSlurmLauncher"
    grouped: bool = False
    """One array task per group of jobs that share an activation stream (split to fit mem_gb)."""


ConfigStore.instance().store(group="hydra/launcher", name="lm_saes_grouped", node=GroupedLauncherConf,
                             provider="lm_saes")
ConfigStore.instance().store(group="hydra/launcher", name="lm_saes_slurm", node=GroupedSlurmConf, provider="lm_saes")


class GroupedLauncher(Launcher):
    """Runs each group of jobs sharing an activation stream in this process, one group after another."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context  # the task (lm-saes train's job) is run_group

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from lm_saes.cli.grouping import compose_jobs, print_groups, run_group, stream_groups

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = compose_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx)
        groups = stream_groups(configs)
        print_groups(configs, groups)
        returns: dict[int, JobReturn] = {}
        for group in groups:
            returns.update(zip(group, run_group(self.hydra_context, [configs[i] for i in group])))
        return [returns[i] for i in range(len(configs))]


class GroupedSlurmLauncher(SlurmLauncher):
    """The submitit SLURM launcher; with `grouped`, each array task is a group of jobs sharing a stream.

    A group travels through submitit as one "job" whose overrides are the group's jobs, each as a JSON
    string: the executor set-up, requeueing on preemption and result collection stay the plugin's."""

    def __init__(self, grouped: bool = False, **params: Any) -> None:
        super().__init__(**params)
        self.grouped = grouped

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not self.grouped:
            return super().launch(job_overrides, initial_job_idx)
        from lm_saes.cli.grouping import compose_jobs, plan_slurm_groups

        assert self.config is not None and self.hydra_context is not None
        configs = compose_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx)
        groups = plan_slurm_groups(configs, self.params.get("mem_gb"))
        tasks = [[json.dumps({"num": initial_job_idx + i, "overrides": list(job_overrides[i])}) for i in group]
                 for group in groups]
        results: dict[int, JobReturn] = {}
        for group, group_returns in zip(groups, super().launch(tasks, initial_job_idx)):
            results.update(zip(group, group_returns))  # type: ignore[call-overload]
        return [results[i] for i in range(len(job_overrides))]

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[Any, Any]) -> Any:
        if not self.grouped:
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        import submitit
        from hydra.core.singleton import Singleton
        from omegaconf import open_dict

        from lm_saes.cli.grouping import run_group

        assert self.config is not None and self.hydra_context is not None
        Singleton.set_state(singleton_state)
        setup_globals()
        configs = []
        for item in map(json.loads, sweep_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, item["overrides"])
            with open_dict(sweep_config.hydra.job):
                sweep_config.hydra.job.id = submitit.JobEnvironment().job_id
                sweep_config.hydra.job.num = item["num"]
            configs.append(sweep_config)
        return run_group(self.hydra_context, configs)
