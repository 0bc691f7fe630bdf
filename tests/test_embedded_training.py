"""Short runs on the embedded SmolLM2 and the built-in corpus, set up as the walkthrough sets them up: the default
L1 gives a sparse SAE at the walkthrough's learning rate, and no Matryoshka prefix collapses into dense latents.
Both fail today (marked xfail, strict, with what was measured) and stay visible until fixed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lm_saes import (
    ActivationFactory,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    DatasetConfig,
    Initializer,
    InitializerConfig,
    LanguageModelConfig,
    SAEConfig,
    Trainer,
    TrainerConfig,
    TransformerLensLanguageModel,
    load_dataset,
)
from lm_saes.metrics import explained_variance

HOOK = "blocks.6.hook_resid_post"
DENSE = 0.1
"""A latent is dense when it fires on more than this fraction of tokens."""


@pytest.fixture(scope="module")
def embedded_batches() -> list[dict[str, torch.Tensor]]:
    """~100K tokens of the walkthrough's stream (batches of 1024, shuffled through 8 batches), in memory."""
    model = TransformerLensLanguageModel(LanguageModelConfig(model_name="builtin:smollm2-135m"))
    cfg = ActivationFactoryConfig(sources=[ActivationFactoryDatasetSource(name="docs")], hook_points=[HOOK],
                                  batch_size=1024, buffer_size=8192)
    stream = ActivationFactory(cfg).process(model=model, model_name="smollm2",
                                            datasets={"docs": load_dataset(DatasetConfig())})
    return [b for _, b in zip(range(100), stream)]


def train(batches: list, sae_cfg: SAEConfig, tmp_path, **trainer) -> tuple:
    stream = iter(batches)
    sae = Initializer(InitializerConfig()).initialize_sae_from_config(sae_cfg, stream)
    n = 1024 * (len(batches) - 10)  # the last 8 batches are held out, 2 go to the initializer
    final = Trainer(TrainerConfig(total_training_tokens=n, exp_result_path=str(tmp_path), **trainer)).fit(sae, stream)
    held_out_ND = torch.cat([b[HOOK] for b in batches[-8:]])
    return sae, final, held_out_ND


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured from a cache of the same stream, 90K tokens at lr=1e-4: L0 1,238 of "
                   "4,608 at the default L1 of 3, 1,143 at 10, 1,128 at 30: Adam moves each weight ~lr per step "
                   "whatever the penalty's weight, so at this rate no L1 makes a short run sparse")
def test_the_default_l1_gives_a_sparse_sae_at_the_walkthroughs_learning_rate(embedded_batches, tmp_path) -> None:
    sae_cfg = SAEConfig(hook_point_in=HOOK, d_model=576, expansion_factor=8, act_fn="relu")
    sae, _, held_out_ND = train(embedded_batches, sae_cfg, tmp_path, lr=1e-4)
    with torch.no_grad():
        latents_NS = sae.encode(held_out_ND)
        ev = explained_variance(held_out_ND, sae.decode(latents_NS))
    l0 = (latents_NS > 0).float().sum(dim=-1).mean().item()
    assert l0 < 0.1 * sae_cfg.d_sae and ev > 0.5, (l0, ev)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured: after 90K tokens the 1/16 prefix (288 latents) has 21% of its "
                   "latents firing on >10% of held-out tokens (EV 0.77 on its own): no collapse to EV 0, but denser "
                   "than the bound; the single global selection rewards the first latents in every prefix's term")
def test_no_matryoshka_prefix_collapses_into_dense_latents(embedded_batches, tmp_path) -> None:
    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/sae/matryoshka_batchtopk_8x.yaml").read_text())
    sae_cfg = SAEConfig(**{**preset["sae"], "d_model": 576, "device": "cpu"})
    sae, _, held_out_ND = train(embedded_batches, sae_cfg, tmp_path, **preset.get("trainer", {}))
    with torch.no_grad(), sae.inference():
        latents_NS = sae.encode(held_out_ND)
        for m in sae.activation_function.prefix_sizes():
            prefix_NM = latents_NS[:, :m]
            dense = ((prefix_NM > 0).float().mean(dim=0) > DENSE).float().mean().item()
            ev = explained_variance(held_out_ND, sae.decode(torch.nn.functional.pad(prefix_NM, (0, sae.cfg.d_sae - m))))
            assert dense < 0.02 and ev > 0, (m, dense, ev)
