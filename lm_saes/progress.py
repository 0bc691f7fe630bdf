"""Console progress for long work: a rich bar with tokens/s and ETA on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lm_saes.formatting import format_value


class TokenProgress:
    """Tracks tokens done against a budget (None: open-ended); `log` prints a metrics line (always) and moves the
    bar (on a tty).

    Not `enabled` (a data-parallel rank other than 0), it counts tokens and shows nothing.
    """

    def __init__(self, total_tokens: int | None, description: str, console: Console | None = None,
                 enabled: bool = True) -> None:
        self.console = console or Console(file=sys.stderr, log_path=False, quiet=not enabled)
        self.enabled = enabled
        self.total_tokens = total_tokens
        self.start = time.perf_counter()
        self.tokens = 0
        self._bar: Progress | None = None
        if enabled and self.console.is_terminal:
            counts = [TaskProgressColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok")] \
                if total_tokens is not None else [TextColumn("{task.completed:,.0f} tok")]
            eta = [TextColumn("ETA"), TimeRemainingColumn()] if total_tokens is not None else []
            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), *counts, TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), *eta, TextColumn("{task.fields[info]}"), console=self.console, transient=False,
            )
            self._task = self._bar.add_task(description, total=total_tokens, rate="", info="")
            self._bar.start()

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def advance(self, n_tokens: int) -> None:
        self.tokens += n_tokens
        if self._bar is not None:
            self._bar.update(self._task, completed=self.tokens, rate=f"{self.tokens_per_second:,.0f} tok/s")

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k}={format_value(v)}" for k, v in metrics.items())
        if self._bar is not None:
            self._bar.update(self._task, info=_short(metrics))
            if sys.stdout.isatty():
                self._bar.console.log(text)
        if not sys.stdout.isatty():  # a log file or a pipe gets plain, greppable lines
            if self.total_tokens is None:
                print(f"[{self.tokens:,} tok, {self.tokens_per_second:,.0f} tok/s] {text}", flush=True)
                return
            eta = (self.total_tokens - self.tokens) / max(self.tokens_per_second, 1e-9)
            print(f"[{self.tokens:,}/{self.total_tokens:,} tok, {self.tokens_per_second:,.0f} tok/s, ETA {eta:,.0f}s] {text}",
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _short(metrics: dict[str, Any]) -> str:
    """The two numbers people watch, for the end of the bar."""
    labels = {"explained_variance": "EV", "l0": "L0"}
    return " ".join(f"{label}={metrics[k]:.3g}" for k, label in labels.items() if k in metrics)
