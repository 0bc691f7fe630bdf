"""The evaluate runner: a finished run directory -> held-out contexts -> Evaluator -> eval.json and a table.

`evaluate_run(settings)` is what `lm-saes evaluate RUN_DIR` calls. "Held-out" means: on the run's own
dataset, the packed contexts that come after every token the run's activation factory could have read
(`tokens_read_by_training`: the trained tokens, the initializer's batches, the shuffle buffer and one
forward batch), so no evaluated token was trained on; for a run trained from an activation cache, the cache's
dataset past everything the cache holds. On another dataset (`dataset=`), from its start.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lm_saes.config_base import BaseConfig, Device
from lm_saes.datasets import DatasetConfig, load_dataset
from lm_saes.errors import UserInputError
from lm_saes.evaluator import EvalResult, Evaluator, EvaluatorConfig, held_out_contexts, held_out_plan
from lm_saes.language_model import TransformerLensLanguageModel
from lm_saes.run_dir import METRICS_FILE, RUN_CONFIG_FILE, STATUS_FILE, read_status, write_json_atomic
from lm_saes.runners.train import TrainSAESettings
from lm_saes.sae import SparseAutoEncoder
from lm_saes.sae.config import CONFIG_FILE
from lm_saes.sae.model import WEIGHTS_FILE

EVAL_FILE = "eval.json"


class EvaluateSettings(BaseConfig):
    run_dir: str
    """A finished training run directory (status.json says ok); eval.json is written into it."""
    evaluator: EvaluatorConfig = EvaluatorConfig()
    device: Device | None = None
    """Where the model and the SAE run; None means the run's model.device."""
    dataset: DatasetConfig | None = None
    """Evaluate on another corpus (from its start); None means the run's first dataset, past what training read."""


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


@dataclass
class HeldOutRun:
    """A finished run loaded for inspection, with the held-out contexts to inspect it on."""

    train: TrainSAESettings
    dataset_cfg: DatasetConfig
    skip_tokens: int
    context_size: int
    model: TransformerLensLanguageModel
    sae: SparseAutoEncoder
    contexts: list[torch.Tensor]


def load_held_out_run(
    run_dir: Path, train: TrainSAESettings, device: str | None, dataset: DatasetConfig | None,
    skip_tokens: int | None, context_size: int | None, n_contexts: int, section: str, verb: str,
) -> HeldOutRun:
    """The run's model and SAE, and `n_contexts` contexts of text it never trained on (`train` is the run's
    settings, from `load_run_settings`).

    With `dataset` None: the run's first dataset, past every token training could have read (or `skip_tokens`).
    `section` ("evaluator", "analysis") and `verb` name the user's keys in the error when no text is left.
    """
    device = device or train.model.device
    if dataset is None:
        plan = held_out_plan(train, *_tokens_and_world_size(run_dir))
        dataset_cfg, key, default_skip, run_context_size = plan.dataset, "datasets (from the run)", plan.skip_tokens, \
            plan.context_size
    else:
        dataset_cfg, key, default_skip = dataset, "dataset.dataset_name_or_path", 0
        run_context_size = train.activation_factory.context_size
    skip = default_skip if skip_tokens is None else skip_tokens
    context_size = context_size or run_context_size
    texts = load_dataset(dataset_cfg, key)
    model = TransformerLensLanguageModel(train.model.model_copy(update={"device": device}))
    sae = SparseAutoEncoder.from_pretrained(run_dir, device=device)
    contexts = held_out_contexts((row["text"] for row in texts), model, context_size, skip, n_contexts)
    if not contexts:
        raise UserInputError(
            f"{section}.skip_tokens", skip, f"{dataset_cfg.dataset_name_or_path} has no text left after skipping "
            f"{skip:,} tokens (what training read); {verb} another corpus (+dataset.dataset_name_or_path=...)",
        )
    return HeldOutRun(train, dataset_cfg, skip, context_size, model, sae, contexts)


