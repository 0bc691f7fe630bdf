"""The dashboard's data encoding, against values worked out by hand."""

from __future__ import annotations

import base64

import numpy as np
import torch

from lm_saes.analysis.dashboard_data import as_indices, density, fnv1a, packed, search_shards
from lm_saes.analysis.synthetic import synthetic_analysis


def unpacked(item: list[str]) -> np.ndarray:
    dtype = {"u8": "<u1", "u16": "<u2", "u32": "<u4", "f16": "<f2", "f32": "<f4"}[item[0]]
    return np.frombuffer(base64.b64decode(item[1]), dtype=dtype)


def test_packing_round_trips_and_clamps_into_float16() -> None:
    assert unpacked(packed(np.array([0.5, -2.0, 1e6]), "f16")).tolist() == [0.5, -2.0, 65504.0]
    table, item = as_indices(np.array([40, -1, 7, 40]))
    assert table.tolist() == [7, 40] and item[0] == "u16" and unpacked(item).tolist() == [1, 65535, 0, 1]


def test_fnv1a_matches_the_published_test_vectors() -> None:
    assert fnv1a("") == 0x811C9DC5 and fnv1a("a") == 0xE40C292C and fnv1a("foobar") == 0xBF9CF968


def test_density_counts_each_quarter_decade() -> None:
    d = density(np.array([1e-3, 0.0015, 0.5, 1.0]))
    assert d["edges"][0] == -3 and d["edges"][-1] == 0 and len(d["counts"]) == 12
    assert d["counts"][0] == 2 and d["counts"][-2:] == [1, 1] and sum(d["counts"]) == 4  # log10(0.5) = -0.30


def test_search_shards_hold_each_shown_peak_token_and_promoted_token_once() -> None:
    info, tensors = synthetic_analysis(14, n_top=2, n_quantile=0, vocab_size=3, n_logits=1)
    info["token_strings"] = {"0": " Cat", "1": "cat ", "2": "\n"}  # one key "cat"; a blank token is not a key
    shards = dict(search_shards(info, tensors, n_top=1, n_shards=1))
    before = info["window_before"]
    peak = torch.where(tensors["top_peak"][:, 0] > 0, tensors["top_tokens"][:, 0, before], -1)
    expected = {s for s in range(14) if int(peak[s]) in (0, 1) or int(tensors["logit_top_ids"][s, 0]) in (0, 1)}
    assert shards == {0: {"cat": sorted(expected)}}
