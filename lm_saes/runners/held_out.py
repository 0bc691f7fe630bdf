"""Held-out text: which tokens a run never read, as contexts to evaluate or analyse its SAE on.

On the run's own dataset, held out means the packed contexts past every token the run's activation factory
could have read (`tokens_read_by_training`: the trained tokens, the initializer's batches, the shuffle buffer
and the forward pass in flight); for a run trained from an activation cache, the cache's dataset past
everything the cache holds of it. On another dataset, text is held out from its start.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lm_saes.activation import ActivationFactoryActivationsSource
from lm_saes.activation.cache import CacheManifest, read_manifest
from lm_saes.activation.packing import pack_documents
from lm_saes.config_base import BaseConfig, Device, DType, check_device_available
from lm_saes.datasets import DatasetConfig, load_dataset
from lm_saes.errors import UserInputError
from lm_saes.evaluator import Evaluator, EvaluatorConfig
from lm_saes.language_model import TransformerLensLanguageModel
from lm_saes.run_dir import METRICS_FILE
from lm_saes.sae import SparseAutoEncoder

if TYPE_CHECKING:  # train imports this module, and run_loading imports train: no runtime import back
    from lm_saes.runners.run_loading import InspectedSAE
    from lm_saes.runners.train import TrainSAESettings

TRAINING_EVAL_CONTEXTS = 4
"""Held-out contexts for the evaluation during training: one forward batch, a few seconds on a CPU."""


def held_out_contexts(
    texts: Iterable[str], model: TransformerLensLanguageModel, context_size: int, skip_tokens: int, n_contexts: int
) -> list[torch.Tensor]:
    """Pack `texts` exactly as training does, skip whole contexts until `skip_tokens` text tokens are passed,
    and return the next `n_contexts` (fewer if the corpus ends). Tokenizes the skipped part; runs no model."""
    special = torch.tensor(model.special_token_ids)
    contexts = pack_documents(texts, model.tokenizer, context_size)
    skipped = 0
    for context_T in contexts:
        if skipped >= skip_tokens:
            return [context_T] + [c for _, c in zip(range(n_contexts - 1), contexts)]
        skipped += int((~torch.isin(context_T, special)).sum())
    return []


def tokens_read_by_training(settings: TrainSAESettings, n_training_tokens: int | None = None, world_size: int = 1) -> int:
    """An upper bound on the text tokens a run's activation factory read from the start of its corpus.

    The trainer consumed `n_training_tokens` (default: the budget) plus the initializer's batches; beyond
    those, the shuffle buffer (or the re-batcher) held at most `buffer_size` (or one batch) unconsumed
    rows, and the forward pass in flight at most one chunk of model_batch_size contexts.
    With `world_size` data-parallel ranks, each holds its own buffer and forward chunk; since the ranks take
    turns at the chunks, one rank may be a chunk ahead of the others: one more chunk each is the margin.
    """
    factory = settings.activation_factory
    trained = settings.trainer.total_training_tokens if n_training_tokens is None else n_training_tokens
    initializer = settings.initializer.n_norm_estimation_batches * factory.batch_size
    held = factory.buffer_size if factory.buffer_size is not None else factory.batch_size // world_size
    chunk = factory.model_batch_size * factory.context_size
    return trained + initializer + world_size * (held + chunk) + (world_size - 1) * chunk


@dataclass
class HeldOutPlan:
    """Where a run's held-out text is: `dataset`, past its first `skip_tokens` text tokens."""

    dataset: DatasetConfig
    skip_tokens: int
    context_size: int
    source_name: str | None
    """The run's dataset key, when the text is the run's own first dataset (not a cache's)."""


def held_out_plan(
    settings: TrainSAESettings, n_training_tokens: int | None = None, world_size: int = 1,
    caches: Mapping[int, CacheManifest] | None = None,
) -> HeldOutPlan:
    """The text a run (of `world_size` data-parallel ranks) never trained on: its first source's dataset past
    everything training could have read.
    For an activation cache, that is the dataset the cache was made from, past everything the cache holds of it
    (in the cache's context size). `caches` are the run's manifests by source index, when already read."""
    factory = settings.activation_factory
    source = factory.sources[0]
    if isinstance(source, ActivationFactoryActivationsSource):
        manifest = caches[0] if caches else read_manifest(source.path, "activation_factory.sources.0.path")
        first = manifest.sources[0]
        return HeldOutPlan(DatasetConfig.model_validate(first.dataset), first.rows, manifest.context_size, None)
    return HeldOutPlan(settings.datasets[source.name], tokens_read_by_training(settings, n_training_tokens, world_size),
                       factory.context_size, source.name)


