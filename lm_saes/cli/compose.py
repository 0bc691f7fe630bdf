"""From the command line to a composed config, and from a composed config to typed settings, with every user
mistake reported as one line (ConfigError).

Before the command line goes to `@hydra.main`, a single (non-sweep) run is composed here with the Compose API,
so that a bad key, value or preset fails before Hydra makes a run directory.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from lm_saes.errors import UserInputError

CONFIG_MODULE = "lm_saes.conf"
GROUPS = ("model", "dataset", "activation_factory", "initializer", "sae", "trainer")
"""The config groups whose presets the pre-check checks by name."""
CLI_ONLY_KEYS = ("device", "dataset", "activation_cache")
"""Keys of the composed config that the settings do not have (`dataset` becomes `datasets`; activation_factory=cached
reads `activation_cache`)."""
SOURCE_TAGS = ("dataset", "activations")
"""The tags of activation_factory.sources' union: pydantic puts them in error locations; the user never typed them."""
LAUNCHER_GROUP = "hydra/launcher"
LAUNCHERS = ("basic", "grouped", "local", "slurm", "submitit_local", "submitit_slurm")
"""hydra/launcher= options: ours (conf/hydra/launcher/) on top of Hydra's and the submitit plugin's."""


class ConfigError(Exception):
    """A one-line message for the user."""


# --- the presets in conf/ ----------------------------------------------------------------------------------

def group_options(group: str) -> list[str]:
    """The presets of a config group (`model`, `hydra/launcher`): its folder's YAML files."""
    folder = resources.files(CONFIG_MODULE).joinpath(*group.split("/"))
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def presets(config_name: str = "train") -> dict[str, tuple[list[str], str | None]]:
    """Every config group under conf/ with its presets and its default in `config_name` (None: it has none, so
    the group is added with +GROUP=NAME); the default groups first, in their order."""
    root = resources.files(CONFIG_MODULE)
    defaults: dict[str, str] = {}
    for entry in yaml.safe_load(root.joinpath(f"{config_name}.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            defaults.update({k: v for k, v in entry.items() if not k.startswith("override")})
    groups = _groups(root)
    order = [*(g for g in defaults if g in groups), *(g for g in groups if g not in defaults)]
    return {g: (group_options(g), defaults.get(g)) for g in order}


def _groups(folder: Any, prefix: str = "") -> list[str]:
    """The folders under `folder` that hold YAML files (`hydra/launcher` too), sorted."""
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("_"):
            if any(p.name.endswith(".yaml") for p in entry.iterdir()):
                found.append(prefix + entry.name)
            found += _groups(entry, f"{prefix}{entry.name}/")
    return found


# --- composed config -> settings ---------------------------------------------------------------------------

def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain data, interpolations resolved, without Hydra's own config (ConfigError)."""
    try:
        data: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except Exception as e:  # an interpolation to a missing key, say
        raise ConfigError(f"{getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}") from None
    data.pop("hydra", None)
    return data


def plain_data(cfg: DictConfig, run_dir: str | None = None) -> tuple[dict[str, Any], None]:
    """What a run-directory verb's settings validate: the composed config as it is (no dataset group)."""
    return resolved_container(cfg), None


def data_with_datasets(cfg: DictConfig, run_dir: str | None = None) -> tuple[dict[str, Any], str]:
    """The composed config with its `dataset` group as `datasets: {name: ...}`, and that name."""
    data = resolved_container(cfg)
    return data, datasets_from_cli(data)


def datasets_from_cli(data: dict[str, Any]) -> str:
    """In place: drop the CLI-only keys and turn the `dataset` group into `datasets: {name: ...}`; return the name."""
    dataset = data.pop("dataset")
    for key in CLI_ONLY_KEYS:
        data.pop(key, None)
    name = dataset.pop("name", None) or "dataset"
    data["datasets"] = {name: dataset}
    return name


def validate_settings(settings_cls: Any, data: dict[str, Any], dataset_name: str | None = None) -> Any:
    """`settings_cls.model_validate(data)`, every complaint turned into one ConfigError line."""
    from pydantic import ValidationError

    try:
        return settings_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, settings_cls, dataset_name=dataset_name)) from None
    except UserInputError as e:
        raise ConfigError(str(e)) from None


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
            allowed = ", ".join(model_at(root, [str(p) for p in err["loc"][:-1]]).model_fields)
            lines.append(f"{key}={err['input']!r}: unknown key; allowed here: {allowed}")
        elif err["type"] == "union_tag_invalid":
            lines.append(f"{key}={err['input']!r}: unknown type {err['ctx']['tag']!r}; allowed: {err['ctx']['expected_tags']}")
        elif err["type"] == "missing":
            lines.append(f"{key}: missing; give a value with {key}=...")
        elif isinstance(err.get("ctx", {}).get("error"), UserInputError):  # a validator's: it names its key
            lines.append(str(err["ctx"]["error"]))
        else:
            lines.append(f"{key}={err.get('input')!r}: {msg}")
    return "; ".join(lines)


