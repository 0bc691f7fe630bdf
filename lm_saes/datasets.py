"""The dataset stage: where text documents come from.

A dataset is a Hugging Face `datasets.Dataset` (or `IterableDataset`) with a text column. It can come from
the hub, from local text/jsonl/json/parquet/csv files or a folder of them, from a folder written by
`Dataset.save_to_disk`, or from the built-in offline corpus: English prose that ships with Python itself.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path
from typing import Any, Literal

from lm_saes.config_base import BaseConfig
from lm_saes.errors import UserInputError

BUILTIN_CORPUS = "builtin:python-docs"

_EXTENSION_BUILDERS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "json", ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


class DatasetConfig(BaseConfig):
    dataset_name_or_path: str = BUILTIN_CORPUS
    """A hub id (`Hzfinfdu/SlimPajama-3B`), a local file or folder, or `builtin:python-docs`."""
    split: str = "train"
    text_column: str = "text"
    """The column holding each document's text; the loaded dataset exposes it as `text`."""
    streaming: bool = False
    """Stream a hub dataset instead of downloading it whole (for corpora larger than the disk)."""
    text_sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """For plain-text files: one document per line, per blank-line-separated paragraph, or per file."""


def builtin_documents() -> list[str]:
    """Python's own reference prose: the `pydoc` topics, then docstrings of the standard library.

    Deterministic (sorted file walk) and offline. About 1.8M characters (~470K SmolLM2 tokens); built in ~4 s.
    """
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo", "ensurepip"}
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(f for f in files if f.endswith(".py")):
            doc = _module_docstrings(Path(root) / name)
            if doc:
                docs.append(doc)
    return docs


def _module_docstrings(path: Path) -> str:
    """A module's docstring and its public classes' and functions' docstrings, as one document."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            parts.append(ast.get_docstring(node) or "")
    return "\n\n".join(p for p in parts if len(p) > 40)


def load_dataset(cfg: DatasetConfig, key: str = "dataset.dataset_name_or_path") -> Any:
    """Load the documents `cfg` names as a `datasets` dataset whose `text` column holds them."""
    dataset = _load(cfg, key)
    if cfg.text_column != "text":
        dataset = dataset.rename_column(cfg.text_column, "text")
    return dataset


def _load(cfg: DatasetConfig, key: str) -> Any:
    import datasets

    name = cfg.dataset_name_or_path
    if name == BUILTIN_CORPUS:
        return datasets.Dataset.from_dict({cfg.text_column: builtin_documents()})
    if name.startswith("builtin:"):
        raise UserInputError(key, name, f"unknown built-in corpus; available: {BUILTIN_CORPUS}")
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, cfg, key)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserInputError(key, name, "no such file or folder (nor a hub id of the form owner/name)")
    try:
        return datasets.load_dataset(name, split=cfg.split, streaming=cfg.streaming)
    except (OSError, datasets.exceptions.DatasetsError) as e:  # offline, unknown, or private: not a bug of ours
        raise UserInputError(key, name, f"cannot load it from the Hugging Face hub ({_first_line(e)}); give a "
                             f"local file or folder, {BUILTIN_CORPUS}, or a hub id with a network") from None


def _load_local(path: Path, cfg: DatasetConfig, key: str) -> Any:
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix in _EXTENSION_BUILDERS]
    builders = {_EXTENSION_BUILDERS[p.suffix] for p in files}
    if not files:
        raise UserInputError(key, str(path), f"no data files; expected one of {', '.join(sorted(_EXTENSION_BUILDERS))}")
    if len(builders) > 1:
        raise UserInputError(key, str(path), f"mixes file kinds {sorted(builders)}; use one kind per dataset")
    if all(p.stat().st_size == 0 for p in files):  # datasets' builders fail on these in builder-specific ways
        raise UserInputError(key, str(path), "the corpus is empty: it gave no text tokens")
    builder = builders.pop()
    kwargs: dict[str, Any] = {"sample_by": cfg.text_sample_by} if builder == "text" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
    except ValueError as e:
        if "corresponds to no data" in str(e):  # files with no rows at all
            raise UserInputError(key, str(path), "the corpus is empty: it gave no text tokens") from None
        raise
    except datasets.exceptions.DatasetsError as e:  # malformed files: the cause names the line or field
        raise UserInputError(key, str(path), f"cannot be read as {builder} files ({_first_line(e.__cause__ or e)})") \
            from None
    if cfg.text_column not in dataset.column_names:
        raise UserInputError(
            "dataset.text_column", cfg.text_column, f"not a column of {path}; columns: {', '.join(dataset.column_names)}"
        )
    return dataset


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
