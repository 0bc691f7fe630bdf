"""Activation stage: turn documents into shuffled batches of hook-point activations."""

from lm_saes.activation.factory import (
    ActivationBatch,
    ActivationFactory,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    ActivationFactoryTarget,
    ActivationStream,
    BufferShuffleConfig,
)

__all__ = [
    "ActivationBatch",
    "ActivationFactory",
    "ActivationFactoryConfig",
    "ActivationFactoryDatasetSource",
    "ActivationFactoryTarget",
    "ActivationStream",
    "BufferShuffleConfig",
]
