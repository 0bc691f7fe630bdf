"""`lm-saes VERB [hydra overrides]`: a thin dispatcher. `--help` answers without importing torch."""

from __future__ import annotations

import sys

HELP = """\
usage: lm-saes VERB [OVERRIDES...]

Train sparse autoencoders on language-model activations. Configs are composed with Hydra from the groups
model, dataset, activation_factory, initializer, sae and trainer; override any value with key=value.

verbs:
  train     train an SAE:  lm-saes train +sae=relu_8x [trainer.lr=3e-4 sae.expansion_factor=16 ...]
            sweep with -m: lm-saes train -m +sae=relu_8x sae.expansion_factor=8,16 trainer.lr=1e-4,3e-4
            on SLURM:      lm-saes train -m hydra/launcher=slurm hydra.launcher.partition=gpu +sae=relu_8x ...
            on N GPUs:     torchrun --standalone --nproc_per_node=N --no-python lm-saes train +sae=relu_8x device=cuda
  generate  run the model once and store its activations (an activation cache) for many training runs:
            lm-saes generate OUTPUT_DIR [hook_points=[blocks.6.hook_resid_post] total_tokens=1000000 ...]
            then: lm-saes train -m +sae=relu_8x activation_factory=cached activation_cache=OUTPUT_DIR ...
  evaluate  splice a trained SAE into its model on held-out text; write RUN_DIR/eval.json, print a table:
            lm-saes evaluate RUN_DIR [evaluator.n_contexts=64 evaluator.ablation=mean ...]
  analyze   what each latent responds to, on held-out text; write RUN_DIR/analysis/:
            lm-saes analyze RUN_DIR [analysis.n_tokens=65536 analysis.n_top_examples=20 ...]
  dashboard render RUN_DIR/analysis/ as one offline HTML page, RUN_DIR/dashboard.html:
            lm-saes dashboard RUN_DIR [n_top_examples=10 output=PATH ...]
  report    a sweep's jobs in one table (SWEEP_DIR/report.csv) and the L0-vs-fidelity frontier (frontier.png):
            lm-saes report SWEEP_DIR

`lm-saes VERB --help` shows the verb's config (for train: the groups, their options, the composed config).
Presets: model=smollm2_135m (default, offline) | pythia_160m; dataset=builtin (default, offline) |
slimpajama_3b; +sae=relu_8x | topk_8x | batchtopk_8x | jumprelu_8x | transcoder_relu_8x | transcoder_topk_8x.
"""

VERBS = ("train", "generate", "evaluate", "analyze", "dashboard", "report")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(HELP, end="")
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"lm-saes: unknown verb {verb!r}; available: {', '.join(VERBS)} (see lm-saes --help)", file=sys.stderr)
        return 2
    from lm_saes.cli_config import run_hydra_verb

    return run_hydra_verb(verb, rest)


if __name__ == "__main__":
    sys.exit(main())
