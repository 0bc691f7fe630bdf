"""lm_saes.config_base: the warning for bf16 matrix products on a CPU without bf16 kernels."""

from __future__ import annotations

import pytest
import torch

from lm_saes import config_base
from lm_saes.config_base import warn_if_slow_dtype


@pytest.fixture
def cpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_base, "cpu_has_bf16_matmul", lambda: False)
    monkeypatch.setattr(config_base, "_WARNED_SLOW_DTYPE", set())


def test_bf16_on_a_cpu_without_bf16_kernels_warns_once_naming_the_key(cpu_without_bf16, capsys) -> None:
    warn_if_slow_dtype("trainer.amp_dtype", torch.bfloat16, "cpu")
    warn_if_slow_dtype("trainer.amp_dtype", torch.bfloat16, "cpu")
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert "trainer.amp_dtype=bfloat16" in err and "use trainer.amp_dtype=float32" in err


@pytest.mark.parametrize(("dtype", "device"), [(torch.float32, "cpu"), (torch.bfloat16, "cuda"),
                                               (torch.bfloat16, "cuda:1")])
def test_float32_or_a_gpu_is_not_warned_about(cpu_without_bf16, capsys, dtype: torch.dtype, device: str) -> None:
    warn_if_slow_dtype("model.dtype", dtype, device)
    assert capsys.readouterr().err == ""


def test_a_cpu_with_bf16_kernels_is_not_warned_about(monkeypatch, capsys) -> None:
    monkeypatch.setattr(config_base, "cpu_has_bf16_matmul", lambda: True)
    monkeypatch.setattr(config_base, "_WARNED_SLOW_DTYPE", set())
    warn_if_slow_dtype("model.dtype", torch.bfloat16, "cpu")
    assert capsys.readouterr().err == ""


def test_training_and_the_model_warn_about_their_own_keys(cpu_without_bf16, capsys, tiny_model_dir, tmp_path) -> None:
    from lm_saes import (
        Initializer,
        InitializerConfig,
        LanguageModelConfig,
        SAEConfig,
        Trainer,
        TrainerConfig,
        TransformerLensLanguageModel,
    )
    from tests.test_trainer import planted_stream

    TransformerLensLanguageModel(LanguageModelConfig(model_name=str(tiny_model_dir), dtype="bfloat16"))
    sae = Initializer(InitializerConfig()).initialize_sae_from_config(
        SAEConfig(hook_point_in="h", d_model=16, expansion_factor=2, dtype="bfloat16"), planted_stream(1))
    Trainer(TrainerConfig(total_training_tokens=512, amp_dtype="bfloat16", exp_result_path=str(tmp_path))).fit(
        sae, planted_stream(2))
    err = capsys.readouterr().err
    for key in ("model.dtype", "sae.dtype", "trainer.amp_dtype"):
        assert f"{key}=bfloat16 on a CPU without bf16 matrix kernels" in err
