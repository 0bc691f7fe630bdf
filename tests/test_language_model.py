import pytest
import torch

from lm_saes import LanguageModelConfig, TransformerLensLanguageModel
from lm_saes.errors import UserInputError
from tests.conftest import save_tiny_model


def test_mask_drops_bos_eos_and_padding(tiny_model) -> None:
    tok = tiny_model.tokenizer
    text = tok("the cat runs", add_special_tokens=False).input_ids
    tokens = torch.tensor([[tok.bos_token_id, *text, tok.eos_token_id, tok.pad_token_id]])
    out = tiny_model.run_hooks(tokens, ["blocks.0.hook_resid_post"])
    assert out.mask_BT.tolist() == [[False] + [True] * len(text) + [False, False]]
    assert out.activations["blocks.0.hook_resid_post"].shape == (1, tokens.shape[1], 32)


def test_activations_equal_hf_hidden_states_and_stop_early(tiny_model, tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    tokens = torch.randint(4, len(tiny_model.tokenizer), (2, 12))
    assert tiny_model.stop_layer(["blocks.0.hook_resid_post"]) == 1
    assert tiny_model.stop_layer(["blocks.1.hook_resid_post"]) is None  # the last block: run it all
    out = tiny_model.run_hooks(tokens, ["blocks.0.hook_resid_post"])
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.activations["blocks.0.hook_resid_post"], hidden[1], rtol=1e-5, atol=1e-5)


def test_unknown_hook_point_names_key_value_and_allowed(tiny_model) -> None:
    with pytest.raises(UserInputError, match=r"sae.hook_point_in='blocks.7.hook_resid_post'.*blocks.0..1"):
        tiny_model.check_hook_points(["blocks.7.hook_resid_post"], "sae.hook_point_in")
    tiny_model.check_hook_points(["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"], "x")


def test_a_local_gpt_neox_folder_loads_like_a_hub_id(tmp_path) -> None:
    # The same code path as model_name="EleutherAI/pythia-160m", pointed at a local folder.
    folder = save_tiny_model(tmp_path / "tiny-neox", architecture="gpt_neox")
    model = TransformerLensLanguageModel(LanguageModelConfig(model_name=str(folder)))
    assert model.d_model == 32 and model.n_layers == 2
    out = model.run_hooks(torch.randint(4, 50, (1, 8)), ["blocks.1.hook_resid_post"])
    assert out.activations["blocks.1.hook_resid_post"].shape == (1, 8, 32)


def test_missing_local_folder_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="model.model_name='/no/such/model'"):
        TransformerLensLanguageModel(LanguageModelConfig(model_name="/no/such/model"))


def test_config_rejects_bad_device_and_dtype() -> None:
    with pytest.raises(ValueError):
        LanguageModelConfig(device="gpu0")
    with pytest.raises(ValueError, match="allowed: float32"):
        LanguageModelConfig(dtype="float8")
    assert LanguageModelConfig(dtype="torch.float16").dtype == torch.float16


def test_pythia_preset_loads_from_a_local_folder(tmp_path) -> None:
    from lm_saes.cli.compose import compose_single_run
    from lm_saes.cli.verbs import settings_from_config

    folder = save_tiny_model(tmp_path / "pythia-like", architecture="gpt_neox")
    cfg = compose_single_run(["+sae=relu_8x", "model=pythia_160m", f"model.model_name={folder}",
                              "sae.hook_point_in=blocks.1.hook_resid_post"])
    settings = settings_from_config(cfg, run_dir=None)
    model = TransformerLensLanguageModel(settings.model)
    model.check_hook_points(settings.activation_factory.hook_points, "activation_factory.hook_points")
    assert model.bridge.cfg.architecture == "GPTNeoXForCausalLM" and model.d_model == 32
