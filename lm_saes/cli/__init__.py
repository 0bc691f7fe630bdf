"""`lm-saes VERB [hydra overrides]`: a thin dispatcher over the verb table (lm_saes.cli.verbs).

`main` checks the command line (lm_saes.cli.verbs.precheck), then hands it to the verb's `@hydra.main` function
(lm_saes.cli.apps), whose job (lm_saes.cli.jobs) validates the config and calls the verb's runner.
`--help` answers without importing torch.
"""

from __future__ import annotations

import sys

from lm_saes.cli.compose import ConfigError, presets, with_positional
from lm_saes.cli.verbs import VERBS, precheck

HELP = """\
usage: lm-saes VERB [OVERRIDES...]

Train sparse autoencoders on language-model activations. Configs are composed with Hydra from the groups
model, dataset, activation_factory, initializer, sae and trainer; override any value with key=value.

verbs:
  train     train an SAE:  lm-saes train +sae=relu_8x [trainer.lr=3e-4 sae.expansion_factor=16 ...]
            sweep with -m: lm-saes train -m +sae=relu_8x sae.expansion_factor=8,16 trainer.lr=1e-4,3e-4
            one stream:    lm-saes train -m hydra/launcher=grouped +sae=relu_8x sae.act_fn=relu,topk   # a group per stream
            on SLURM:      lm-saes train -m hydra/launcher=slurm hydra.launcher.partition=gpu +sae=relu_8x ...
            on N GPUs:     torchrun --standalone --nproc_per_node=N --no-python lm-saes train +sae=relu_8x device=cuda
  generate  run the model once and store its activations (an activation cache) for many training runs:
            lm-saes generate OUTPUT_DIR [hook_points=[blocks.6.hook_resid_post] total_tokens=1000000 ...]
            then: lm-saes train -m +sae=relu_8x activation_factory=cached activation_cache=OUTPUT_DIR ...
  evaluate  splice a trained SAE into its model on held-out text; write RUN_DIR/eval.json, print a table
            (here and for analyze, RUN_DIR may also be a SAELens folder: see README "Interop"):
            lm-saes evaluate RUN_DIR [evaluator.n_contexts=64 evaluator.ablation=mean ...]
  analyze   what each latent responds to, on held-out text; write RUN_DIR/analysis/:
            lm-saes analyze RUN_DIR [analysis.n_tokens=65536 analysis.n_top_examples=20 ...]
  dashboard render RUN_DIR/analysis/ as pages that open from disk, RUN_DIR/dashboard/index.html:
            lm-saes dashboard RUN_DIR [dashboard.n_top_examples=10 dashboard.single_file=true output=PATH ...]
  inspect   per token of a text, the SAE's strongest latents and their activations (a terminal lens):
            lm-saes inspect RUN_DIR "some text" [n_latents=5 device=cpu]
  compare   match each latent of run A to its closest in run B by decoder cosine; RUN_A/compare/B.json:
            lm-saes compare RUN_A RUN_B [output=PATH]
  export    write a run's SAE in SAELens's format (cfg.json + sae_weights.safetensors):
            lm-saes export RUN_DIR OUT_DIR [format=saelens]
  report    a sweep's jobs in one table (SWEEP_DIR/report.csv) and the L0-vs-fidelity frontier (frontier.png):
            lm-saes report SWEEP_DIR

`lm-saes VERB --help` shows the verb's config (for train: the groups, their options, the composed config).
"""

NON_MAIN_RANK_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
"""Hydra writes nothing for a data-parallel rank other than 0: rank 0 owns the run directory, and tells the
others its name (their clocks may name another)."""


def help_text() -> str:
    """HELP and train's presets, as conf/ has them."""
    lines = ["Presets of lm-saes train, from conf/ (* marks the default; the defaults run offline):"]
    for group, (options, default) in presets("train").items():
        plus = "" if default is not None or group.startswith("hydra/") else "+"  # hydra/ groups have Hydra's defaults
        names = [f"{o}*" if o == default else o for o in sorted(options, key=lambda o: o != default)]
        lines.append(f"  {plus}{group}={' | '.join(names)}")
    return HELP + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(help_text(), end="")
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"lm-saes: unknown verb {verb!r}; available: {', '.join(VERBS)} (see lm-saes --help)", file=sys.stderr)
        return 2
    return run_verb(verb, rest)


def run_verb(verb: str, args: list[str]) -> int:
    """Pre-check the command line, then run the verb's Hydra application on it; the exit code."""
    overrides = with_positional(args, VERBS[verb].positional)
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    other_flags = any(a.startswith("-") and a not in ("-m", "--multirun") for a in overrides)  # --help, --cfg, ...
    try:
        rank_overrides = _rank_overrides(multirun) if VERBS[verb].data_parallel else []
        if not other_flags:
            overrides = precheck(verb, overrides, multirun)
    except ConfigError as e:
        print(f"lm-saes {verb}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # not the user's mistake: one line, the traceback in a file
        from lm_saes.cli.jobs import report_crash

        return report_crash(verb, e, None)
    from lm_saes.cli.apps import APPS
    from lm_saes.cli.launchers import register_launchers

    register_launchers()

    sys.argv = [f"lm-saes {verb}", *overrides, *rank_overrides]  # rank overrides are Hydra's, not the user's
    try:
        APPS[verb]()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


def _rank_overrides(multirun: bool) -> list[str]:
    """The overrides this process adds as one rank of a data-parallel job (none on rank 0 or alone)."""
    from lm_saes.distributed import launch_from_env

    launch = launch_from_env()
    if launch.world_size > 1 and multirun:
        raise ConfigError("-m under torchrun or srun would run the whole sweep in every process; run the sweep with "
                          "hydra/launcher=slurm and hydra.launcher.tasks_per_node=N for data-parallel jobs")
    return NON_MAIN_RANK_OVERRIDES if launch.rank > 0 else []
