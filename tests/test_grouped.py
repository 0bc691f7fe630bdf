"""Several SAEs from one activation stream (train_saes_together): each ends bit for bit where it ends alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_saes import TrainSAESettings, train_sae, train_saes_together
from lm_saes.checkpoint import latest_checkpoint_path
from lm_saes.errors import RunDirectoryError, UserInputError
from lm_saes.trainer import TrainingDiverged
from tests.conftest import run_cli, tiny_overrides
from tests.test_resume import DRIVER
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


# --- faults stay local --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_diverging_job_and_one_failing_its_checks_fail_alone(tiny_model_dir, corpus_file, tmp_path) -> None:
    good = _job(tiny_model_dir, corpus_file, tmp_path / "good", "topk")
    diverging = _job(tiny_model_dir, corpus_file, tmp_path / "diverging", lr=1e30)
    missing_hook = _job(tiny_model_dir, corpus_file, tmp_path / "missing_hook")
    missing_hook.sae.hook_point_in = missing_hook.sae.hook_point_out = "blocks.7.hook_resid_post"
    missing_hook.activation_factory.hook_points = ["blocks.7.hook_resid_post"]
    finished = _job(tiny_model_dir, corpus_file, tmp_path / "finished")
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "status.json").write_text('{"status": "ok"}')

    outcomes = train_saes_together([good, diverging, missing_hook, finished])

    assert not isinstance(outcomes[0], BaseException) and _status(tmp_path / "good")["status"] == "ok"
    assert isinstance(outcomes[1], TrainingDiverged)
    assert _status(tmp_path / "diverging")["status"] == "failed"
    assert "training diverged" in _status(tmp_path / "diverging")["error"]
    assert isinstance(outcomes[2], UserInputError) and "blocks.7.hook_resid_post" in str(outcomes[2])
    assert _status(tmp_path / "missing_hook")["status"] == "failed"
    assert isinstance(outcomes[3], RunDirectoryError)
    assert _status(tmp_path / "finished") == {"status": "ok"}  # a finished run is left as it is
    train_sae(_job(tiny_model_dir, corpus_file, tmp_path / "alone", "topk"))
    _assert_same_weights(tmp_path / "good", tmp_path / "alone")


# --- preemption ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_checkpoints_every_job_and_the_rerun_resumes_each_exactly(tiny_model_dir, corpus_file, tmp_path) -> None:
    kinds = ["relu", "topk"]

    def group(root: Path) -> list[TrainSAESettings]:
        return [_job(tiny_model_dir, corpus_file, root / k, k, total_training_tokens=256 * 40) for k in kinds]

    train_saes_together(group(tmp_path / "whole"))
    settings_file = tmp_path / "group.json"
    settings_file.write_text(json.dumps([s.model_dump(mode="json") for s in group(tmp_path / "preempted")]))
    # The initializer takes 2 batches: batch 20 is training step 18, during which SIGTERM lands.
    result = subprocess.run([sys.executable, str(DRIVER), str(settings_file), "20", "SIGTERM"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 3, result.stderr
    assert "received SIGTERM at step 18: 2 job(s) saved a checkpoint" in result.stderr
    for kind in kinds:
        run = tmp_path / "preempted" / kind
        assert _status(run)["status"] == "preempted"
        assert latest_checkpoint_path(run).name == "step_00000018"
        assert not (run / "sae_weights.safetensors").exists()
    train_saes_together(group(tmp_path / "preempted"))
    for kind in kinds:
        _assert_same_weights(tmp_path / "whole" / kind, tmp_path / "preempted" / kind)
        assert _status(tmp_path / "preempted" / kind)["status"] == "ok"


# --- the command line: hydra/launcher=grouped ---------------------------------------------------------------

@pytest.mark.slow
def test_grouped_launcher_groups_jobs_by_stream_and_each_job_is_a_normal_run(tiny_model_dir, corpus_file, tmp_path) -> None:
    overrides = [o for o in tiny_overrides(tiny_model_dir, corpus_file, tmp_path / "unused") if not o.startswith("hydra.")]
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "hydra/launcher=grouped", "+sae=relu_8x", *overrides, "++sae.top_k=8",
                     "sae.act_fn=relu,topk,nonsense", "activation_factory.buffer_shuffle.perm_seed=42,7",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    # Jobs 0-5: the seed varies fastest. Per seed, relu and topk share a stream; the invalid jobs are alone.
    for line in ("group 0: jobs 0, 2 share", "group 1: jobs 1, 3 share", "group 2: job 4 alone", "group 3: job 5 alone"):
        assert line in result.stderr, result.stderr
    statuses = {i: _status(sweep / str(i))["status"] for i in range(6)}
    assert statuses == {0: "ok", 1: "ok", 2: "ok", 3: "ok", 4: "failed", 5: "failed"}
    assert "sae.act_fn='nonsense'" in _status(sweep / "4")["error"]
    assert (sweep / "0" / ".hydra" / "overrides.yaml").exists()
    report = run_cli("report", str(sweep))
    assert report.returncode == 0 and "4 ok, 2 not ok" in report.stdout + report.stderr, report.stdout + report.stderr
    # A job of a group is the job alone, through the plain command line too.
    alone = run_cli("train", "+sae=relu_8x", *overrides, "++sae.top_k=8", "sae.act_fn=topk",
                    "activation_factory.buffer_shuffle.perm_seed=7", f"hydra.run.dir={tmp_path / 'alone'}")
    assert alone.returncode == 0, alone.stderr
    _assert_same_weights(sweep / "3", tmp_path / "alone")


# --- SLURM: memory per group (the sweep itself: tests/test_slurm.py) ----------------------------------------

def test_sae_memory_is_four_copies_of_its_parameters(tiny_model_dir, corpus_file, tmp_path) -> None:
    from lm_saes.cli.grouping import sae_bytes

    settings = _job(tiny_model_dir, corpus_file, tmp_path)  # d_model 32, expansion 4: d_sae 128, float32
    assert sae_bytes(settings, None) == 4 * (2 * 128 * 32 + 128 + 32) * 4
    settings.sae.d_model = None
    assert sae_bytes(settings, None) is None and sae_bytes(settings, 16) == 4 * (2 * 64 * 16 + 64 + 16) * 4


def test_a_group_over_the_memory_limit_is_split() -> None:
    from lm_saes.cli.grouping import split_by_memory

    assert split_by_memory([0, 1, 2, 3], [4, 4, 4, 4], None) == [[0, 1, 2, 3]]
    assert split_by_memory([0, 1, 2, 3], [4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert split_by_memory([0, 1, 2], [3, 20, 3], 8) == [[0], [1], [2]]  # one over the limit goes alone
    assert split_by_memory([5, 7], [None, 4], 4) == [[5, 7]]  # unknown sizes count as zero


@pytest.mark.slow
def test_each_job_of_a_group_has_its_own_wandb_run(tiny_model_dir, corpus_file, tmp_path, monkeypatch) -> None:
    import wandb

    from lm_saes import WandbConfig
    from lm_saes.runners import train_group

    monkeypatch.delenv("WANDB_MODE", raising=False)
    runs, logged = [], {}
    real_start = train_group._start_wandb

    def watched_start(settings):
        run = real_start(settings)
        real_log, name = run.log, settings.trainer.exp_result_path
        run.log = lambda data, step=None: (logged.setdefault(name, []).append(data), real_log(data, step=step))[1]
        runs.append(run)
        return run

    monkeypatch.setattr(train_group, "_start_wandb", watched_start)
    group = [_job(tiny_model_dir, corpus_file, tmp_path / k, k) for k in ("relu", "topk")]
    for settings in group:
        settings.wandb = WandbConfig(mode="offline", project="tests")
    train_saes_together(group)
    assert len({run.id for run in runs}) == 2 and wandb.run is None  # two runs, both finished
    for kind in ("relu", "topk"):
        assert len(list((tmp_path / kind / "wandb").glob("offline-run-*"))) == 1
        assert any("train/explained_variance" in data for data in logged[str(tmp_path / kind)])
    assert [dict(run.config)["sae"]["act_fn"] for run in runs] == ["relu", "topk"]
