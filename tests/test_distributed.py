"""Data-parallel training on CPU (gloo, 2 processes): it equals one process on the same global batches.

The trainer's equivalence is tested on synthetic activations, rank r getting its (uneven) part of each global
batch, so the single-process run sees exactly the union of the rows the ranks see at every step; that the
activation stream's ranks together read every forward group exactly once is tested on its own; and
`torchrun ... lm-saes train` is run end to end, through a preemption and its resumption.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lm_saes import (
    ActivationFactory,
    DatasetConfig,
    Initializer,
    InitializerConfig,
    SAEConfig,
    Trainer,
    TrainerConfig,
    load_dataset,
    train_sae,
)
from lm_saes import distributed
from lm_saes.activation.cache import iter_cache_chunks, read_manifest
from lm_saes.checkpoint import CheckpointError, latest_checkpoint_path, load_checkpoint
from lm_saes.distributed import SINGLE, Launch, launch_from_env
from lm_saes.errors import UserInputError
from lm_saes.runners.generate import generate_activations
from lm_saes.trainer import Preempted, TrainingDiverged
from tests.test_activation_cache import _cache_settings, _generate_settings
from tests.conftest import tiny_overrides
from tests.test_train_api import HOOK, _factory_cfg, _settings
from tests.test_trainer import planted_stream

BIN = Path(sys.executable).parent
SPLIT = 100
"""Rank 0's rows of each 256-row global batch (rank 1 has the other 156): uneven, so a plain average of the
ranks' gradients or metrics would be wrong; they must be weighted by rows."""
STEPS = 12


# --- where a process is in the job ----------------------------------------------------------------------

def test_launch_comes_from_torchrun_or_a_slurm_step(tmp_path, monkeypatch) -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29400"}
    assert launch_from_env(torchrun) == Launch(3, 4, 1, "node1", "29400")
    step = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
            "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu07,gpu08"}
    assert launch_from_env(step) == Launch(2, 4, 0, "gpu07", str(20_000 + 123456 % 20_000))
    # A bracketed node list is expanded by scontrol (a stand-in here).
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[07-08]' ] && printf 'gpu07\\ngpu08\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert launch_from_env({**step, "SLURM_JOB_NODELIST": "gpu[07-08]"}).master_addr == "gpu07"
    # A batch script that asked for 4 tasks but runs once (no srun step), and a plain process: one process.
    assert launch_from_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1"}) == SINGLE
    assert launch_from_env({}) == SINGLE


