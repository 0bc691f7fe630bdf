"""ActivationFactory: documents -> packed contexts -> forward -> masked, flattened, shuffled batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from lm_saes.activation.buffer import FifoBatcher, ShuffleBuffer
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
    name: str
    """The key of the dataset in `datasets=` (or in the settings' `datasets`); its documents are read from
    the `text` column (`load_dataset` renames `DatasetConfig.text_column` to it)."""


class BufferShuffleConfig(BaseConfig):
    perm_seed: int = 42
    generator_device: Device | None = None
    """Where the permutations are drawn; None means the CPU. Seeds give different streams per device."""


class ActivationFactoryConfig(BaseConfig):
    sources: list[ActivationFactoryDatasetSource] = Field(min_length=1)
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
            raise ValueError(f"buffer_size ({self.buffer_size}) must be at least batch_size ({self.batch_size})")
        return self


class ActivationFactory:
    def __init__(self, cfg: ActivationFactoryConfig) -> None:
        self.cfg = cfg

    def process(
        self,
        *,
        model: TransformerLensLanguageModel,
        model_name: str,
        datasets: Mapping[str, Any],
        state: dict[str, torch.Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> "ActivationStream":
        """Stream batches of activations. `model_name` labels the stream; it is not loaded.

        `state` is a stream's `state_dict()`: the stream then continues exactly where that one was.
        With `world_size` > 1 (data-parallel training) this is rank `rank`'s share of the stream: see
        `ActivationStream`.
        """
        missing = [s.name for s in self.cfg.sources if s.name not in datasets]
        if missing:
            raise KeyError(f"activation_factory.sources name datasets {missing} not given; have {sorted(datasets)}")
        return ActivationStream(self.cfg, model, datasets, state, rank=rank, world_size=world_size)


class ActivationStream:
    """An iterator of `ActivationBatch`es that can say where it is (`state_dict`) and resume from there.

    Its position is: which source, how many packed contexts of it went through the model, and the
    re-batcher's rows and random state. Resuming re-tokenizes and skips the consumed contexts (cheap) rather
    than re-running the model on them.

    Data parallelism: rank r of `world_size` runs the model only on the forward groups it owns (`owns`), and
    batches their rows into batches of batch_size / world_size, shuffled with seed perm_seed + r (buffer_size
    rows per rank). The ranks' groups are disjoint and together are every group: one global batch is the
    ranks' batches of one step together.
    """

    def __init__(self, cfg: ActivationFactoryConfig, model: TransformerLensLanguageModel,
                 datasets: Mapping[str, Any], state: dict[str, torch.Tensor] | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        if cfg.batch_size % world_size:
            raise UserInputError("activation_factory.batch_size", cfg.batch_size,
                                 f"must be divisible by the number of data-parallel processes ({world_size})")
        self.cfg, self.model, self.datasets = cfg, model, datasets
        self.rank, self.world_size = rank, world_size
        self.source_index = 0
        self.contexts_done = 0
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

    def owns(self, group_index: int) -> bool:
        """Whether this rank runs forward group `group_index` (counted from a source's start); the groups of
        the other ranks are tokenized and skipped, which is cheap next to running the model."""
        return group_index % self.world_size == self.rank

    def _generate(self) -> Iterator[ActivationBatch]:
        hook_points = list(dict.fromkeys(self.cfg.hook_points))
        while not self.draining and self.source_index < len(self.cfg.sources):
            source = self.cfg.sources[self.source_index]
            texts = (row["text"] for row in self.datasets[source.name])
            contexts = pack_documents(texts, self.model.tokenizer, self.cfg.context_size)
            for _ in zip(range(self.contexts_done), contexts):  # resume: skip what the model already saw
                pass
            while True:
                group = [c for _, c in zip(range(self.cfg.model_batch_size), contexts)]
                if not group:
                    break
                if not self.owns(self.contexts_done // self.cfg.model_batch_size):
                    self.contexts_done += len(group)
                    continue
                out = self.model.run_hooks(torch.stack(group), hook_points)
                rows = {name: acts[out.mask_BT] for name, acts in out.activations.items()}
                rows["tokens"] = out.tokens_BT[out.mask_BT]
                self.contexts_done += len(group)  # counted before the rows are handed out: they are in the batcher
                yield from self.batcher.push(rows)
            self.source_index, self.contexts_done = self.source_index + 1, 0
        self.draining = True
        yield from self.batcher.flush()
