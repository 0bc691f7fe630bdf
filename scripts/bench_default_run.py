"""The default run end to end, across revisions of this repository: README's `lm-saes train +sae=relu_8x`, each
revision (and environment) in turn, round by round, so that a load that drifts moves every row alike.

    .venv/bin/python scripts/bench_default_run.py 6c1e62c HEAD [--rounds 2] [--tokens 300000]
    .venv/bin/python scripts/bench_default_run.py HEAD HEAD:OMP_NUM_THREADS=1      # a run under other env values

A run is `REV` or `REV:NAME=VALUE[,NAME=VALUE]` (environment variables for that run). Each revision is checked
out once into a temporary worktree and run with this checkout's virtual environment (its packages; the
revision's own lm_saes, first on PYTHONPATH). Prints training tokens/s (the progress bar's, generation and SAE
step together), wall time with the model load, EV and L0, each run's median over the rounds, and the ratio of
tokens/s to the first run's. Quote the ratios with the machine; absolute numbers compare only within one table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
FINAL_PROGRESS = re.compile(r"\[([\d,]+)/\1 tok, ([\d,]+) tok/s")
"""The progress bar's last line: every token done, and its tokens/s."""


def checkout(rev: str, root: Path) -> Path:
    """A detached worktree of `rev` under `root`, with `lm_saes/conf` pointing at its `conf/` (the wheel's layout,
    which Hydra's pkg:// path needs when the revision is imported from source rather than installed)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = root / sha
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), sha], cwd=REPO, check=True)
        if not (tree / "lm_saes" / "conf").exists():
            (tree / "lm_saes" / "conf").symlink_to(tree / "conf", target_is_directory=True)
    return tree


def run_once(tree: Path, env_updates: dict[str, str], tokens: int, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "WANDB_MODE": "disabled", **env_updates}
    command = [sys.executable, "-m", "lm_saes", "train", "+sae=relu_8x", f"trainer.total_training_tokens={tokens}",
               f"trainer.exp_result_path={out}"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{tree.name} {env_updates}: exit {result.returncode}\n{result.stderr[-2000:]}")
    finals = FINAL_PROGRESS.findall(result.stdout + result.stderr)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"tokens_per_s": float(finals[-1][1].replace(",", "")), "wall_s": wall,
            "ev": metrics["explained_variance"], "l0": metrics["l0"]}


def parse_run(spec: str) -> tuple[str, dict[str, str]]:
    rev, _, envs = spec.partition(":")
    return rev, dict(pair.split("=", 1) for pair in envs.split(",") if pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="REV or REV:NAME=VALUE[,NAME=VALUE]")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=300_000, help="trainer.total_training_tokens")
    args = parser.parse_args()
    runs = [parse_run(spec) for spec in args.runs]
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench_default_run_") as tmp:
        root = Path(tmp)
        trees = {rev: checkout(rev, root / "trees") for rev, _ in runs}
        results: list[list[dict[str, float]]] = [[] for _ in runs]
        try:
            for round_ in range(args.rounds):
                for i, (spec, (rev, envs)) in enumerate(zip(args.runs, runs)):
                    result = run_once(trees[rev], envs, args.tokens, root / "runs" / f"{i}-{round_}")
                    results[i].append(result)
                    console.print(f"round {round_ + 1}: {spec}: {result['tokens_per_s']:,.0f} tokens/s, "
                                  f"{result['wall_s']:.1f} s, load {os.getloadavg()[0]:.2f}")
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    table = Table(title=f"lm-saes train +sae=relu_8x, {args.tokens:,} tokens, median of {args.rounds} interleaved rounds")
    for col in ("run", "tokens/s", "x first", "wall s", "x first", "EV", "L0"):
        table.add_column(col, justify="left" if col == "run" else "right")
    first = {key: median(r[key] for r in results[0]) for key in ("tokens_per_s", "wall_s")}
    for spec, rows in zip(args.runs, results):
        tps, wall = median(r["tokens_per_s"] for r in rows), median(r["wall_s"] for r in rows)
        table.add_row(spec, f"{tps:,.0f}", f"{tps / first['tokens_per_s']:.2f}", f"{wall:.1f}",
                      f"{first['wall_s'] / wall:.2f}", f"{median(r['ev'] for r in rows):.3f}",
                      f"{median(r['l0'] for r in rows):.1f}")
    console.print(table)
    console.print(f"machine: {machine()}")


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