def test_srun_tasks_form_one_process_group(tmp_path) -> None:
    # Two processes with what srun gives each task (and no torchrun variables) find each other.
    code = ("import torch; from lm_saes import distributed\n"
            "with distributed.process_group('cpu') as launch:\n"
            "    total = distributed.all_reduce_sum(torch.tensor([distributed.rank() + 1]))\n"
            "    print(launch.rank, distributed.world_size(), int(total[0]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1",
               MASTER_PORT=str(_free_port()))  # the job id's port may be taken on a shared machine
    tasks = [subprocess.Popen([sys.executable, "-c", code], env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [task.communicate(timeout=120) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["0 2 3", "1 2 3"]


# --- the stream's shares ----------------------------------------------------------------------------------

class _Recording:
    """The model, recording the contexts each forward pass gets."""

    def __init__(self, model: Any) -> None:
        self.model, self.tokenizer, self.groups = model, model.tokenizer, []

    def run_hooks(self, tokens_BT: torch.Tensor, hook_points: list[str]) -> Any:
        self.groups.append(tokens_BT.clone())
        return self.model.run_hooks(tokens_BT, hook_points)


def _stream(model: Any, corpus_file: Path, rank: int, world: int, state=None, **cfg: Any):
    data = {"synthetic": load_dataset(DatasetConfig(dataset_name_or_path=str(corpus_file)))}
    return ActivationFactory(_factory_cfg(**cfg)).process(model=model, model_name="t", datasets=data, state=state,
                                                          rank=rank, world_size=world)


def test_ranks_run_disjoint_forward_groups_that_together_are_all_of_them(tiny_model, corpus_file) -> None:
    single = _Recording(tiny_model)
    single_rows = torch.cat([b["tokens"] for b in _stream(single, corpus_file, 0, 1, buffer_size=None)])
    ranks = [_Recording(tiny_model) for _ in range(2)]
    rank_batches = [list(_stream(r, corpus_file, i, 2, buffer_size=None)) for i, r in enumerate(ranks)]
    assert len(single.groups) > 20
    # Rank r ran groups r, r + 2, ...: disjoint, and together every group of the single-process stream.
    for i, recording in enumerate(ranks):
        expected = single.groups[i::2]
        assert len(recording.groups) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(recording.groups, expected))
    # Each rank's batches are its groups' kept rows in order (FIFO), cut at half the global batch.
    assert {len(b["tokens"]) for b in rank_batches[0][:-1]} == {128}
    total = sum(len(b["tokens"]) for batches in rank_batches for b in batches)
    assert total == len(single_rows)
    for i in range(2):
        mine = torch.cat([b["tokens"] for b in rank_batches[i]])
        assert torch.equal(mine, _kept_tokens(tiny_model, ranks[i].groups))


def _kept_tokens(model: Any, groups: list[torch.Tensor]) -> torch.Tensor:
    tokens = torch.cat([g.flatten() for g in groups])
    return tokens[~torch.isin(tokens, torch.tensor(model.special_token_ids))]


def test_a_rank_resumes_its_own_share_and_shuffles_with_its_own_seed(tiny_model, corpus_file) -> None:
    whole = [b["tokens"] for b in _stream(tiny_model, corpus_file, 1, 2)]
    stream = _stream(tiny_model, corpus_file, 1, 2)
    head = [next(stream)["tokens"] for _ in range(5)]
    tail = [b["tokens"] for b in _stream(tiny_model, corpus_file, 1, 2, state=stream.state_dict())]
    assert len(head) + len(tail) == len(whole)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, whole))
    assert stream.batcher.generator.initial_seed() == 42 + 1


