"""The analyze runner: a finished run directory -> held-out contexts -> FeatureAnalyzer -> RUN_DIR/analysis/.

`analyze_run(settings)` is what `lm-saes analyze RUN_DIR` calls. The contexts are held-out text as for
`lm-saes evaluate` (see `held_out.py`), or another corpus from its start.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from lm_saes.analysis import AnalysisConfig, FeatureAnalysis, FeatureAnalyzer, save_analysis
from lm_saes.progress import TokenProgress
from lm_saes.runners.held_out import HeldOutRunSettings, load_held_out_run
from lm_saes.runners.run_loading import load_run_settings


class AnalyzeSettings(HeldOutRunSettings):
    """The analysis is written into RUN_DIR/analysis/."""

    analysis: AnalysisConfig = AnalysisConfig()


def analyze_run(settings: AnalyzeSettings) -> FeatureAnalysis:
    """Analyse every latent of the SAE in `settings.run_dir` on held-out text; write RUN_DIR/analysis/."""
    run_dir = Path(settings.run_dir)
    cfg = settings.analysis
    started = time.perf_counter()
    train = load_run_settings(run_dir)
    context_size = cfg.context_size or train.activation_factory.context_size
    # Each context holds at most context_size - 1 text tokens (one BOS); one batch more covers EOS separators.
    n_contexts = math.ceil(cfg.n_tokens / (context_size - 1)) + cfg.model_batch_size
    run = load_held_out_run(settings, train, cfg.skip_tokens, context_size, n_contexts, "analysis", "analyse")
    model, dataset_cfg, skip = run.model, run.dataset_cfg, run.skip_tokens
    progress = TokenProgress(cfg.n_tokens, "analyze")  # a bar with tokens/s and ETA on a terminal
    try:
        result = FeatureAnalyzer(cfg).analyze(run.sae, model, run.contexts, progress)
    finally:
        progress.close()
    result.info.update(run_dir=str(run_dir), dataset=dataset_cfg.dataset_name_or_path, skip_tokens=skip,
                       context_size=context_size, seconds=round(time.perf_counter() - started, 1))
    folder = save_analysis(result, run_dir, model.tokenizer)
    n_dead = len(result.info["dead_latents"])
    short = " (the corpus ended first)" if result.info["n_tokens"] < cfg.n_tokens else ""
    print(f"analysed {result.info['n_tokens']:,} held-out tokens{short} in {result.info['seconds']:.0f} s: "
          f"{result.info['d_sae'] - n_dead:,} live latents, {n_dead:,} dead (listed) -> {folder}")
    return result
