"""Sweeps through `hydra/launcher=slurm` on a real single-node SLURM cluster (scripts/slurm_cluster.sh).

The cluster needs Debian's slurmctld, slurmd, slurm-client and munge (`scripts/install.sh --test` installs
them). Where they are missing these tests fail in CI (env CI set) and skip, saying why, elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_saes.report import find_jobs
from tests.conftest import run_cli, synthetic_documents, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
# Small requests, so that both jobs of a sweep fit on a 2-core CI machine at once.
SMALL_JOBS = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
              "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=30"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Bring the loopback cluster up for this module; SLURM_CONF for the clients (sbatch, squeue, scontrol)."""
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(tool) is None]
    if missing:
        message = f"SLURM is not installed (missing {', '.join(missing)}; scripts/install.sh --test installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: the SLURM tests must run in CI")
        pytest.skip(message)
    # A cluster of its own (state folder, free ports), so that a developer's cluster or a second test run on
    # the same machine is left alone.
    ctld_port, slurmd_port = _free_ports(2)
    cluster_env = {**os.environ, "LM_SAES_SLURM_DIR": str(tmp_path_factory.mktemp("slurm")),
                   "LM_SAES_SLURMCTLD_PORT": str(ctld_port), "LM_SAES_SLURMD_PORT": str(slurmd_port)}

    def cluster(action: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(CLUSTER_SCRIPT), action], capture_output=True, text=True, timeout=timeout,
                              env=cluster_env)

    up = cluster("up", timeout=180)
    if up.returncode != 0:
        cluster("down", timeout=60)
        pytest.fail(f"the test cluster did not start:\n{up.stdout}\n{up.stderr}")
    slurm_conf = up.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = slurm_conf  # run_cli passes the environment on to lm-saes, and it to sbatch
    try:
        yield {**os.environ, "SLURM_CONF": slurm_conf}
    finally:
        cluster("down", timeout=60)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_a_two_job_sweep_runs_as_a_slurm_job_array(slurm_cluster, tiny_model_dir, corpus_file, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_model_dir, corpus_file, tmp_path) if not o.startswith("hydra.run")]
    result = run_cli("train", "-m", *SMALL_JOBS, "+sae=relu_8x", *overrides, "sae.expansion_factor=2,4",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    # Each job ran as a task of one sbatch array, not as a local process.
    scripts = list(sweep.glob(".submitit/*/*_submission.sh"))
    assert len(scripts) == 1 and "#SBATCH --array=0-1%" in scripts[0].read_text()
    assert "#SBATCH --job-name=lm-saes" in scripts[0].read_text()
    job_logs = sorted(sweep.glob(".submitit/*_[01]/*_log.out"))
    assert len(job_logs) == 2 and all("Starting with JobEnvironment(job_id=" in p.read_text() for p in job_logs)
    rows = find_jobs(sweep)
    assert [r.status for r in rows] == ["ok", "ok"]
    assert [r.overrides["sae.expansion_factor"] for r in rows] == ["2", "4"]
    assert all(json.loads((sweep / r.job / "status.json").read_text())["metrics"]["n_training_tokens"] == 2560 for r in rows)
    report = run_cli("report", str(sweep))
    assert report.returncode == 0 and "2 ok" in report.stdout, report.stderr


def test_a_job_with_two_tasks_trains_data_parallel(slurm_cluster, tiny_model_dir, corpus_file, tmp_path) -> None:
    """hydra.launcher.tasks_per_node=2: SLURM starts two tasks of one job, which form one gloo process group (from
    the srun step's variables) and split each batch; only rank 0 writes and prints progress."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_model_dir, corpus_file, tmp_path) if not o.startswith("hydra.run")]
    result = run_cli("train", "-m", *SMALL_JOBS, "hydra.launcher.tasks_per_node=2", "+sae=relu_8x", *overrides,
                     "sae.expansion_factor=2", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    task_logs = sorted(sweep.glob(".submitit/*/*_log.out"))
    assert [("global_rank=0(2)" in p.read_text(), "global_rank=1(2)" in p.read_text()) for p in task_logs] == \
        [(True, False), (False, True)]
    assert ["tok/s" in p.read_text() for p in task_logs] == [True, False]  # rank 1 prints no progress
    status = json.loads((sweep / "0" / "status.json").read_text())
    assert status["status"] == "ok" and status["metrics"]["n_training_tokens"] == 2560
    assert json.loads((sweep / "0" / "metrics.json").read_text())["world_size"] == 2


def test_a_slurm_sweep_without_a_cluster_is_one_line_before_anything_is_made(tmp_path, monkeypatch, capsys) -> None:
    from lm_saes.cli import main

    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))  # sbatch, if installed, finds no cluster
    sweep = tmp_path / "sweep"
    assert main(["train", "-m", "hydra/launcher=slurm", "+sae=relu_8x", "sae.expansion_factor=8,16",
                 f"hydra.sweep.dir={sweep}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm-saes train: hydra/launcher='slurm': ") and "hydra/launcher=local" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not sweep.exists()


def test_the_local_launcher_runs_a_sweep_without_slurm(tiny_model_dir, corpus_file, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_model_dir, corpus_file, tmp_path) if not o.startswith("hydra.run")]
    result = run_cli("train", "-m", "hydra/launcher=local", "+sae=relu_8x", *overrides, "sae.expansion_factor=2,4",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2  # each job ran in its own submitit process
    assert [r.status for r in find_jobs(sweep)] == ["ok", "ok"]


def _squeue_state(job_id: str, env: dict[str, str]) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, env=env)
    return out.stdout.strip()


def _wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_a_signalled_job_checkpoints_is_requeued_and_resumes_exactly(slurm_cluster, tiny_model_dir, tmp_path) -> None:
    """Two identical jobs; job 0 gets SLURM's time-limit signal (SIGUSR2, what `--signal=USR2@N` sends) mid-run.
    It must checkpoint, be requeued by submitit, resume in the same run directory, and end with weights equal to
    its uninterrupted twin's."""
    corpus = tmp_path / "docs.jsonl"  # ~250K tokens: enough steps to signal the job while it trains
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(6000, seed=1)))
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_model_dir, corpus, tmp_path) if not o.startswith("hydra.run")
                 and not o.startswith(("activation_factory.batch_size", "activation_factory.buffer_size",
                                       "trainer.total_training_tokens", "trainer.log_frequency"))]
    command = [sys.executable, "-m", "lm_saes", "train", "-m", *SMALL_JOBS, "+sae=relu_8x", *overrides,
               "activation_factory.batch_size=32", "activation_factory.buffer_size=256",
               "trainer.total_training_tokens=96000", "trainer.log_frequency=100", "sae_name=a,b",
               f"hydra.sweep.dir={sweep}"]
    env = {**slurm_cluster, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as sweep_process:
        try:
            # Signal job 0 once it has logged training progress (not while it loads the model).
            _wait_for(lambda: any("tok/s" in p.read_text() for p in sweep.glob(".submitit/*_0/*_log.out")),
                      "job 0 to start training", timeout=120)
            job_dir = next(sweep.glob(".submitit/*_0"))
            job_id = job_dir.name  # ARRAYID_0
            signal = subprocess.run(["scancel", "--signal=USR2", job_id], capture_output=True, text=True, env=env)
            assert signal.returncode == 0, signal.stderr
            _wait_for(lambda: _squeue_state(job_id, env) == "PENDING", "job 0 to be requeued", timeout=60)
            # SLURM holds a requeued job for 2 minutes before it may start again; an administrator can release it
            # at once, and so does this test, to keep CI short. The requeue itself is SLURM's and submitit's.
            # Not within the second of the requeue, though: slurmd refuses a credential created no later than the
            # second it revoked the job's (ctime <= revoked, whole seconds), and kills such a restart as "Job
            # credential revoked"; the job then never runs again (seen once in a CI run).
            time.sleep(2)
            release = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                                     capture_output=True, text=True, env=env)
            assert release.returncode == 0, release.stderr
            output, _ = sweep_process.communicate(timeout=300)
        finally:
            if sweep_process.poll() is None:
                sweep_process.kill()
                subprocess.run(["scancel", "--name=lm-saes"], env=env)
    assert sweep_process.returncode == 0, output[-3000:]
    job0_log = "".join(p.read_text() for p in job_dir.glob("*_log.err"))
    assert "received SIGUSR2 at step" in job0_log and "this job is preempted" in job0_log
    assert "resuming from" in job0_log, job0_log[-3000:]
    rows = find_jobs(sweep)
    assert [r.status for r in rows] == ["ok", "ok"]
    assert [r.metrics["n_training_tokens"] for r in rows] == [96000, 96000]
    interrupted, twin = (load_file(sweep / r.job / "sae_weights.safetensors") for r in rows)
    assert interrupted.keys() == twin.keys()
    for name in interrupted:
        assert torch.equal(interrupted[name], twin[name]), name


