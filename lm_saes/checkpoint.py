"""Training checkpoints: one format, written atomically, read back with clear errors.

A checkpoint is a folder `checkpoints/step_00001234/` holding `state.safetensors` (every tensor: weights,
Adam moments, counters, RNG states, the activation stream's buffer, one per rank when data-parallel) and
`meta.json` (step, token counts, optimizer hyperparameters, the settings that produced it, the number of
data-parallel ranks). It is written into a hidden temporary folder and
renamed into place, so a crash during a write leaves the previous checkpoint as the latest complete one.
No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
STATE_FILE, META_FILE = "state.safetensors", "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, or written by different settings."""


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under `prefix.`, with the prefix removed."""
        return {k.removeprefix(prefix + "."): v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def stream_section(rank: int, world_size: int) -> str:
    """Where a checkpoint keeps the activation stream's position: `stream`, or with data parallelism one
    section per rank (`stream.rank0`, `stream.rank1`, ...), each rank resuming from its own."""
    return "stream" if world_size == 1 else f"stream.rank{rank}"


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def latest_checkpoint_path(run_dir: Path) -> Path | None:
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(str(path / STATE_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to resume from an earlier one, "
            "or start a fresh run directory"
        ) from None
    return Checkpoint(path, tensors, meta)


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state_dict as flat tensors plus JSON-able parameter groups."""
    tensors = {f"{idx}.{name}": value for idx, per_param in state["state"].items() for name, value in per_param.items()}
    return tensors, state["param_groups"]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    return {"state": per_param, "param_groups": param_groups}
