"""From Hydra's composed config to typed settings, with user mistakes reported as one line.

Before handing the command line to `@hydra.main`, a single (non-sweep) run is composed and validated here
with the Compose API, so that a bad key, value or preset fails before Hydra makes a run directory.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lm_saes.errors import RunDirectoryError, UserInputError

CONFIG_MODULE = "lm_saes.conf"
GROUPS = ("model", "dataset", "activation_factory", "initializer", "sae", "trainer")
CLI_ONLY_KEYS = ("device", "dataset", "activation_cache")
"""Keys of the composed config that the settings do not have (`dataset` becomes `datasets`; activation_factory=cached
reads `activation_cache`)."""


SOURCE_TAGS = ("dataset", "activations")
"""The tags of activation_factory.sources' union: pydantic puts them in error locations; the user never typed them."""


class ConfigError(Exception):
    """A one-line message for the user."""


def group_options(group: str) -> list[str]:
    folder = resources.files(CONFIG_MODULE).joinpath(group)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


# --- composed config -> settings -------------------------------------------------------------------------

def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain data, interpolations resolved (ConfigError with one line)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as e:  # an interpolation to a missing key, say
        raise ConfigError(f"{getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}") from None


def validate_settings(settings_cls: Any, data: dict[str, Any], dataset_name: str | None = None) -> Any:
    """`settings_cls.model_validate(data)`, every complaint turned into one ConfigError line."""
    from pydantic import ValidationError

    try:
        return settings_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, settings_cls, dataset_name=dataset_name)) from None
    except UserInputError as e:
        raise ConfigError(str(e)) from None


def settings_from_config(cfg: DictConfig, run_dir: str | None) -> Any:
    """Validate a composed `train` config into TrainSAESettings. Raises ConfigError with one line."""
    from lm_saes.runners.train import TrainSAESettings

    if "sae" not in cfg or cfg.sae is None:
        raise ConfigError(f"sae: missing; choose a preset with +sae=NAME, one of: {', '.join(group_options('sae'))}")
    data = resolved_container(cfg)
    name = datasets_from_cli(data)
    factory = data.get("activation_factory") or {}
    if any(isinstance(s, dict) and "path" in s and s["path"] is None for s in factory.get("sources") or []):
        raise ConfigError("activation_cache: missing; activation_factory=cached trains from the activation cache at "
                          "activation_cache=DIR (make one with lm-saes generate DIR)")
    if factory.get("hook_points") is None:
        sae = data["sae"]
        hooks = [sae.get("hook_point_in"), sae.get("hook_point_out") or sae.get("hook_point_in")]
        factory["hook_points"] = list(dict.fromkeys(h for h in hooks if h))
    trainer = data.get("trainer") or {}
    if trainer.get("exp_result_path") is None:
        trainer["exp_result_path"] = run_dir or "results"
    return validate_settings(TrainSAESettings, data, dataset_name=name)


def datasets_from_cli(data: dict[str, Any]) -> str:
    """In place: drop the CLI-only keys and turn the `dataset` group into `datasets: {name: ...}`; return the name."""
    data.pop("hydra", None)
    dataset = data.pop("dataset")
    for key in CLI_ONLY_KEYS:
        data.pop(key, None)
    name = dataset.pop("name", None) or "dataset"
    data["datasets"] = {name: dataset}
    return name


def format_validation_error(error: Any, root: Any, dataset_name: str | None = None) -> str:
    """pydantic's errors for settings class `root` as `key=value: what is allowed`, joined on one line.

    With `dataset_name`, `datasets.<name>.x` is reported as `dataset.x`, the key the CLI user typed.
    """
    lines = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        loc = [p for i, p in enumerate(loc) if not (i >= 2 and loc[i - 2] == "sources" and p in SOURCE_TAGS)]
        if dataset_name is not None and loc[:2] == ["datasets", dataset_name]:
            loc = ["dataset", *loc[2:]]
        key = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_model_at(root, [str(p) for p in err["loc"][:-1]]).model_fields)
            lines.append(f"{key}={err['input']!r}: unknown key; allowed here: {allowed}")
        elif err["type"] == "union_tag_invalid":
            lines.append(f"{key}={err['input']!r}: unknown type {err['ctx']['tag']!r}; allowed: {err['ctx']['expected_tags']}")
        elif err["type"] == "missing":
            lines.append(f"{key}: missing; give a value with {key}=...")
        elif not loc and "=" in msg:  # a UserInputError raised by a model validator already names its key
            lines.append(msg)
        else:
            lines.append(f"{key}={err.get('input')!r}: {msg}")
    return "; ".join(lines)


