"""The dashboard's data, split so that a page loads only what it shows.

- the index (`index_data`): one row per live latent, as columns of little-endian binary in base64 (frequency
  float32; max and mean activation float16; the top token as an index into a list of strings), the live
  latents as a bitmask over d_sae, the activation-histogram edges and a density histogram of log10 firing
  frequencies. About 14 bytes of text per live latent: 262,144 latents make 3.5 MB.
- blocks (`block_data`): everything a latent's page shows, for `block_size` consecutive latent ids (dead ones
  included, as empty rows): examples (tokens as indices into the block's own vocabulary, activations float16),
  histogram counts, logit effects and decoder neighbours.
- search shards (`search_shards`): token -> latents, for the tokens at a latent's top peaks and those it
  promotes most; a token's key is its text stripped and lower-cased, its shard `fnv1a(key) % n_shards`
  (the page computes the same hash).

An array travels as ["u8"|"u16"|"u32"|"f16"|"f32", base64]; index arrays use the sentinel 2**bits - 1 for
"no token" (padding, an empty slot). Every float is clamped into float16's range before it is narrowed.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lm_saes.analysis.top_examples import PAD_TOKEN

F16_MAX = 65504.0
SHARD_LATENTS = 1024
"""Live latents per search shard: a shard holds ~20 entries per latent, so ~150 KB."""


def packed(array: np.ndarray, dtype: str) -> list[str]:
    np_dtype = {"u8": "<u1", "u16": "<u2", "u32": "<u4", "f16": "<f2", "f32": "<f4"}[dtype]
    if dtype == "f16":
        array = np.clip(array, -F16_MAX, F16_MAX)
    return [dtype, base64.b64encode(np.ascontiguousarray(array, dtype=np_dtype).tobytes()).decode("ascii")]


def as_indices(ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(the sorted distinct non-negative values of `ids`, `ids` packed as indices into them)."""
    table = np.unique(ids[ids >= 0])
    return table, indices_into(table, ids)


def indices_into(table: np.ndarray, ids: np.ndarray) -> list[str]:
    """`ids` (all in the sorted `table`, or negative) packed as indices into `table`; negatives -> the sentinel."""
    dtype, sentinel = ("u16", 2**16 - 1) if len(table) < 2**16 - 1 else ("u32", 2**32 - 1)
    return packed(np.where(ids >= 0, np.searchsorted(table, ids), sentinel), dtype)


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def token_text(strings: dict[str, str], token_id: int) -> str:
    return strings.get(str(token_id), f"<{token_id}>")


def density(frequency: np.ndarray, per_decade: int = 4) -> dict[str, Any]:
    """Counts of log10 firing frequency in bins of 1/per_decade decade, from the rarest latent's decade to 1."""
    if len(frequency) == 0:
        return {"edges": [], "counts": []}
    logs = np.log10(np.clip(frequency, 1e-12, 1.0))
    low = math.floor(float(logs.min()))
    edges = np.linspace(low, 0.0, -low * per_decade + 1) if low < 0 else np.array([-1.0, 0.0])
    counts, _ = np.histogram(logs, bins=edges)
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}


