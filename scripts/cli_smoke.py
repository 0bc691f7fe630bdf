"""`lm-saes train` end to end on one device, offline: a tiny random Llama (tests/conftest.py's) and a synthetic
corpus, through the real command line, for each preset given. Prints one table (preset, exit status, seconds,
the final log line's EV and L0) and exits non-zero when any run failed. scripts/gpu_check.sh runs it on cuda:
the model's forward, the activation buffer and the SAE on the GPU, the path a user's `device=cuda` takes.

    .venv/bin/python scripts/cli_smoke.py [--device cuda] [--presets relu_8x topk_8x] [--tokens 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lm_saes.run_dir import METRICS_FILE
from tests.conftest import HOOK, save_tiny_model, synthetic_documents


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The run's final metrics (metrics.json; empty when there is none)."""
    path = next(iter(run_dir.rglob(METRICS_FILE)), None)
    return json.loads(path.read_text()) if path is not None else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--presets", nargs="+", default=["relu_8x", "topk_8x", "jumprelu_8x"])
    parser.add_argument("--tokens", type=int, default=20_000, help="trainer.total_training_tokens per run")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    table = Table(title=f"lm-saes train on device={args.device}: tiny random Llama, synthetic corpus, "
                        f"{args.tokens:,} tokens")
    for col in ("preset", "exit", "seconds", "EV", "L0", "last stderr line"):
        table.add_column(col, justify="left" if col in ("preset", "last stderr line") else "right")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(Path(tmp) / "tiny-llama")
        corpus = Path(tmp) / "docs.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(2000, seed=1)))
        for preset in args.presets:
            run_dir = Path(tmp) / f"run-{preset}"
            command = [sys.executable, "-m", "lm_saes", "train", f"+sae={preset}", f"device={args.device}",
                       f"model.model_name={model_dir}", f"dataset.dataset_name_or_path={corpus}",
                       f"sae.hook_point_in={HOOK}", "activation_factory.batch_size=1024",
                       "activation_factory.context_size=64", f"trainer.total_training_tokens={args.tokens}",
                       "trainer.log_frequency=5", f"hydra.run.dir={run_dir}"]
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
            seconds = time.perf_counter() - start
            failed += proc.returncode != 0
            metrics = final_metrics(run_dir)
            last = (proc.stderr.strip().splitlines() or [""])[-1][:80] if proc.returncode else ""
            table.add_row(preset, str(proc.returncode), f"{seconds:.1f}",
                          *(f"{metrics[k]:.3f}" if isinstance(metrics.get(k), float) else "" for k in
                            ("explained_variance", "l0")), last)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
    Console(width=170).print(table)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
