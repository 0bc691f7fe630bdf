"""Each SAE preset recovers planted sparse features in superposition, at its own settings.

64 unit directions in 32 dimensions (twice as many features as dimensions), each active with probability
3/64 and a magnitude in [0.5, 1.5]. Every preset in conf/sae/ trains on them with the trainer's defaults and
the preset's own sae and trainer values; the test changes only what the data dictates, the same for every
preset: d_model, the budget, and k = the planted L0 (3) for the variants that select k latents. For every
planted direction we take the best cosine similarity with a learned decoder row. Random unit vectors in 32
dimensions give a best cosine of about 0.5 against the rows, so a mean above 0.9 means the directions were
found, not stumbled on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml


from lm_saes import Initializer, InitializerConfig, SAEConfig, Trainer, TrainerConfig

D_MODEL, N_FEATURES, P_ACTIVE, BATCH, STEPS = 32, 64, 3 / 64, 512, 300
PRESETS_DIR = Path(__file__).resolve().parents[1] / "conf" / "sae"
NOT_YET: dict[str, str] = {}  # preset -> why it does not recover yet (mean max cosine), kept visible until fixed
SAE_PRESETS = [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[name])) if name in NOT_YET else name
    for name in sorted(p.stem for p in PRESETS_DIR.glob("*.yaml") if not p.stem.startswith("transcoder"))
]
DATA_DICTATES = {"hook_point_in": "x", "hook_point_out": None, "d_model": D_MODEL, "device": "cpu", "top_k": 3}


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


def preset(name: str) -> tuple[SAEConfig, dict]:
    """The preset's SAEConfig (with what the data dictates) and its trainer overrides."""
    data = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())
    return SAEConfig(**{**data["sae"], **DATA_DICTATES}), data.get("trainer", {})


def test_random_directions_are_far_from_the_threshold() -> None:
    random_rows = torch.randn(8 * D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(5))
    assert mean_max_cosine(planted_directions(), random_rows) < 0.65


@pytest.mark.slow
@pytest.mark.parametrize("name", SAE_PRESETS)
def test_planted_features_are_recovered_at_the_preset(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    cfg, trainer_overrides = preset(name)
    directions = planted_directions()
    stream = planted_stream(directions, STEPS + 2)
    sae = Initializer(InitializerConfig()).initialize_sae_from_config(cfg, stream)
    trainer = Trainer(TrainerConfig(**{**trainer_overrides, "total_training_tokens": BATCH * STEPS,
                                       "exp_result_path": str(tmp_path)}))
    final = trainer.fit(sae, stream)
    score = mean_max_cosine(directions, sae.W_D.detach())
    assert score > 0.9, (score, final)
    assert final["l0"] < 2 * 3 * N_FEATURES * P_ACTIVE, final  # sparse: within twice the planted L0 of 3