def index_data(info: dict[str, Any], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The latent list: what the first page loads."""
    live = _np(tensors["fired"]) > 0
    ids = np.nonzero(live)[0]
    before = int(info["window_before"])
    top_tok = np.where(_np(tensors["top_peak"][:, 0]) > 0, _np(tensors["top_tokens"][:, 0, before]), PAD_TOKEN)[ids]
    table, top = as_indices(top_tok.astype(np.int64))
    strings = info.get("token_strings", {})
    frequency = _np(tensors["frequency"])[ids]
    return {
        "meta": {**meta, "n_live": len(ids), "n_dead": int((~live).sum())},
        "edges": [float(f"{e:.4g}") for e in _np(tensors["histogram_edges"]).tolist()],
        "live": packed(np.packbits(live, bitorder="little"), "u8"),
        "freq": packed(frequency, "f32"),
        "max": packed(_np(tensors["max_activation"])[ids], "f16"),
        "mean": packed(_np(tensors["mean_activation"])[ids], "f16"),
        "top": top,
        "top_vocab": [token_text(strings, int(t)) for t in table],
        "density": density(frequency),
    }


def block_data(
    info: dict[str, Any], tensors: dict[str, torch.Tensor], start: int, stop: int, n_top: int, n_quantile: int
) -> dict[str, Any]:
    """Everything the pages of latents start..stop-1 show."""
    n_top = min(n_top, tensors["top_peak"].shape[1])
    n_quantile = min(n_quantile, tensors["quantile_peak"].shape[1])
    rows = slice(start, stop)
    tokens = np.concatenate([_np(tensors["top_tokens"][rows, :n_top]), _np(tensors["quantile_tokens"][rows, :n_quantile])], 1)
    peaks = np.concatenate([_np(tensors["top_peak"][rows, :n_top]), _np(tensors["quantile_peak"][rows, :n_quantile])], 1)
    acts = np.concatenate([_np(tensors["top_acts"][rows, :n_top]), _np(tensors["quantile_acts"][rows, :n_quantile])], 1)
    tokens = np.where(peaks[:, :, None] > 0, tokens, PAD_TOKEN).astype(np.int64)  # empty slots: no tokens
    logit_keys = [k for k in ("logit_top_ids", "logit_bottom_ids") if k in tensors]
    all_ids = np.concatenate([tokens.ravel(), *(_np(tensors[k][rows]).astype(np.int64).ravel() for k in logit_keys)])
    table, _ = as_indices(all_ids)
    strings = info.get("token_strings", {})

    def local(ids: np.ndarray) -> list[str]:
        return indices_into(table, ids)

    out: dict[str, Any] = {
        "start": start, "count": stop - start, "n_examples": n_top + n_quantile, "n_top": n_top,
        "window": tokens.shape[2], "vocab": [token_text(strings, int(t)) for t in table],
        "tokens": local(tokens), "peaks": packed(peaks, "f16"), "acts": packed(acts, "f16"),
        "hist": packed(_np(tensors["histogram"][rows]), "u32"),
    }
    for which in ("top", "bottom"):
        if f"logit_{which}_ids" in tensors:
            out[f"logit_{which}_ids"] = local(_np(tensors[f"logit_{which}_ids"][rows]).astype(np.int64))
            out[f"logit_{which}"] = packed(_np(tensors[f"logit_{which}_values"][rows]), "f16")
            out["n_logits"] = int(tensors[f"logit_{which}_ids"].shape[1])
    if "neighbour_ids" in tensors:
        out["neighbour_ids"] = packed(_np(tensors["neighbour_ids"][rows]), "u32")
        out["neighbour_cosine"] = packed(_np(tensors["neighbour_cosine"][rows]), "f16")
        out["n_neighbours"] = int(tensors["neighbour_ids"].shape[1])
    return out


def fnv1a(text: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes: the page's `fnv1a` gives the same number."""
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def search_key(token: str) -> str:
    return token.strip().lower()


def n_search_shards(n_live: int) -> int:
    return max(1, math.ceil(n_live / SHARD_LATENTS))


def search_shards(info: dict[str, Any], tensors: dict[str, torch.Tensor], n_top: int, n_shards: int
                  ) -> Iterator[tuple[int, dict[str, list[int]]]]:
    """(shard, {key: sorted latent ids}) for every shard, from the tokens at the latents' shown top peaks and
    their promoted tokens."""
    before = int(info["window_before"])
    n_top = min(n_top, tensors["top_peak"].shape[1])
    peak_tok = np.where(_np(tensors["top_peak"][:, :n_top]) > 0, _np(tensors["top_tokens"][:, :n_top, before]), -1)
    columns = [peak_tok.astype(np.int64)]
    if "logit_top_ids" in tensors:
        columns.append(_np(tensors["logit_top_ids"]).astype(np.int64))
    token_SK = np.concatenate(columns, axis=1)
    latent_SK = np.broadcast_to(np.arange(token_SK.shape[0])[:, None], token_SK.shape)
    keep = token_SK >= 0
    d_sae = token_SK.shape[0]
    pairs = np.unique(token_SK[keep] * d_sae + latent_SK[keep])
    tokens, latents = pairs // d_sae, pairs % d_sae
    cuts = np.flatnonzero(np.diff(tokens)) + 1
    strings = info.get("token_strings", {})
    shards: list[dict[str, set[int]]] = [{} for _ in range(n_shards)]
    for token_ids, ids in zip(np.split(tokens, cuts), np.split(latents, cuts)):
        if not len(token_ids):
            continue
        key = search_key(token_text(strings, int(token_ids[0])))
        if key:
            shards[fnv1a(key) % n_shards].setdefault(key, set()).update(ids.tolist())
    for n, shard in enumerate(shards):
        yield n, {key: sorted(ids) for key, ids in sorted(shard.items())}
