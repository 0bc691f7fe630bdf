"""Every shipped preset composes and validates into TrainSAESettings (Compose API, no training)."""

from pathlib import Path

import pytest
import yaml

from lm_saes import TrainerConfig, TrainSAESettings
from lm_saes.cli.compose import ConfigError, compose_single_run, group_options, with_positional
from lm_saes.cli.verbs import settings_from_config


@pytest.mark.parametrize("model", group_options("model"))
@pytest.mark.parametrize("dataset", group_options("dataset"))
def test_presets_compose_into_settings(model: str, dataset: str) -> None:
    cfg = compose_single_run(["+sae=relu_8x", f"model={model}", f"dataset={dataset}"])
    settings = settings_from_config(cfg, run_dir="somewhere")
    assert isinstance(settings, TrainSAESettings)
    assert settings.trainer.exp_result_path == "somewhere"
    assert settings.activation_factory.hook_points == ["blocks.6.hook_resid_post"]
    assert list(settings.datasets) == [settings.activation_factory.sources[0].name]


def test_defaults_are_the_offline_embedded_model_and_corpus() -> None:
    settings = settings_from_config(compose_single_run(["+sae=relu_8x"]), run_dir=None)
    assert settings.model.model_name == "builtin:smollm2-135m"
    assert [d.dataset_name_or_path for d in settings.datasets.values()] == ["builtin:python-docs"]
    assert settings.sae.d_model is None  # taken from the model at run time
    assert settings.sae_name == "relu_8x"
    assert settings.wandb.mode == "disabled"


def test_overrides_reach_the_settings_and_device_reaches_every_stage() -> None:
    cfg = compose_single_run(["+sae=relu_8x", "trainer.lr=3e-4", "sae.expansion_factor=16", "device=cuda:1"])
    settings = settings_from_config(cfg, run_dir=None)
    assert settings.trainer.lr == 3e-4 and settings.sae.expansion_factor == 16
    assert settings.model.device == settings.sae.device == "cuda:1"


@pytest.mark.parametrize("preset", group_options("sae"))
def test_every_sae_preset_validates(preset: str) -> None:
    settings = settings_from_config(compose_single_run([f"+sae={preset}"]), run_dir=None)
    assert settings.sae.act_fn == preset.removeprefix("transcoder_").removesuffix("_8x")
    assert settings.sae.is_transcoder == preset.startswith("transcoder_")
    assert settings.sae_name == f"{settings.sae.act_fn}_8x"


def test_jumprelu_preset_sets_its_own_sparsity_coefficient_and_users_can_override_it() -> None:
    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf/sae/jumprelu_8x.yaml").read_text())
    own = preset["trainer"]["l1_coefficient"]
    assert own != TrainerConfig().l1_coefficient
    assert settings_from_config(compose_single_run(["+sae=jumprelu_8x"]), None).trainer.l1_coefficient == own
    cfg = compose_single_run(["+sae=jumprelu_8x", "trainer.l1_coefficient=0.5"])
    assert settings_from_config(cfg, None).trainer.l1_coefficient == 0.5


def test_transcoder_hooks_are_both_generated() -> None:
    cfg = compose_single_run(["+sae=relu_8x", "sae.hook_point_in=blocks.6.ln2.hook_normalized",
                              "sae.hook_point_out=blocks.6.hook_mlp_out"])
    settings = settings_from_config(cfg, run_dir=None)
    assert settings.sae.is_transcoder
    assert settings.activation_factory.hook_points == ["blocks.6.ln2.hook_normalized", "blocks.6.hook_mlp_out"]


def test_errors_from_several_keys_are_joined_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_config(compose_single_run(["+sae=relu_8x", "trainer.lr=-1", "sae.expansion_factor=0"]), None)
    message = str(info.value)
    assert "\n" not in message and "trainer.lr=-1" in message and "sae.expansion_factor=0" in message


def test_sweep_preset_declares_the_grid() -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lm_saes.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+sae=relu_8x", "+sweep=ef_act_lr"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert dict(params) == {"sae.expansion_factor": "8,16", "sae.act_fn": "relu,topk", "trainer.lr": "1e-3,3e-3"}
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("value", ["/tmp/a run", "x = 1, y", "q's", "a\\b", "end\\", "\\'", "cost ${x} and \\${y}",
                                   "é 日本\n", "[1, 2]", "{a: b}"])
def test_a_positional_argument_composes_back_exactly(value: str) -> None:
    overrides = with_positional(["runs/x", value, "n_latents=2"], ("run_dir", "text"))
    cfg = compose_single_run(overrides, "inspect")
    assert (cfg.run_dir, cfg.text, cfg.n_latents) == ("runs/x", value, 2)
