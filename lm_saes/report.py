"""A sweep's report: every job's overrides, status and metrics in one table, and the sparsity/fidelity frontier.

A sweep directory (Hydra's multirun dir) holds one run directory per job, each with `.hydra/overrides.yaml`,
`status.json` and, when it finished, `metrics.json` (and `eval.json` once evaluated). Failed jobs are rows
too, with their error: never silently dropped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lm_saes.run_dir import EVAL_FILE, METRICS_FILE, RUN_CONFIG_FILE, STATUS_FILE

HYDRA_OVERRIDES_FILE = ".hydra/overrides.yaml"
"""Where Hydra keeps a job's command-line overrides, in its run directory."""

METRIC_COLUMNS = ("explained_variance", "l0", "mse", "dead_fraction", "n_training_tokens", "ce_loss_score", "kl_div_score")


@dataclass
class JobRow:
    job: str
    """The job's folder, relative to the sweep directory."""
    status: str
    overrides: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    act_fn: str = "?"
    error: str = ""


def find_jobs(sweep_dir: Path) -> list[JobRow]:
    """Every run directory under `sweep_dir` (any folder holding status.json), sorted by job number."""
    rows = []
    for status_file in sorted(sweep_dir.rglob(STATUS_FILE), key=lambda p: _job_key(p.parent, sweep_dir)):
        run_dir = status_file.parent
        status = _read_dict(status_file, json.loads)
        metrics = {**_read_dict(run_dir / METRICS_FILE, json.loads), **_read_dict(run_dir / EVAL_FILE, json.loads)}
        overrides = _read_overrides(run_dir / HYDRA_OVERRIDES_FILE)
        config = _read_dict(run_dir / RUN_CONFIG_FILE, yaml.safe_load)
        rows.append(JobRow(
            job=str(run_dir.relative_to(sweep_dir)) or ".",
            status=str(status.get("status", "unknown")),
            overrides=overrides,
            metrics={k: metrics[k] for k in METRIC_COLUMNS if isinstance(metrics.get(k), (int, float))},
            act_fn=str((config.get("sae") or {}).get("act_fn", "?")),
            error=str(status.get("error", "")).splitlines()[0] if status.get("error") else "",
        ))
    return rows


def _job_key(run_dir: Path, sweep_dir: Path) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in run_dir.relative_to(sweep_dir).parts)


def _read(path: Path, parse: Callable[[str], Any]) -> Any:
    """`path` parsed, or None when it is missing or unreadable (a job may have died while writing it)."""
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # json.JSONDecodeError is a ValueError
        return None


def _read_dict(path: Path, parse: Callable[[str], Any]) -> dict[str, Any]:
    data = _read(path, parse)
    return data if isinstance(data, dict) else {}


def _read_overrides(path: Path) -> dict[str, str]:
    items = _read(path, yaml.safe_load) or []
    pairs = (str(item).lstrip("+~").split("=", 1) for item in items)
    return {k: v for k, v in (p if len(p) == 2 else (p[0], "") for p in pairs)}


def varying_keys(rows: list[JobRow]) -> list[str]:
    """The override keys whose value differs between jobs (the sweep's axes), in first-seen order."""
    keys = list(dict.fromkeys(k for r in rows for k in r.overrides))
    return [k for k in keys if len({r.overrides.get(k) for r in rows}) > 1] or keys


def to_csv(rows: list[JobRow]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r.overrides))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["job", "status", "act_fn", *keys, *METRIC_COLUMNS, "error"])
    for r in rows:
        writer.writerow([r.job, r.status, r.act_fn, *(r.overrides.get(k, "") for k in keys),
                         *(r.metrics.get(k, "") for k in METRIC_COLUMNS), r.error])
    return out.getvalue()


def frontier_series(rows: list[JobRow], y_key: str) -> dict[str, list[tuple[float, float, str]]]:
    """The plotted points, one series per act_fn (whatever the variant): (L0, y_key's value, job), by L0."""
    series: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        if r.status == "ok" and "l0" in r.metrics and y_key in r.metrics:
            series.setdefault(r.act_fn, []).append((r.metrics["l0"], r.metrics[y_key], r.job))
    return {act_fn: sorted(points) for act_fn, points in sorted(series.items())}


def plot_frontier(rows: list[JobRow], path: Path) -> Path:
    """L0 against explained variance (and against CE loss score when evaluated), one series per act_fn."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "ok" and "l0" in r.metrics]
    y_keys = ["explained_variance"] + (["ce_loss_score"] if any("ce_loss_score" in r.metrics for r in done) else [])
    fig, axes = plt.subplots(1, len(y_keys), figsize=(6 * len(y_keys), 4.5), squeeze=False)
    for ax, y_key in zip(axes[0], y_keys):
        for act_fn, series in frontier_series(done, y_key).items():
            xs, ys, labels = zip(*series)
            ax.plot(xs, ys, "o-", label=act_fn)
            for x, y, label in series:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token, log scale)")
        ax.set_ylabel(y_key.replace("_", " "))
        ax.set_title(f"sparsity vs {y_key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend(title="act_fn")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path