def _model_at(root: Any, path: list[str]) -> Any:
    """The pydantic model class found by following field names from `root` (through dict values too)."""
    from typing import get_args

    from pydantic import BaseModel, Tag

    def is_model(t: Any) -> bool:
        return isinstance(t, type) and issubclass(t, BaseModel)

    def models_in(t: Any, tag: str | None = None) -> dict[str | None, Any]:
        """Model classes inside an annotation (through lists, unions, Annotated), by their union tag."""
        if is_model(t):
            return {tag: t}
        tags = [m.tag for m in getattr(t, "__metadata__", ()) if isinstance(m, Tag)]
        found: dict[str | None, Any] = {}
        for arg in ((t.__origin__,) if hasattr(t, "__metadata__") else get_args(t)):
            found.update(models_in(arg, tags[0] if tags else tag))
        return found

    model, candidates = root, {}
    for part in path:
        if part in candidates:  # a tagged union's tag (activation_factory.sources.0.activations.path)
            model, candidates = candidates[part], {}
            continue
        field = model.model_fields.get(part)
        if field is None:
            continue  # a dict key (e.g. a dataset's name): stay on the dict's value model
        found = models_in(field.annotation)
        if len(found) == 1:
            model = next(iter(found.values()))
        elif found:
            candidates = found
    return model


# --- command line -> composed config (the pre-check) -----------------------------------------------------

LAUNCHER_GROUP = "hydra/launcher"
LAUNCHERS = ("basic", "local", "slurm", "submitit_local", "submitit_slurm")
"""hydra/launcher= options: ours (conf/hydra/launcher/) on top of Hydra's and the submitit plugin's."""


