"""ActivationFactory: documents -> packed contexts -> forward -> masked, flattened, shuffled batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from lm_saes.activation.buffer import ShuffleBuffer
from lm_saes.activation.packing import pack_documents
from lm_saes.config_base import BaseConfig, Device
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
        self, *, model: TransformerLensLanguageModel, model_name: str, datasets: Mapping[str, Any]
    ) -> Iterator[ActivationBatch]:
        """Stream batches of activations. `model_name` labels the stream (logs, caches); it is not loaded."""
        missing = [s.name for s in self.cfg.sources if s.name not in datasets]
        if missing:
            raise KeyError(f"activation_factory.sources name datasets {missing} not given; have {sorted(datasets)}")
        return self._batches(model, datasets)

    def _rows(self, model: TransformerLensLanguageModel, datasets: Mapping[str, Any]) -> Iterator[ActivationBatch]:
        """Unshuffled rows, one chunk per forward pass, in corpus order."""
        hook_points = list(dict.fromkeys(self.cfg.hook_points))
        for source in self.cfg.sources:
            texts = (row["text"] for row in datasets[source.name])
            contexts = pack_documents(texts, model.tokenizer, self.cfg.context_size)
            while True:
                group = [c for _, c in zip(range(self.cfg.model_batch_size), contexts)]
                if not group:
                    break
                out = model.run_hooks(torch.stack(group), hook_points)
                mask = out.mask_BT
                rows = {name: acts[mask] for name, acts in out.activations.items()}
                rows["tokens"] = out.tokens_BT[mask]
                yield rows

    def _batches(self, model: TransformerLensLanguageModel, datasets: Mapping[str, Any]) -> Iterator[ActivationBatch]:
        rows = self._rows(model, datasets)
        if self.cfg.buffer_size is None:
            yield from _rebatch(rows, self.cfg.batch_size)
            return
        shuffle = self.cfg.buffer_shuffle
        generator = torch.Generator(device=shuffle.generator_device or "cpu").manual_seed(shuffle.perm_seed)
        buffer = ShuffleBuffer(self.cfg.buffer_size, self.cfg.batch_size, generator)
        for chunk in rows:
            yield from buffer.push(chunk)
        yield from buffer.flush()


def _rebatch(chunks: Iterator[ActivationBatch], batch_size: int) -> Iterator[ActivationBatch]:
    """Cut a stream of variable-size chunks into batches of batch_size (the last may be smaller)."""
    pending: list[ActivationBatch] = []
    n_pending = 0
    for chunk in chunks:
        pending.append(chunk)
        n_pending += len(chunk["tokens"])
        while n_pending >= batch_size:
            merged = {k: torch.cat([c[k] for c in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            pending, n_pending = [rest], n_pending - batch_size
    if n_pending:
        yield {k: torch.cat([c[k] for c in pending]) for k in pending[0]}
