import json

import pytest

from lm_saes import DatasetConfig, load_dataset
from lm_saes.datasets import builtin_documents
from lm_saes.errors import UserInputError


def test_builtin_corpus_is_offline_english_prose() -> None:
    docs = builtin_documents()
    assert len(docs) > 300 and sum(map(len, docs)) > 1_000_000
    assert any("The \"for\" statement" in d for d in docs)  # a pydoc topic
    assert docs == builtin_documents()  # deterministic


def test_text_file_is_split_into_paragraphs(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("first paragraph\nstill first\n\nsecond one\n")
    ds = load_dataset(DatasetConfig(dataset_name_or_path=str(path)))
    assert [r["text"].strip() for r in ds] == ["first paragraph\nstill first", "second one"]


def test_jsonl_folder_with_other_text_column(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    for i in range(2):
        (tmp_path / "d" / f"{i}.jsonl").write_text(json.dumps({"body": f"doc {i}"}) + "\n")
    ds = load_dataset(DatasetConfig(dataset_name_or_path=str(tmp_path / "d"), text_column="body"))
    assert sorted(r["text"] for r in ds) == ["doc 0", "doc 1"]


def test_parquet_and_saved_dataset(tmp_path) -> None:
    import datasets

    data = datasets.Dataset.from_dict({"text": ["x y", "z"]})
    data.to_parquet(str(tmp_path / "p.parquet"))
    assert len(load_dataset(DatasetConfig(dataset_name_or_path=str(tmp_path / "p.parquet")))) == 2
    data.save_to_disk(str(tmp_path / "saved"))
    assert load_dataset(DatasetConfig(dataset_name_or_path=str(tmp_path / "saved")))["text"] == ["x y", "z"]


def test_missing_path_and_wrong_column_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserInputError, match=r"dataset.dataset_name_or_path='/no/such/file.jsonl': no such file"):
        load_dataset(DatasetConfig(dataset_name_or_path="/no/such/file.jsonl"))
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserInputError, match="dataset.text_column='text'.*columns: body"):
        load_dataset(DatasetConfig(dataset_name_or_path=str(tmp_path / "a.jsonl")))
    with pytest.raises(UserInputError, match="unknown built-in corpus"):
        load_dataset(DatasetConfig(dataset_name_or_path="builtin:wiki"))
