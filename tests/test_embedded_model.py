"""The embedded SmolLM2: atomic conversion (fast) and activations equal to the HF model's (slow, real weights)."""

from __future__ import annotations

import pytest
import torch

from lm_saes import embedded_model
from lm_saes.errors import UserInputError


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LM_SAES_CACHE", str(tmp_path))

    def half_written(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded_model, "_convert_gguf", half_written)
    with pytest.raises(KeyboardInterrupt):
        embedded_model.embedded_model_dir("builtin:smollm2-135m")
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # neither the target nor the temporary folder is left


def test_unknown_embedded_model() -> None:
    with pytest.raises(UserInputError, match="available: builtin:smollm2-135m"):
        embedded_model.embedded_model_dir("builtin:gpt5")


@pytest.mark.slow
def test_smollm2_activations_match_hf_hidden_states() -> None:
    from transformers import AutoModelForCausalLM

    from lm_saes import LanguageModelConfig, TransformerLensLanguageModel

    model = TransformerLensLanguageModel(LanguageModelConfig(model_name="builtin:smollm2-135m"))
    assert (model.d_model, model.n_layers) == (576, 30)
    hf = AutoModelForCausalLM.from_pretrained(
        embedded_model.embedded_model_dir("builtin:smollm2-135m"), attn_implementation="eager"
    )
    text = "Sparse autoencoders find interpretable features in the residual stream of language models."
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]
    assert model.stop_layer(hooks) == 4  # only four of the thirty blocks run
    out = model.run_hooks(ids, hooks)
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
    for hook in hooks:
        layer = int(hook.split(".")[1])
        torch.testing.assert_close(out.activations[hook], hidden[layer + 1], rtol=1e-4, atol=1e-4)
    # Sanity: a real model, not a random one: its next-token prediction of an easy continuation.
    logits = hf(model.tokenizer("The capital of France is", return_tensors="pt").input_ids).logits
    assert model.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
