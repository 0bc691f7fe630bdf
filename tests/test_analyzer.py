"""FeatureAnalyzer on the tiny random Llama with a hand-built SAE whose latents detect planted tokens."""

from __future__ import annotations

import json

import pytest
import torch

from lm_saes import SAEConfig, SparseAutoEncoder
from lm_saes.activation.packing import pack_documents
from lm_saes.analysis import FORMAT_VERSION, AnalysisConfig, FeatureAnalyzer, load_analysis, save_analysis
from lm_saes.analysis.logit_effects import not_applicable_reason, writes_residual_stream
from lm_saes.analysis.top_examples import PAD_TOKEN
from lm_saes.errors import UserInputError
from tests.conftest import synthetic_documents

HOOK = "blocks.0.hook_resid_pre"  # = the token embedding in a Llama (no positional embedding)
DETECTOR, ANTI, DEAD = 3, 7, 0


def token_id(model, word: str) -> int:
    (i,) = model.tokenizer(word, add_special_tokens=False)["input_ids"]
    return i


def detector_sae(model) -> tuple[SparseAutoEncoder, int, int]:
    """Latent DETECTOR fires (at 1.0) exactly on the token `cat`, ANTI on `dog`; every other latent is dead.

    The encoder column is cat's embedding direction, with a bias halfway between cat's own projection and
    the largest projection of any other token; the decoder row points at cat's (dog's negated) unembedding.
    """
    E_VD = model.bridge.W_E.detach()
    sae = SparseAutoEncoder(SAEConfig(hook_point_in=HOOK, d_model=E_VD.shape[1], expansion_factor=2))
    with torch.no_grad():
        sae.W_E.zero_(), sae.W_D.zero_()
        sae.b_E.fill_(-1.0)
        for latent, word, sign in ((DETECTOR, "cat", 1.0), (ANTI, "dog", -1.0)):
            tok = token_id(model, word)
            unit_D = E_VD[tok] / E_VD[tok].norm()
            proj_V = E_VD @ unit_D
            others = torch.cat([proj_V[:tok], proj_V[tok + 1 :]]).max()
            assert others < proj_V[tok], "a random embedding would not separate the token; pick another word"
            gap = proj_V[tok] - others
            sae.W_E[:, latent] = unit_D * 2 / gap  # cat -> 1.0, every other token < 0
            sae.b_E[latent] = 1.0 - proj_V[tok] * 2 / gap
            sae.W_D[latent] = sign * model.bridge.W_U[:, tok]
    return sae, token_id(model, "cat"), token_id(model, "dog")


@pytest.fixture(scope="module")
def contexts(tiny_model) -> list[torch.Tensor]:
    return list(pack_documents(synthetic_documents(120, seed=5), tiny_model.tokenizer, 24))


def test_the_planted_latents_find_exactly_their_tokens(tiny_model, contexts) -> None:
    sae, cat, dog = detector_sae(tiny_model)
    cfg = AnalysisConfig(n_tokens=10**6, model_batch_size=4, n_top_examples=20, n_quantile_examples=5,
                         window_before=3, window_after=2)
    result = FeatureAnalyzer(cfg).analyze(sae, tiny_model, contexts)
    t = result.tensors
    tokens_CT = torch.stack(contexts)
    has_cat = [i for i, c in enumerate(contexts) if (c == cat).any()]
    n_text = int(tiny_model.text_mask(tokens_CT).sum())
    assert result.info["n_tokens"] == n_text and result.info["n_contexts"] == len(contexts)
    assert int(t["fired"][DETECTOR]) == int((tokens_CT == cat).sum())
    assert float(t["frequency"][DETECTOR]) == pytest.approx(int((tokens_CT == cat).sum()) / n_text)
    assert float(t["max_activation"][DETECTOR]) == pytest.approx(1.0, abs=1e-4)
    assert float(t["mean_activation"][DETECTOR]) == pytest.approx(1.0, abs=1e-4)
    assert int(t["histogram"][DETECTOR].sum()) == int(t["fired"][DETECTOR])
    # The top examples are contexts holding `cat`, distinct, with `cat` at the peak (window position 3).
    kept = t["top_context"][DETECTOR]
    kept = kept[kept >= 0].tolist()
    assert len(kept) == min(20, len(has_cat)) and len(set(kept)) == len(kept) and set(kept) <= set(has_cat)
    n = len(kept)
    assert (t["top_tokens"][DETECTOR, :n, 3] == cat).all()
    assert torch.allclose(t["top_acts"][DETECTOR, :n, 3], torch.ones(n), atol=1e-4)
    assert (t["top_peak"][DETECTOR, n:] == 0).all()
    for slot, context in enumerate(kept):  # the stored window is the context's own tokens around its first cat
        pos = int(torch.nonzero(contexts[context] == cat)[0])
        window = [int(contexts[context][p]) if 0 <= p < 24 else PAD_TOKEN for p in range(pos - 3, pos + 3)]
        assert t["top_tokens"][DETECTOR, slot].tolist() == window
    quantile = t["quantile_context"][DETECTOR]
    assert set(quantile[quantile >= 0].tolist()) <= set(has_cat) and (quantile >= 0).sum() == min(5, len(has_cat))
    # Logit effects: the decoder rows point at cat's unembedding (and against dog's).
    assert int(t["logit_top_ids"][DETECTOR, 0]) == cat
    assert int(t["logit_bottom_ids"][ANTI, 0]) == dog
    assert result.info["logit_effects_applicable"] is True
    dead = result.info["dead_latents"]
    assert DEAD in dead and DETECTOR not in dead and ANTI not in dead and len(dead) == sae.cfg.d_sae - 2
    assert (t["top_context"][DEAD] == -1).all() and (t["logit_top_ids"][DEAD] == -1).all()
    # Decoder neighbours: DETECTOR's and ANTI's rows are the only non-zero ones, at the cosine of cat's and
    # -dog's unembeddings; every zero row has cosine 0 with everything.
    W_U = tiny_model.bridge.W_U.detach().float()
    expected = float(torch.nn.functional.cosine_similarity(W_U[:, cat], -W_U[:, dog], dim=0))
    nearest = int(t["neighbour_ids"][DETECTOR, 0])
    assert nearest == ANTI if expected > 0 else nearest != ANTI
    assert float(t["neighbour_cosine"][DETECTOR].max()) == pytest.approx(max(expected, 0.0), abs=1e-5)
    assert t["neighbour_ids"].shape == (sae.cfg.d_sae, 10) and DETECTOR not in t["neighbour_ids"][DETECTOR].tolist()


