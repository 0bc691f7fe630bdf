"""Each activation function recovers planted sparse features in superposition.

64 unit directions in 32 dimensions (twice as many features as dimensions), each active with probability
3/64 and a magnitude in [0.5, 1.5]. An SAE with 128 latents trains on them; for every planted direction we
take the best cosine similarity with a learned decoder row. Random unit vectors in 32 dimensions give a best
cosine of about 0.5 against 128 rows, so a mean above 0.9 means the directions were found, not stumbled on.
"""

from __future__ import annotations

import pytest
import torch

from lm_saes import Initializer, InitializerConfig, SAEConfig, Trainer, TrainerConfig

D_MODEL, N_FEATURES, P_ACTIVE, BATCH, STEPS = 32, 64, 3 / 64, 512, 300


def planted_directions(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(N_FEATURES, D_MODEL, generator=g), dim=1)


def planted_stream(directions: torch.Tensor, n_batches: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        active = torch.rand(BATCH, N_FEATURES, generator=g) < P_ACTIVE
        magnitude = 0.5 + torch.rand(BATCH, N_FEATURES, generator=g)
        yield {"x": (active * magnitude) @ directions, "tokens": torch.zeros(BATCH, dtype=torch.long)}


def mean_max_cosine(planted_FD: torch.Tensor, decoder_SD: torch.Tensor) -> float:
    learned = torch.nn.functional.normalize(decoder_SD, dim=1)
    return (planted_FD @ learned.T).max(dim=1).values.mean().item()


SETUPS = {  # act_fn -> (SAEConfig extras, trainer.l1_coefficient), fixed seeds, 300 steps of 512
    "relu": ({}, 1.5),
    "topk": ({"top_k": 3}, 0.0),
    "batchtopk": ({"top_k": 3}, 0.0),
    # Thresholds start near the planted magnitudes and learn 10x faster than the weights: with Adam, a log
    # threshold moves at most ~lr per step, too slow to travel far in a CI-sized run otherwise.
    "jumprelu": ({"jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 0.1, "jumprelu_lr_factor": 10.0}, 0.5),
}


def test_random_directions_are_far_from_the_threshold() -> None:
    random_rows = torch.randn(4 * D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(5))
    assert mean_max_cosine(planted_directions(), random_rows) < 0.65


@pytest.mark.parametrize("act_fn", sorted(SETUPS))
def test_planted_features_are_recovered(act_fn: str, tmp_path) -> None:
    torch.manual_seed(0)
    extra, sparsity = SETUPS[act_fn]
    directions = planted_directions()
    cfg = SAEConfig(hook_point_in="x", d_model=D_MODEL, expansion_factor=4, act_fn=act_fn, **extra)
    stream = planted_stream(directions, STEPS + 2)
    sae = Initializer(InitializerConfig()).initialize_sae_from_config(cfg, stream)
    trainer = Trainer(TrainerConfig(lr=3e-3, l1_coefficient=sparsity, total_training_tokens=BATCH * STEPS,
                                    log_frequency=STEPS, exp_result_path=str(tmp_path)))
    final = trainer.fit(sae, stream)
    score = mean_max_cosine(directions, sae.W_D.detach())
    assert score > 0.9, (score, final)
