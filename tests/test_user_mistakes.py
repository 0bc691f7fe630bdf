"""Every user mistake the project knows, in one table: each is one line `lm-saes VERB: key=value: ...` on stderr,
exit code 2, no traceback, and nothing left that looks finished.

To add a mistake, add a row. Placeholders in the arguments, in braces: {TINY} (the tiny model, corpus and budget, see
conftest.tiny_overrides), RUN (a finished tiny run), NOT_A_RUN (an empty folder), FAILED_RUN (a run whose
status.json says failed), FUTURE (an analysis of a newer format), CACHE (an activation cache of the tiny model),
GROUPMAX (a sparsify folder of a groupmax SAE), OTHER_HOOK and OTHER_D_MODEL (copies of RUN whose SAE config names blocks.1 or d_model 64), EMPTY_TXT (a 0-byte .txt), BLANK_TXT (blank lines only), EMPTY_JSONL, BAD_JSONL (a malformed line), SHORT (one
short document). `before` rows run in-process and must fail before any directory is made; `runtime` rows run
the real command line and fail once the model or data is loaded, leaving status.json `failed` (`no_status`: the
run directory itself could not be made).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import save_file

from lm_saes.cli import main
from tests.conftest import run_cli, tiny_overrides

SAE_PRESETS = ("batchtopk_8x, gated_8x, jumprelu_8x, matryoshka_batchtopk_8x, relu_8x, topk_8x, transcoder_relu_8x, "
               "transcoder_topk_8x")


@dataclass(frozen=True)
class Mistake:
    verb: str
    args: tuple[str, ...]
    expected: str
    when: Literal["before", "runtime", "no_status"] = "before"


def row(verb: str, args: list[str], expected: str, when: Literal["before", "runtime", "no_status"] = "before"):
    return pytest.param(Mistake(verb, tuple(args), expected, when), id=f"{verb} {' '.join(args)}"[:80])


MISTAKES = [
    # --- train: the composed config --------------------------------------------------------------------------
    row("train", [], f"sae: missing; choose a preset with +sae=NAME, one of: {SAE_PRESETS}"),
    row("train", ["+sae=relu_9x"], "sae=relu_9x: unknown preset; available: batchtopk_8x, gated_8x, jumprelu_8x,"),
    row("train", ["+sae=relu_8x", "trainer.lrr=3"], "trainer.lrr=3: unknown key; allowed in trainer: amp_dtype, lr,"),
    row("train", ["+sae=relu_8x", "+trainer.lrr=3"], "trainer.lrr=3: unknown key; allowed here: amp_dtype, lr,"),
    row("train", ["+sae=relu_8x", "sae.expansion_factr=16"], "sae.expansion_factr=16: unknown key; allowed in sae:"),
    row("train", ["+sae=relu_8x", "trainer.lr=fast"], "trainer.lr='fast': Input should be a valid number"),
    row("train", ["+sae=relu_8x", "+dataset.splt=test"],
        "dataset.splt='test': unknown key; allowed here: dataset_name_or_path, split,"),
    row("train", ["+sae=matryoshka_batchtopk_8x", "sae.matryoshka_prefix_weights=[1,1]"],
        "sae.matryoshka_prefix_weights=[1.0, 1.0]: one non-negative weight per prefix, 3 here"),
    row("train", ["+sae=relu_8x", "sae.act_fn=gelu"],
        "sae.act_fn='gelu': unknown activation function; allowed: relu, topk, batchtopk, jumprelu"),
    row("train", ["+sae=relu_8x", "model=gpt9"], "model=gpt9: unknown preset; available: pythia_160m, smollm2_135m"),
    row("train", ["+sae=relu_8x", "trainer.total_training_tokens=100"],
        "trainer.total_training_tokens=100: must be at least one batch (activation_factory.batch_size=1024)"),
    row("train", ["+sae=relu_8x", "model.dtype=float8"], "model.dtype='float8': unknown dtype; allowed: float32"),
    row("train", ["+sae=relu_8x", "activation_factory.batch_size=100000", "trainer.total_training_tokens=100000"],
        "activation_factory.buffer_size=8192: must be at least activation_factory.batch_size (100000)"),
    row("train", ["+sae=relu_8x", "device=cuda"], "device='cuda': CUDA is not available on this machine"),
    row("train", ["+sae=relu_8x", "sae.device=cuda"], "sae.device='cuda': CUDA is not available on this machine"),
    # --- train: a sweep's structure, before anything is launched ----------------------------------------------
    row("train", ["-m", "+sae=relu_8x", "hydra/launcher=slrum"],
        "hydra/launcher=slrum: unknown preset; available: basic, grouped, local, slurm,"),
    row("train", ["-m", "+sae=relu_8x", "hydra/launcher=slurm", "hydra.launcher.partiton=gpu"],
        "hydra.launcher.partiton=gpu: unknown key; allowed in hydra.launcher: submitit_folder, timeout_min,"),
    row("train", ["-m", "+sae=relu_8x", "sae.expansion_factr=8,16"], "sae.expansion_factr=8: unknown key; allowed in sae:"),
    row("train", ["-m", "+sae=relu_8x", "sae.expansion_factor=8,16", "model=gpt9"],
        "model=gpt9: unknown preset; available: pythia_160m, smollm2_135m"),
    # --- train from an activation cache ------------------------------------------------------------------------
    row("train", ["+sae=relu_8x", "activation_factory=cached"],
        "activation_cache: missing; activation_factory=cached trains from the activation cache at activation_cache=DIR"),
    row("train", ["+sae=relu_8x", "activation_factory=cached", "activation_cache=/no/such"],
        "activation_cache='/no/such': no such directory"),
    row("train", ["+sae=relu_8x", "activation_factory=cached", "activation_cache={CACHE}"],
        "model.model_name='builtin:smollm2-135m': the activation cache {CACHE} holds"),
    row("train", ["+sae=relu_8x", "activation_factory=cached", "activation_factory.sources=[{type:activations,pth:x}]"],
        "activation_factory.sources.0.pth='x': unknown key; allowed here: type, path"),
    row("train", ["+sae=relu_8x", "activation_factory=cached", "activation_factory.sources=[{type:cache}]"],
        "activation_factory.sources.0={'type': 'cache'}: unknown type 'cache'; allowed: 'dataset', 'activations'"),
    row("train", ["-m", "+sae=relu_8x", "activation_factory=cached", "activation_cache=/no/such", "sae.expansion_factor=2,4"],
        "activation_cache='/no/such': no such directory"),
    # --- train: found once the model or the data is loaded ---------------------------------------------------
    row("train", ["+sae=relu_8x", "{TINY}", "sae.d_model=64"], "sae.d_model=64: does not match the model's d_model (32)",
        "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "sae.hook_point_in=blocks.5.hook_resid_post"],
        "sae.hook_point_in='blocks.5.hook_resid_post': the model has no such hook point", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "dataset.dataset_name_or_path=/no/such/corpus.jsonl"],
        "'/no/such/corpus.jsonl': no such file or folder", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "dataset.dataset_name_or_path={BLANK_TXT}"], "the corpus is empty", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "dataset.dataset_name_or_path={EMPTY_TXT}"],
        "dataset.dataset_name_or_path='{EMPTY_TXT}': the corpus is empty: it gave no text tokens", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "dataset.dataset_name_or_path={EMPTY_JSONL}"],
        "dataset.dataset_name_or_path='{EMPTY_JSONL}': the corpus is empty: it gave no text tokens", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "dataset.dataset_name_or_path={BAD_JSONL}"],
        "dataset.dataset_name_or_path='{BAD_JSONL}': cannot be read as json files", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "dataset.dataset_name_or_path={SHORT}"],
        "dataset.dataset_name_or_path='{SHORT}': the corpus holds only 6 text tokens, fewer than one context of "
        "activation_factory.context_size=32", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "dataset.dataset_name_or_path=nobody/no-such-corpus"],
        "dataset.dataset_name_or_path='nobody/no-such-corpus': cannot load it from the Hugging Face hub", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "model.model_name=nobody/no-such-model"],
        "model.model_name='nobody/no-such-model': cannot load it (", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "activation_factory.context_size=1000000"],
        "activation_factory.context_size=1000000: longer than the model's context window (128 tokens)", "runtime"),
    row("train", ["+sae=relu_8x", "{TINY}", "trainer.exp_result_path=/proc/lm-saes-run"],
        "trainer.exp_result_path='/proc/lm-saes-run': cannot create or write the run directory there", "no_status"),
    # --- generate -------------------------------------------------------------------------------------------
    row("generate", ["{CACHE}", "context_size=1"], "context_size=1: Input should be greater than or equal to 2"),
    row("generate", [], "output_dir: missing; usage: lm-saes generate OUTPUT_DIR"),
    row("generate", ["{NOT_A_RUN}", "device=cuda"], "device='cuda': CUDA is not available on this machine"),
    # --- evaluate --------------------------------------------------------------------------------------------
    row("evaluate", [], "run_dir: missing; usage: lm-saes evaluate RUN_DIR"),
    row("evaluate", ["/no/such/run"], "run_dir='/no/such/run': no such directory"),
    row("evaluate", ["{RUN}", "evaluator.ablaton=mean"], "evaluator.ablaton=mean: unknown key; allowed in evaluator: n_contexts,"),
    row("evaluate", ["{RUN}", "evaluator.ablation=max"], "evaluator.ablation='max': Input should be 'zero' or 'mean'"),
    row("evaluate", ["{RUN}", "+evaluator.bins=3"], "evaluator.bins=3: unknown key; allowed here: n_contexts,"),
    row("evaluate", ["{RUN}", "evaluator.n_contexts=0"], "evaluator.n_contexts=0: Input should be greater than 0"),
    row("evaluate", ["{NOT_A_RUN}"], "no readable status.json: not a training run directory"),
    row("evaluate", ["{FAILED_RUN}"], "status.json says 'failed'; evaluate a finished run (ok)"),
    row("evaluate", ["{GROUPMAX}"], "{GROUPMAX}/cfg.json: activation='groupmax': only topk is importable"),
    row("analyze", ["{GROUPMAX}"], "{GROUPMAX}/cfg.json: activation='groupmax': only topk is importable"),
    row("evaluate", ["{RUN}", "device=cuda"], "device='cuda': CUDA is not available on this machine"),
    row("analyze", ["{RUN}", "device=cuda:1"], "device='cuda:1': CUDA is not available on this machine"),
    row("evaluate", ["{RUN}", "evaluator.context_size=4096"],
        "evaluator.context_size=4096: longer than the model's context window (128 tokens)", "no_status"),
    # --- export ---------------------------------------------------------------------------------------------
    row("export", [], "run_dir: missing; usage: lm-saes export RUN_DIR OUT_DIR"),
    row("export", ["{RUN}"], "out_dir: missing; usage: lm-saes export RUN_DIR OUT_DIR"),
    row("export", ["{NOT_A_RUN}", "/tmp/lm-saes-export"], "no readable status.json: not a training run directory"),
    row("export", ["{RUN}", "{NOT_A_RUN}", "format=sparsify"], "format='sparsify': Input should be 'saelens'"),
    # --- inspect and compare --------------------------------------------------------------------------------
    row("inspect", [], "run_dir: missing; usage: lm-saes inspect RUN_DIR TEXT"),
    row("inspect", ["{RUN}"], "text: missing; usage: lm-saes inspect RUN_DIR TEXT"),
    row("inspect", ["/no/such/run", "some text"], "run_dir='/no/such/run': no such directory"),
    row("inspect", ["{NOT_A_RUN}", "some text"], "no readable status.json: not a training run directory"),
    row("inspect", ["{RUN}", ""], "text='': no text tokens; give some text"),
    row("inspect", ["{RUN}", " \n "], "text=' \\n ': no text tokens; give some text"),
    row("inspect", ["{RUN}", "some text", "n_latents=0"], "n_latents=0: Input should be greater than 0"),
    row("inspect", ["{RUN}", "some text", "device=cuda"], "device='cuda': CUDA is not available on this machine"),
    row("inspect", ["{RUN}", "<bos><eos>"], "text='<bos><eos>': no text tokens; give some text", "no_status"),
    row("compare", [], "run_a: missing; usage: lm-saes compare RUN_A RUN_B"),
    row("compare", ["{RUN}"], "run_b: missing; usage: lm-saes compare RUN_A RUN_B"),
    row("compare", ["{RUN}", "/no/such/run"], "run_b='/no/such/run': no such directory"),
    row("compare", ["{NOT_A_RUN}", "{RUN}"], "run_a='{NOT_A_RUN}': no readable status.json: not a training run directory"),
    row("compare", ["{RUN}", "{FAILED_RUN}"], "run_b='{FAILED_RUN}': status.json says 'failed'"),
    row("compare", ["{RUN}", "{OTHER_HOOK}"],
        "run_b='{OTHER_HOOK}': hook point blocks.1.hook_resid_post differs from run_a's blocks.0.hook_resid_post"),
    row("compare", ["{RUN}", "{OTHER_D_MODEL}"], "run_b='{OTHER_D_MODEL}': d_model 64 differs from run_a's 32"),
    row("compare", ["{RUN}", "{RUN}", "device=cuda"], "device='cuda': CUDA is not available on this machine"),
    # --- analyze and dashboard -------------------------------------------------------------------------------
    row("analyze", [], "run_dir: missing; usage: lm-saes analyze RUN_DIR"),
    row("analyze", ["/no/such/run"], "run_dir='/no/such/run': no such directory"),
    row("analyze", ["/no/such/run", "analysis.n_token=5"], "analysis.n_token=5: unknown key; allowed in analysis: n_tokens,"),
    row("analyze", ["/no/such/run", "analysis.n_tokens=0"], "analysis.n_tokens=0: Input should be greater than 0"),
    row("analyze", ["{NOT_A_RUN}"], "no readable status.json: not a training run directory"),
    row("dashboard", [], "run_dir: missing; usage: lm-saes dashboard RUN_DIR"),
    row("dashboard", ["{NOT_A_RUN}"], "no analysis/analysis.json and features.safetensors; run `lm-saes analyze RUN_DIR` first"),
    row("dashboard", ["{FUTURE}"], "has format_version 7; this lm_saes reads version 1"),
    row("dashboard", ["{NOT_A_RUN}", "dashboard.n_top_examples=-1"],
        "dashboard.n_top_examples=-1: Input should be greater than or equal to 0"),
]


@pytest.fixture(scope="module")
def places(tiny_model_dir, corpus_file, tiny_run, tmp_path_factory) -> dict[str, str]:
    """The placeholders' paths; made once, and checked unchanged by every row."""
    from lm_saes.runners.generate import generate_activations
    from tests.test_activation_cache import _generate_settings

    root = tmp_path_factory.mktemp("mistakes")
    (root / "not-a-run").mkdir()
    (root / "failed-run").mkdir()
    (root / "failed-run" / "status.json").write_text('{"status": "failed"}')
    future = root / "future" / "analysis"
    future.mkdir(parents=True)
    (future / "analysis.json").write_text('{"format_version": 7}')
    (future / "features.safetensors").write_bytes(b"")
    files = {"EMPTY_TXT": ("empty.txt", ""), "BLANK_TXT": ("blank.txt", "\n\n"), "EMPTY_JSONL": ("empty.jsonl", ""),
             "BAD_JSONL": ("bad.jsonl", '{"text": "fine"}\n{"text": broken\n'),
             "SHORT": ("short.jsonl", json.dumps({"text": "The cat sees a dog."}) + "\n")}
    for name, text in files.values():
        (root / name).write_text(text)
    for name, change in (("other-hook", {"hook_point_in": "blocks.1.hook_resid_post"}), ("other-d-model", {"d_model": 64})):
        shutil.copytree(tiny_run, root / name)
        config = root / name / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    groupmax = root / "groupmax" / "layers.1"  # a sparsify folder (tests/test_interop_sparsify.py has real ones)
    groupmax.mkdir(parents=True)
    (groupmax / "cfg.json").write_text(json.dumps({"activation": "groupmax", "k": 4, "num_latents": 64, "d_in": 32}))
    save_file({"encoder.weight": torch.zeros(64, 32), "encoder.bias": torch.zeros(64), "W_dec": torch.zeros(64, 32),
               "b_dec": torch.zeros(32)}, str(groupmax / "sae.safetensors"))
    cache = root / "cache"
    generate_activations(_generate_settings(tiny_model_dir, corpus_file, cache, total_tokens=2000))
    return {"RUN": str(tiny_run), "NOT_A_RUN": str(root / "not-a-run"), "FAILED_RUN": str(root / "failed-run"),
            "FUTURE": str(root / "future"), "CACHE": str(cache),
            "OTHER_HOOK": str(root / "other-hook"), "OTHER_D_MODEL": str(root / "other-d-model"),
            "GROUPMAX": str(groupmax), **{k: str(root / n) for k, (n, _) in files.items()}}


