"""The generate runner: GenerateSettings -> model, data -> an activation cache on disk.

`generate_activations(settings)` is what `lm-saes generate` calls. Rerunning it on an unfinished cache
continues after the last complete shard (the model never reruns on what is on disk); the manifest's
`complete: true` says it is done.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from rich.console import Console

from lm_saes.activation import ActivationFactory, ActivationFactoryConfig, ActivationFactoryDatasetSource
from lm_saes.activation.cache import CacheManifest, CacheSource, CacheWriter, resume_point
from lm_saes.config_base import BaseConfig, DType
from lm_saes.datasets import DatasetConfig, load_dataset
from lm_saes.errors import UserInputError
from lm_saes.language_model import LanguageModelConfig, TransformerLensLanguageModel
from lm_saes.progress import TokenProgress


class GenerateSettings(BaseConfig):
    output_dir: str
    """The cache directory: manifest.json and shards/ are written there."""
    model: LanguageModelConfig = LanguageModelConfig()
    datasets: dict[str, DatasetConfig] = Field(min_length=1)
    sources: list[ActivationFactoryDatasetSource] | None = None
    """The datasets to read, in order; None means every one in `datasets`, in their order."""
    hook_points: list[str] = Field(min_length=1)
    """The hook points to store (TransformerLens names); a run may train on any of them."""
    context_size: int = Field(256, ge=2)
    """Tokens per packed context fed to the model, as in ActivationFactoryConfig."""
    model_batch_size: int = Field(8, gt=0)
    """Contexts per model forward pass."""
    shard_size: int = Field(65536, gt=0)
    """Rows (tokens) per shard file: a shard closes at the first forward pass that reaches it. What one
    process holds in memory, and what a killed run loses, is at most about this much."""
    dtype: DType | None = None
    """The dtype activations are stored in (e.g. bfloat16 halves the disk); None means model.dtype."""
    total_tokens: int | None = Field(None, gt=0)
    """Stop after this many tokens (rows); None means read every source to its end."""
    overwrite: bool = False
    """Replace a complete cache (or one made with other settings) at output_dir instead of refusing."""

    @model_validator(mode="after")
    def _sources_are_datasets(self) -> "GenerateSettings":
        for i, source in enumerate(self.dataset_sources):
            if source.name not in self.datasets:
                raise UserInputError(f"sources.{i}.name", source.name, f"not a dataset; datasets: {', '.join(self.datasets)}")
        return self

    @property
    def dataset_sources(self) -> list[ActivationFactoryDatasetSource]:
        return self.sources if self.sources is not None else [ActivationFactoryDatasetSource(name=n) for n in self.datasets]


def _fingerprint(settings: GenerateSettings) -> dict[str, Any]:
    """What must not change between a partial cache and the run that continues it."""
    return settings.model_dump(mode="json", exclude={"output_dir", "overwrite"})


def generate_activations(settings: GenerateSettings) -> CacheManifest:
    """Write (or finish) the activation cache at settings.output_dir; return its manifest."""
    root = Path(settings.output_dir)
    fingerprint = _fingerprint(settings)
    manifest = resume_point(root, fingerprint, settings.overwrite, "output_dir")
    sources = settings.dataset_sources
    # Datasets before the model: a wrong path should fail before the model spends time loading.
    datasets = {s.name: load_dataset(settings.datasets[s.name], f"datasets.{s.name}.dataset_name_or_path") for s in sources}
    model = TransformerLensLanguageModel(settings.model)
    model.check_hook_points(settings.hook_points, "hook_points")
    console = Console(file=sys.stderr)
    if manifest is None:
        manifest = CacheManifest(
            model_name=settings.model.model_name, hook_points=settings.hook_points, d_model=model.d_model,
            dtype=settings.dtype or settings.model.dtype, context_size=settings.context_size,
            sources=[CacheSource(name=s.name, dataset=settings.datasets[s.name].model_dump(mode="json")) for s in sources],
            settings=fingerprint,
        )
    else:
        console.print(f"continuing {root}: {manifest.n_rows:,} tokens in {len(manifest.shards)} shards already")
    factory_cfg = ActivationFactoryConfig(
        sources=sources, hook_points=settings.hook_points, batch_size=settings.model_batch_size * settings.context_size,
        buffer_size=None, context_size=settings.context_size, model_batch_size=settings.model_batch_size,
    )
    # Start where the last complete shard ended: the stream skips those contexts without the model.
    position = torch.tensor([manifest.resume_source, manifest.resume_contexts, 0], dtype=torch.long)
    stream = ActivationFactory(factory_cfg).process(
        model=model, model_name=settings.model.model_name, datasets=datasets, state={"position": position}
    )
    writer = CacheWriter(root, manifest, settings.shard_size)
    writer.start()
    budget = settings.total_tokens
    progress = TokenProgress(budget, f"caching {', '.join(settings.hook_points)}", console=console)
    progress.advance(manifest.n_rows)
    initial = written = manifest.n_rows
    started = time.perf_counter()
    try:
        for rows in stream.rows():
            if budget is not None and written + len(rows["tokens"]) > budget:
                rows = {k: v[: budget - written] for k, v in rows.items()}
            n_shards = len(manifest.shards)
            writer.add(rows, stream.source_index, stream.contexts_done)
            written += len(rows["tokens"])
            progress.advance(len(rows["tokens"]))
            if len(manifest.shards) > n_shards:
                progress.log({"shards": len(manifest.shards), "tokens": manifest.n_rows})
            if budget is not None and written >= budget:
                break
        writer.finish()
    finally:
        progress.close()
    if budget is not None and written < budget:
        console.print(f"[yellow]warning: the corpus ended after {written:,} tokens, before total_tokens={budget:,}")
    rate = (written - initial) / max(time.perf_counter() - started, 1e-9)  # this run's own tokens
    console.print(f"[green]done[/]: {root}  {manifest.n_rows:,} tokens in {len(manifest.shards)} shards "
                  f"({rate:,.0f} tok/s)")
    return manifest
