"""The dashboard: one self-contained HTML page (inline CSS, plain JS, data as inline JSON; no network).

`render_dashboard(info, tensors)` turns what `load_analysis` returns into the page's text. The data are
compacted for the page: only live latents; floats to 3 significant digits; every token string once, in a
page-local vocabulary that examples and logit tables index; windows trimmed of padding.

Page data (`<script type="application/json" id="data">`):
    {"meta": {...}, "vocab": [str], "edges": [histogram bin edges],
     "latents": [[id, frequency, max, mean, [first_bin, counts...], top_logits, bottom_logits, top, quantile]]}
    logits: [[vocab_index, value], ...];  examples: [[peak, peak_index, [vocab_index...], [activation...]], ...]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lm_saes.analysis.top_examples import PAD_TOKEN

DASHBOARD_FILE = "dashboard.html"
_ASSETS = Path(__file__).with_name("dashboard_assets")


def _r(x: float) -> float | int:
    """3 significant digits, as the shortest JSON number."""
    if x == 0:
        return 0
    v = float(f"{x:.3g}")
    return int(v) if v.is_integer() and abs(v) < 1e15 else v


class _Vocab:
    """Page-local token indices, the most used tokens first (so the most common indices are the shortest)."""

    def __init__(self, strings: dict[str, str], ids_by_use: list[int]) -> None:
        self.strings, self.index, self.table = strings, {}, []
        for token_id in ids_by_use:
            self(token_id)

    def __call__(self, token_id: int) -> int:
        if token_id not in self.index:
            self.index[token_id] = len(self.table)
            self.table.append(self.strings.get(str(token_id), f"<{token_id}>"))
        return self.index[token_id]


def _examples(tensors: dict[str, torch.Tensor], prefix: str, latent: int, n: int, before: int, vocab: _Vocab) -> list:
    peaks = tensors[f"{prefix}_peak"][latent].tolist()
    out = []
    for slot in range(min(n, len(peaks))):
        if peaks[slot] <= 0:
            break
        tokens = tensors[f"{prefix}_tokens"][latent, slot].tolist()
        acts = tensors[f"{prefix}_acts"][latent, slot].tolist()
        keep = [i for i, t in enumerate(tokens) if t != PAD_TOKEN]
        lo, hi = keep[0], keep[-1] + 1
        out.append([_r(peaks[slot]), before - lo, [vocab(t) for t in tokens[lo:hi]], [_r(a) for a in acts[lo:hi]]])
    return out


def _logits(tensors: dict[str, torch.Tensor], which: str, latent: int, vocab: _Vocab) -> list:
    if f"logit_{which}_ids" not in tensors:
        return []
    ids = tensors[f"logit_{which}_ids"][latent].tolist()
    values = tensors[f"logit_{which}_values"][latent].tolist()
    return [[vocab(i), _r(v)] for i, v in zip(ids, values) if i >= 0]


def page_data(info: dict[str, Any], tensors: dict[str, torch.Tensor], n_top: int = 10, n_quantile: int = 5) -> dict[str, Any]:
    dead = set(info["dead_latents"])
    live = [s for s in range(int(info["d_sae"])) if s not in dead]
    shown = [tensors[k][live].flatten() for k in ("top_tokens", "quantile_tokens", "logit_top_ids", "logit_bottom_ids")
             if k in tensors]
    ids, counts = torch.unique(torch.cat([t.to(torch.int64) for t in shown]), return_counts=True)
    by_use = [i for i in ids[counts.argsort(descending=True, stable=True)].tolist() if i >= 0]
    vocab = _Vocab(info.get("token_strings", {}), by_use)
    before = int(info["window_before"])
    freq, vmax, mean = (tensors[k].tolist() for k in ("frequency", "max_activation", "mean_activation"))
    latents = []
    for s in live:
        counts = tensors["histogram"][s].tolist()
        nonzero = [i for i, c in enumerate(counts) if c]
        first, last = (nonzero[0], nonzero[-1] + 1) if nonzero else (0, 0)
        latents.append([
            s, _r(freq[s]), _r(vmax[s]), _r(mean[s]), [first, *counts[first:last]],
            _logits(tensors, "top", s, vocab), _logits(tensors, "bottom", s, vocab),
            _examples(tensors, "top", s, n_top, before, vocab),
            _examples(tensors, "quantile", s, n_quantile, before, vocab),
        ])
    meta_keys = ("run_dir", "hook_point_in", "hook_point_out", "act_fn", "n_tokens", "n_contexts", "d_sae", "dataset",
                 "logit_effects", "logit_effects_applicable", "quantile_examples")
    meta = {k: info.get(k) for k in meta_keys}
    meta["n_dead"] = len(dead)
    return {"meta": meta, "vocab": vocab.table, "edges": [_r(e) for e in tensors["histogram_edges"].tolist()],
            "latents": latents, "dead": sorted(dead)}


def render_dashboard(info: dict[str, Any], tensors: dict[str, torch.Tensor], n_top: int = 10, n_quantile: int = 5) -> str:
    data = json.dumps(page_data(info, tensors, n_top, n_quantile), separators=(",", ":"), ensure_ascii=False)
    # Inside <script>, "<" only ever occurs in JSON strings, where \u003c is the same character: no "</script>".
    data = data.replace("<", "\\u003c")
    template = (_ASSETS / "dashboard.html").read_text()
    where = f" ({info['run_dir']})" if info.get("run_dir") else ""
    title = f"lm_saes features: {info.get('hook_point_in', '')}{where}"
    return (template.replace("/*STYLE*/", (_ASSETS / "dashboard.css").read_text())
            .replace("/*SCRIPT*/", (_ASSETS / "dashboard.js").read_text())
            .replace("__TITLE__", _escape(title))
            .replace("__DATA__", data))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
