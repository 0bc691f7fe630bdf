"""A sweep's jobs grouped by activation stream, each group trained in one process (train_saes_together).

The launchers in hydra_plugins/lm_saes_launchers call these: `hydra/launcher=grouped` runs the groups here,
one after another; `hydra/launcher=slurm hydra.launcher.grouped=true` makes each group one SLURM array task.
Every job is composed first, exactly as Hydra composes it for a job of its own (its output directory, its
.hydra/ folder), so a job is the same job whichever launcher runs it.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict, read_write

ADAM_SETS = 4
"""Copies of each parameter a training SAE holds: the weights, their gradients, Adam's two moments."""


def compose_jobs(hydra_context: Any, config: DictConfig, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list[DictConfig]:
    """Each job's composed config, numbered as Hydra numbers them."""
    configs = []
    for i, overrides in enumerate(job_overrides):
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = initial_job_idx + i
        configs.append(sweep_config)
    return configs


def job_settings(sweep_config: DictConfig, run_dir: str | None = None) -> Any:
    """The job's TrainSAESettings (ConfigError when its config is wrong). Its interpolations may read Hydra's
    config (`${hydra:...}`), so that is set to the job's while validating."""
    from hydra.core.hydra_config import HydraConfig

    from lm_saes.cli.verbs import settings_from_config

    HydraConfig.instance().set_config(sweep_config)
    job_cfg = copy.deepcopy(sweep_config)
    with read_write(job_cfg), open_dict(job_cfg):
        del job_cfg["hydra"]
    return settings_from_config(job_cfg, run_dir=run_dir or "unused")


def stream_groups(configs: list[DictConfig]) -> list[list[int]]:
    """The jobs' indices grouped by activation stream, in order of first appearance; a job whose config does
    not validate is a group of its own (it fails as it would alone)."""
    from lm_saes.cli.compose import ConfigError
    from lm_saes.runners.train_group import stream_key

    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        try:
            key = json.dumps(stream_key(job_settings(cfg)), sort_keys=True)
        except ConfigError:
            key = f"invalid job {i}"
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def print_groups(configs: list[DictConfig], groups: list[list[int]]) -> None:
    for n, group in enumerate(groups):
        print(f"lm-saes train: group {n}: {_jobs_text(configs, group)}", file=sys.stderr)


def _jobs_text(configs: list[DictConfig], group: list[int]) -> str:
    if len(group) == 1:
        return f"job {configs[group[0]].hydra.job.num} alone"
    return f"jobs {', '.join(str(configs[i].hydra.job.num) for i in group)} share one activation stream"


def run_group(hydra_context: Any, configs: list[DictConfig]) -> list[Any]:
    """Set up each job as Hydra would (output directory, .hydra/), then train them together; one JobReturn
    per job. A job whose config is wrong, or that fails, records `failed` and the others go on; a preemption
    hands the signal on (under submitit: the group's task is requeued) and the rerun resumes every job."""
    from hydra.core.utils import run_job

    from lm_saes.cli.jobs import PREEMPTED_EXIT_CODE, _hand_on_signal
    from lm_saes.runners.train_group import train_saes_together
    from lm_saes.trainer import Preempted

    returns = [run_job(hydra_context=hydra_context, task_function=_prepared_job, config=cfg,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir") for cfg in configs]
    ready = [(cfg, ret) for cfg, ret in zip(configs, returns) if ret.return_value is not None]
    try:
        outcomes = train_saes_together([ret.return_value for _, ret in ready])
    except Preempted as e:
        print(f"lm-saes train: {e}", file=sys.stderr)
        _hand_on_signal(e.signal_name)
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as e:  # shared by the whole group (its corpus is missing, say): each job recorded it
        jobs = ", ".join(str(cfg.hydra.job.num) for cfg, _ in ready)
        print(f"lm-saes train (jobs {jobs}): {type(e).__name__}: {e}", file=sys.stderr)
        outcomes = [None] * len(ready)
    for (cfg, ret), outcome in zip(ready, outcomes):
        if isinstance(outcome, BaseException):
            print(f"lm-saes train (job {cfg.hydra.job.num}): {type(outcome).__name__}: {outcome}", file=sys.stderr)
        ret.return_value = None  # the settings are no result
    return returns


def _prepared_job(cfg: DictConfig) -> Any:
    """A job's body before training: its settings, or None after recording a wrong config as `failed`."""
    from hydra.core.hydra_config import HydraConfig

    from lm_saes.cli.compose import ConfigError
    from lm_saes.cli.jobs import report_crash
    from lm_saes.cli.verbs import settings_from_config
    from lm_saes.run_dir import write_status

    output_dir, num = Path(HydraConfig.get().runtime.output_dir), HydraConfig.get().job.num
    try:
        return settings_from_config(cfg, run_dir=str(output_dir))
    except ConfigError as e:
        write_status(output_dir, "failed", error=str(e))
        print(f"lm-saes train (job {num}): {e}", file=sys.stderr)
    except Exception as e:  # not the user's mistake: one line, the traceback in the run directory
        write_status(output_dir, "failed", error=f"{type(e).__name__}: {e}")
        report_crash(f"train (job {num})", e, output_dir)
    return None


# --- SLURM: memory per group -------------------------------------------------------------------------------

def sae_bytes(settings: Any, d_model: int | None) -> int | None:
    """What one SAE holds while training: ADAM_SETS copies of its parameters (W_E and W_D, d_sae x d_model
    each, and the biases), in its dtype; None when d_model is unknown."""
    d_model = settings.sae.d_model or d_model
    if d_model is None:
        return None
    d_sae = d_model * settings.sae.expansion_factor
    n_params = 2 * d_sae * d_model + d_sae + d_model
    return ADAM_SETS * n_params * settings.sae.dtype.itemsize


def model_d_model(settings: Any) -> int | None:
    """The model's hidden size from its config file alone (no weights loaded); None if it cannot be read."""
    try:
        from transformers import AutoConfig

        from lm_saes.embedded_model import embedded_model_dir, is_embedded

        name = settings.model.model_name
        config = AutoConfig.from_pretrained(str(embedded_model_dir(name)) if is_embedded(name) else name)
        return int(config.hidden_size)
    except Exception:
        return None


def split_by_memory(group: list[int], sizes: list[int | None], limit_bytes: float | None) -> list[list[int]]:
    """`group` cut into consecutive parts whose SAEs together fit in `limit_bytes` (a job alone over the limit
    is a part of its own; unknown sizes count as zero)."""
    if not limit_bytes:
        return [group]
    parts: list[list[int]] = [[]]
    total = 0
    for job, size in zip(group, sizes):
        size = size or 0
        if parts[-1] and total + size > limit_bytes:
            parts.append([])
            total = 0
        parts[-1].append(job)
        total += size
    return parts


def plan_slurm_groups(configs: list[DictConfig], mem_gb: float | None) -> list[list[int]]:
    """The jobs grouped by stream and split to fit `mem_gb`; each group's memory estimate printed."""
    groups, planned = stream_groups(configs), []
    for group in groups:
        try:
            settings = [job_settings(configs[i]) for i in group]
        except Exception:  # an invalid job: alone, it fails in its task as it would by itself
            planned.append(group)
            continue
        d_model = None if all(s.sae.d_model for s in settings) else model_d_model(settings[0])
        sizes = [sae_bytes(s, d_model) for s in settings]
        for part in split_by_memory(group, sizes, mem_gb * 2**30 if mem_gb else None):
            known = [sizes[group.index(i)] for i in part]
            estimate = "unknown (d_model not known before the model loads)" if None in known else \
                f"{sum(k for k in known if k) / 2**30:.2f} GiB of SAE weights, gradients and Adam state"
            print(f"lm-saes train: group {len(planned)}: {_jobs_text(configs, part)}: {estimate} (mem_gb={mem_gb}; "
                  "the model and activation buffers come on top)", file=sys.stderr)
            planned.append(part)
    return planned