def compose_single_run(overrides: list[str], config_name: str = "train", sweep: bool = False) -> DictConfig:
    """Compose `config_name` as a single run would, turning Hydra's multi-line errors into one line.

    With `sweep`, compose the sweep's first job instead (each swept key at its first value) together with the
    hydra config, so that a misspelt key, preset or launcher field fails before anything is submitted."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"cannot parse the overrides: {str(e).splitlines()[0]}") from None
    if sweep:
        overrides = [_first_job_override(o) for o in parsed]
        parsed = OverridesParser.create().parse_overrides(overrides)
    for o in parsed:
        group = o.key_or_group
        if group in (*GROUPS, LAUNCHER_GROUP) and not o.is_delete() and isinstance(o.value(), str) and o.package is None:
            options = group_options(group) if group in GROUPS else list(LAUNCHERS)
            if o.value() not in options:
                raise ConfigError(f"{group}={o.value()}: unknown preset; available: {', '.join(options)}")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=sweep)
        except HydraException as e:
            raise ConfigError(_explain_override_failure(e, parsed, config_name, sweep)) from None


def _first_job_override(override: Any) -> str:
    if not override.is_sweep_override():
        return override.input_line
    try:
        first = next(iter(override.sweep_string_iterator()))
    except Exception:  # glob() needs the composed config: leave it to Hydra
        return override.input_line
    prefix = override.input_line.split("=", 1)[0]
    return f"{prefix}={first}"


def _explain_override_failure(error: Exception, parsed: list[Any], config_name: str, sweep: bool = False) -> str:
    from hydra import compose

    group_overrides = [o.input_line for o in parsed if o.key_or_group in (*GROUPS, LAUNCHER_GROUP)]
    try:
        base = compose(config_name=config_name, overrides=group_overrides, return_hydra_config=sweep)
    except Exception:
        return str(error).splitlines()[0]
    for o in parsed:
        if o.key_or_group in (*GROUPS, LAUNCHER_GROUP) or o.is_add() or o.is_force_add():
            continue
        parent_key, _, leaf = o.key_or_group.rpartition(".")
        parent = OmegaConf.select(base, parent_key) if parent_key else base
        if parent is None:
            return f"{o.key_or_group}={o.value()}: unknown key {parent_key!r}; top-level keys: {', '.join(base.keys())}"
        if isinstance(parent, DictConfig) and leaf not in parent.keys():  # keys(): `in` is False for ??? values
            where = parent_key or "the top level"
            return f"{o.key_or_group}={o.value()}: unknown key; allowed in {where}: {', '.join(str(k) for k in parent.keys())}"
    return str(error).splitlines()[0]


# --- the Hydra entry -------------------------------------------------------------------------------------

PREEMPTED_EXIT_CODE = 3
"""`lm-saes train` exits with this after SIGTERM/SIGUSR1/SIGUSR2 and a checkpoint: rerun (or requeue) to resume."""


@dataclass(frozen=True)
class _RunDirVerb:
    """A verb whose first positional argument is a run (or sweep) directory. Each field is "module:name",
    imported only when the verb runs, so `lm-saes --help` stays free of torch."""

    settings: str
    """The settings class the composed config validates into."""
    runner: str
    """The function that takes those settings and does the work."""
    check: str | None = None
    """A function of the directory that raises UserInputError when the verb cannot use it (run in the pre-check)."""


RUN_DIR_VERBS: dict[str, _RunDirVerb] = {
    "evaluate": _RunDirVerb("lm_saes.runners.evaluate:EvaluateSettings", "lm_saes.runners.evaluate:evaluate_run",
                            "lm_saes.runners.evaluate:load_run_settings"),
    "analyze": _RunDirVerb("lm_saes.runners.analyze:AnalyzeSettings", "lm_saes.runners.analyze:analyze_run",
                           "lm_saes.runners.evaluate:load_run_settings"),
    "dashboard": _RunDirVerb("lm_saes.runners.dashboard:DashboardSettings", "lm_saes.runners.dashboard:dashboard_run",
                             "lm_saes.analysis.files:read_analysis_info"),
    "report": _RunDirVerb("lm_saes.runners.report:ReportSettings", "lm_saes.runners.report:report_run"),
}


def _load(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


NON_MAIN_RANK_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
"""Hydra writes nothing for a data-parallel rank other than 0: rank 0 owns the run directory, and tells the
others its name (their clocks may name another)."""


def run_hydra_verb(verb: str, overrides: list[str]) -> int:
    if verb in RUN_DIR_VERBS:
        overrides = positional_run_dir(overrides)
    elif verb == "generate":
        overrides = positional_run_dir(overrides, key="output_dir")
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    other_flags = any(a.startswith("-") and a not in ("-m", "--multirun") for a in overrides)
    rank_overrides: list[str] = []  # added after the pre-check: they are Hydra's, not the user's
    if verb == "train":
        from lm_saes.distributed import launch_from_env

        launch = launch_from_env()
        if launch.world_size > 1 and multirun:
            print("lm-saes train: -m under torchrun or srun would run the whole sweep in every process; run the sweep "
                  "with hydra/launcher=slurm and hydra.launcher.tasks_per_node=N for data-parallel jobs", file=sys.stderr)
            return 2
        rank_overrides = NON_MAIN_RANK_OVERRIDES if launch.rank > 0 else []
    if not other_flags:
        from lm_saes import cli_cache

        try:
            if multirun:  # structure (and the shared cache) only: a job whose values are wrong records `failed`
                composed = compose_single_run([a for a in overrides if not a.startswith("-")], config_name=verb, sweep=True)
                cli_cache.check_shared_cache(composed)
                _check_launcher(composed)
            else:
                composed = compose_single_run(overrides, config_name=verb)
                if verb in RUN_DIR_VERBS:
                    run_dir_settings_from_config(verb, composed, check_run_dir=True)
                elif verb == "generate":
                    cli_cache.generate_settings_from_config(composed)
                else:
                    cli_cache.check_train_inputs(settings_from_config(composed, run_dir=None), composed)
        except ConfigError as e:
            print(f"lm-saes {verb}: {e}", file=sys.stderr)
            return 2
    from lm_saes.hydra_app import APPS

    sys.argv = [f"lm-saes {verb}", *overrides, *rank_overrides]
    try:
        APPS[verb]()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


def _check_launcher(composed_with_hydra: DictConfig) -> None:
    from lm_saes import slurm

    if slurm.uses_slurm(composed_with_hydra):
        try:
            slurm.check_cluster_reachable()
        except UserInputError as e:
            raise ConfigError(str(e)) from None


def run_train_job(cfg: DictConfig) -> None:
    """The body of the Hydra job: validate, train, and report user mistakes as one line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lm_saes.checkpoint import CheckpointError
    from lm_saes.distributed import PeerFailed
    from lm_saes.runners.train import train_sae
    from lm_saes.trainer import Preempted, TrainingDiverged

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        settings = settings_from_config(cfg, run_dir=hydra_cfg.runtime.output_dir)
        train_sae(settings)
    except Preempted as e:
        print(f"lm-saes train: {e}", file=sys.stderr)
        _hand_on_signal(e.signal_name)  # under submitit: requeues the job, then exits
        if not multirun:
            sys.exit(PREEMPTED_EXIT_CODE)
    except (ConfigError, UserInputError, RunDirectoryError, CheckpointError, TrainingDiverged, PeerFailed) as e:
        print(f"lm-saes train: {e}", file=sys.stderr)
        if not multirun:  # in a sweep the job's status.json says failed and the others go on
            sys.exit(2)
        if isinstance(e, ConfigError):  # failed before train_sae could record it
            from lm_saes.run_dir import write_status

            write_status(Path(hydra_cfg.runtime.output_dir), "failed", error=str(e))
    except Exception as e:
        if not multirun:
            raise  # a bug, not a user's mistake: the traceback is wanted
        # train_sae already wrote status.json "failed" with the traceback; one job must not end the sweep.
        print(f"lm-saes train: job {hydra_cfg.job.num} failed: {type(e).__name__}: {e}", file=sys.stderr)