def training_evaluation(
    settings: TrainSAESettings, model: TransformerLensLanguageModel, datasets: Mapping[str, Any], world_size: int = 1,
    caches: Mapping[int, CacheManifest] | None = None,
) -> Callable[[SparseAutoEncoder], dict[str, float | None]]:
    """The `evaluate` callable for `Trainer.fit`: downstream scores on a fixed batch of contexts that lie past
    everything the run (of `world_size` data-parallel ranks) will read from its first source (so never trained on)."""
    plan = held_out_plan(settings, world_size=world_size, caches=caches)
    if plan.source_name is not None:
        texts = (row["text"] for row in datasets[plan.source_name])
    else:
        texts = (row["text"] for row in load_dataset(plan.dataset, "the activation cache's dataset"))
    contexts = held_out_contexts(texts, model, plan.context_size, plan.skip_tokens, TRAINING_EVAL_CONTEXTS)
    if not contexts:
        raise UserInputError(
            "trainer.eval_frequency", settings.trainer.eval_frequency,
            f"needs held-out text, but the corpus ends within the {plan.skip_tokens:,} tokens training reads; use a "
            "larger corpus, a smaller trainer.total_training_tokens, or trainer.eval_frequency=0",
        )
    evaluator = Evaluator(EvaluatorConfig(n_contexts=len(contexts)))
    return lambda sae: evaluator.evaluate(sae, model, contexts).downstream()


PAST_TRAINING = "past every token training could have read"
FROM_CORPUS_START = "from the corpus start (what the SAE was trained on is unknown)"
FROM_ANOTHER_CORPUS = "from the start of another corpus than the run's"


def tokens_phrase(held_out: str | None) -> str:
    """How a printed line calls the inspected tokens: held out, unless a foreign SAE's training text is unknown."""
    return f"tokens {FROM_CORPUS_START}" if held_out == FROM_CORPUS_START else "held-out tokens"


class InspectModelConfig(BaseConfig):
    """The model an inspected SAE runs in; each None keeps the SAE's own."""

    model_name: str | None = None
    """A hub id, a local HF folder or builtin:smollm2-135m. None: the run's model; for a foreign SAE, the model
    its metadata names (TransformerLens aliases such as gpt2-small read as their hub ids), else the embedded
    builtin:smollm2-135m (used only if its d_model is the SAE's)."""
    dtype: DType | None = None
    """The model's dtype; None: the run's (a foreign SAE: float32)."""

    def updates(self) -> dict[str, Any]:
        """The LanguageModelConfig fields these settings replace."""
        return {k: v for k, v in (("model_name", self.model_name), ("dtype", self.dtype)) if v is not None}


class HeldOutRunSettings(BaseConfig):
    """What the verbs that inspect a finished run on held-out text (evaluate, analyze) are given in common."""

    run_dir: str
    """A finished training run directory (status.json says ok), or an SAE folder of another tool's (a SAELens
    folder: cfg.json + sae_weights.safetensors, e.g. an export); the verb writes its results into it."""
    device: Device | None = None
    """Where the model and the SAE run; None means the run's model.device (a foreign SAE: cpu)."""
    model: InspectModelConfig = InspectModelConfig()
    dataset: DatasetConfig | None = None
    """Another corpus, read from its start; None means the run's first dataset, past what training read (a
    foreign SAE: the corpus its metadata names, from its start; none named: the built-in corpus)."""
    hook_point_in: str | None = None
    """A SAELens folder that records no hook (metadata.hook_name): the hook its SAE reads."""
    hook_point_out: str | None = None
    """A SAELens transcoder that records no output hook (metadata.hook_name_out): the hook it writes."""


@dataclass
class HeldOutRun:
    """An SAE loaded for inspection, with the held-out contexts to inspect it on."""

    source: InspectedSAE
    dataset_cfg: DatasetConfig
    skip_tokens: int
    context_size: int
    held_out: str
    """How the text was chosen (PAST_TRAINING, FROM_CORPUS_START, FROM_ANOTHER_CORPUS): eval.json and
    analysis.json say it."""
    model: TransformerLensLanguageModel
    sae: SparseAutoEncoder
    contexts: list[torch.Tensor]

    def info(self) -> dict[str, Any]:
        """What the outputs record of where the text came from."""
        return {"run_dir": str(self.source.folder), "dataset": self.dataset_cfg.dataset_name_or_path,
                "skip_tokens": self.skip_tokens, "context_size": self.context_size, "held_out": self.held_out}


