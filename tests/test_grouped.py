"""Several SAEs from one activation stream (train_saes_together): each ends bit for bit where it ends alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_saes import TrainSAESettings, train_sae, train_saes_together
from lm_saes.errors import RunDirectoryError, UserInputError
from lm_saes.trainer import TrainingDiverged
from tests.test_train_api import _settings

MLP_IN, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


def _job(tiny_model_dir, corpus_file, run_dir: Path, act_fn: str = "relu", transcoder: bool = False,
         **trainer_kw) -> TrainSAESettings:
    settings = _settings(tiny_model_dir, corpus_file, run_dir, **trainer_kw)
    data = settings.model_dump()
    data["sae"].update(act_fn=act_fn, top_k=8, aux_k=16)
    if transcoder:
        data["sae"].update(hook_point_in=MLP_IN, hook_point_out=MLP_OUT)
        data["activation_factory"]["hook_points"] = [MLP_IN, MLP_OUT]
    return TrainSAESettings.model_validate(data)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sae_weights.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), (a, name)


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.mark.slow
def test_a_group_of_relu_topk_jumprelu_matches_each_job_alone(tiny_model_dir, corpus_file, tmp_path) -> None:
    kinds = ["relu", "topk", "jumprelu"]
    group = [_job(tiny_model_dir, corpus_file, tmp_path / "group" / k, k) for k in kinds]
    outcomes = train_saes_together(group)
    for kind, outcome in zip(kinds, outcomes):
        assert not isinstance(outcome, BaseException), outcome
        train_sae(_job(tiny_model_dir, corpus_file, tmp_path / "alone" / kind, kind))
        group_dir, alone_dir = tmp_path / "group" / kind, tmp_path / "alone" / kind
        _assert_same_weights(group_dir, alone_dir)
        assert _status(group_dir)["status"] == "ok"
        group_metrics, alone_metrics = (json.loads((d / "metrics.json").read_text()) for d in (group_dir, alone_dir))
        assert group_metrics["explained_variance"] == alone_metrics["explained_variance"]
        assert {p.name for p in group_dir.iterdir()} == {p.name for p in alone_dir.iterdir()}


@pytest.mark.slow
def test_transcoders_next_to_saes_on_shared_hooks_match_alone(tiny_model_dir, corpus_file, tmp_path) -> None:
    jobs = {"sae_in": dict(), "transcoder": dict(transcoder=True), "transcoder_topk": dict(transcoder=True, act_fn="topk")}
    group = [_job(tiny_model_dir, corpus_file, tmp_path / "group" / name, **kw) for name, kw in jobs.items()]
    group[0] = TrainSAESettings.model_validate(  # an SAE on the transcoders' input hook
        {**group[0].model_dump(), "sae": {**group[0].sae.model_dump(), "hook_point_in": MLP_IN, "hook_point_out": MLP_IN},
         "activation_factory": {**group[0].activation_factory.model_dump(), "hook_points": [MLP_IN]}})
    train_saes_together(group)
    for name, settings in zip(jobs, group):
        alone = settings.model_copy(update={"trainer": settings.trainer.model_copy(
            update={"exp_result_path": str(tmp_path / "alone" / name)})})
        train_sae(alone)
        _assert_same_weights(tmp_path / "group" / name, tmp_path / "alone" / name)


def test_settings_of_different_streams_name_the_differing_key(tiny_model_dir, corpus_file, tmp_path) -> None:
    a = _job(tiny_model_dir, corpus_file, tmp_path / "a")
    b = _job(tiny_model_dir, corpus_file, tmp_path / "b")
    b.activation_factory.buffer_shuffle.perm_seed = 7
    with pytest.raises(UserInputError, match=r"^activation_factory.buffer_shuffle.perm_seed=7: job 1 differs"):
        train_saes_together([a, b])
    b = _job(tiny_model_dir, corpus_file, tmp_path / "b")
    b.activation_factory.batch_size = 128
    with pytest.raises(UserInputError, match=r"^activation_factory.batch_size=128"):
        train_saes_together([a, b])
    with pytest.raises(UserInputError, match=r"^trainer.exp_result_path=.*job 1 has the run directory of job 0"):
        train_saes_together([a, _job(tiny_model_dir, corpus_file, tmp_path / "a", "topk")])
    assert not (tmp_path / "a").exists()  # refused before anything is written
