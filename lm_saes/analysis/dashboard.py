"""The dashboard: a folder that opens from disk (file://, no server, no network) at any number of latents.

    dashboard/index.html         the page: style and script inline; loads index.js
    dashboard/index.js           the latent list (dashboard_data.index_data): the only data the first page loads
    dashboard/blocks/NNNNN.js    latents N*block_size .. : what a latent's page shows, loaded when one is opened
    dashboard/search/NNNN.js     token -> latents, loaded when a token is searched

Data files are scripts that hand their object to the page (`LM_SAES.index({...})`), because a file:// page
may load scripts but not fetch() files. `single_file` writes the same scripts inline into one HTML file
instead (fine up to a few thousand latents: it holds every block). Written into a temporary folder that
replaces the old one at the end, so a reader never sees a half-written dashboard.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from lm_saes.analysis.dashboard_data import block_data, index_data, n_search_shards, search_shards
from lm_saes.config_base import BaseConfig
from lm_saes.run_dir import atomic_path

DASHBOARD_DIR = "dashboard"
DASHBOARD_FILE = "dashboard.html"
INDEX_FILE = "index.html"
_ASSETS = Path(__file__).with_name("dashboard_assets")
_META_KEYS = ("run_dir", "hook_point_in", "hook_point_out", "act_fn", "n_tokens", "n_contexts", "d_sae", "dataset",
              "logit_effects", "logit_effects_applicable", "quantile_examples", "window_before")


class DashboardConfig(BaseConfig):
    n_top_examples: int = Field(10, ge=0)
    """Top-activating examples shown per latent (at most what the analysis kept)."""
    n_quantile_examples: int = Field(5, ge=0)
    """Sampled (weaker) examples shown per latent (at most what the analysis kept)."""
    single_file: bool = False
    """One self-contained HTML file instead of a folder (for small SAEs: it holds every latent)."""
    block_size: int = Field(256, gt=0)
    """Latents per detail file: opening a latent loads its block (~2 KB per latent with the defaults)."""


def script(call: str, *args: Any) -> str:
    """`LM_SAES.call(args...);` with "<" escaped (so the text can sit inside <script>: no "</script>")."""
    text = ",".join(json.dumps(a, separators=(",", ":"), ensure_ascii=False) for a in args).replace("<", "\\u003c")
    return f"LM_SAES.{call}({text});\n"


def data_scripts(info: dict[str, Any], tensors: dict[str, torch.Tensor], cfg: DashboardConfig
                 ) -> Iterator[tuple[str, str]]:
    """(relative path, script text) of every data file: the blocks, the search shards, then the index."""
    d_sae = int(info["d_sae"])
    n_live = int((tensors["fired"] > 0).sum())
    shards = n_search_shards(n_live)
    meta = {**{k: info.get(k) for k in _META_KEYS}, "block_size": cfg.block_size, "n_shards": shards}
    for n, start in enumerate(range(0, d_sae, cfg.block_size)):
        stop = min(start + cfg.block_size, d_sae)
        data = block_data(info, tensors, start, stop, cfg.n_top_examples, cfg.n_quantile_examples)
        yield f"blocks/{n:05d}.js", script("block", n, data)
    for n, shard in search_shards(info, tensors, cfg.n_top_examples, shards):
        yield f"search/{n:04d}.js", script("search", n, shard)
    yield "index.js", script("index", index_data(info, tensors, meta))


def page(info: dict[str, Any], data: str) -> str:
    """The HTML page around `data` (script tags)."""
    where = f" ({info['run_dir']})" if info.get("run_dir") else ""
    title = _escape(f"lm_saes features: {info.get('hook_point_in', '')}{where}")
    return ((_ASSETS / "dashboard.html").read_text()
            .replace("/*STYLE*/", (_ASSETS / "dashboard.css").read_text())
            .replace("/*SCRIPT*/", (_ASSETS / "dashboard.js").read_text())
            .replace("__TITLE__", title).replace("__DATA__", data))


def write_dashboard(info: dict[str, Any], tensors: dict[str, torch.Tensor], output: Path, cfg: DashboardConfig) -> Path:
    """Write the folder (or, with `cfg.single_file`, the file) at `output`; the path a browser opens."""
    if cfg.single_file:
        before, after = page(info, "\0").split("\0")
        with atomic_path(output) as tmp, tmp.open("w", encoding="utf-8") as f:
            f.write(before)
            for _, text in data_scripts(info, tensors, cfg):
                f.write(f"<script>{text}</script>\n")
            f.write(after)
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        (tmp / "blocks").mkdir()
        (tmp / "search").mkdir()
        for path, text in data_scripts(info, tensors, cfg):
            _write(tmp / path, text)
        _write(tmp / INDEX_FILE, page(info, '<script src="index.js"></script>'))
        os.chmod(tmp, 0o777 & ~_umask())
        _replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output / INDEX_FILE


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; an old `target` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