@pytest.fixture(scope="module")
def cache(tiny_model_dir, corpus_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "acts"  # ~22K rows in shards of 3,000: slices cross shard ends
    generate_activations(_generate_settings(tiny_model_dir, corpus_file, out))
    return out


def _cache_stream(cache: Path, rank: int, world: int, state=None):
    factory_cfg = _cache_settings(Path("unused"), Path("unused"), cache, Path("unused")).activation_factory
    factory_cfg.buffer_size = None  # FIFO: each rank's rows in the order it read them
    return ActivationFactory(factory_cfg).process(model=None, model_name="t", state=state, rank=rank, world_size=world)


def test_ranks_read_disjoint_cache_slices_that_together_are_all_of_them(cache) -> None:
    manifest = read_manifest(cache, "cache")
    slices = list(iter_cache_chunks(cache, manifest, ["tokens"], start_row=0, chunk_rows=256))
    assert len(slices) > 20 and len({first // 256 % 2 for first, _ in slices}) == 2
    for rank in range(2):
        batches = list(_cache_stream(cache, rank, 2))
        assert {len(b["tokens"]) for b in batches[:-1]} == {128}  # half the global batch
        mine = [rows["tokens"] for first, rows in slices if first // 256 % 2 == rank]
        assert torch.equal(torch.cat([b["tokens"] for b in batches]), torch.cat(mine))
    assert sum(len(rows["tokens"]) for _, rows in slices) == manifest.n_rows  # the two shares are every row
    # A rank resumes its own share mid-way.
    whole = [b["tokens"] for b in _cache_stream(cache, 1, 2)]
    stream = _cache_stream(cache, 1, 2)
    head = [next(stream)["tokens"] for _ in range(9)]
    tail = [b["tokens"] for b in _cache_stream(cache, 1, 2, state=stream.state_dict())]
    assert len(head) + len(tail) == len(whole)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, whole))


def test_a_batch_that_does_not_split_evenly_among_ranks_is_refused(tiny_model, corpus_file) -> None:
    with pytest.raises(UserInputError, match=r"activation_factory.batch_size=256: must be divisible by the number of "
                                             r"data-parallel processes \(3\)"):
        _stream(tiny_model, corpus_file, 0, 3)


# --- the trainer: two ranks against one process -----------------------------------------------------------

def _sae(act_fn: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = SAEConfig(hook_point_in="h", d_model=16, expansion_factor=4, act_fn=act_fn, top_k=4)
    return Initializer(InitializerConfig(seed=seed)).initialize_sae_from_config(cfg, planted_stream(2, seed=99 + seed))


def _trainer(run_dir: Path, **kw: Any) -> Trainer:
    # AuxK is normalised by each rank's residual (see README), so it stays off here: equality is the point.
    return Trainer(TrainerConfig(**{"lr": 3e-3, "l1_coefficient": 0.3, "total_training_tokens": 256 * STEPS,
                                    "log_frequency": 4, "exp_result_path": str(run_dir),
                                    "dead_feature_window": 10**9, **kw}))


def _share(rank: int, n_batches: int, poison_at: int | None = None, signal_at: int | None = None):
    """Rank `rank`'s rows of each global batch of planted_stream."""
    for i, batch in enumerate(planted_stream(n_batches)):
        part = {k: v[:SPLIT] if rank == 0 else v[SPLIT:] for k, v in batch.items()}
        if i == poison_at:
            part["h"][0, 0] = float("nan")
        if i == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        yield part


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: Path) -> None:
    """One of two ranks: every scenario in turn, weights and messages saved under `out` for the tests."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    messages: dict[str, str] = {}
    with distributed.process_group("cpu") as launch:
        assert launch.world_size == 2 and distributed.rank() == rank
        threads = {"open": _gloo_threads()}
        for act_fn in ("relu", "topk", "jumprelu", "batchtopk"):
            sae = _sae(act_fn, seed=rank)  # rank 1 starts elsewhere: the broadcast must fix that
            distributed.broadcast_module_(sae)
            _trainer(out / f"{act_fn}.rank{rank}").fit(sae, _share(rank, STEPS))
            save_file(sae.state_dict(), str(out / f"{act_fn}.rank{rank}.safetensors"))
        # Rank 1's share ends a batch early: both stop there.
        sae = _sae("relu")
        _trainer(out / f"short.rank{rank}").fit(sae, _share(rank, STEPS - 1 if rank else STEPS))
        save_file(sae.state_dict(), str(out / f"short.rank{rank}.safetensors"))
        for name, kw in (("diverged", {"poison_at": 2 if rank else None}), ("preempted", {"signal_at": 3 if rank else None})):
            try:
                _trainer(out / f"{name}.rank{rank}").fit(_sae("relu"), _share(rank, STEPS, **kw))
            except (TrainingDiverged, Preempted) as e:
                messages[name] = f"{type(e).__name__}: {e}"
    threads["closed"] = _gloo_threads()
    (out / f"messages.rank{rank}.json").write_text(json.dumps(messages))
    (out / f"threads.rank{rank}.json").write_text(json.dumps(threads))


def _gloo_threads() -> list[str]:
    """The names of this process's threads that gloo runs (its worker and socket threads), as Linux lists them."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append((task / "comm").read_text().strip())
    return sorted(name for name in names if "gloo" in name)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    return out


def _single(act_fn: str, run_dir: Path, n_batches: int = STEPS) -> dict[str, torch.Tensor]:
    sae = _sae(act_fn)
    _trainer(run_dir).fit(sae, planted_stream(n_batches))
    return sae.state_dict()


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("act_fn", ["relu", "topk", "jumprelu"])
def test_two_ranks_train_like_one_process_on_the_global_batch(act_fn, two_ranks, tmp_path) -> None:
    single = _single(act_fn, tmp_path / "single")
    start = _sae(act_fn).state_dict()
    for rank in range(2):
        ranked = load_file(str(two_ranks / f"{act_fn}.rank{rank}.safetensors"))
        _assert_close(ranked, single)
        assert not torch.allclose(ranked["W_E"], start["W_E"], atol=1e-3)  # it did train
    written, expected = (json.loads((d / "metrics.json").read_text()) for d in (two_ranks / f"{act_fn}.rank0", tmp_path / "single"))
    for key in ("explained_variance", "l0", "mse", "sparsity_loss", "dead_fraction", "n_dense"):
        assert written[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert written["n_training_tokens"] == expected["n_training_tokens"] == 256 * STEPS
    assert written["world_size"] == 2 and expected["world_size"] == 1
    assert not (two_ranks / f"{act_fn}.rank1").exists()  # rank 1 wrote nothing


@pytest.mark.slow
def test_batchtopk_ranks_keep_one_threshold(two_ranks) -> None:
    # Each rank picks its own batch's top k x rows, so this differs from one process; but the ranks agree.
    rank0, rank1 = (load_file(str(two_ranks / f"batchtopk.rank{r}.safetensors")) for r in range(2))
    assert rank0["activation_function.threshold"] > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


@pytest.mark.slow
def test_ranks_stop_together_when_one_share_ends(two_ranks, tmp_path) -> None:
    single = _single("relu", tmp_path / "single", n_batches=STEPS - 1)
    for rank in range(2):
        _assert_close(load_file(str(two_ranks / f"short.rank{rank}.safetensors")), single)
    assert json.loads((two_ranks / "short.rank0" / "metrics.json").read_text())["n_training_tokens"] == 256 * (STEPS - 1)


@pytest.mark.slow
def test_divergence_and_preemption_on_one_rank_stop_both_at_the_same_step(two_ranks) -> None:
    rank0, rank1 = (json.loads((two_ranks / f"messages.rank{r}.json").read_text()) for r in range(2))
    assert rank1["diverged"].startswith("TrainingDiverged: training diverged: the loss became nan at step 2;")
    assert rank0["diverged"].startswith("TrainingDiverged: training diverged: the loss became non-finite on another rank at step 2;")
    # The signal came while rank 1 fetched step 3's batch: both ranks finish step 3, rank 0 saves, both stop.
    assert rank1["preempted"].startswith("Preempted: received SIGUSR1 at step 4: saved a checkpoint (rank 0)")
    checkpoint = two_ranks / "preempted.rank0" / "checkpoints" / "step_00000004"
    assert rank0["preempted"].startswith(f"Preempted: another rank received a preemption signal at step 4: saved {checkpoint};")
    assert load_checkpoint(checkpoint).meta["world_size"] == 2
    assert not (two_ranks / "preempted.rank1").exists()


@pytest.mark.slow
def test_closing_the_process_group_stops_its_threads(two_ranks) -> None:
    # Training imports torch._dynamo (Adam's first step), and it torch.distributed.nn.functional, whose default
    # arguments would hold the live group: it then outlived destroy_process_group, and its threads were torn down
    # at interpreter exit, where a loaded machine saw rank 1 abort ("terminate called without an active exception").
    for rank in range(2):
        threads = json.loads((two_ranks / f"threads.rank{rank}.json").read_text())
        assert threads["open"], "gloo's threads are not named as expected: this test would check nothing"
        assert threads["closed"] == [], rank


# --- torchrun, end to end ---------------------------------------------------------------------------------

def test_a_sweep_under_torchrun_is_refused(monkeypatch, capsys) -> None:
    from lm_saes.cli import main

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "-m", "+sae=relu_8x", "trainer.lr=1e-4,3e-4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm-saes train: -m under torchrun or srun would run the whole sweep in every process;")
    assert len(err.strip().splitlines()) == 1


def _torchrun(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env or {})})


