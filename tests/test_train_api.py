"""The walkthrough's API, end to end on the tiny model and a synthetic corpus."""

import json

import pytest
import torch

from lm_saes import (
    ActivationFactory,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    ActivationFactoryTarget,
    BufferShuffleConfig,
    DatasetConfig,
    Initializer,
    InitializerConfig,
    LanguageModelConfig,
    SAEConfig,
    SparseAutoEncoder,
    Trainer,
    TrainerConfig,
    TrainSAESettings,
    TransformerLensLanguageModel,
    load_dataset,
    train_sae,
)
from lm_saes.errors import RunDirectoryError, UserInputError

HOOK = "blocks.0.hook_resid_post"


def _factory_cfg(**kw) -> ActivationFactoryConfig:
    return ActivationFactoryConfig(**{
        "sources": [ActivationFactoryDatasetSource(name="synthetic")],
        "target": ActivationFactoryTarget.ACTIVATIONS_1D,
        "hook_points": [HOOK],
        "batch_size": 256,
        "buffer_size": 1024,
        "buffer_shuffle": BufferShuffleConfig(perm_seed=42, generator_device="cpu"),
        "context_size": 32,
        "model_batch_size": 4,
        **kw,
    })


def _settings(tiny_model_dir, corpus_file, run_dir, **trainer_kw) -> TrainSAESettings:
    return TrainSAESettings(
        sae=SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=32, expansion_factor=4, act_fn="relu",
                      dtype=torch.float32, device="cpu"),
        initializer=InitializerConfig(grid_search_init_norm=True),
        trainer=TrainerConfig(**{"amp_dtype": torch.float32, "lr": 1e-3, "total_training_tokens": 256 * 20,
                                 "log_frequency": 5, "exp_result_path": str(run_dir), **trainer_kw}),
        model=LanguageModelConfig(model_name=str(tiny_model_dir), device="cpu", dtype="torch.float32"),
        model_name="tiny-llama",
        datasets={"synthetic": DatasetConfig(dataset_name_or_path=str(corpus_file))},
        activation_factory=_factory_cfg(),
        sae_name="tiny-sae",
        sae_series="tests",
    )


def test_activation_stream_has_the_walkthrough_shape(tiny_model, corpus_file) -> None:
    stream = ActivationFactory(_factory_cfg()).process(
        model=tiny_model, model_name="tiny", datasets={"synthetic": load_dataset(DatasetConfig(dataset_name_or_path=str(corpus_file)))}
    )
    batch = next(stream)
    assert set(batch) == {HOOK, "tokens"}
    assert batch[HOOK].shape == (256, 32) and batch["tokens"].shape == (256,)
    special = torch.tensor(tiny_model.special_token_ids)
    assert not torch.isin(batch["tokens"], special).any()


def test_stream_is_seeded(tiny_model, corpus_file) -> None:
    data = {"synthetic": load_dataset(DatasetConfig(dataset_name_or_path=str(corpus_file)))}

    def first(seed: int) -> torch.Tensor:
        cfg = _factory_cfg(buffer_shuffle=BufferShuffleConfig(perm_seed=seed))
        return next(ActivationFactory(cfg).process(model=tiny_model, model_name="t", datasets=data))["tokens"]

    assert torch.equal(first(1), first(1)) and not torch.equal(first(1), first(2))


def test_walkthrough_step_by_step(tiny_model_dir, corpus_file, tmp_path) -> None:
    model = TransformerLensLanguageModel(LanguageModelConfig(model_name=str(tiny_model_dir), device="cpu",
                                                             dtype="torch.float32"))
    dataset = load_dataset(DatasetConfig(dataset_name_or_path=str(corpus_file)))
    stream = ActivationFactory(_factory_cfg()).process(model=model, model_name="tiny", datasets={"synthetic": dataset})
    sae_cfg = SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=32, expansion_factor=4, act_fn="relu",
                        dtype=torch.float32, device="cpu")
    sae = Initializer(InitializerConfig(grid_search_init_norm=True)).initialize_sae_from_config(sae_cfg, activation_stream=stream)
    trainer = Trainer(TrainerConfig(amp_dtype=torch.float32, lr=1e-3, total_training_tokens=256 * 10, log_frequency=5,
                                    exp_result_path=str(tmp_path)))
    sae.cfg.save_hyperparameters(str(tmp_path))
    trainer.fit(sae=sae, activation_stream=stream)
    sae.save_pretrained(save_path=str(tmp_path))
    loaded = SparseAutoEncoder.from_pretrained(tmp_path)
    assert torch.equal(loaded.W_D, sae.folded_state_dict()["W_D"])


