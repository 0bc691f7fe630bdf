"""ActivationFactory: documents -> packed contexts -> forward -> masked, flattened, shuffled batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from lm_saes.activation.buffer import FifoBatcher, Rows, ShuffleBuffer
from lm_saes.activation.cache import CacheManifest, iter_cache_chunks, read_manifest
from lm_saes.activation.packing import pack_documents
from lm_saes.config_base import BaseConfig, Device
from lm_saes.errors import UserInputError
from lm_saes.language_model import TransformerLensLanguageModel

ActivationBatch = dict[str, torch.Tensor]
"""{hook_point: (batch, d_model) activations, "tokens": (batch,) token ids}."""


class ActivationFactoryTarget(str, Enum):
    ACTIVATIONS_1D = "activations-1d"
    """Every kept position is a row: no sequence dimension, shuffled across contexts and positions."""


class ActivationFactoryDatasetSource(BaseConfig):
    """Documents, run through the model as the stream goes."""

    type: Literal["dataset"] = Field("dataset", exclude=True)
    """The source's kind; may be left out (a source without `type` is a dataset). Not saved."""
    name: str
    """The key of the dataset in `datasets=` (or in the settings' `datasets`); its documents are read from
    the `text` column (`load_dataset` renames `DatasetConfig.text_column` to it)."""


class ActivationFactoryActivationsSource(BaseConfig):
    """An activation cache written by `lm-saes generate` (`generate_activations`): no model runs."""

    type: Literal["activations"] = "activations"
    """Marks the source as a cache (`{type: activations, path: DIR}`)."""
    path: str
    """The cache directory (holding manifest.json and shards/)."""


def _source_kind(value: Any) -> str:
    if isinstance(value, BaseConfig):
        return "activations" if isinstance(value, ActivationFactoryActivationsSource) else "dataset"
    return value.get("type", "dataset") if isinstance(value, dict) else "dataset"


ActivationFactorySource = Annotated[
    Annotated[ActivationFactoryDatasetSource, Tag("dataset")]
    | Annotated[ActivationFactoryActivationsSource, Tag("activations")],
    Discriminator(_source_kind),
]
"""A dataset (`{name: ...}`) or an activation cache (`{type: activations, path: ...}`), told apart by `type`."""


class BufferShuffleConfig(BaseConfig):
    perm_seed: int = 42
    generator_device: Device | None = None
    """Where the permutations are drawn; None means the CPU. Seeds give different streams per device."""


class ActivationFactoryConfig(BaseConfig):
    sources: list[ActivationFactorySource] = Field(min_length=1)
    """Read in order, into one stream: datasets (`{name: ...}`) and activation caches (`{type: activations,
    path: DIR}`)."""
    target: ActivationFactoryTarget = ActivationFactoryTarget.ACTIVATIONS_1D
    hook_points: list[str] = Field(min_length=1)
    batch_size: int = Field(4096, gt=0)
    """Activation rows per training batch."""
    buffer_size: int | None = None
    """Rows held for shuffling (a few batches' worth mixes well); None means no shuffling."""
    buffer_shuffle: BufferShuffleConfig = BufferShuffleConfig()
    context_size: int = Field(256, ge=2)
    """Tokens per packed context fed to the model."""
    model_batch_size: int = Field(8, gt=0)
    """Contexts per model forward pass."""

    @field_validator("target", mode="before")
    @classmethod
    def _target_by_name(cls, value: Any) -> Any:
        # Accept the enum member's name too (ACTIVATIONS_1D), as YAML files naturally write it.
        if isinstance(value, str) and value in ActivationFactoryTarget.__members__:
            return ActivationFactoryTarget[value]
        return value

    @model_validator(mode="after")
    def _buffer_holds_a_batch(self) -> "ActivationFactoryConfig":
        if self.buffer_size is not None and self.buffer_size < self.batch_size:
            raise UserInputError("activation_factory.buffer_size", self.buffer_size,
                                 f"must be at least activation_factory.batch_size ({self.batch_size})")
        return self


