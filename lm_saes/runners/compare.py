"""The compare runner: two finished runs -> for every latent of A, its best match in B by decoder cosine.

`compare_runs(settings)` is what `lm-saes compare RUN_A RUN_B` calls. Only the SAEs are loaded (no model). The
cosines come from `top_cosine` (blockwise: 262,144 latents fit). Latent indices are the dashboards' ids, so a
pair (i, j) is `RUN_A/dashboard/index.html#latent=i` beside `RUN_B/dashboard/index.html#latent=j`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lm_saes.analysis.neighbours import top_cosine
from lm_saes.config_base import BaseConfig, Device, check_device_available
from lm_saes.errors import UserInputError
from lm_saes.run_dir import write_text_atomic
from lm_saes.sae import SAEConfig, SparseAutoEncoder

THRESHOLDS = (0.9, 0.7, 0.5)
"""A latent of A "has a match" in B when its best decoder cosine there is above each of these."""
COMPARE_DIR = "compare"


class CompareSettings(BaseConfig):
    run_a: str
    """A finished training run: every one of its latents is matched (the first positional argument)."""
    run_b: str
    """A finished training run with the same hook points and d_model; any d_sae (the second)."""
    output: str | None = None
    """Where the matched pairs go (JSON); None means RUN_A/compare/<RUN_B's folder name>.json."""
    device: Device = "cpu"
    """Where the decoder cosines are computed (a GPU is much faster for 100K+ latents)."""


@dataclass
class CompareResult:
    run_a: str
    run_b: str
    hook_point: str
    d_sae_a: int
    d_sae_b: int
    best_cosine_A: torch.Tensor
    """(d_sae of A,) each latent of A's largest decoder cosine with a latent of B."""
    best_index_A: torch.Tensor
    """(d_sae of A,) the latent of B it is reached at (int64)."""

    def matched(self, threshold: float) -> int:
        """Latents of A whose best match in B has a cosine above `threshold`."""
        return int((self.best_cosine_A > threshold).sum())

    def summary(self) -> dict[str, Any]:
        counts = {str(t): {"count": self.matched(t), "fraction": round(self.matched(t) / self.d_sae_a, 6)}
                  for t in THRESHOLDS}
        return {"run_a": self.run_a, "run_b": self.run_b, "hook_point": self.hook_point, "d_sae_a": self.d_sae_a,
                "d_sae_b": self.d_sae_b, "matched_above": counts}

    def to_json(self) -> str:
        """The summary, then `pairs`: every latent of A as [index in A, index in B, cosine], one line each."""
        pairs = zip(range(self.d_sae_a), self.best_index_A.tolist(), self.best_cosine_A.tolist())
        lines = ",\n".join(f"    [{a}, {b}, {c:.6f}]" for a, b, c in pairs)
        head = json.dumps(self.summary(), indent=2)[:-2]  # leave the object open for the pairs
        return f'{head},\n  "pairs": [\n{lines}\n  ]\n}}\n'


def _hooks(cfg: SAEConfig) -> str:
    return cfg.hook_point_in if not cfg.is_transcoder else f"{cfg.hook_point_in} -> {cfg.hook_point_target}"


def _sae_config(run_dir: str, key: str) -> SAEConfig:
    """The SAE config of a finished run, errors naming `key` (run_a or run_b)."""
    from lm_saes.runners.run_loading import load_run_settings

    try:
        load_run_settings(Path(run_dir))
    except UserInputError as e:
        raise UserInputError(key, e.value, e.allowed) from None
    return SAEConfig.from_pretrained(run_dir)


def check_comparable(settings: CompareSettings) -> tuple[SAEConfig, SAEConfig]:
    """Both runs are finished and their SAEs read the same hook points of the same width (UserInputError);
    reads config files only."""
    a, b = _sae_config(settings.run_a, "run_a"), _sae_config(settings.run_b, "run_b")
    if _hooks(a) != _hooks(b):
        raise UserInputError("run_b", settings.run_b, f"hook point {_hooks(b)} differs from run_a's {_hooks(a)}")
    if a.d_model != b.d_model:
        raise UserInputError("run_b", settings.run_b, f"d_model {b.d_model} differs from run_a's {a.d_model}")
    check_device_available(settings.device, "device")
    return a, b


def match_latents(W_D_a: torch.Tensor, W_D_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, index) of each row of A's decoder at its best row of B's."""
    cos_N1, idx_N1 = top_cosine(W_D_a, W_D_b, k=1)
    return cos_N1[:, 0], idx_N1[:, 0]


def compare_runs(settings: CompareSettings, console: Console | None = None) -> CompareResult:
    """Match every latent of run A to its best latent in run B; write the pairs as JSON and print the counts."""
    cfg_a, _ = check_comparable(settings)
    sae_a = SparseAutoEncoder.from_pretrained(settings.run_a, device=settings.device)
    sae_b = SparseAutoEncoder.from_pretrained(settings.run_b, device=settings.device)
    best_cosine_A, best_index_A = match_latents(sae_a.W_D, sae_b.W_D)
    result = CompareResult(settings.run_a, settings.run_b, _hooks(cfg_a), sae_a.cfg.d_sae, sae_b.cfg.d_sae,
                           best_cosine_A, best_index_A)
    output = Path(settings.output) if settings.output else Path(settings.run_a) / COMPARE_DIR / \
        f"{Path(settings.run_b).resolve().name}.json"
    write_text_atomic(output, result.to_json())
    print_counts(result, console or Console(width=None if sys.stdout.isatty() else 140))
    print(f"pairs (each latent of A, its best match in B, their cosine) -> {output}")
    return result


def print_counts(result: CompareResult, console: Console) -> None:
    console.print(f"latents of {result.run_a} ({result.d_sae_a:,}) matched in {result.run_b} ({result.d_sae_b:,}), "
                  f"{result.hook_point}:", highlight=False)
    table = Table()
    for name in ("best decoder cosine", "latents of A", "fraction"):
        table.add_column(name, justify="right")
    for t in THRESHOLDS:
        n = result.matched(t)
        table.add_row(f"> {t}", f"{n:,}", f"{n / result.d_sae_a:.1%}")
    console.print(table)
