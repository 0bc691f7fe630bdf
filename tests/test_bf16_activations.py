"""`model.dtype=bfloat16`: the model runs in bf16, its activations reach an fp32 SAE in the SAE's dtype (on the
fly and through a cache), they are close to the fp32 model's, and an SAE trained on them explains as much."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

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
from lm_saes.activation.cache import read_manifest
from lm_saes.metrics import explained_variance
from tests.conftest import HOOK as TINY_HOOK
from tests.conftest import run_cli, tiny_overrides

HOOK = "blocks.6.hook_resid_post"
BATCH, N_BATCHES, HELD_OUT, EPOCHS = 512, 16, 4, 3
"""Embedded-model stream: 16 batches of 512 rows; the last 4 are held out, the SAE sees the others 3 times (2
of them go to the initializer first): enough steps to learn, on few forward passes."""
REL_ERROR_MAX = 0.03
"""Measured on SmolLM2 blocks.6: ~1% (bf16 keeps 8 bits of mantissa; the error grows over the 7 blocks)."""
EV_TOLERANCE = 0.01
"""|EV(bf16-trained) - EV(fp32-trained)|, both scored on the fp32 model's held-out activations. Measured: 0.0002
(one pass over 24 batches, EV 0.268 both)."""


@pytest.fixture(scope="module")
def streams() -> dict[torch.dtype, list[dict[str, torch.Tensor]]]:
    """The same shuffled stream of the built-in corpus through the embedded SmolLM2 in fp32 and in bf16."""
    docs = load_dataset(DatasetConfig())
    cfg = ActivationFactoryConfig(sources=[ActivationFactoryDatasetSource(name="docs")], hook_points=[HOOK],
                                  batch_size=BATCH, buffer_size=4 * BATCH, context_size=128, model_batch_size=8)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = TransformerLensLanguageModel(LanguageModelConfig(dtype=dtype))
        stream = ActivationFactory(cfg).process(model=model, model_name="smollm2", datasets={"docs": docs})
        out[dtype] = [b for _, b in zip(range(N_BATCHES), stream)]
        del model
    return out


@pytest.mark.slow
def test_bf16_activations_are_close_to_fp32s(streams) -> None:
    fp32, bf16 = streams[torch.float32], streams[torch.bfloat16]
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(fp32, bf16))  # the same rows, same order
    assert bf16[0][HOOK].dtype == torch.bfloat16  # held (and shuffled) at half the memory
    ref_ND = torch.cat([b[HOOK] for b in fp32])
    got_ND = torch.cat([b[HOOK] for b in bf16]).float()
    rel_N = (got_ND - ref_ND).norm(dim=-1) / ref_ND.norm(dim=-1)
    assert rel_N.median() < REL_ERROR_MAX and (got_ND - ref_ND).norm() / ref_ND.norm() < REL_ERROR_MAX, rel_N.median()


def train(batches: list[dict[str, torch.Tensor]], tmp_path) -> torch.nn.Module:
    """The relu_8x preset's SAE (fp32), initialised and trained on `batches` but the held-out ones."""
    torch.manual_seed(0)
    stream = iter(batches[:-HELD_OUT] * EPOCHS)
    sae_cfg = SAEConfig(hook_point_in=HOOK, d_model=576, expansion_factor=8, act_fn="relu")
    sae = Initializer(InitializerConfig()).initialize_sae_from_config(sae_cfg, stream)
    n = BATCH * ((N_BATCHES - HELD_OUT) * EPOCHS - 2)
    trainer_cfg = TrainerConfig(total_training_tokens=n, exp_result_path=str(tmp_path), lr=3e-3, l1_coefficient=3.0)
    Trainer(trainer_cfg).fit(sae, stream)
    return sae


@pytest.mark.slow
def test_an_sae_trained_on_bf16_activations_explains_as_much(streams, tmp_path) -> None:
    held_out_ND = torch.cat([b[HOOK] for b in streams[torch.float32][-HELD_OUT:]])
    evs = {}
    for dtype, batches in streams.items():
        sae = train(batches, tmp_path / str(dtype))
        assert sae.W_E.dtype == torch.float32
        with torch.no_grad():
            evs[dtype] = float(explained_variance(held_out_ND, sae.decode(sae.encode(held_out_ND))))
    assert evs[torch.float32] > 0.1, evs  # it learned something: the comparison means something
    assert abs(evs[torch.bfloat16] - evs[torch.float32]) < EV_TOLERANCE, evs


@pytest.mark.slow
def test_bf16_model_trains_on_the_fly_and_through_a_cache(tiny_model_dir, corpus_file, tmp_path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, corpus_file, tmp_path / "fly"), "model.dtype=bfloat16"]
    result = run_cli("train", "+sae=relu_8x", *overrides)
    assert result.returncode == 0, result.stderr
    weights = load_file(tmp_path / "fly" / "sae_weights.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the SAE keeps its own dtype
    assert json.loads((tmp_path / "fly" / "metrics.json").read_text())["explained_variance"] > 0

    cache = tmp_path / "acts"
    result = run_cli("generate", str(cache), f"model.model_name={tiny_model_dir}", "model.dtype=bfloat16",
                     f"dataset.dataset_name_or_path={corpus_file}", f"hook_points=[{TINY_HOOK}]", "context_size=32",
                     "total_tokens=4000")
    assert result.returncode == 0, result.stderr
    assert read_manifest(cache, "cache").dtype == torch.bfloat16  # half the disk of fp32
    cached = [o for o in overrides if not o.startswith(("hydra.run.dir", "dataset."))]
    result = run_cli("train", "+sae=relu_8x", *cached, "activation_factory=cached", f"activation_cache={cache}",
                     f"hydra.run.dir={tmp_path / 'cached'}")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "cached" / "metrics.json").read_text())["n_training_tokens"] == 2560
