"""The report runner: a sweep directory -> a printed table, report.csv and frontier.png beside the jobs."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lm_saes.config_base import BaseConfig
from lm_saes.errors import UserInputError
from lm_saes.formatting import format_value
from lm_saes.report import METRIC_COLUMNS, JobRow, find_jobs, plot_frontier, to_csv, varying_keys
from lm_saes.run_dir import atomic_path, write_text_atomic

CSV_FILE, PLOT_FILE = "report.csv", "frontier.png"


class ReportSettings(BaseConfig):
    run_dir: str
    """A sweep directory (`multirun/DATE/TIME`), or any folder holding run directories."""


def report_run(settings: ReportSettings) -> list[JobRow]:
    sweep_dir = Path(settings.run_dir)
    if not sweep_dir.is_dir():
        raise UserInputError("run_dir", str(sweep_dir), "no such directory; give a sweep directory (multirun/DATE/TIME)")
    rows = find_jobs(sweep_dir)
    if not rows:
        raise UserInputError("run_dir", str(sweep_dir), "holds no run directories (no status.json below it)")
    write_text_atomic(sweep_dir / CSV_FILE, to_csv(rows))
    with atomic_path(sweep_dir / PLOT_FILE) as tmp:
        plot_frontier(rows, tmp)
    console = Console(width=None if sys.stdout.isatty() else 200)  # a pipe or log file gets whole columns
    console.print(_table(rows, sweep_dir))
    failed = [r for r in rows if r.status != "ok"]
    for r in failed:
        console.print(f"[red]{r.status}[/]: {r.job}  {r.error}")
    console.print(f"{len(rows) - len(failed)} ok, {len(failed)} not ok; wrote {sweep_dir / CSV_FILE} and {sweep_dir / PLOT_FILE}")
    return rows


def _table(rows: list[JobRow], sweep_dir: Path) -> Table:
    keys = varying_keys(rows)
    metrics = [k for k in METRIC_COLUMNS if any(k in r.metrics for r in rows)]
    table = Table(title=f"sweep {sweep_dir}")
    for col in ("job", "status", *keys, *metrics):
        table.add_column(col, justify="right" if col in metrics else "left")
    for r in rows:
        values = [format_value(r.metrics[k]) if k in r.metrics else "" for k in metrics]
        status = "[green]ok[/]" if r.status == "ok" else f"[red]{r.status}[/]"
        table.add_row(r.job, status, *(r.overrides.get(k, "") for k in keys), *values)
    return table
