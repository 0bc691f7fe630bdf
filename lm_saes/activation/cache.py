"""Activation cache: a model's activations on disk, so that many training runs share one pass of the model.

A cache is a directory:

    manifest.json                      what the cache holds and how far generation got (CacheManifest)
    shards/shard-00000.safetensors     {hook_point: (N, d_model), "tokens": (N,) int64}
    shards/shard-00001.safetensors     ...

The shards hold exactly the masked, flattened rows the on-the-fly `ActivationStream` produces, in the same
order. The shuffle buffer's output does not depend on how rows are chunked, so training from a cache sees the
very batches training on the fly would.

A shard closes at the first forward pass that brings it to `shard_size` rows or more, so that after each
shard the manifest can say exactly where generation stands (which source, how many packed contexts): a rerun
continues from there without running the model on what is already on disk.

Atomic: a shard is written under a temporary name and renamed into place; then the manifest, which lists only
complete shards, is rewritten atomically. Readers trust the manifest alone, so a half-written or orphaned shard
file is never read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lm_saes.activation.buffer import Rows
from lm_saes.config_base import BaseConfig, DType
from lm_saes.errors import UserInputError
from lm_saes.run_dir import atomic_path, write_text_atomic

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"


class CacheShard(BaseConfig):
    file: str
    """The shard's path, relative to the cache directory."""
    rows: int
    """Rows (text tokens) it holds."""


class CacheSource(BaseConfig):
    name: str
    """The dataset's key in the generating settings."""
    dataset: dict[str, Any]
    """Its DatasetConfig, so held-out text can be found past what the cache holds."""
    contexts: int = 0
    """Packed contexts of it that went through the model and into complete shards."""
    rows: int = 0
    """Rows of it in complete shards."""


class CacheManifest(BaseConfig):
    format_version: int = FORMAT_VERSION
    model_name: str
    """The generating LanguageModelConfig.model_name; a run training from the cache must name the same model."""
    hook_points: list[str]
    d_model: int
    dtype: DType
    """The dtype the activations are stored in."""
    context_size: int
    n_rows: int = 0
    """Rows (text tokens) in complete shards."""
    sources: list[CacheSource]
    shards: list[CacheShard] = Field(default_factory=list)
    resume_source: int = 0
    """Where generation continues: the source index ..."""
    resume_contexts: int = 0
    """... and how many of its packed contexts are already in complete shards."""
    complete: bool = False
    """True once every source is read (or the token cap reached): the cache can be trained on."""
    settings: dict[str, Any]
    """The generating settings (less the output location): a rerun with other settings is refused."""


# --- reading -----------------------------------------------------------------------------------------------

