"""Activation cache: generate once, train many times, and land exactly where training on the fly lands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_saes import (
    ActivationFactory,
    ActivationFactoryActivationsSource,
    BufferShuffleConfig,
    DatasetConfig,
    GenerateSettings,
    LanguageModelConfig,
    TrainSAESettings,
    generate_activations,
    load_dataset,
    train_sae,
)
from lm_saes.activation import ActivationStream
from lm_saes.activation.cache import MANIFEST_FILE, iter_cache_rows, read_manifest
from lm_saes.errors import UserInputError
from lm_saes.runners.held_out import held_out_plan
from lm_saes.runners.train import check_activation_caches
from lm_saes.trainer import Preempted
from tests.conftest import run_cli, tiny_overrides
from tests.test_train_api import HOOK, _settings

SHARD_SIZE = 3000
"""Rows per shard: the ~22K-token corpus makes 8 shards, so reading crosses many shard boundaries."""


def _generate_settings(tiny_model_dir: Path, corpus_file: Path, out: Path, **kw) -> GenerateSettings:
    # The model, corpus, context size and forward batch of tests.test_train_api._settings: the same rows.
    return GenerateSettings(**{
        "output_dir": str(out),
        "model": LanguageModelConfig(model_name=str(tiny_model_dir), device="cpu", dtype="torch.float32"),
        "datasets": {"synthetic": DatasetConfig(dataset_name_or_path=str(corpus_file))},
        "hook_points": [HOOK, "blocks.1.hook_resid_post"], "context_size": 32, "model_batch_size": 4,
        "shard_size": SHARD_SIZE, **kw,
    })


def _cache_settings(tiny_model_dir: Path, corpus_file: Path, cache: Path, run_dir: Path, **trainer_kw) -> TrainSAESettings:
    """tests.test_train_api._settings, reading the cache instead of running the model; no datasets at all."""
    settings = _settings(tiny_model_dir, corpus_file, run_dir, **trainer_kw)
    settings.activation_factory.sources = [ActivationFactoryActivationsSource(path=str(cache))]
    settings.datasets = {}
    return settings


@pytest.fixture(scope="module")
def cache(tiny_model_dir, corpus_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "acts"
    generate_activations(_generate_settings(tiny_model_dir, corpus_file, out))
    return out


@pytest.fixture(scope="module")
def cache_run(tiny_model_dir, corpus_file, cache, tmp_path_factory) -> Path:
    """A finished run trained from the cache, with the language model unloadable: the cache must not need it."""
    run = tmp_path_factory.mktemp("cache-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lm_saes.runners.train.TransformerLensLanguageModel", _no_model)
        train_sae(_cache_settings(tiny_model_dir, corpus_file, cache, run))
    return run


def _no_model(*args, **kwargs):
    raise AssertionError("the language model was loaded")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae_weights.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# --- the cache's content ------------------------------------------------------------------------------------

def test_the_cache_holds_the_streams_rows_in_order(tiny_model, tiny_model_dir, corpus_file, cache) -> None:
    manifest = read_manifest(cache, "cache")
    assert manifest.complete and manifest.d_model == 32 and manifest.context_size == 32
    assert len(manifest.shards) > 3 and all(s.rows >= SHARD_SIZE for s in manifest.shards[:-1])
    assert manifest.n_rows == sum(s.rows for s in manifest.shards) == manifest.sources[0].rows
    # The on-the-fly stream's raw rows (before the shuffle buffer), concatenated, are the shards, concatenated.
    settings = _settings(tiny_model_dir, corpus_file, "unused")
    stream = ActivationFactory(settings.activation_factory).process(
        model=tiny_model, model_name="t", datasets={"synthetic": load_dataset(settings.datasets["synthetic"])})
    live, contexts = [], 0
    for rows in stream.rows():
        live.append(rows)
        contexts = stream.contexts_done
    on_disk = [load_file(str(cache / s.file)) for s in manifest.shards]
    for key in (HOOK, "tokens"):
        assert torch.equal(torch.cat([r[key] for r in live]), torch.cat([s[key] for s in on_disk])), key
    assert manifest.sources[0].contexts == contexts > 0


# --- (a) the same weights as on the fly ---------------------------------------------------------------------

def test_training_from_the_cache_reaches_the_on_the_fly_weights(tiny_model_dir, corpus_file, cache, cache_run, tmp_path) -> None:
    fly = tmp_path / "fly"
    settings = _settings(tiny_model_dir, corpus_file, fly)
    assert settings.activation_factory.buffer_size == 1024  # shuffled: the buffer mixes rows across shards
    train_sae(settings)
    _assert_same_weights(fly, cache_run)
    m_fly, m_cache = (json.loads((r / "metrics.json").read_text()) for r in (fly, cache_run))
    assert m_fly["explained_variance"] == m_cache["explained_variance"]
    assert m_cache["n_training_tokens"] == 256 * 20
    assert json.loads((cache_run / "config.json").read_text())["d_model"] == 32  # from the manifest


def test_a_different_shuffle_seed_gives_different_weights(tiny_model_dir, corpus_file, cache, cache_run, tmp_path) -> None:
    """The equivalence above is not vacuous: the weights do depend on the order of the rows."""
    other = tmp_path / "other"
    settings = _cache_settings(tiny_model_dir, corpus_file, cache, other)
    settings.activation_factory.buffer_shuffle = BufferShuffleConfig(perm_seed=7)
    train_sae(settings)
    assert not torch.equal(_weights(other)["W_E"], _weights(cache_run)["W_E"])


# --- (c) resuming mid-cache -----------------------------------------------------------------------------------

def test_the_stream_resumes_mid_shard_exactly(cache) -> None:
    settings = _cache_settings(Path("unused"), Path("unused"), cache, Path("unused"))
    factory = ActivationFactory(settings.activation_factory)
    whole = [b[HOOK] for b in factory.process(model=None, model_name="t")]
    stream = factory.process(model=None, model_name="t")
    head = [next(stream)[HOOK] for _ in range(37)]
    state = stream.state_dict()
    rows_done = int(state["position"][1])
    shard_ends = torch.tensor([s.rows for s in read_manifest(cache, "cache").shards]).cumsum(0).tolist()
    assert rows_done > shard_ends[1] and rows_done not in shard_ends  # past two shards, and mid-shard
    tail = [b[HOOK] for b in factory.process(model=None, model_name="t", state=state)]
    assert len(head) + len(tail) == len(whole) > 80
    for a, b in zip(head + tail, whole):
        assert torch.equal(a, b)


def test_training_preempted_mid_cache_resumes_to_the_same_weights(tiny_model_dir, corpus_file, cache, tmp_path, monkeypatch,
                                                                   capsys) -> None:
    whole, run = tmp_path / "whole", tmp_path / "preempted"
    train_sae(_cache_settings(tiny_model_dir, corpus_file, cache, whole))
    settings = _cache_settings(tiny_model_dir, corpus_file, cache, run)
    original_next, served = ActivationStream.__next__, []

    def next_then_signal(self):
        served.append(1)
        if len(served) == 12:  # training step 10 (the initializer took 2 batches): the step completes first
            os.kill(os.getpid(), signal.SIGTERM)
        return original_next(self)

    monkeypatch.setattr(ActivationStream, "__next__", next_then_signal)
    with pytest.raises(Preempted, match="at step 10"):
        train_sae(settings)
    monkeypatch.setattr(ActivationStream, "__next__", original_next)
    assert not (run / "sae_weights.safetensors").exists()
    capsys.readouterr()
    train_sae(settings)  # continues from the step-10 checkpoint, mid-cache (not afresh: that would match too)
    assert "(step 10)" in capsys.readouterr().err
    _assert_same_weights(whole, run)


# --- (b) an interrupted generate ------------------------------------------------------------------------------

KILL_DRIVER = """
import os, signal, sys
import lm_saes.activation.cache as cache
from lm_saes import GenerateSettings, generate_activations