def evaluate_run(settings: EvaluateSettings, console: Console | None = None) -> EvalResult:
    """Evaluate the SAE in `settings.run_dir` on held-out text; write eval.json there and print a table."""
    run_dir = Path(settings.run_dir)
    cfg = settings.evaluator
    run = load_held_out_run(run_dir, load_run_settings(run_dir), settings.device, settings.dataset, cfg.skip_tokens,
                            cfg.context_size, cfg.n_contexts, "evaluator", "evaluate")
    contexts = run.contexts
    console = console or Console(width=None if sys.stdout.isatty() else 140)  # a pipe gets no narrow wrap
    if len(contexts) < cfg.n_contexts:
        console.print(f"[yellow]warning: the corpus ends after {len(contexts)} held-out contexts of {cfg.n_contexts}")
    result = Evaluator(cfg).evaluate(run.sae, run.model, contexts)
    result.info.update(
        run_dir=str(run_dir), dataset=run.dataset_cfg.dataset_name_or_path, skip_tokens=run.skip_tokens,
        context_size=run.context_size,
    )
    write_json_atomic(run_dir / EVAL_FILE, result.to_json())
    print_table(result, console)
    return result


def _tokens_and_world_size(run_dir: Path) -> tuple[int | None, int]:
    """The tokens a run trained on, and over how many data-parallel ranks, from its metrics.json."""
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
        return int(metrics["n_training_tokens"]), int(metrics.get("world_size", 1))
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None, 1  # fall back on the budget: an upper bound on what the run trained on


_ROWS: list[tuple[str, list[tuple[str, str]]]] = [
    ("reconstruction", [
        ("explained_variance", "1 - SSE / variance about the mean"), ("mse", "raw units, summed over d_model"),
        ("cosine_similarity", "mean cos(x, x_hat)"), ("l2_ratio", "mean ||x_hat|| / ||x||"),
        ("relative_reconstruction_bias", "E||x_hat||^2 / E[x.x_hat]; 1 = unbiased"),
    ]),
    ("sparsity", [
        ("l0", "latents firing per token"), ("l1", "sum of latent activations per token"),
        ("dead_fraction", "never fired on these tokens"), ("dense_fraction", "fired on > 10% of tokens"),
    ]),
    ("downstream", [
        ("ce_loss_score", "(CE_abl - CE_sae) / (CE_abl - CE_clean)"), ("ce_loss_clean", "nats / token"),
        ("ce_loss_sae", "SAE spliced in"), ("ce_loss_ablated", "activation ablated"),
        ("kl_div_score", "(KL_abl - KL_sae) / KL_abl"), ("kl_div_sae", "KL(clean || SAE), nats / token"),
        ("kl_div_ablated", "KL(clean || ablated)"),
    ]),
]


def print_table(result: EvalResult, console: Console) -> None:
    info = result.info
    title = (f"{info.get('run_dir', 'SAE')}: {info['hook_point_out']}, {info['n_tokens']:,} held-out tokens, "
             f"{info['ablation']} ablation")
    table = Table(title=title, title_justify="left")
    for name, justify in (("group", "left"), ("metric", "left"), ("value", "right"), ("meaning", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for group, rows in _ROWS:
        for i, (key, meaning) in enumerate(rows):
            table.add_row(group if i == 0 else "", key, _fmt(result.metrics[key]), escape(meaning),  # [x.x_hat] is no markup
                          end_section=i == len(rows) - 1)
    table.add_row("", "log10 firing freq.", _sparkline(result.histogram), "histogram, 1e-8 .. 1 (never fired apart)")
    console.print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "undefined"
    return f"{value:.4f}" if isinstance(value, float) else f"{value:,}"


def _sparkline(histogram: dict[str, Any]) -> str:
    counts, blocks = histogram["counts"], " ▁▂▃▄▅▆▇█"
    top = max(max(counts), 1)
    bars = "".join(blocks[0] if c == 0 else blocks[max(1, round(8 * c / top))] for c in counts)
    return f"{bars} +{histogram['never_fired']} never"
