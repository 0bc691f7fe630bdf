"""Activation functions, one registry keyed by the name `SAEConfig.act_fn` uses."""

from __future__ import annotations

from collections.abc import Callable

import torch

ActivationFunction = Callable[[torch.Tensor], torch.Tensor]
"""(batch, d_sae) pre-activations -> (batch, d_sae) latent activations."""

ACTIVATION_FUNCTIONS: dict[str, ActivationFunction] = {
    "relu": torch.relu,
}


def get_activation_function(name: str) -> ActivationFunction:
    return ACTIVATION_FUNCTIONS[name]