settings = GenerateSettings.model_validate_json(open(sys.argv[1]).read())
kill_at, real_save, calls = int(sys.argv[2]), cache.save_file, []

def save_half_then_die(tensors, path):  # the kill lands while shard number kill_at is being written
    calls.append(path)
    real_save(tensors, path)
    if len(calls) == kill_at:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

cache.save_file = save_half_then_die
generate_activations(settings)
"""


def test_a_killed_generate_reruns_to_the_same_cache(tiny_model_dir, corpus_file, cache, tmp_path) -> None:
    out = tmp_path / "killed"
    settings = _generate_settings(tiny_model_dir, corpus_file, out)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(settings.model_dump_json())
    result = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(settings_file), "4"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == -9, result.stderr  # really killed mid-shard
    partial = read_manifest(out, "cache", require_complete=False)
    assert not partial.complete and len(partial.shards) == 3
    leftovers = [p.name for p in (out / "shards").iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".shard-00003.safetensors.")  # the half-written shard
    # A shard renamed into place just before a kill, but not yet in the manifest, must not be read either.
    shutil.copy(cache / "shards" / "shard-00000.safetensors", out / "shards" / "shard-00003.safetensors")
    with pytest.raises(UserInputError, match="incomplete activation cache"):
        read_manifest(out, "activation_factory.sources.0.path")
    # What the partial cache lists reads back as the whole cache's first three shards.
    whole = read_manifest(cache, "cache")
    rows = torch.cat([r[HOOK] for r in iter_cache_rows(out, partial, [HOOK], 0, 1000)])
    expected = torch.cat([load_file(str(cache / s.file))[HOOK] for s in whole.shards[:3]])
    assert torch.equal(rows, expected)

    manifest = generate_activations(settings)  # the same command again: continues after shard 3
    assert manifest.complete
    assert json.loads((out / MANIFEST_FILE).read_text()) == json.loads((cache / MANIFEST_FILE).read_text())
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(p.name for p in (cache / "shards").iterdir())
    for shard in whole.shards:
        assert (out / shard.file).read_bytes() == (cache / shard.file).read_bytes(), shard.file


# --- (d) one-line errors ------------------------------------------------------------------------------------

def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_caches_are_one_line_errors(tiny_model_dir, corpus_file, cache, tmp_path) -> None:
    def check(path: Path, **changes) -> str:
        settings = _cache_settings(tiny_model_dir, corpus_file, path, tmp_path / "run")
        for key, value in changes.items():
            section, _, field = key.partition(".")
            setattr(getattr(settings, section), field, value)
        with pytest.raises(UserInputError) as info:
            check_activation_caches(settings)
        return _one_line(info)

    assert "activation_factory.sources.0.path='/no/such/cache': no such directory" in check(Path("/no/such/cache"))
    (tmp_path / "empty").mkdir()
    assert "not an activation cache (no manifest.json)" in check(tmp_path / "empty")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(cache, incomplete)
    manifest = json.loads((incomplete / MANIFEST_FILE).read_text())
    (incomplete / MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))
    assert "incomplete activation cache" in check(incomplete) and "rerun the same lm-saes generate" in check(incomplete)
    (incomplete / MANIFEST_FILE).write_text("{not json")
    assert "unreadable manifest.json" in check(incomplete)
    assert ("sae.hook_point_in='blocks.0.hook_mlp_out': not in the activation cache" in
            check(cache, **{"sae.hook_point_in": "blocks.0.hook_mlp_out", "sae.hook_point_out": "blocks.0.hook_mlp_out",
                            "activation_factory.hook_points": ["blocks.0.hook_mlp_out"]}))
    assert ("activation_factory.hook_points='blocks.0.hook_mlp_out': not in the activation cache" in
            check(cache, **{"activation_factory.hook_points": [HOOK, "blocks.0.hook_mlp_out"]}))
    assert f"model.model_name='other-model': the activation cache {cache} holds activations of {tiny_model_dir}" in \
        check(cache, **{"model.model_name": "other-model"})
    assert "sae.d_model=64: does not match the activation cache's d_model (32)" in check(cache, **{"sae.d_model": 64})
    assert ("activation_factory.context_size=64: the activation cache" in
            check(cache, **{"activation_factory.context_size": 64}))


def test_generate_refuses_to_clobber_or_mix_settings(tiny_model_dir, corpus_file, cache, tmp_path) -> None:
    before = (cache / MANIFEST_FILE).read_bytes()
    with pytest.raises(UserInputError) as info:
        generate_activations(_generate_settings(tiny_model_dir, corpus_file, cache))
    assert "already holds a complete activation cache" in _one_line(info) and "overwrite=true" in str(info.value)
    with pytest.raises(UserInputError) as info:
        generate_activations(_generate_settings(tiny_model_dir, corpus_file, cache, context_size=64))
    assert "made with other settings (context_size)" in _one_line(info)
    assert (cache / MANIFEST_FILE).read_bytes() == before  # untouched
    # overwrite=true makes it again (here a smaller one, capped: in a copy, the module's cache stays).
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    manifest = generate_activations(_generate_settings(tiny_model_dir, corpus_file, copy, total_tokens=5000, overwrite=True))
    assert manifest.complete and manifest.n_rows == 5000 and len(manifest.shards) == 2
    assert sorted(p.name for p in (copy / "shards").iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    # Held-out text for evaluation: the cache's corpus, past all the cache holds of it.
    settings = _cache_settings(tiny_model_dir, corpus_file, copy, tmp_path / "run")
    plan = held_out_plan(settings)
    assert plan.dataset.dataset_name_or_path == str(corpus_file) and plan.skip_tokens == 5000 and plan.context_size == 32


# --- (e) the command line -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_generate_then_a_sweep_from_the_cache_through_the_cli(tiny_model_dir, corpus_file, tmp_path) -> None:
    cache = tmp_path / "acts"
    result = run_cli("generate", str(cache), f"model.model_name={tiny_model_dir}",
                     f"dataset.dataset_name_or_path={corpus_file}", f"hook_points=[{HOOK}]", "context_size=32",
                     "model_batch_size=4", "shard_size=4000", "total_tokens=12000")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(cache, "cache")
    assert manifest.n_rows == 12000 and len(manifest.shards) == 3
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "shards"]  # nothing of Hydra's

    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_model_dir, corpus_file, tmp_path / "unused")
                 if not o.startswith(("hydra.run.dir", "dataset.", "sae.expansion_factor"))]
    result = run_cli("train", "-m", "+sae=relu_8x", *overrides, "activation_factory=cached",
                     f"activation_cache={cache}", "sae.expansion_factor=2,4", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    for job, expansion in (("0", 2), ("1", 4)):
        assert json.loads((sweep / job / "status.json").read_text())["status"] == "ok", job
        sae_config = json.loads((sweep / job / "config.json").read_text())
        assert (sae_config["d_model"], sae_config["expansion_factor"]) == (32, expansion)  # d_model: the manifest's
        assert json.loads((sweep / job / "metrics.json").read_text())["n_training_tokens"] == 2560
        assert f"path: {cache}" in (sweep / job / "config.yaml").read_text()  # the resolved source
