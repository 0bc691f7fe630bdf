"""The one place that owns a run directory: atomic writes, status, and refusing to clobber a finished run.

| file                     | written by                 |
|--------------------------|----------------------------|
| config.json              | SAEConfig.save_hyperparameters |
| sae_weights.safetensors  | SparseAutoEncoder.save_pretrained |
| config.yaml              | the runner (whole resolved run config) |
| metrics.json             | the runner (final metrics) |
| status.json              | the runner: "running" at start, "ok"/"failed" last |
| eval.json                | `lm-saes evaluate`, later |
| traceback.txt            | `lm-saes`, when an error that is not the user's mistake ends a verb |
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lm_saes.errors import RunDirectoryError, UserInputError

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "config.yaml"
TRACEBACK_FILE = "traceback.txt"
"""Where `lm-saes` puts the traceback of an error that was not the user's mistake (its one line names it)."""
EVAL_FILE = "eval.json"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success, rename it over `path` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 (and some writers replace the file): give it what a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_status(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_finished(run_dir: Path) -> bool:
    status = read_status(run_dir)
    return status is not None and status.get("status") == "ok"


def claim(run_dir: Path, overwrite: bool, key: str = "trainer.exp_result_path") -> None:
    """Refuse a directory that holds a finished run unless `overwrite`; then mark it as running.

    A directory that cannot be made or written is a UserInputError naming `key`, the setting that chose it."""
    if is_finished(run_dir) and not overwrite:
        raise RunDirectoryError(
            f"{run_dir} already holds a finished run (status.json says ok); "
            f"choose another {key} or pass trainer.overwrite=true"
        )
    try:
        write_status(run_dir, "running")
    except OSError as e:
        raise UserInputError(key, str(run_dir), f"cannot create or write the run directory there ({e.strerror or e}); "
                             "choose a writable folder") from None


def write_status(run_dir: Path, status: str, **extra: Any) -> None:
    write_json_atomic(run_dir / STATUS_FILE, {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})
