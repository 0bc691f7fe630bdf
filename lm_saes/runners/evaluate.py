"""The evaluate runner: a finished run directory (or a foreign SAE folder) -> held-out contexts -> Evaluator ->
eval.json and a table.

`evaluate_run(settings)` is what `lm-saes evaluate RUN_DIR` calls. Which text is held out (never trained on)
is `held_out.py`'s to say; on another dataset (`dataset=`), or for a foreign SAE, it is read from its start.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lm_saes.evaluator import EvalResult, Evaluator, EvaluatorConfig
from lm_saes.formatting import format_value
from lm_saes.run_dir import EVAL_FILE, write_json_atomic
from lm_saes.runners.held_out import HeldOutRunSettings, load_held_out_run, tokens_phrase
from lm_saes.runners.run_loading import load_inspected_sae


class EvaluateSettings(HeldOutRunSettings):
    """eval.json is written into `run_dir`."""

    evaluator: EvaluatorConfig = EvaluatorConfig()


def evaluate_run(settings: EvaluateSettings, console: Console | None = None) -> EvalResult:
    """Evaluate the SAE in `settings.run_dir` on held-out text; write eval.json there and print a table."""
    cfg = settings.evaluator
    run = load_held_out_run(settings, load_inspected_sae(settings), cfg.skip_tokens, cfg.context_size,
                            cfg.n_contexts, "evaluator", "evaluate")
    contexts = run.contexts
    console = console or Console(width=None if sys.stdout.isatty() else 140)  # a pipe gets no narrow wrap
    if len(contexts) < cfg.n_contexts:
        console.print(f"[yellow]warning: the corpus ends after {len(contexts)} held-out contexts of {cfg.n_contexts}")
    result = Evaluator(cfg).evaluate(run.sae, run.model, contexts)
    result.info.update(run.info())
    write_json_atomic(run.source.folder / EVAL_FILE, result.to_json())
    print_table(result, console)
    return result


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
    tokens = tokens_phrase(info.get("held_out"))
    title = (f"{info.get('run_dir', 'SAE')}: {info['hook_point_out']}, {info['n_tokens']:,} {tokens}, "
             f"{info['ablation']} ablation")
    table = Table(title=title, title_justify="left")
    for name, justify in (("group", "left"), ("metric", "left"), ("value", "right"), ("meaning", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for group, rows in _ROWS:
        for i, (key, meaning) in enumerate(rows):
            value = format_value(result.metrics[key], ".4f")  # fixed decimals line up in the column
            table.add_row(group if i == 0 else "", key, value, escape(meaning),  # [x.x_hat] is no markup
                          end_section=i == len(rows) - 1)
    table.add_row("", "log10 firing freq.", _sparkline(result.histogram), "histogram, 1e-8 .. 1 (never fired apart)")
    console.print(table)


def _sparkline(histogram: dict[str, Any]) -> str:
    counts, blocks = histogram["counts"], " ▁▂▃▄▅▆▇█"
    top = max(max(counts), 1)
    bars = "".join(blocks[0] if c == 0 else blocks[max(1, round(8 * c / top))] for c in counts)
    return f"{bars} +{histogram['never_fired']} never"
