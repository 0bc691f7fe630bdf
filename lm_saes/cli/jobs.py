"""The bodies of the Hydra jobs: validate the composed config, run the verb's runner, and turn the user's
mistakes into one line and an exit code (in a sweep: a `failed` job, while the others go on)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from omegaconf import DictConfig

from lm_saes.cli.compose import ConfigError
from lm_saes.cli.verbs import VERBS, load, settings_from_config
from lm_saes.errors import RunDirectoryError, UserInputError

PREEMPTED_EXIT_CODE = 3
"""`lm-saes train` exits with this after SIGTERM/SIGUSR1/SIGUSR2 and a checkpoint: rerun (or requeue) to resume."""


def verb_job(verb: str, cfg: DictConfig) -> None:
    """The job of every verb but train: validate, run, and report user mistakes as one line (exit code 2)."""
    try:
        load(VERBS[verb].runner)(settings_from_config(cfg, None, verb))
    except (ConfigError, UserInputError) as e:
        print(f"lm-saes {verb}: {e}", file=sys.stderr)
        sys.exit(2)


def train_job(cfg: DictConfig) -> None:
    """`lm-saes train`'s job: validate, train, report user mistakes as one line; after a preemption, hand the
    signal on (under submitit: requeue) and exit with PREEMPTED_EXIT_CODE."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lm_saes.checkpoint import CheckpointError
    from lm_saes.distributed import PeerFailed
    from lm_saes.trainer import Preempted, TrainingDiverged

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        load(VERBS["train"].runner)(settings_from_config(cfg, run_dir=hydra_cfg.runtime.output_dir))
    except Preempted as e:
        print(f"lm-saes train: {e}", file=sys.stderr)
        _hand_on_signal(e.signal_name)  # under submitit: requeues the job, then exits
        if not multirun:
            sys.exit(PREEMPTED_EXIT_CODE)
    except (ConfigError, UserInputError, RunDirectoryError, CheckpointError, TrainingDiverged, PeerFailed) as e:
        print(f"lm-saes train: {e}", file=sys.stderr)
        if not multirun:  # in a sweep the job's status.json says failed and the others go on
            sys.exit(2)
        if isinstance(e, ConfigError):  # failed before train_sae could record it
            from lm_saes.run_dir import write_status

            write_status(Path(hydra_cfg.runtime.output_dir), "failed", error=str(e))
    except Exception as e:
        if not multirun:
            raise  # a bug, not a user's mistake: the traceback is wanted
        # train_sae already wrote status.json "failed" with the traceback; one job must not end the sweep.
        print(f"lm-saes train: job {hydra_cfg.job.num} failed: {type(e).__name__}: {e}", file=sys.stderr)


def _hand_on_signal(signal_name: str | None) -> None:
    """Call the handler that was installed for `signal_name` before training took it over, if it is a Python
    function: under Hydra's submitit launcher that is submitit's, which resubmits this job with `scontrol requeue`
    (the requeued job resumes from the checkpoint just written) and exits. Plain runs have none; nor has a
    data-parallel rank that stopped for another rank's signal (None)."""
    if signal_name is None:
        return
    signum = getattr(signal, signal_name)
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
