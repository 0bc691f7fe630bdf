"""Shared fixtures: a tiny random Llama behind a real TransformerBridge, and synthetic text. All offline."""

from __future__ import annotations

import os
import random
from pathlib import Path

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
