"""The bodies of the Hydra jobs: validate the composed config, run the verb's runner, and turn the user's
mistakes into one line and an exit code (in a sweep: a `failed` job, while the others go on)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from omegaconf import DictConfig

from lm_saes.cli.compose import ConfigError
from lm_saes.cli.keys import dataset_name, typed_key_error
from lm_saes.cli.verbs import VERBS, load, settings_from_config
from lm_saes.errors import RunDirectoryError, UserInputError
from lm_saes.run_dir import TRACEBACK_FILE, read_status, write_status, write_text_atomic

INTERNAL_ERROR_EXIT_CODE = 1
"""Any verb exits with this when something that is not the user's mistake went wrong (a user's mistake: 2)."""
PREEMPTED_EXIT_CODE = 3
"""`lm-saes train` exits with this after SIGTERM/SIGUSR1/SIGUSR2 and a checkpoint: rerun (or requeue) to resume."""


def verb_job(verb: str, cfg: DictConfig) -> None:
    """The job of every verb but train: validate, run, and report user mistakes as one line (exit code 2) and
    anything else as one line pointing at its traceback (exit code 1)."""
    try:
        load(VERBS[verb].runner)(settings_from_config(cfg, None, verb))
    except (ConfigError, UserInputError) as e:
        _user_mistake(verb, e, cfg)
    except Exception as e:
        sys.exit(report_crash(verb, e, None))


def train_job(cfg: DictConfig) -> None:
    """`lm-saes train`'s job: validate, train, report user mistakes as one line; after a preemption, hand the
    signal on (under submitit: requeue) and exit with PREEMPTED_EXIT_CODE. In a sweep a failed job records
    `failed` in its status.json and the others go on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lm_saes.checkpoint import CheckpointError
    from lm_saes.distributed import PeerFailed
    from lm_saes.trainer import Preempted, TrainingDiverged

    hydra_cfg = HydraConfig.get()
    multirun, output_dir = hydra_cfg.mode == RunMode.MULTIRUN, Path(hydra_cfg.runtime.output_dir)
    run_dir = output_dir
    try:
        settings = settings_from_config(cfg, run_dir=str(output_dir))
        run_dir = Path(settings.trainer.exp_result_path)
        load(VERBS["train"].runner)(settings)
    except Preempted as e:
        print(f"lm-saes train: {e}", file=sys.stderr)
        _hand_on_signal(e.signal_name)  # under submitit: requeues the job, then exits
        if not multirun:
            sys.exit(PREEMPTED_EXIT_CODE)
    except (ConfigError, UserInputError, RunDirectoryError, CheckpointError, TrainingDiverged, PeerFailed) as e:
        if isinstance(e, ConfigError) and multirun:  # failed before train_sae could record it
            write_status(output_dir, "failed", error=str(e))
        _user_mistake("train", e, cfg, exit=not multirun)
    except Exception as e:
        _mark_failed(run_dir, e)
        code = report_crash(f"train (job {hydra_cfg.job.num})" if multirun else "train", e, run_dir)
        if not multirun:  # one job's failure must not end the sweep
            sys.exit(code)


def _mark_failed(run_dir: Path, error: Exception) -> None:
    """status.json `failed` where the error escaped before train_sae recorded it; a finished run stays as it is."""
    status = (read_status(run_dir) or {}).get("status") if run_dir.is_dir() else "absent"
    if status in (None, "running"):
        write_status(run_dir, "failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())


def _user_mistake(verb: str, error: Exception, cfg: DictConfig, exit: bool = True) -> None:
    """Print `error` as one line naming the key the user typed; exit with code 2 unless told not to."""
    if isinstance(error, UserInputError):
        error = typed_key_error(error, cfg, dataset_name(cfg))
    print(f"lm-saes {verb}: {error}", file=sys.stderr)
    if exit:
        sys.exit(2)


def report_crash(verb: str, error: BaseException, run_dir: Path | None) -> int:
    """An error that is not the user's (a bug, a full disk, ...) as one line on stderr naming the verb, the error
    and a file holding the full traceback (in `run_dir`, else a temporary file); the exit code. With
    LM_SAES_DEBUG=1 or HYDRA_FULL_ERROR=1 the error is raised again instead, traceback and all."""
    if os.environ.get("LM_SAES_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    text = "".join(traceback.format_exception(error))
    path = None
    if run_dir is not None and run_dir.is_dir():
        try:
            write_text_atomic(run_dir / TRACEBACK_FILE, text)
            path = run_dir / TRACEBACK_FILE
        except OSError:
            pass
    if path is None:
        fd, name = tempfile.mkstemp(prefix=f"lm-saes-{verb.split()[0]}-", suffix=".traceback.txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        path = Path(name)
    first = (str(error).strip().splitlines() or [""])[0]
    print(f"lm-saes {verb}: internal error: {type(error).__name__}: {first} (traceback in {path}; "
          "LM_SAES_DEBUG=1 shows it here)", file=sys.stderr)
    return INTERNAL_ERROR_EXIT_CODE


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
