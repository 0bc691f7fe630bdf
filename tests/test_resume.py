"""Checkpoints and exact resume: SIGKILL mid-run, rerun, and land on the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_saes import train_sae
from lm_saes.checkpoint import CheckpointError, latest_checkpoint_path
from lm_saes.errors import UserInputError
from tests.test_train_api import _settings

DRIVER = Path(__file__).with_name("kill_driver.py")


def _ckpt_settings(tiny_model_dir, corpus_file, run_dir, act_fn: str = "relu"):
    settings = _settings(tiny_model_dir, corpus_file, run_dir, n_checkpoints=4, total_training_tokens=256 * 40)
    settings.sae.act_fn = act_fn
    return settings


@pytest.mark.slow
@pytest.mark.parametrize("act_fn", ["relu", "topk"])
def test_sigkill_then_rerun_gives_the_uninterrupted_weights(act_fn, tiny_model_dir, corpus_file, tmp_path) -> None:
    train_sae(_ckpt_settings(tiny_model_dir, corpus_file, tmp_path / "whole", act_fn))

    killed = _ckpt_settings(tiny_model_dir, corpus_file, tmp_path / "killed", act_fn)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(killed.model_dump(mode="json")))
    # The initializer takes 2 batches; batch 30 is training step 28, after the checkpoint at step 24.
    result = subprocess.run([sys.executable, str(DRIVER), str(settings_file), "30"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == -9, result.stderr  # really killed, not finished
    run = tmp_path / "killed"
    assert json.loads((run / "status.json").read_text())["status"] == "running"
    assert latest_checkpoint_path(run).name == "step_00000024"
    assert not (run / "sae_weights.safetensors").exists()

    train_sae(killed)  # the same settings again: resumes from step 24
    whole, resumed = load_file(str(tmp_path / "whole" / "sae_weights.safetensors")), load_file(str(run / "sae_weights.safetensors"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", run))
    assert m1["explained_variance"] == m2["explained_variance"] and m1["n_training_tokens"] == m2["n_training_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_and_the_rerun_resumes_exactly(signal_name, tiny_model_dir, corpus_file, tmp_path) -> None:
    train_sae(_ckpt_settings(tiny_model_dir, corpus_file, tmp_path / "whole"))
    settings = _ckpt_settings(tiny_model_dir, corpus_file, tmp_path / "preempted")
    settings.trainer.n_checkpoints = 0  # the only checkpoint is the one the signal causes
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(settings.model_dump(mode="json")))
    # Batch 20 is training step 18 (the initializer took 2): the signal lands during it, the step completes.
    result = subprocess.run([sys.executable, str(DRIVER), str(settings_file), "20", signal_name], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 3, result.stderr
    assert f"received {signal_name} at step 18" in result.stderr
    run = tmp_path / "preempted"
    assert json.loads((run / "status.json").read_text())["status"] == "preempted"
    assert latest_checkpoint_path(run).name == "step_00000018"
    train_sae(settings)
    whole, resumed = load_file(str(tmp_path / "whole" / "sae_weights.safetensors")), load_file(str(run / "sae_weights.safetensors"))
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_checkpoints_are_written_evenly_and_atomically(tiny_model_dir, corpus_file, tmp_path) -> None:
    run = tmp_path / "run"
    train_sae(_ckpt_settings(tiny_model_dir, corpus_file, run))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000008", "step_00000016", "step_00000024", "step_00000032"]  # no temporary leftovers


def test_a_half_written_checkpoint_is_ignored_and_a_corrupt_one_is_an_error(tiny_model_dir, corpus_file, tmp_path) -> None:
    run = tmp_path / "run"
    settings = _ckpt_settings(tiny_model_dir, corpus_file, run)
    train_sae(settings)
    (run / "status.json").unlink()  # pretend the process died
    (run / "checkpoints" / ".step_00000040.tmp123").mkdir()  # a write the kill interrupted
    assert latest_checkpoint_path(run).name == "step_00000032"
    state = run / "checkpoints" / "step_00000032" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="step_00000032 is unreadable"):
        train_sae(settings)


def test_resuming_with_other_settings_is_refused(tiny_model_dir, corpus_file, tmp_path) -> None:
    run = tmp_path / "run"
    train_sae(_ckpt_settings(tiny_model_dir, corpus_file, run))
    (run / "status.json").unlink()
    changed = _ckpt_settings(tiny_model_dir, corpus_file, run)
    changed.trainer.lr = 0.5
    with pytest.raises(CheckpointError, match=r"different settings \(trainer.lr\)"):
        train_sae(changed)


def test_resume_flag(tiny_model_dir, corpus_file, tmp_path) -> None:
    settings = _ckpt_settings(tiny_model_dir, corpus_file, tmp_path / "fresh")
    settings.trainer.resume = True
    with pytest.raises(UserInputError, match="trainer.resume=True: there is no checkpoint"):
        train_sae(settings)