def _hand_on_signal(signal_name: str | None) -> None:
    """Call the handler that was installed for `signal_name` before training took it over, if it is a Python
    function: under Hydra's submitit launcher that is submitit's, which resubmits this job with `scontrol requeue`
    (the requeued job resumes from the checkpoint just written) and exits. Plain runs have none; nor has a
    data-parallel rank that stopped for another rank's signal (None)."""
    import signal

    if signal_name is None:
        return
    signum = getattr(signal, signal_name)
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)


# --- verbs on a run directory: evaluate, analyze, dashboard, report -------------------------------------

def positional_run_dir(args: list[str], key: str = "run_dir") -> list[str]:
    """`RUN_DIR k=v ...` -> `run_dir='RUN_DIR' k=v ...` (or `key=`): the first argument that is neither a flag
    nor an override."""
    for i, arg in enumerate(args):
        if not arg.startswith("-") and "=" not in arg:
            quoted = arg.replace("\\", "\\\\").replace("'", "\\'")
            return [*args[:i], f"{key}='{quoted}'", *args[i + 1 :]]
    return args


def run_dir_settings_from_config(verb: str, cfg: DictConfig, check_run_dir: bool = False) -> Any:
    """Validate a composed run-directory verb's config into its settings (ConfigError with one line); with
    `check_run_dir`, also check the directory is one the verb can use."""
    spec = RUN_DIR_VERBS[verb]
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise ConfigError(f"run_dir: missing; usage: lm-saes {verb} RUN_DIR [KEY=VALUE ...]")
    data = resolved_container(cfg)
    data.pop("hydra", None)
    settings = validate_settings(_load(spec.settings), data)
    if check_run_dir and spec.check is not None:
        try:
            _load(spec.check)(Path(settings.run_dir))
        except UserInputError as e:
            raise ConfigError(str(e)) from None
    return settings


def run_dir_job(verb: str, cfg: DictConfig) -> None:
    """The body of a run-directory verb's Hydra job: validate, run, and report user mistakes as one line."""
    try:
        _load(RUN_DIR_VERBS[verb].runner)(run_dir_settings_from_config(verb, cfg))
    except (ConfigError, UserInputError) as e:
        print(f"lm-saes {verb}: {e}", file=sys.stderr)
        sys.exit(2)