def load_held_out_run(
    settings: HeldOutRunSettings, source: InspectedSAE, skip_tokens: int | None, context_size: int | None,
    n_contexts: int, section: str, verb: str,
) -> HeldOutRun:
    """The SAE's model and the SAE, and `n_contexts` contexts of text it never trained on (`source` is the
    folder read by `load_inspected_sae`).

    With `settings.dataset` None: a run's first dataset, past every token training could have read (or
    `skip_tokens`); a foreign SAE's recorded corpus from its start. `section` ("evaluator", "analysis") and
    `verb` name the user's keys in the error when no text is left.
    """
    device = settings.device or source.model.device
    check_device_available(device, "device")
    dataset_cfg, key, default_skip, plan_context_size, held_out = _text_plan(settings, source)
    skip = default_skip if skip_tokens is None else skip_tokens
    context_size = source.resolve_context_size(context_size or plan_context_size, f"{section}.context_size")
    texts = load_dataset(dataset_cfg, key)
    model = _load_model(source, device)
    model.check_context_size(context_size, f"{section}.context_size")
    sae = SparseAutoEncoder.from_pretrained(source.folder, device=device, **source.hook_overrides)
    _check_model_fits(model, sae, source)
    if source.metadata.prepend_bos is False:
        print("warning: the SAE was trained without a BOS token; these contexts start with one (masked out of "
              "every metric)", file=sys.stderr)
    contexts = held_out_contexts((row["text"] for row in texts), model, context_size, skip, n_contexts)
    if not contexts:
        raise UserInputError(
            f"{section}.skip_tokens", skip, f"{dataset_cfg.dataset_name_or_path} has no text left after skipping "
            f"{skip:,} tokens; {verb} another corpus (+dataset.dataset_name_or_path=...)",
        )
    return HeldOutRun(source, dataset_cfg, skip, context_size, held_out, model, sae, contexts)


def _text_plan(settings: HeldOutRunSettings, source: InspectedSAE) -> tuple[DatasetConfig, str, int, int | None, str]:
    """(the corpus, the key naming it in errors, the tokens to skip by default, the context size the text
    implies (None: the SAE's), how the text is held out)."""
    if settings.dataset is not None:
        return settings.dataset, "dataset.dataset_name_or_path", 0, None, \
            FROM_ANOTHER_CORPUS if source.train is not None else FROM_CORPUS_START
    if source.train is None:  # a foreign SAE: its recorded corpus, else the built-in offline one
        return source.dataset or DatasetConfig(), "dataset.dataset_name_or_path", 0, None, FROM_CORPUS_START
    plan = held_out_plan(source.train, *_trained_tokens_and_world_size(source.folder))
    return plan.dataset, "datasets (from the run)", plan.skip_tokens, plan.context_size, PAST_TRAINING


def _load_model(source: InspectedSAE, device: Device) -> TransformerLensLanguageModel:
    """The model `source` names, on `device`; its error line says where a name the user did not type came from."""
    try:
        return TransformerLensLanguageModel(source.model.model_copy(update={"device": device}))
    except UserInputError as e:
        if source.model_origin is None:
            raise
        raise UserInputError(e.key, e.value, f"{source.model_origin}: {e.allowed}") from None


def _check_model_fits(model: TransformerLensLanguageModel, sae: SparseAutoEncoder, source: InspectedSAE) -> None:
    """The model's width is the SAE's, and it has the SAE's hooks: one line, not a shape error mid-forward."""
    if model.d_model != sae.cfg.d_model:
        origin = f"{source.model_origin}: " if source.model_origin else ""
        raise UserInputError("model.model_name", source.model.model_name, f"{origin}its d_model is {model.d_model}, "
                             f"the SAE's is {sae.cfg.d_model}; give the SAE's model (model.model_name=HUB_ID_OR_FOLDER)")
    model.check_hook_points(sorted({sae.cfg.hook_point_in, sae.cfg.hook_point_target}), "hook_point_in")


def _trained_tokens_and_world_size(run_dir: Path) -> tuple[int | None, int]:
    """The tokens a run trained on, and over how many data-parallel ranks, from its metrics.json."""
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
        return int(metrics["n_training_tokens"]), int(metrics.get("world_size", 1))
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None, 1  # fall back on the budget: an upper bound on what the run trained on