@pytest.mark.slow
def test_torchrun_lm_saes_train_makes_one_run_directory(tiny_model_dir, corpus_file, tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # A run directory named after the rank stands for Hydra's runs/DATE/TIME, which the ranks' clocks may name apart.
    overrides = [*tiny_overrides(tiny_model_dir, corpus_file, work), "hydra.run.dir=runs/rank${oc.env:RANK}"]
    command = ["--no-python", str(BIN / "lm-saes"), "train", "+sae=relu_8x", *overrides]
    result = _torchrun(*command, cwd=work)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in work.iterdir()] == ["runs"]  # rank 1 made no directory of its own, here or there
    assert [p.name for p in (work / "runs").iterdir()] == ["rank0"]
    run = work / "runs" / "rank0"
    assert json.loads((run / "status.json").read_text())["status"] == "ok"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_training_tokens"] == 2560 and metrics["world_size"] == 2
    # Only rank 0 prints: 10 steps logged every 5 is two metric lines, and one closing line.
    assert len([line for line in result.stdout.splitlines() if "explained_variance=" in line]) == 2, result.stdout
    assert result.stderr.count("done: ") == 1, result.stderr

    # Again into the finished run: rank 0 refuses, and rank 1 stops with it rather than wait at a collective.
    again = _torchrun(*command, cwd=work, timeout=180)
    assert again.returncode != 0
    assert "lm-saes train: rank 0 stopped: RunDirectoryError:" in again.stderr, again.stderr
    assert "already holds a finished run" in again.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "ok"  # untouched