class ActivationFactory:
    def __init__(self, cfg: ActivationFactoryConfig) -> None:
        self.cfg = cfg

    def process(
        self,
        *,
        model: TransformerLensLanguageModel | None,
        model_name: str,
        datasets: Mapping[str, Any] | None = None,
        state: dict[str, torch.Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
        caches: Mapping[int, CacheManifest] | None = None,
    ) -> "ActivationStream":
        """Stream batches of activations. `model_name` labels the stream; it is not loaded.

        `model` may be None when every source is an activation cache. `state` is a stream's `state_dict()`:
        the stream then continues exactly where that one was. With `world_size` > 1 (data-parallel training)
        this is rank `rank`'s share of the stream: see `ActivationStream`. `caches` are the activation-cache
        sources' manifests from `caches()`, when the caller has read them already.
        """
        datasets = datasets or {}
        names = [s.name for s in self.cfg.sources if isinstance(s, ActivationFactoryDatasetSource)]
        missing = [name for name in names if name not in datasets]
        if missing:
            raise KeyError(f"activation_factory.sources name datasets {missing} not given; have {sorted(datasets)}")
        if names and model is None:
            raise ValueError(f"activation_factory.sources read datasets {names}: they need a model")
        caches = self.caches() if caches is None else caches
        return ActivationStream(self.cfg, model, datasets, state, caches, rank=rank, world_size=world_size)

    def caches(self) -> dict[int, CacheManifest]:
        """The manifest of each activation-cache source, by source index, once each is checked: it exists,
        is complete, and holds every hook point asked for. Raises a one-line UserInputError otherwise."""
        caches = {}
        hook_keys = dict.fromkeys(self.cfg.hook_points, "activation_factory.hook_points")
        for i, source in enumerate(self.cfg.sources):
            if isinstance(source, ActivationFactoryActivationsSource):
                caches[i] = read_manifest(source.path, f"activation_factory.sources.{i}.path")
                check_cache_hook_points(caches[i], source.path, hook_keys)
        return caches


def check_cache_hook_points(manifest: CacheManifest, path: str, hook_keys: Mapping[str, str]) -> None:
    """That the cache at `path` holds every hook point of `hook_keys`, which maps each, in the order to check
    them, to the key a one-line UserInputError names it by."""
    for hook, key in hook_keys.items():
        if hook not in manifest.hook_points:
            raise UserInputError(key, hook, f"not in the activation cache {path}, which holds: "
                                 f"{', '.join(manifest.hook_points)}")


class ActivationStream:
    """An iterator of `ActivationBatch`es that can say where it is (`state_dict`) and resume from there.

    Its position is: which source, how far into it (packed contexts that went through the model, or rows read
    from an activation cache), and the re-batcher's rows and random state. Resuming a dataset re-tokenizes and
    skips the consumed contexts (cheap) rather than re-running the model on them; resuming a cache seeks to
    the row (shard and offset) directly.

    Data parallelism: rank r of `world_size` reads only the chunks it owns (`owns`): forward groups of a
    dataset, slices of a cache. It batches their rows into batches of batch_size / world_size, shuffled with
    seed perm_seed + r (buffer_size rows per rank). The ranks' chunks are disjoint and together are every
    chunk: one global batch is the ranks' batches of one step together.
    """

    def __init__(self, cfg: ActivationFactoryConfig, model: TransformerLensLanguageModel | None,
                 datasets: Mapping[str, Any], state: dict[str, torch.Tensor] | None = None,
                 caches: Mapping[int, CacheManifest] | None = None, rank: int = 0, world_size: int = 1) -> None:
        if cfg.batch_size % world_size:
            raise UserInputError("activation_factory.batch_size", cfg.batch_size,
                                 f"must be divisible by the number of data-parallel processes ({world_size})")
        self.cfg, self.model, self.datasets, self.caches = cfg, model, datasets, caches or {}
        self.rank, self.world_size = rank, world_size
        self.source_index = 0
        self.contexts_done = 0
        """Progress in the current source: packed contexts for a dataset, rows for an activation cache."""
        self.draining = False
        batch_size = cfg.batch_size // world_size
        if cfg.buffer_size is None:
            self.batcher: ShuffleBuffer | FifoBatcher = FifoBatcher(batch_size)
        else:
            shuffle = cfg.buffer_shuffle
            generator = torch.Generator(device=shuffle.generator_device or "cpu").manual_seed(shuffle.perm_seed + rank)
            self.batcher = ShuffleBuffer(cfg.buffer_size, batch_size, generator)
        if state is not None:
            self.load_state_dict(state)
        self._batches = self._generate()

    def __iter__(self) -> "ActivationStream":
        return self

    def __next__(self) -> ActivationBatch:
        return next(self._batches)

    def state_dict(self) -> dict[str, torch.Tensor]:
        position = torch.tensor([self.source_index, self.contexts_done, int(self.draining)], dtype=torch.long)
        return {"position": position, **{f"batcher.{k}": v for k, v in self.batcher.state_dict().items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.source_index, self.contexts_done, draining = (int(v) for v in state["position"].tolist())
        self.draining = bool(draining)
        self.batcher.load_state_dict({k.removeprefix("batcher."): v for k, v in state.items() if k.startswith("batcher.")})

    def owns(self, chunk_index: int) -> bool:
        """Whether this rank reads chunk `chunk_index` of the current source: a dataset's forward group (the
        others are tokenized and skipped, cheap next to running the model) or a cache's batch-sized slice (the
        others are not read)."""
        return chunk_index % self.world_size == self.rank

    def rows(self) -> Iterator[Rows]:
        """The masked, flattened rows in order, before re-batching: one forward pass (or one slice of a cache)
        at a time. The position counts each chunk before it is yielded."""
        while self.source_index < len(self.cfg.sources):
            source = self.cfg.sources[self.source_index]
            if isinstance(source, ActivationFactoryActivationsSource):
                yield from self._cache_rows(Path(source.path), self.caches[self.source_index])
            else:
                yield from self._model_rows(source)
            self.source_index, self.contexts_done = self.source_index + 1, 0

    def _model_rows(self, source: ActivationFactoryDatasetSource) -> Iterator[Rows]:
        assert self.model is not None
        hook_points = list(dict.fromkeys(self.cfg.hook_points))
        texts = (row["text"] for row in self.datasets[source.name])
        contexts = pack_documents(texts, self.model.tokenizer, self.cfg.context_size)
        for _ in zip(range(self.contexts_done), contexts):  # resume: skip what the model already saw
            pass
        while True:
            group = [c for _, c in zip(range(self.cfg.model_batch_size), contexts)]
            if not group:
                return
            if not self.owns(self.contexts_done // self.cfg.model_batch_size):
                self.contexts_done += len(group)
                continue
            out = self.model.run_hooks(torch.stack(group), hook_points)
            rows = {name: acts[out.mask_BT] for name, acts in out.activations.items()}
            rows["tokens"] = out.tokens_BT[out.mask_BT]
            self.contexts_done += len(group)  # counted before the rows are handed out: they are in the batcher
            yield rows

    def _cache_rows(self, root: Path, manifest: CacheManifest) -> Iterator[Rows]:
        # Slices of one batch: the re-batcher's pending rows (saved in checkpoints) stay at most that big.
        # Data-parallel: a slice belongs to rank (its first row // batch_size) mod world_size.
        columns, size = [*dict.fromkeys(self.cfg.hook_points), "tokens"], self.cfg.batch_size
        chunks = iter_cache_chunks(root, manifest, columns, start_row=self.contexts_done, chunk_rows=size,
                                   read=lambda first_row: self.owns(first_row // size))
        for first_row, rows in chunks:
            self.contexts_done = first_row + len(rows["tokens"])  # the slices it did not read are behind it too
            yield rows

    def _generate(self) -> Iterator[ActivationBatch]:
        if not self.draining:
            for rows in self.rows():
                yield from self.batcher.push(rows)
        self.draining = True
        yield from self.batcher.flush()
