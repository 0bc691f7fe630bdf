"""`lm-saes` through the real command line: help, a full training run, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_saes.cli import main
from tests.conftest import run_cli, tiny_overrides


def test_help_lists_verbs_without_importing_torch() -> None:
    code = "import sys; from lm_saes.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "+sae=relu_8x" in out
    assert out.strip().endswith("False")


def test_unknown_verb(capsys) -> None:
    assert main(["trian"]) == 2
    assert "unknown verb 'trian'; available: train" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "sae: missing; choose a preset with +sae=NAME, one of: batchtopk_8x, gated_8x, jumprelu_8x, "
             "matryoshka_batchtopk_8x, relu_8x, topk_8x, transcoder_relu_8x, transcoder_topk_8x"),
        (["+sae=relu_9x"], "sae=relu_9x: unknown preset; available: batchtopk_8x, gated_8x, jumprelu_8x,"),
        (["+sae=relu_8x", "trainer.lrr=3"], "trainer.lrr=3: unknown key; allowed in trainer: amp_dtype, lr,"),
        (["+sae=relu_8x", "+trainer.lrr=3"], "trainer.lrr=3: unknown key; allowed here: amp_dtype, lr,"),
        (["+sae=relu_8x", "sae.expansion_factr=16"], "sae.expansion_factr=16: unknown key; allowed in sae:"),
        (["+sae=relu_8x", "trainer.lr=fast"], "trainer.lr='fast': Input should be a valid number"),
        (["+sae=relu_8x", "+dataset.splt=test"], "dataset.splt='test': unknown key; allowed here: dataset_name_or_path, split,"),
        (["+sae=relu_8x", "sae.act_fn=gelu"],
         "sae.act_fn='gelu': unknown activation function; allowed: relu, topk, batchtopk, jumprelu"),
        (["+sae=relu_8x", "model=gpt9"], "model=gpt9: unknown preset; available: pythia_160m, smollm2_135m"),
        (["+sae=relu_8x", "trainer.total_training_tokens=100"],
         "trainer.total_training_tokens=100: must be at least one batch (activation_factory.batch_size=1024)"),
        (["+sae=relu_8x", "model.dtype=float8"], "model.dtype='float8': unknown dtype; allowed: float32"),
    ],
)
def test_config_mistakes_are_one_line_before_any_run_directory(overrides, expected, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", *overrides, f"hydra.run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm-saes train: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["hydra/launcher=slrum"], "hydra/launcher=slrum: unknown preset; available: basic, local, slurm,"),
        (["hydra/launcher=slurm", "hydra.launcher.partiton=gpu"],
         "hydra.launcher.partiton=gpu: unknown key; allowed in hydra.launcher: submitit_folder, timeout_min,"),
        (["sae.expansion_factr=8,16"], "sae.expansion_factr=8: unknown key; allowed in sae:"),
        (["sae.expansion_factor=8,16", "model=gpt9"], "model=gpt9: unknown preset; available: pythia_160m, smollm2_135m"),
    ],
)
def test_sweep_structure_mistakes_are_one_line_before_anything_is_launched(overrides, expected, tmp_path, capsys) -> None:
    sweep_dir = tmp_path / "sweep"
    assert main(["train", "-m", "+sae=relu_8x", *overrides, f"hydra.sweep.dir={sweep_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm-saes train: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert not sweep_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sae.d_model=64", "sae.d_model=64: does not match the model's d_model (32)"),
        ("sae.hook_point_in=blocks.5.hook_resid_post", "sae.hook_point_in='blocks.5.hook_resid_post': the model has no such hook point"),
        ("dataset.dataset_name_or_path=/no/such/corpus.jsonl", "'/no/such/corpus.jsonl': no such file or folder"),
        ("dataset.dataset_name_or_path=EMPTY", "the corpus is empty"),
    ],
)
def test_runtime_mistakes_are_one_line_and_leave_a_failed_run(override, expected, tiny_model_dir, corpus_file, tmp_path) -> None:
    if "EMPTY" in override:
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n")
        override = override.replace("EMPTY", str(empty))
    run_dir = tmp_path / "run"
    result = run_cli("train", "+sae=relu_8x", *tiny_overrides(tiny_model_dir, corpus_file, run_dir), override)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("lm-saes train: ")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert not (run_dir / "sae_weights.safetensors").exists()


@pytest.mark.slow
def test_train_end_to_end_through_the_cli(tiny_model_dir, corpus_file, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "+sae=relu_8x", *tiny_overrides(tiny_model_dir, corpus_file, run_dir), "trainer.lr=3e-3"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "sae_weights.safetensors", "config.yaml", "metrics.json", "status.json"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_training_tokens"] == 2560
    config = json.loads((run_dir / "config.json").read_text())
    assert config["d_model"] == 32 and config["expansion_factor"] == 4  # d_model resolved from the model
    resolved = (run_dir / "config.yaml").read_text()
    assert "lr: 0.003" in resolved and "${" not in resolved  # resolved, with the override applied
    # A second run into the same directory refuses to clobber it.
    again = run_cli(*args)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_train_on_the_embedded_default(tmp_path) -> None:
    """The issue's acceptance command, on the real SmolLM2 and the built-in corpus, offline."""
    run_dir = tmp_path / "run"
    result = run_cli("train", "+sae=relu_8x", "trainer.total_training_tokens=50000", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "sae_weights.safetensors", "config.yaml", "metrics.json", "status.json"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_training_tokens"] == 48 * 1024  # 50,000 // 1024 steps of 1024 tokens
    assert metrics["explained_variance"] > 0.3  # a real, if short, reconstruction


@pytest.mark.slow
def test_the_walkthrough_script_runs_with_embedded_names(tmp_path) -> None:
    script = Path(__file__).parents[1] / "scripts" / "walkthrough.py"
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, str(script), "--tokens", "10240", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    from lm_saes import SparseAutoEncoder

    sae = SparseAutoEncoder.from_pretrained(out)
    assert sae.cfg.d_sae == 576 * 8
    assert json.loads((out / "metrics.json").read_text())["n_training_tokens"] == 10240


# --- lm-saes evaluate ----------------------------------------------------------------------------------------

EVAL_KEYS = {
    "mse", "explained_variance", "cosine_similarity", "l2_ratio", "relative_reconstruction_bias",
    "l0", "l1", "dead_fraction", "dense_fraction", "firing_frequency_histogram",
    "ce_loss_clean", "ce_loss_sae", "ce_loss_ablated", "ce_loss_score", "kl_div_sae", "kl_div_ablated", "kl_div_score",
}


@pytest.mark.slow
def test_evaluate_end_to_end_through_the_cli(tiny_run) -> None:
    before = {p.name for p in tiny_run.rglob("*")}
    result = run_cli("evaluate", str(tiny_run), "evaluator.n_contexts=8", "evaluator.ablation=mean")
    assert result.returncode == 0, result.stderr
    assert "ce_loss_score" in result.stdout and "explained_variance" in result.stdout  # the table
    report = json.loads((tiny_run / "eval.json").read_text())
    assert EVAL_KEYS <= set(report), EVAL_KEYS - set(report)
    assert report["ablation"] == "mean" and report["n_contexts"] == 8
    # Held out: past the 2,560 trained + 512 initializer + 1,024 buffer + 4 x 32 in-flight tokens.
    assert report["skip_tokens"] == 2560 + 512 + 1024 + 8 * 32
    assert 0 <= report["kl_div_sae"] and report["ce_loss_clean"] > 0
    assert {p.name for p in tiny_run.rglob("*")} == before | {"eval.json"}  # nothing else touched


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "run_dir: missing; usage: lm-saes evaluate RUN_DIR"),
        (["/no/such/run"], "run_dir='/no/such/run': no such directory"),
        (["RUN", "evaluator.ablaton=mean"], "evaluator.ablaton=mean: unknown key; allowed in evaluator: n_contexts,"),
        (["RUN", "evaluator.ablation=max"], "evaluator.ablation='max': Input should be 'zero' or 'mean'"),
        (["RUN", "+evaluator.bins=3"], "evaluator.bins=3: unknown key; allowed here: n_contexts,"),
        (["RUN", "evaluator.n_contexts=0"], "evaluator.n_contexts=0: Input should be greater than 0"),
        (["NOT_A_RUN"], "no readable status.json: not a training run directory"),
        (["FAILED_RUN"], "status.json says 'failed'; evaluate a finished run (ok)"),
    ],
)
def test_evaluate_mistakes_are_one_line(args, expected, tiny_run, tmp_path, capsys) -> None:
    (tmp_path / "not-a-run").mkdir()
    failed = tmp_path / "failed-run"
    failed.mkdir()
    (failed / "status.json").write_text('{"status": "failed"}')
    paths = {"RUN": str(tiny_run), "NOT_A_RUN": str(tmp_path / "not-a-run"), "FAILED_RUN": str(failed)}
    contents_before = sorted(p.name for p in tiny_run.iterdir())
    assert main(["evaluate", *[paths.get(a, a) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm-saes evaluate: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tiny_run.iterdir()) == contents_before
    assert not Path("/no/such/run").exists()  # Hydra made no directory for a bad run_dir
