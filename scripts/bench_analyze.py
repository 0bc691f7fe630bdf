"""`lm-saes analyze` at scale: peak memory and tokens/s by d_sae, and memory against the tokens analysed.

    .venv/bin/python scripts/bench_analyze.py [--expansions 8 64 455] [--tokens 2048] [--device cpu]

Each row runs in its own process (so its peak RSS, `resource.getrusage` ru_maxrss, is its own): the embedded
SmolLM2 (d_model 576) on the built-in corpus, blocks.6.hook_resid_post, a random ReLU SAE of 576 x expansion
latents (455 gives 262,080, the nearest to 262,144), `FeatureAnalyzer` with `lm-saes analyze`'s defaults.
"stream tok/s" is the token loop alone (model forward + SAE + statistics); "end s" is the work after it
(logit effects and decoder neighbours, d_sae^2 x d_model); "RSS model MB" is the process after loading
the model, before the analysis. The smallest size also runs at 4x the tokens: its peak should not move.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

HOOK = "blocks.6.hook_resid_post"


def worker(expansion: int, n_tokens: int, device: str, n_neighbours: int) -> dict[str, float]:
    import torch

    from lm_saes import DatasetConfig, LanguageModelConfig, SAEConfig, SparseAutoEncoder, TransformerLensLanguageModel
    from lm_saes.activation.packing import pack_documents
    from lm_saes.analysis import AnalysisConfig, FeatureAnalyzer
    from lm_saes.datasets import load_dataset

    torch.manual_seed(0)
    model = TransformerLensLanguageModel(LanguageModelConfig(device=device))
    texts = (row["text"] for row in load_dataset(DatasetConfig(), "dataset"))
    contexts = pack_documents(texts, model.tokenizer, 128)
    sae = SparseAutoEncoder(SAEConfig(hook_point_in=HOOK, d_model=576, expansion_factor=expansion, device=device))
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    analyzer = FeatureAnalyzer(AnalysisConfig(n_tokens=n_tokens, n_neighbours=n_neighbours))
    started = time.perf_counter()
    result = analyzer.analyze(sae, model, contexts)
    stream = result.info["stream_seconds"]  # the token loop; the rest is logit effects and neighbours
    ended = time.perf_counter()
    return {"d_sae": sae.cfg.d_sae, "tokens": result.info["n_tokens"],
            "stream_tok_s": result.info["n_tokens"] / stream, "end_s": ended - started - stream,
            "rss_model_mb": rss_model, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_row(expansion: int, n_tokens: int, device: str, n_neighbours: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--worker", str(expansion), str(n_tokens), device, str(n_neighbours)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expansions", type=int, nargs="+", default=[8, 64, 455])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--neighbours", type=int, default=10, help="analysis.n_neighbours (0 skips that end work)")
    args = parser.parse_args()
    rows = [(e, args.tokens) for e in args.expansions] + [(min(args.expansions), 4 * args.tokens)]
    table = Table(title=f"lm-saes analyze, random SAE on SmolLM2 {HOOK} ({platform.machine()}, {os.cpu_count()} cores, "
                        f"{args.device}, n_neighbours={args.neighbours})")
    for column in ("latents", "tokens", "stream tok/s", "end s", "RSS model MB", "peak RSS MB", "analysis MB"):
        table.add_column(column, justify="right")
    for expansion, n_tokens in rows:
        r = run_row(expansion, n_tokens, args.device, args.neighbours)
        table.add_row(f"{r['d_sae']:,}", f"{r['tokens']:,}", f"{r['stream_tok_s']:,.0f}", f"{r['end_s']:.1f}",
                      f"{r['rss_model_mb']:,.0f}", f"{r['peak_mb']:,.0f}", f"{r['peak_mb'] - r['rss_model_mb']:,.0f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
