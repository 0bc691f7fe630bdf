"""Activation stage: turn documents (or an activation cache) into shuffled batches of hook-point activations."""

from lm_saes.activation.factory import (
    ActivationBatch,
    ActivationFactory,
    ActivationFactoryActivationsSource,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    ActivationFactoryTarget,
    ActivationStream,
    BufferShuffleConfig,
)

__all__ = [
    "ActivationBatch",
    "ActivationFactory",
    "ActivationFactoryActivationsSource",
    "ActivationFactoryConfig",
    "ActivationFactoryDatasetSource",
    "ActivationFactoryTarget",
    "ActivationStream",
    "BufferShuffleConfig",
]