def _snapshot(places: dict[str, str]) -> dict[str, list[str]]:
    return {k: sorted(str(p) for p in Path(v).rglob("*")) for k, v in places.items() if Path(v).is_dir()}


def _args(mistake: Mistake, places: dict[str, str], tiny: list[str], out: Path) -> list[str]:
    args: list[str] = []
    for arg in mistake.args:
        if arg == "{TINY}":
            args += tiny
            continue
        for name, path in places.items():
            arg = arg.replace(f"{{{name}}}", path)
        args.append(arg)
    if mistake.verb == "train":
        args.append(f"hydra.sweep.dir={out}" if "-m" in args else f"hydra.run.dir={out}")
    return args


def _expected(mistake: Mistake, places: dict[str, str]) -> str:
    expected = mistake.expected
    for name, path in places.items():
        expected = expected.replace(f"{{{name}}}", path)
    return expected


@pytest.mark.parametrize("mistake", [p for p in MISTAKES if p.values[0].when == "before"])
def test_mistakes_found_before_any_directory_is_made(mistake: Mistake, places, tmp_path, capsys) -> None:
    out, before = tmp_path / "out", _snapshot(places)
    assert main([mistake.verb, *_args(mistake, places, [], out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lm-saes {mistake.verb}: ") and _expected(mistake, places) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not Path("/no/such/run").exists()
    assert _snapshot(places) == before  # nothing written into the runs and folders the command named


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [p for p in MISTAKES if p.values[0].when != "before"])
def test_mistakes_found_at_run_time(mistake: Mistake, places, tiny_model_dir, corpus_file, tmp_path) -> None:
    out, before = tmp_path / "out", _snapshot(places)
    tiny = tiny_overrides(tiny_model_dir, corpus_file, out)[:-1]  # without hydra.run.dir: _args adds it
    result = run_cli(mistake.verb, *_args(mistake, places, tiny, out))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith(f"lm-saes {mistake.verb}: ")]
    assert len(lines) == 1 and _expected(mistake, places) in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    if mistake.when == "runtime":
        assert json.loads((out / "status.json").read_text())["status"] == "failed"
    assert not list(out.rglob("sae_weights.safetensors")) and not list(out.rglob("metrics.json"))
    assert _snapshot(places) == before


# --- the safety net: what is not a user's mistake is one line too, with the traceback kept -------------------

CRASH = """
import sys
import lm_saes.trainer
def crash(*args, **kwargs):
    raise RuntimeError("injected deep in the trainer")
lm_saes.trainer.Trainer.fit = crash
from lm_saes.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_crashing(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("LM_SAES_DEBUG", "HYDRA_FULL_ERROR")}
    return subprocess.run([sys.executable, "-c", CRASH, *args], capture_output=True, text=True, timeout=300,
                          env={**environ, "HF_HUB_OFFLINE": "1", **env})


@pytest.mark.slow
def test_an_unexpected_error_is_one_line_naming_its_traceback_file(tiny_model_dir, corpus_file, tmp_path) -> None:
    out = tmp_path / "run"
    result = _run_crashing(["train", "+sae=relu_8x", *tiny_overrides(tiny_model_dir, corpus_file, out)])
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("lm-saes train: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "internal error: RuntimeError: injected deep in the trainer" in lines[0]
    assert f"traceback in {out / 'traceback.txt'}" in lines[0]
    saved = (out / "traceback.txt").read_text()
    assert saved.startswith("Traceback") and "def crash" not in saved and "injected deep in the trainer" in saved
    assert "in crash" in saved  # the frame where it was raised
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    assert not (out / "sae_weights.safetensors").exists()
    # LM_SAES_DEBUG=1 shows the traceback itself.
    debug = _run_crashing(["train", "+sae=relu_8x", *tiny_overrides(tiny_model_dir, corpus_file, tmp_path / "run2")],
                          LM_SAES_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "injected deep in the trainer" in debug.stderr


def test_an_unexpected_error_before_the_run_is_one_line_too(monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise KeyError("injected into the pre-check")

    monkeypatch.delenv("LM_SAES_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr("lm_saes.cli.verbs.settings_from_config", broken)
    assert main(["train", "+sae=relu_8x"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("lm-saes train: internal error: KeyError: 'injected into the pre-check' (traceback in ")
    saved = Path(err.split("(traceback in ")[1].split(";")[0])
    assert "injected into the pre-check" in saved.read_text() and "in broken" in saved.read_text()
    saved.unlink()
