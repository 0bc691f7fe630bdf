"""Quality of every SAE preset at one equal budget, on one activation cache of the embedded SmolLM2-135M.

    .venv/bin/python scripts/bench_quality.py [--budget 500000] [--cache-tokens 2000000] [--only cache]
    .venv/bin/python scripts/bench_quality.py --presets relu_8x topk_8x --amp float32 bfloat16   # bf16's EV cost

The cache (blocks.6 resid_post, ln2 input, MLP output; bfloat16) holds the built-in corpus minus its held-out
tail, cycled until it reaches --cache-tokens; it is written once under ~/.cache/lm_saes/bench_quality and
reused. Every conf/sae preset trains with the CLI's defaults (its own trainer values on top) on the same
rows in the same order for --budget tokens, then is evaluated on the held-out tail: EV, L0, CE and KL
scores (SAE spliced into the model), dead and dense fractions (on the held-out tokens), and the trainer's
tokens/s. A reference row trains an OpenAI-style TopK SAE (k=32, 8x) with a plain PyTorch loop on the same
rows and budget. Tokens/s on a shared machine is noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from lm_saes import (
    ActivationFactory,
    ActivationFactoryActivationsSource,
    ActivationFactoryConfig,
    DatasetConfig,
    GenerateSettings,
    Initializer,
    InitializerConfig,
    LanguageModelConfig,
    SAEConfig,
    SparseAutoEncoder,
    Trainer,
    TrainerConfig,
    TransformerLensLanguageModel,
    generate_activations,
)
from lm_saes.activation.cache import read_manifest
from lm_saes.datasets import builtin_documents
from lm_saes.evaluator import Evaluator, EvaluatorConfig
from lm_saes.runners.held_out import held_out_contexts

ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path("~/.cache/lm_saes/bench_quality").expanduser()
HOOKS = ["blocks.6.hook_resid_post", "blocks.6.ln2.hook_normalized", "blocks.6.hook_mlp_out"]
HELD_OUT_DOCS = 300
"""The corpus's last documents: never in the cache, the evaluation's text."""
BATCH, BUFFER = 1024, 8192  # the CLI's activation_factory defaults


def corpus_split() -> tuple[list[str], list[str]]:
    docs = builtin_documents()
    return docs[:-HELD_OUT_DOCS], docs[-HELD_OUT_DOCS:]


def ensure_cache(n_tokens: int) -> Path:
    """The activation cache of at least `n_tokens` rows (the training documents, cycled): reused if complete."""
    import datasets

    cache = CACHE_ROOT / f"acts-{n_tokens}"
    if (cache / "manifest.json").exists() and read_manifest(str(cache), "cache", require_complete=False).complete:
        return cache
    train_docs, _ = corpus_split()
    corpus = CACHE_ROOT / "train-docs-x8"
    if not (corpus / "dataset_info.json").exists():  # 8 passes of ~430K tokens: more than any budget here
        datasets.Dataset.from_dict({"text": train_docs * 8}).save_to_disk(str(corpus))
    generate_activations(GenerateSettings(
        output_dir=str(cache), datasets={"train": DatasetConfig(dataset_name_or_path=str(corpus))},
        hook_points=HOOKS, dtype=torch.bfloat16, total_tokens=n_tokens,
    ))
    return cache


def stream(cache: Path, sae_cfg: SAEConfig):
    hooks = list(dict.fromkeys([sae_cfg.hook_point_in, sae_cfg.hook_point_target]))
    # The cache listed a few times over: a budget larger than the cache cycles its rows.
    cfg = ActivationFactoryConfig(sources=[ActivationFactoryActivationsSource(path=str(cache))] * 8,
                                  hook_points=hooks, batch_size=BATCH, buffer_size=BUFFER)
    return ActivationFactory(cfg).process(model=None, model_name="smollm2-135m")


def preset(name: str) -> tuple[SAEConfig, dict]:
    data = yaml.safe_load((ROOT / "conf" / "sae" / f"{name}.yaml").read_text())
    return SAEConfig(**{**data["sae"], "d_model": 576, "device": "cpu"}), data.get("trainer", {})


def train_preset(name: str, cache: Path, budget: int, out: Path,
                 amp_dtype: str = "float32") -> tuple[SparseAutoEncoder, float]:
    sae_cfg, trainer_overrides = preset(name)
    batches = stream(cache, sae_cfg)
    sae = Initializer(InitializerConfig()).initialize_sae_from_config(sae_cfg, batches)
    cfg = TrainerConfig(**{**trainer_overrides, "total_training_tokens": budget, "log_frequency": 100,
                           "exp_result_path": str(out / f"{name}-{amp_dtype}"), "overwrite": True,
                           "amp_dtype": amp_dtype})
    final = Trainer(cfg).fit(sae, batches)
    return sae, float(final["tokens_per_second"])


def reference_topk(cache: Path, budget: int, k: int = 32, expansion: int = 8, lr: float = 3e-3) -> tuple[SparseAutoEncoder, float]:
    """A plain OpenAI-style TopK SAE (Gao et al. 2024): pre-encoder bias = decoder bias, W_enc initialised as
    W_dec^T, unit-norm decoder rows with the parallel gradient removed, Adam, normalised MSE. Same rows (the
    initializer's two batches skipped, as ours are), same budget, the same linear warm-up/cool-down."""
    cfg = SAEConfig(hook_point_in=HOOKS[0], d_model=576, expansion_factor=expansion, act_fn="topk", top_k=k)
    batches = stream(cache, cfg)
    first = torch.cat([next(batches)[HOOKS[0]].float() for _ in range(2)])
    scale = math.sqrt(576) / first.norm(dim=1).mean()  # inputs of mean norm sqrt(d_model), as ours
    torch.manual_seed(0)
    W_dec = torch.nn.functional.normalize(torch.randn(cfg.d_sae, 576), dim=1).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(cfg.d_sae, requires_grad=True)
    b_pre = (first * scale).mean(dim=0).requires_grad_()
    opt = torch.optim.Adam([W_dec, W_enc, b_enc, b_pre], lr=lr, eps=6.25e-10)
    steps = budget // BATCH
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / (0.05 * steps), 1, (steps - s) / (0.2 * steps)))
    start = time.perf_counter()
    for _, batch in zip(range(steps), batches):
        x = batch[HOOKS[0]].float() * scale
        values, idx = ((x - b_pre) @ W_enc + b_enc).topk(k, dim=-1)
        latents = torch.zeros(len(x), cfg.d_sae).scatter(-1, idx, values.relu())
        recon = latents @ W_dec + b_pre
        loss = (recon - x).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        sched.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))
    tps = steps * BATCH / (time.perf_counter() - start)
    sae = SparseAutoEncoder(cfg)
    with torch.no_grad():  # pre = (x - b_pre) W_enc + b_enc on scaled inputs, as our SAE's weights
        sae.W_E.copy_(W_enc)
        sae.b_E.copy_(b_enc - b_pre @ W_enc)
        sae.W_D.copy_(W_dec)
        sae.b_D.copy_(b_pre)
        sae.norm_factor_in.fill_(scale)
        sae.norm_factor_out.fill_(scale)
    return sae.eval(), tps