def _models_in(annotation: Any, tag: str | None = None) -> dict[str | None, Any]:
    """The pydantic model classes inside an annotation (through lists, unions, Annotated), by their union tag."""
    from typing import get_args

    from pydantic import BaseModel, Tag

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {tag: annotation}
    tags = [m.tag for m in getattr(annotation, "__metadata__", ()) if isinstance(m, Tag)]
    found: dict[str | None, Any] = {}
    for arg in ((annotation.__origin__,) if hasattr(annotation, "__metadata__") else get_args(annotation)):
        found.update(_models_in(arg, tags[0] if tags else tag))
    return found


def model_at(root: Any, path: list[str]) -> Any:
    """The pydantic model class found by following field names from `root` (through dict values too)."""
    model, candidates = root, {}
    for part in path:
        if part in candidates:  # a tagged union's tag (activation_factory.sources.0.activations.path)
            model, candidates = candidates[part], {}
            continue
        field = model.model_fields.get(part)
        if field is None:
            continue  # a dict key (e.g. a dataset's name): stay on the dict's value model
        found = _models_in(field.annotation)
        if len(found) == 1:
            model = next(iter(found.values()))
        elif found:
            candidates = found
    return model


# --- command line -> composed config -----------------------------------------------------------------------

def compose_single_run(overrides: list[str], config_name: str = "train", sweep: bool = False) -> DictConfig:
    """Compose `config_name` as a single run would, turning Hydra's multi-line errors into one line.

    With `sweep`, compose the sweep's first job instead (each swept key at its first value) together with the
    hydra config, so that a misspelt key, preset or launcher field fails before anything is submitted."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from lm_saes.cli.launchers import OUR_LAUNCHERS, register_launchers

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
    if not register_launchers():
        asked = [o.value() for o in parsed if o.key_or_group == LAUNCHER_GROUP and o.value() in OUR_LAUNCHERS]
        if asked:
            raise ConfigError(f"{LAUNCHER_GROUP}={asked[0]}: this install of lm_saes lacks its Hydra launchers "
                              "(hydra_plugins/lm_saes_launchers); reinstall it: pip install -e . (scripts/install.sh)")
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


_OVERRIDE = re.compile(r"(\+\+|\+)?[A-Za-z_][\w/@.\[\]-]*=")
"""A Hydra override (`key=v`, `+group/name@pkg=v`): any other argument is positional, so a text such as
"x = 1" or "Hello, world." is one (`a=b` as a text has to be written `text='a=b'`)."""


def with_positional(args: list[str], keys: tuple[str, ...]) -> list[str]:
    """`A B k=v ...` -> `keys[0]='A' keys[1]='B' k=v ...`: the arguments that are neither flags nor overrides, in
    order (quoted, so that any path survives Hydra's parser)."""
    out, remaining = [], list(keys)
    for arg in args:
        if remaining and not arg.startswith(("-", "~")) and not _OVERRIDE.match(arg):
            out.append(f"{remaining.pop(0)}={_quoted(arg)}")
        else:
            out.append(arg)
    return out


def _quoted(value: str) -> str:
    """`value` as a quoted Hydra override value that composes back to exactly `value`."""
    # OmegaConf reads `${` as an interpolation unless a backslash escapes it (and backslashes before it escape).
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    # Hydra reads backslashes as escapes only before a quote, the closing one included.
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return f"'{value}'"
