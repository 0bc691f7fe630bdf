"""Before a sweep goes to `hydra/launcher=slurm`: is there a SLURM cluster to submit to?

Without this check, a missing `sbatch` or an unreachable controller surfaces as submitit's traceback after
Hydra has made the sweep directory; with it, as one line before anything is made.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from lm_saes.errors import UserInputError

SLURM_LAUNCHER_SUFFIX = "SlurmLauncher"
"""The end of the submitit plugin's launcher class name, in the composed config's hydra.launcher._target_."""


def uses_slurm(composed_with_hydra: Any) -> bool:
    target = composed_with_hydra.hydra.get("launcher", {}).get("_target_", "") or ""
    return str(target).endswith(SLURM_LAUNCHER_SUFFIX)


def check_cluster_reachable(timeout_s: float = 20.0) -> None:
    """Raise UserInputError (key hydra/launcher) unless `sbatch` exists and the controller answers `sinfo`."""
    instead = "submit from a SLURM login node (or set SLURM_CONF), or run the sweep with hydra/launcher=local"
    if shutil.which("sbatch") is None:
        raise UserInputError("hydra/launcher", "slurm", f"sbatch is not on PATH; {instead}")
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserInputError("hydra/launcher", "slurm", f"sinfo did not answer ({e}); {instead}") from None
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.strip().splitlines() if line] or [f"exit code {probe.returncode}"]
        raise UserInputError("hydra/launcher", "slurm", f"no SLURM controller answers ({lines[-1]}); {instead}")
