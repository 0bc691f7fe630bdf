"""Held-out text: which tokens a run never read, as contexts to evaluate or analyse its SAE on.

On the run's own dataset, held out means the packed contexts past every token the run's activation factory
could have read (`tokens_read_by_training`: the trained tokens, the initializer's batches, the shuffle buffer
and the forward pass in flight); for a run trained from an activation cache, the cache's dataset past
everything the cache holds of it. On another dataset, text is held out from its start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lm_saes.activation import ActivationFactoryActivationsSource
from lm_saes.activation.cache import CacheManifest, read_manifest
from lm_saes.activation.packing import pack_documents
from lm_saes.config_base import BaseConfig, Device, check_device_available
from lm_saes.datasets import DatasetConfig, load_dataset
from lm_saes.errors import UserInputError
from lm_saes.evaluator import Evaluator, EvaluatorConfig
from lm_saes.language_model import TransformerLensLanguageModel
from lm_saes.run_dir import METRICS_FILE
from lm_saes.sae import SparseAutoEncoder

if TYPE_CHECKING:
    from lm_saes.runners.train import TrainSAESettings  # train imports this module: no runtime import back

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


class HeldOutRunSettings(BaseConfig):
    """What the verbs that inspect a finished run on held-out text (evaluate, analyze) are given in common."""

    run_dir: str
    """A finished training run directory (status.json says ok); the verb writes its results into it."""
    device: Device | None = None
    """Where the model and the SAE run; None means the run's model.device."""
    dataset: DatasetConfig | None = None
    """Another corpus, read from its start; None means the run's first dataset, past what training read."""


@dataclass
class HeldOutRun:
    """A finished run loaded for inspection, with the held-out contexts to inspect it on."""

    train: TrainSAESettings
    dataset_cfg: DatasetConfig
    skip_tokens: int
    context_size: int
    model: TransformerLensLanguageModel
    sae: SparseAutoEncoder
    contexts: list[torch.Tensor]


def load_held_out_run(
    settings: HeldOutRunSettings, train: TrainSAESettings, skip_tokens: int | None, context_size: int | None,
    n_contexts: int, section: str, verb: str,
) -> HeldOutRun:
    """The run's model and SAE, and `n_contexts` contexts of text it never trained on (`train` is the run's
    settings, from `load_run_settings`).

    With `settings.dataset` None: the run's first dataset, past every token training could have read (or
    `skip_tokens`). `section` ("evaluator", "analysis") and `verb` name the user's keys in the error when no
    text is left.
    """
    run_dir, dataset = Path(settings.run_dir), settings.dataset
    device = settings.device or train.model.device
    check_device_available(device, "device")
    if dataset is None:
        plan = held_out_plan(train, *_trained_tokens_and_world_size(run_dir))
        dataset_cfg, key, default_skip, run_context_size = plan.dataset, "datasets (from the run)", plan.skip_tokens, \
            plan.context_size
    else:
        dataset_cfg, key, default_skip = dataset, "dataset.dataset_name_or_path", 0
        run_context_size = train.activation_factory.context_size
    skip = default_skip if skip_tokens is None else skip_tokens
    context_size = context_size or run_context_size
    texts = load_dataset(dataset_cfg, key)
    model = TransformerLensLanguageModel(train.model.model_copy(update={"device": device}))
    model.check_context_size(context_size, f"{section}.context_size")
    sae = SparseAutoEncoder.from_pretrained(run_dir, device=device)
    contexts = held_out_contexts((row["text"] for row in texts), model, context_size, skip, n_contexts)
    if not contexts:
        raise UserInputError(
            f"{section}.skip_tokens", skip, f"{dataset_cfg.dataset_name_or_path} has no text left after skipping "
            f"{skip:,} tokens (what training read); {verb} another corpus (+dataset.dataset_name_or_path=...)",
        )
    return HeldOutRun(train, dataset_cfg, skip, context_size, model, sae, contexts)


def _trained_tokens_and_world_size(run_dir: Path) -> tuple[int | None, int]:
    """The tokens a run trained on, and over how many data-parallel ranks, from its metrics.json."""
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
        return int(metrics["n_training_tokens"]), int(metrics.get("world_size", 1))
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None, 1  # fall back on the budget: an upper bound on what the run trained on