def test_memory_stays_flat_as_tokens_grow(tiny_model, contexts) -> None:
    sae, _, _ = detector_sae(tiny_model)
    sizes = []
    for n_contexts in (len(contexts) // 4, len(contexts)):
        analyzer = FeatureAnalyzer(AnalysisConfig(n_tokens=10**6, model_batch_size=4))
        result = analyzer.analyze(sae, tiny_model, iter(contexts[:n_contexts]))  # a stream, consumed lazily
        assert result.info["n_contexts"] == n_contexts
        assert analyzer.state is not None
        sizes.append({k: (tuple(v.shape), v.dtype) for k, v in analyzer.state.tensors().items()})
        sizes.append({k: (tuple(v.shape), v.dtype) for k, v in result.tensors.items()})
    assert sizes[0] == sizes[2] and sizes[1] == sizes[3]


def test_n_tokens_stops_the_stream(tiny_model, contexts) -> None:
    sae, _, _ = detector_sae(tiny_model)
    consumed = []

    def stream():
        for c in contexts:
            consumed.append(c)
            yield c

    result = FeatureAnalyzer(AnalysisConfig(n_tokens=50, model_batch_size=2)).analyze(sae, tiny_model, stream())
    assert 50 <= result.info["n_tokens"] < 50 + 2 * 24 and len(consumed) <= 2 * result.info["n_contexts"] + 2


def test_files_round_trip_and_refuse_an_unknown_version(tiny_model, contexts, tmp_path) -> None:
    sae, cat, _ = detector_sae(tiny_model)
    result = FeatureAnalyzer(AnalysisConfig(model_batch_size=4)).analyze(sae, tiny_model, contexts[:20])
    folder = save_analysis(result, tmp_path, tiny_model.tokenizer)
    assert sorted(p.name for p in folder.iterdir()) == ["analysis.json", "features.safetensors"]
    info, tensors = load_analysis(tmp_path)
    assert info["format_version"] == FORMAT_VERSION and info["token_strings"][str(cat)] == "cat"
    assert torch.equal(tensors["top_tokens"], result.tensors["top_tokens"])
    info["format_version"] = 99
    (folder / "analysis.json").write_text(json.dumps(info))
    with pytest.raises(UserInputError, match="format_version 99"):
        load_analysis(tmp_path)


def test_logit_effects_apply_only_to_the_residual_stream() -> None:
    for hook in ("blocks.3.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.2.hook_mlp_out", "blocks.1.hook_out",
                 "blocks.1.attn.hook_out"):
        assert writes_residual_stream(hook) and not_applicable_reason(hook) is None
    for hook in ("blocks.3.ln2.hook_normalized", "blocks.3.mlp.hook_post", "hook_embed", "blocks.x.hook_out"):
        assert "not applicable" in (not_applicable_reason(hook) or "")