def evaluate(sae: SparseAutoEncoder, model: TransformerLensLanguageModel, contexts: list[torch.Tensor]) -> dict:
    return Evaluator(EvaluatorConfig(n_contexts=len(contexts))).evaluate(sae, model, contexts).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=300_000, help="training tokens per preset")
    parser.add_argument("--cache-tokens", type=int, default=2_000_000,
                        help="rows in the cache (cycled when the budget is larger)")
    parser.add_argument("--eval-contexts", type=int, default=32, help="held-out contexts of 256 tokens")
    parser.add_argument("--presets", nargs="*", help="default: every conf/sae preset")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--model-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the evaluation model's weights (CE and KL scores with the SAE spliced into it); the "
                             "cache is always the fp32 model's")
    parser.add_argument("--amp", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                        help="trainer.amp_dtype values: each preset trains once per value, on the same rows")
    parser.add_argument("--only", choices=("all", "cache"), default="all")
    args = parser.parse_args()
    cache = ensure_cache(args.cache_tokens)
    if args.only == "cache":
        return
    model = TransformerLensLanguageModel(LanguageModelConfig(dtype=args.model_dtype))
    _, held_out = corpus_split()
    contexts = held_out_contexts(held_out, model, 256, 0, args.eval_contexts)
    names = args.presets or sorted(p.stem for p in (ROOT / "conf" / "sae").glob("*.yaml"))
    table = Table(title=f"every preset at {args.budget:,} training tokens, evaluated on "
                        f"{len(contexts) * 256:,} held-out tokens (embedded SmolLM2-135M, blocks.6)")
    for col in ("preset", "EV", "L0", "CE score", "KL score", "dead", "dense", "train tokens/s"):
        table.add_column(col, justify="left" if col == "preset" else "right")
    runs = [(name if amp == "float32" else f"{name}, trainer.amp_dtype={amp}",
             lambda name=name, amp=amp: train_preset(name, cache, args.budget, CACHE_ROOT / "runs", amp))
            for name in names for amp in args.amp]
    if not args.no_reference:
        runs.append(("reference: plain TopK k=32 8x", lambda: reference_topk(cache, args.budget)))
    for name, train in runs:  # each row printed as soon as it is measured: a long run shows its progress
        sae, tps = train()
        m = evaluate(sae, model, contexts)
        row = (name, f"{m['explained_variance']:.3f}", f"{m['l0']:.1f}", f"{m['ce_loss_score']:.3f}",
               f"{m['kl_div_score']:.3f}", f"{m['dead_fraction']:.3f}", f"{m['dense_fraction']:.3f}", f"{tps:,.0f}")
        table.add_row(*row)
        print("ROW | " + " | ".join(row) + " |", flush=True)
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
