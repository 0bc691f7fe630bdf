"""Shared fixtures: a tiny random Llama behind a real TransformerBridge, and synthetic text. All offline."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

WORDS = (
    "the a one every some cat dog bird model layer token feature vector sparse dense small large red blue "
    "runs sees reads writes learns finds keeps makes quickly slowly often never and but while because"
).split()


def synthetic_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Seeded pseudo-English documents of a few sentences each."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    return docs


def build_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"])
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_model(folder: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """A randomly initialised 2-layer model plus a trained tokenizer, saved as a normal HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    docs = synthetic_documents(200, seed=seed)
    tokenizer = build_tokenizer(docs)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if architecture == "llama":
        config = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    else:
        config = GPTNeoXConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from lm_saes import LanguageModelConfig, TransformerLensLanguageModel

    return TransformerLensLanguageModel(LanguageModelConfig(model_name=str(tiny_model_dir)))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jsonl corpus of synthetic documents (~25K tiny-model tokens)."""
    import json

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(600, seed=1)))
    return path


# --- the real command line, and a finished run for the verbs that read one ----------------------------------

HOOK = "blocks.0.hook_resid_post"


def tiny_overrides(tiny_model_dir: Path, corpus_file: Path, run_dir: Path) -> list[str]:
    return [
        f"model.model_name={tiny_model_dir}",
        f"dataset.dataset_name_or_path={corpus_file}",
        f"sae.hook_point_in={HOOK}",
        "sae.expansion_factor=4",
        "activation_factory.batch_size=256",
        "activation_factory.buffer_size=1024",
        "activation_factory.context_size=32",
        "trainer.total_training_tokens=2560",
        "trainer.log_frequency=5",
        f"hydra.run.dir={run_dir}",
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "lm_saes", *args], capture_output=True, text=True, env=env, timeout=300)


def train_tiny_run(tiny_model_dir: Path, corpus_file: Path, run_dir: Path) -> Path:
    """A finished tiny training run through the real CLI, for the verbs that read a run directory."""
    result = run_cli("train", "+sae=relu_8x", *tiny_overrides(tiny_model_dir, corpus_file, run_dir), "trainer.lr=3e-3")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run, one per test module: the verbs write into it, and each module's tests check
    exactly which files its own verbs added."""
    # A space in the name: the positional run directory must survive Hydra's parser.
    return train_tiny_run(tiny_model_dir, corpus_file, tmp_path_factory.mktemp("run") / "a run")


# --- the real sae-lens, in its own venv (scripts/saelens_venv.sh), driven by tests/saelens_driver.py ----------

REPO = Path(__file__).resolve().parents[1]
SAELENS_DRIVER = REPO / "tests" / "saelens_driver.py"


@pytest.fixture(scope="session")
def saelens_python() -> Path:
    """The sae-lens venv's python, built on first use (a couple of minutes) and cached across runs."""
    try:
        proc = subprocess.run(["bash", str(REPO / "scripts" / "saelens_venv.sh")], capture_output=True, text=True,
                              timeout=1800)
        failure = None if proc.returncode == 0 else f"exit {proc.returncode} {proc.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        failure = "timed out"
    if failure is not None:
        message = f"could not build the sae-lens venv (scripts/saelens_venv.sh): {failure}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: the SAELens round trips must run in CI")
        pytest.skip(message)
    return Path(proc.stdout.strip().splitlines()[-1])


def run_driver(python: Path, jobs: list[dict[str, Any]], folder: Path, driver: Path = SAELENS_DRIVER) -> list[dict[str, Any]]:
    """Run `jobs` (see tests/saelens_driver.py, or tests/sparsify_driver.py) in the peer venv; one answer per job."""
    jobs_file = folder / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    proc = subprocess.run([str(python), str(driver), str(jobs_file)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
