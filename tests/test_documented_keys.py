"""What the README and `--help` document works as written: every `lm-saes` command they show composes and
validates, and every config key they name (`sae.top_k_initial`, `trainer.resume=true`, ...) is accepted by the
command line exactly as written, without Hydra's `+`.

Commands and keys are read from the documents themselves, so a new example or key is tested without a new test.
Nothing here runs a model: each command is composed and validated as `lm-saes` does before it starts.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources
from pathlib import Path

import pytest
import yaml

from lm_saes.cli import help_text
from lm_saes.cli.compose import compose_single_run, model_at, with_positional
from lm_saes.cli.keys import settable_overrides
from lm_saes.cli.verbs import VERBS, load, settings_from_config

README = Path(__file__).parents[1] / "README.md"
TRAIN_SECTIONS = ("sae", "trainer", "activation_factory", "model", "dataset", "initializer", "wandb")
SECTION_VERB = {**{s: "train" for s in TRAIN_SECTIONS}, "evaluator": "evaluate", "analysis": "analyze", "hydra": "train"}
PLACEHOLDER_VALUES = {"N": "2", "DIR": "/tmp/lm-saes-docs", "PATH": "/tmp/lm-saes-docs", "NAME": "x"}


def _command_lines(text: str) -> list[str]:
    """Every `lm-saes VERB ...` invocation in `text` (also after `&&`, torchrun or srun), comments dropped."""
    found = []
    for line in text.splitlines():
        for part in line.split("&&"):
            part = part.split(" # ")[0].split("  #")[0].strip()
            if "lm-saes " in part and not part.startswith(("$", "lm-saes train: ", "lm-saes generate: ")):
                command = part[part.index("lm-saes "):]
                if command.split()[1] in VERBS:
                    found.append(command)
    return found


def _documented_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    texts = [*blocks, help_text()]
    conf = resources.files("lm_saes.conf")
    for verb in VERBS.values():
        help_cfg = yaml.safe_load(conf.joinpath(f"{verb.config}.yaml").read_text()).get("hydra", {}).get("help", {})
        texts.append(help_cfg.get("footer", ""))
    usage = ("...", "VERB", " [")  # usage lines, not commands
    return sorted({c for text in texts for c in _command_lines(text) if not any(u in c for u in usage)})


COMMANDS = _documented_commands()


def test_the_documents_show_commands_of_every_verb() -> None:
    shown = {c.split()[1] for c in COMMANDS}
    assert set(VERBS) <= shown, set(VERBS) - shown
    assert len(COMMANDS) >= 25


def _compose_and_validate(verb: str, args: list[str]) -> None:
    spec = VERBS[verb]
    overrides = with_positional(args, spec.positional)
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    overrides = [a for a in settable_overrides(overrides, spec.config, load(spec.settings)) if not a.startswith("-")]
    composed = compose_single_run(overrides, spec.config, sweep=multirun)
    if not multirun:
        settings_from_config(composed, "/tmp/lm-saes-docs", verb)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_documented_command_composes_and_validates(command: str) -> None:
    verb, *args = shlex.split(command)[1:]
    if any(a.startswith("--") for a in args):  # `lm-saes train --help`: Hydra's own flag, checked elsewhere
        return
    _compose_and_validate(verb, args)


def _documented_keys() -> list[str]:
    """Backticked `section.key` and `section.key=value` mentions in the README and the help texts."""
    text = README.read_text() + help_text()
    found = re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+(?:=[^`\s]*)?)`", text)
    files = ("json", "yaml", "csv", "png", "html", "safetensors")
    return sorted({k for k in found if k.split(".")[0] in SECTION_VERB and k.split("=")[0].split(".")[-1] not in files})


KEYS = _documented_keys()


def _value_for(key: str, verb: str) -> str | None:
    """A valid value for a key mentioned without one: its default in the settings (None: it has no default)."""
    section, *path, leaf = key.split(".")
    root = load(VERBS[verb].settings)
    parts = ["datasets", "", *path] if section == "dataset" else [section, *path]
    field = model_at(root, parts).model_fields[leaf]  # a KeyError names a key the settings do not have
    if field.is_required():
        return None
    default = field.default
    return "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


def _preset_for(key: str) -> str:
    if "jumprelu" in key:
        return "+sae=jumprelu_8x"
    return "+sae=topk_8x" if "top_k" in key or "aux_k" in key or "topk" in key else "+sae=relu_8x"


@pytest.mark.parametrize("key", KEYS)
def test_every_documented_key_is_accepted_as_written(key: str) -> None:
    assert len(KEYS) >= 20
    verb = SECTION_VERB[key.split(".")[0]]
    name, _, value = key.partition("=")
    if key.startswith("hydra.launcher."):
        value = value or "2"
        _compose_and_validate("train", ["-m", "hydra/launcher=slurm", "+sae=relu_8x", f"{name}={value}"])
        return
    value = value.split("|")[0] if value else _value_for(name, verb)
    if value is None:  # a required field (activation_factory.sources): the presets set it; it exists
        return
    value = PLACEHOLDER_VALUES.get(value, value)
    args = [_preset_for(name)] if verb == "train" else ["/tmp/lm-saes-docs"]
    _compose_and_validate(verb, [*args, f"{name}={value}"])