def test_a_grouped_sweep_is_one_array_task_per_activation_stream(slurm_cluster, tiny_model_dir, corpus_file,
                                                                 tmp_path) -> None:
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_model_dir, corpus_file, tmp_path) if not o.startswith("hydra.run")]
    result = run_cli("train", "-m", *SMALL_JOBS, "hydra.launcher.grouped=true", "+sae=relu_8x", *overrides,
                     "++sae.top_k=8", "sae.act_fn=relu,topk", "activation_factory.buffer_shuffle.perm_seed=42,7",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    # 4 jobs over 2 streams (the seed varies fastest): 2 array tasks, each group's memory said before submission.
    for line in ("group 0: jobs 0, 2 share one activation stream: 0.00 GiB", "group 1: jobs 1, 3 share"):
        assert line in result.stderr, result.stderr
    scripts = list(sweep.glob(".submitit/*/*_submission.sh"))
    assert len(scripts) == 1 and "#SBATCH --array=0-1%" in scripts[0].read_text()
    task_logs = sorted(sweep.glob(".submitit/*_[01]/*_log.out"))
    assert len(task_logs) == 2 and all("Starting with JobEnvironment(job_id=" in p.read_text() for p in task_logs)
    # Each task trained its group's two jobs side by side (their log lines name their run directories).
    assert [sorted({j for j in "0123" if f"{sweep / j}: 1,280/2,560 tok" in p.read_text()}) for p in task_logs] == \
        [["0", "2"], ["1", "3"]]
    rows = find_jobs(sweep)
    assert [r.status for r in rows] == ["ok"] * 4
    assert [(r.overrides["sae.act_fn"], r.overrides["activation_factory.buffer_shuffle.perm_seed"]) for r in rows] == \
        [("relu", "42"), ("relu", "7"), ("topk", "42"), ("topk", "7")]