def read_manifest(path: str | Path, key: str, require_complete: bool = True) -> CacheManifest:
    """The manifest of the cache at `path`, or a one-line UserInputError about `key`."""
    root = Path(path)
    if not root.is_dir():
        raise UserInputError(key, str(path), "no such directory; give an activation cache made by lm-saes generate")
    try:
        manifest = CacheManifest.model_validate_json((root / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise UserInputError(key, str(path), f"not an activation cache (no {MANIFEST_FILE}); make one with "
                             "lm-saes generate") from None
    except (OSError, ValidationError) as e:
        raise UserInputError(key, str(path), f"unreadable {MANIFEST_FILE} ({str(e).splitlines()[0]}); "
                             "regenerate the cache") from None
    if manifest.format_version != FORMAT_VERSION:
        raise UserInputError(key, str(path), f"cache format {manifest.format_version}; this version reads {FORMAT_VERSION}")
    if require_complete and not manifest.complete:
        raise UserInputError(key, str(path), f"incomplete activation cache ({manifest.n_rows:,} tokens in "
                             f"{len(manifest.shards)} shards so far); rerun the same lm-saes generate to finish it")
    return manifest


def iter_cache_rows(root: Path, manifest: CacheManifest, columns: list[str], start_row: int,
                    chunk_rows: int) -> Iterator[Rows]:
    """The cache's rows of `columns` from row `start_row` on, at most `chunk_rows` at a time, reading only
    those slices from disk (shards are memory-mapped)."""
    for _, rows in iter_cache_chunks(root, manifest, columns, start_row, chunk_rows):
        yield rows


def iter_cache_chunks(root: Path, manifest: CacheManifest, columns: list[str], start_row: int, chunk_rows: int,
                      read: Callable[[int], bool] = lambda first_row: True) -> Iterator[tuple[int, Rows]]:
    """(first row in the whole cache, rows) of each slice of iter_cache_rows for which `read(first row)` is true;
    the others are skipped unread (a data-parallel rank reads only its own slices)."""
    first = 0  # the index of the shard's first row in the whole cache
    for shard in manifest.shards:
        if start_row >= first + shard.rows:
            first += shard.rows
            continue
        path = root / shard.file
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                slices = {c: f.get_slice(c) for c in columns}
                if any(s.get_shape()[0] != shard.rows for s in slices.values()):
                    raise SafetensorError(f"it does not hold the {shard.rows} rows the manifest lists")
                for start in range(max(start_row - first, 0), shard.rows, chunk_rows):
                    if read(first + start):
                        yield first + start, {c: s[start : start + chunk_rows] for c, s in slices.items()}
        except (OSError, SafetensorError) as e:
            raise UserInputError("activation cache", str(root), f"shard {shard.file} is unreadable ({e}); "
                                 "regenerate the cache") from None
        first += shard.rows


# --- writing -----------------------------------------------------------------------------------------------

def resume_point(root: Path, settings: dict[str, Any], overwrite: bool, key: str) -> CacheManifest | None:
    """The manifest of an incomplete cache at `root` made with the same `settings`, to continue; None to start
    afresh (nothing there, or `overwrite`: the old cache's files are removed). A complete cache, or one made
    with other settings, is refused unless `overwrite`. Only a cache's own files are ever removed."""
    if not (root / MANIFEST_FILE).exists():
        if (root / SHARD_DIR).is_dir() and any((root / SHARD_DIR).iterdir()):
            raise UserInputError(key, str(root), f"has a {SHARD_DIR}/ folder but no {MANIFEST_FILE}: not a cache "
                                 "this can continue; pick another directory")
        return None
    manifest = read_manifest(root, key, require_complete=False)
    if overwrite:
        shutil.rmtree(root / SHARD_DIR, ignore_errors=True)
        (root / MANIFEST_FILE).unlink()
        return None
    differing = sorted(k for k in set(manifest.settings) | set(settings) if manifest.settings.get(k) != settings.get(k))
    if differing:
        raise UserInputError(key, str(root), f"holds an activation cache made with other settings "
                             f"({', '.join(differing)}); pick another directory or pass overwrite=true")
    if manifest.complete:
        raise UserInputError(key, str(root), f"already holds a complete activation cache ({manifest.n_rows:,} "
                             "tokens); train from it, or pass overwrite=true to make it again")
    return manifest


class CacheWriter:
    """Appends rows to a cache; each time `shard_size` rows or more are pending, writes them as one shard and
    rewrites the manifest, which then says where generation stands."""

    def __init__(self, root: Path, manifest: CacheManifest, shard_size: int) -> None:
        self.root, self.manifest, self.shard_size = root, manifest, shard_size
        self._pending: list[Rows] = []
        self._rows = [s.rows for s in manifest.sources]
        self._contexts = [s.contexts for s in manifest.sources]
        """Per source, counting the pending rows: the manifest takes them when they are in a shard."""
        self._position = (manifest.resume_source, manifest.resume_contexts)

    def start(self) -> None:
        """Write the manifest (so the directory is marked as a cache) and drop a killed writer's leftovers:
        temporary files, and shards written after the manifest's last one."""
        listed = {shard.file for shard in self.manifest.shards}
        shards = self.root / SHARD_DIR
        if shards.is_dir():
            for path in shards.iterdir():
                if f"{SHARD_DIR}/{path.name}" not in listed:
                    path.unlink()
        self._write_manifest()

    def add(self, rows: Rows, source_index: int, contexts_done: int) -> None:
        """Rows of one forward pass; (`source_index`, `contexts_done`) is the stream's position after it."""
        self._pending.append({k: v.detach().to("cpu", self._dtype(k)) for k, v in rows.items()})
        self._rows[source_index] += len(rows["tokens"])
        self._contexts[source_index] = contexts_done
        self._position = (source_index, contexts_done)
        if sum(len(r["tokens"]) for r in self._pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write what is pending as a shard (if anything is)."""
        if not self._pending:
            return
        m = self.manifest
        tensors = {k: torch.cat([rows[k] for rows in self._pending]).contiguous() for k in self._pending[0]}
        name = f"{SHARD_DIR}/shard-{len(m.shards):05d}.safetensors"
        with atomic_path(self.root / name) as tmp:
            save_file(tensors, str(tmp))
        n_rows = len(tensors["tokens"])
        m.shards.append(CacheShard(file=name, rows=n_rows))
        m.n_rows += n_rows
        for source, rows, contexts in zip(m.sources, self._rows, self._contexts):
            source.rows, source.contexts = rows, contexts
        m.resume_source, m.resume_contexts = self._position
        self._pending = []
        self._write_manifest()

    def finish(self) -> None:
        """Write the last shard and mark the cache complete."""
        self.flush()
        self.manifest.complete = True
        self._write_manifest()

    def _dtype(self, column: str) -> torch.dtype:
        return torch.long if column == "tokens" else self.manifest.dtype

    def _write_manifest(self) -> None:
        write_text_atomic(self.root / MANIFEST_FILE, json.dumps(self.manifest.model_dump(mode="json"), indent=1) + "\n")
