"""Reading back an SAE folder for the verbs that inspect it: a finished training run of ours (its resolved
settings, once the directory is checked to hold one), or a folder of another tool's (a SAELens folder, an
export) whose model, corpus, context size and hooks come from its own metadata, or from overrides.

Its own module because it needs `TrainSAESettings` at run time, and runners/train.py imports held_out.py
(for the evaluation during training): held_out.py cannot import train.py back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from lm_saes.datasets import DatasetConfig
from lm_saes.errors import UserInputError
from lm_saes.interop import foreign_format, read_foreign_sae
from lm_saes.interop.saelens import SAELENS_CFG_FILE, SAELensMetadata
from lm_saes.language_model import LanguageModelConfig
from lm_saes.run_dir import RUN_CONFIG_FILE, STATUS_FILE, read_status
from lm_saes.runners.train import TrainSAESettings
from lm_saes.sae.config import CONFIG_FILE, SAEConfig
from lm_saes.sae.model import WEIGHTS_FILE

if TYPE_CHECKING:
    from lm_saes.runners.held_out import HeldOutRunSettings

DEFAULT_MODEL = LanguageModelConfig().model_name
"""The model a foreign SAE that records none is run in (the embedded one: it works offline); used only when
its d_model is the SAE's d_in (checked once loaded)."""


def load_run_settings(run_dir: Path) -> TrainSAESettings:
    """The resolved settings of a finished run, or a UserInputError naming what is wrong with `run_dir`."""
    if not run_dir.is_dir():
        raise UserInputError("run_dir", str(run_dir), "no such directory; give a training run directory")
    status = read_status(run_dir)
    if status is None:
        raise UserInputError("run_dir", str(run_dir), f"no readable {STATUS_FILE}: not a training run directory "
                             f"(nor an SAE folder: {SAELENS_CFG_FILE} or {CONFIG_FILE} with {WEIGHTS_FILE}, or sparsify's "
                             f"{SAELENS_CFG_FILE} with sae.safetensors)")
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


def is_foreign_sae_folder(folder: Path) -> bool:
    """An SAE folder that is no training run of ours: a SAELens folder (an export, a published SAE), or a bare
    `save_pretrained` folder. A run directory (status.json or config.yaml) is never one, finished or not."""
    if (folder / STATUS_FILE).exists() or (folder / RUN_CONFIG_FILE).exists():
        return False
    return foreign_format(folder) is not None or ((folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file())


@dataclass(frozen=True)
class InspectedSAE:
    """An SAE folder as evaluate and analyze see it: which model it reads, at which hooks, in contexts of which
    size, and which text it can be inspected on."""

    folder: Path
    sae: SAEConfig
    """The SAE's config (hooks, d_model), as `SparseAutoEncoder.from_pretrained` will build it."""
    model: LanguageModelConfig
    model_origin: str | None
    """Where `model.model_name` came from when the user did not type it, for the error line when it cannot be
    loaded or does not fit the SAE."""
    context_size: int | None
    """The context size it was trained with (None: a foreign SAE that does not record one)."""
    train: TrainSAESettings | None
    """A run of ours: its settings, so the held-out text is past what training read. None: a foreign SAE,
    whose training text is unknown, so text is read from the corpus start."""
    dataset: DatasetConfig | None = None
    """A foreign SAE: the corpus its metadata names (None: none recorded)."""
    metadata: SAELensMetadata = SAELensMetadata()

    @property
    def hook_overrides(self) -> dict[str, str | None]:
        """from_pretrained's keywords that give a SAELens folder the hooks resolved here."""
        return {"hook_point_in": self.sae.hook_point_in, "hook_point_out": self.sae.hook_point_out}

    def resolve_context_size(self, override: int | None, key: str) -> int:
        """`override`, else the SAE's own; a UserInputError naming `key` when neither is known."""
        size = override or self.context_size
        if size is None:
            raise UserInputError(key, None, f"{self.folder / SAELENS_CFG_FILE} records no context size "
                                 f"(metadata.context_size); give one, e.g. {key}=128")
        return size


def load_inspected_sae(settings: "HeldOutRunSettings") -> InspectedSAE:
    """`settings.run_dir` as an InspectedSAE: a finished run of ours, or a foreign SAE folder; reads files only
    (the SAE's weights included, to check that they are importable), never a model."""
    folder = Path(settings.run_dir)
    override = settings.model.model_name
    if not (folder.is_dir() and is_foreign_sae_folder(folder)):
        train = load_run_settings(folder)
        model = train.model.model_copy(update=settings.model.updates())
        origin = None if override else f"the run's model ({folder / RUN_CONFIG_FILE})"
        return InspectedSAE(folder, train.sae, model, origin, train.activation_factory.context_size, train)
    if foreign_format(folder) and not (folder / CONFIG_FILE).exists():
        sae, _, metadata = read_foreign_sae(folder, settings.hook_point_in, settings.hook_point_out)
    else:
        sae, metadata = SAEConfig.from_pretrained(folder), SAELensMetadata()
    name, origin = _foreign_model_name(override, metadata.model_name, folder)
    model = LanguageModelConfig(model_name=name).model_copy(update=settings.model.updates())
    dataset = DatasetConfig(dataset_name_or_path=metadata.dataset_path) if metadata.dataset_path else None
    return InspectedSAE(folder, sae, model, origin, metadata.context_size, None, dataset, metadata)


def _foreign_model_name(override: str | None, recorded: str | None, folder: Path) -> tuple[str, str | None]:
    """The model a foreign SAE runs in, and where its name came from (None: the user's override)."""
    if override:
        return override, None
    if recorded:
        name = hub_model_name(recorded)
        alias = f" ({recorded!r}, TransformerLens's name for it)" if name != recorded else ""
        return name, f"the model {folder / SAELENS_CFG_FILE} names{alias}"
    return DEFAULT_MODEL, "the default, as the SAE records no model"


def hub_model_name(name: str) -> str:
    """The Hugging Face id of a model name as SAELens records it: TransformerLens's aliases (`gpt2-small`,
    `pythia-70m-deduped`) become their hub ids (`gpt2`, `EleutherAI/pythia-70m-deduped`); others stay."""
    try:
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:  # an older TransformerLens keeps it elsewhere: the name as it is
        return name
    try:
        return get_official_model_name(name)
    except ValueError:
        return name