@pytest.mark.slow
def test_torchrun_trains_from_an_activation_cache(tiny_model_dir, corpus_file, cache, tmp_path) -> None:
    overrides = [o for o in tiny_overrides(tiny_model_dir, corpus_file, tmp_path / "run")
                 if not o.startswith(("dataset.", "sae.hook_point_in"))]
    result = _torchrun("--no-python", str(BIN / "lm-saes"), "train", "+sae=relu_8x", *overrides,
                       f"sae.hook_point_in={HOOK}", "activation_factory=cached", f"activation_cache={cache}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_training_tokens"] == 2560 and metrics["world_size"] == 2


DRIVER = Path(__file__).with_name("kill_driver.py")


@pytest.mark.slow
def test_torchrun_preempted_on_one_rank_resumes_to_the_uninterrupted_weights(tiny_model_dir, corpus_file, tmp_path) -> None:
    def settings_file(name: str, n_checkpoints: int) -> tuple[Path, Any]:
        settings = _settings(tiny_model_dir, corpus_file, tmp_path / name, n_checkpoints=n_checkpoints,
                             total_training_tokens=256 * 40)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(settings.model_dump(mode="json")))
        return path, settings

    whole_file, _ = settings_file("whole", n_checkpoints=4)
    result = _torchrun(str(DRIVER), str(whole_file), "0")
    assert result.returncode == 0, result.stderr

    # Each rank's initializer takes 2 batches: rank 1's batch 20 is step 18. Only rank 1 gets the signal.
    preempted_file, settings = settings_file("preempted", n_checkpoints=0)
    result = _torchrun(str(DRIVER), str(preempted_file), "20", "SIGUSR1", env={"SIGNAL_RANK": "1"})
    assert result.returncode != 0 and "received SIGUSR1 at step 18" in result.stderr, result.stderr
    run = tmp_path / "preempted"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "preempted", status
    assert status["error"].startswith("another rank received a preemption signal at step 18")
    checkpoint = load_checkpoint(latest_checkpoint_path(run))
    assert checkpoint.path.name == "step_00000018" and checkpoint.meta["world_size"] == 2
    assert {k.split(".")[1] for k in checkpoint.tensors if k.startswith("stream.")} == {"rank0", "rank1"}

    with pytest.raises(CheckpointError, match="written by 2 data-parallel processes, this run has 1"):
        train_sae(settings)  # one process cannot take over two ranks' streams

    result = _torchrun(str(DRIVER), str(preempted_file), "0")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "ok"
    whole, resumed = (load_file(str(d / "sae_weights.safetensors")) for d in (tmp_path / "whole", run))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