def test_train_sae_writes_a_finished_run_directory(tiny_model_dir, corpus_file, tmp_path) -> None:
    run = tmp_path / "run"
    sae = train_sae(_settings(tiny_model_dir, corpus_file, run))
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "sae_weights.safetensors", "config.yaml", "metrics.json", "status.json"} <= names
    status = json.loads((run / "status.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert status["status"] == "ok"
    assert metrics["n_training_tokens"] == 256 * 20
    assert {"explained_variance", "l0", "mse", "dead_fraction"} <= set(metrics)
    assert metrics["explained_variance"] > 0.5  # it reconstructs, even after 20 steps
    assert torch.equal(SparseAutoEncoder.from_pretrained(run).W_E, sae.folded_state_dict()["W_E"])
    # A rerun does not clobber the finished run unless asked.
    with pytest.raises(RunDirectoryError, match="already holds a finished run"):
        train_sae(_settings(tiny_model_dir, corpus_file, run))
    train_sae(_settings(tiny_model_dir, corpus_file, run, overwrite=True))


def test_empty_corpus_is_a_user_error_and_the_run_is_marked_failed(tiny_model_dir, tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    settings = _settings(tiny_model_dir, empty, tmp_path / "run")
    with pytest.raises(UserInputError, match="corpus is empty"):
        train_sae(settings)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "sae_weights.safetensors").exists()


def test_d_model_mismatch_and_missing_hook(tiny_model_dir, corpus_file, tmp_path) -> None:
    settings = _settings(tiny_model_dir, corpus_file, tmp_path / "a")
    settings.sae.d_model = 64
    with pytest.raises(UserInputError, match=r"sae.d_model=64: does not match the model's d_model \(32\)"):
        train_sae(settings)


def test_settings_cross_checks() -> None:
    with pytest.raises(ValueError, match="total_training_tokens=100: must be at least one batch"):
        TrainSAESettings(
            sae=SAEConfig(hook_point_in=HOOK), trainer=TrainerConfig(total_training_tokens=100),
            datasets={"synthetic": DatasetConfig()}, activation_factory=_factory_cfg(),
        )
    with pytest.raises(ValueError, match="sae.hook_point_in='blocks.1.hook_resid_post': must be one of"):
        TrainSAESettings(
            sae=SAEConfig(hook_point_in="blocks.1.hook_resid_post"), trainer=TrainerConfig(),
            datasets={"synthetic": DatasetConfig()}, activation_factory=_factory_cfg(),
        )


@pytest.mark.slow
def test_wandb_offline_gets_the_config_and_is_always_closed(tiny_model_dir, corpus_file, tmp_path, monkeypatch) -> None:
    import wandb

    from lm_saes import WandbConfig

    from lm_saes.runners import train as runner

    monkeypatch.delenv("WANDB_MODE", raising=False)
    # Watch the real run from this process: wandb writes its offline records file asynchronously.
    runs, logged = [], []
    real_start = runner._start_wandb

    def watched_start(settings):
        run = real_start(settings)
        real_log = run.log
        run.log = lambda data, step=None: (logged.append(data), real_log(data, step=step))[1]
        runs.append(run)
        return run

    monkeypatch.setattr(runner, "_start_wandb", watched_start)
    settings = _settings(tiny_model_dir, corpus_file, tmp_path / "run")
    settings.wandb = WandbConfig(mode="offline", project="tests")
    train_sae(settings)
    assert wandb.run is None  # finished
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1
    assert dict(runs[0].config)["sae"]["hook_point_in"] == "blocks.0.hook_resid_post"  # the resolved settings
    assert any("train/explained_variance" in data for data in logged)

    # A run that fails after wandb started still closes it.
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("lm_saes.runners.train.Trainer.fit", explode)
    settings.trainer.exp_result_path = str(tmp_path / "run2")
    with pytest.raises(RuntimeError, match="boom"):
        train_sae(settings)
    assert wandb.run is None


@pytest.mark.parametrize("buffer_size", [1024, None])
def test_stream_resumes_exactly_from_its_state(tiny_model, corpus_file, buffer_size) -> None:
    data = {"synthetic": load_dataset(DatasetConfig(dataset_name_or_path=str(corpus_file)))}
    cfg = _factory_cfg(buffer_size=buffer_size)
    whole = [b["tokens"] for b in ActivationFactory(cfg).process(model=tiny_model, model_name="t", datasets=data)]
    stream = ActivationFactory(cfg).process(model=tiny_model, model_name="t", datasets=data)
    head = [next(stream)["tokens"] for _ in range(7)]
    resumed = ActivationFactory(cfg).process(model=tiny_model, model_name="t", datasets=data, state=stream.state_dict())
    tail = [b["tokens"] for b in resumed]
    assert len(head) + len(tail) == len(whole)
    for a, b in zip(head + tail, whole):
        assert torch.equal(a, b)


def test_eval_frequency_puts_downstream_scores_in_the_final_metrics(tiny_model_dir, corpus_file, tmp_path) -> None:
    run = tmp_path / "run"
    train_sae(_settings(tiny_model_dir, corpus_file, run, eval_frequency=10))
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"ce_loss_score", "ce_loss_clean", "ce_loss_sae", "ce_loss_ablated", "kl_div_score", "kl_div_sae"} <= set(metrics)
    assert metrics["kl_div_sae"] >= 0 and metrics["ce_loss_clean"] > 0


def test_eval_frequency_without_held_out_text_is_a_user_error(tiny_model_dir, corpus_file, tmp_path) -> None:
    # ~25K tokens of corpus, all of it within what a 24K-token budget (plus buffer and init batches) reads.
    settings = _settings(tiny_model_dir, corpus_file, tmp_path / "run", eval_frequency=10, total_training_tokens=256 * 94)
    with pytest.raises(UserInputError, match=r"trainer.eval_frequency=10: needs held-out text"):
        train_sae(settings)
