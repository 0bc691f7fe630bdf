"""Reading back a finished training run: its resolved settings, once the directory is checked to hold one.

Its own module because it needs `TrainSAESettings` at run time, and runners/train.py imports held_out.py
(for the evaluation during training): held_out.py cannot import train.py back.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from lm_saes.errors import UserInputError
from lm_saes.run_dir import RUN_CONFIG_FILE, STATUS_FILE, read_status
from lm_saes.runners.train import TrainSAESettings
from lm_saes.sae.config import CONFIG_FILE
from lm_saes.sae.model import WEIGHTS_FILE


def load_run_settings(run_dir: Path) -> TrainSAESettings:
    """The resolved settings of a finished run, or a UserInputError naming what is wrong with `run_dir`."""
    if not run_dir.is_dir():
        raise UserInputError("run_dir", str(run_dir), "no such directory; give a training run directory")
    status = read_status(run_dir)
    if status is None:
        raise UserInputError("run_dir", str(run_dir), f"no readable {STATUS_FILE}: not a training run directory")
    if status.get("status") != "ok":
        raise UserInputError("run_dir", str(run_dir), f"{STATUS_FILE} says {status.get('status')!r}; evaluate a finished run (ok)")
    missing = [f for f in (RUN_CONFIG_FILE, CONFIG_FILE, WEIGHTS_FILE) if not (run_dir / f).exists()]
    if missing:
        raise UserInputError("run_dir", str(run_dir), f"missing {', '.join(missing)}: not a complete training run")
    try:
        return TrainSAESettings.model_validate(yaml.safe_load((run_dir / RUN_CONFIG_FILE).read_text()))
    except (ValidationError, UserInputError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0]
        raise UserInputError("run_dir", str(run_dir), f"{RUN_CONFIG_FILE} is not a valid run config ({first})") from None
