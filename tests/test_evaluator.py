"""The evaluator's closed forms, on the tiny random Llama (and once on the real SmolLM2)."""

from __future__ import annotations

import pytest
import torch

from lm_saes import SAEConfig, SparseAutoEncoder
from lm_saes.activation.packing import pack_documents
from lm_saes.evaluator import Evaluator, EvaluatorConfig
from lm_saes.runners.held_out import held_out_contexts
from tests.conftest import synthetic_documents

HOOK = "blocks.0.hook_resid_post"


def identity_sae(d_model: int, hook_in: str = HOOK, hook_out: str | None = None) -> SparseAutoEncoder:
    """relu(x) - relu(-x) = x exactly: W_E = [I, -I], W_D = [I; -I], biases and norm factors neutral."""
    sae = SparseAutoEncoder(SAEConfig(hook_point_in=hook_in, hook_point_out=hook_out, d_model=d_model, expansion_factor=2))
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.W_E.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_D.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def constant_sae(d_model: int, value_D: torch.Tensor, hook_in: str = HOOK, hook_out: str | None = None) -> SparseAutoEncoder:
    """An SAE whose output is `value_D` whatever the input (zero decoder, b_D = value)."""
    sae = identity_sae(d_model, hook_in, hook_out)
    with torch.no_grad():
        sae.W_D.zero_()
        sae.b_D.copy_(value_D)
    return sae


@pytest.fixture(scope="module")
def contexts(tiny_model) -> list[torch.Tensor]:
    return list(pack_documents(synthetic_documents(40, seed=3), tiny_model.tokenizer, 24))[:6]


def test_splicing_the_clean_activation_leaves_the_logits_unchanged(tiny_model, contexts) -> None:
    tokens_BT = torch.stack(contexts[:2])
    logits_BTV, clean = tiny_model.run_with_capture(tokens_BT, [HOOK])
    spliced_BTV = tiny_model.run_with_replacement(tokens_BT, HOOK, clean.activations[HOOK])
    assert torch.equal(spliced_BTV, logits_BTV)
    zeroed_BTV = tiny_model.run_with_replacement(tokens_BT, HOOK, torch.zeros_like(clean.activations[HOOK]))
    assert (zeroed_BTV - logits_BTV).abs().max() > 1e-3  # the hook really feeds the rest of the model


def test_a_perfect_sae_has_ce_score_one_and_kl_zero(tiny_model, contexts) -> None:
    result = Evaluator(EvaluatorConfig(model_batch_size=4)).evaluate(identity_sae(32), tiny_model, contexts)
    m = result.metrics
    assert m["ce_loss_sae"] == m["ce_loss_clean"] and m["ce_loss_score"] == 1.0
    assert m["kl_div_sae"] == pytest.approx(0.0, abs=1e-6) and m["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    # A random model: ablation moves the loss (either way), and the distribution.
    assert m["ce_loss_ablated"] != pytest.approx(m["ce_loss_clean"], abs=1e-4) and m["kl_div_ablated"] > 1e-4
    assert m["explained_variance"] == pytest.approx(1.0) and m["mse"] == pytest.approx(0.0, abs=1e-9)
    assert m["cosine_similarity"] == pytest.approx(1.0) and m["l2_ratio"] == pytest.approx(1.0)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0)
    # Exactly one of relu(x_i), relu(-x_i) fires per dimension (none where x_i == 0).
    assert m["l0"] == pytest.approx(32, abs=0.5) and m["dead_fraction"] == 0.0


def test_an_sae_that_outputs_zeros_equals_zero_ablation(tiny_model, contexts) -> None:
    m = Evaluator(EvaluatorConfig()).evaluate(constant_sae(32, torch.zeros(32)), tiny_model, contexts).metrics
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_ablated"], abs=1e-6)
    assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-5) and m["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    assert m["l0"] == 32  # the encoder still fires; only the decoder is zero


def test_mean_ablation_writes_the_mean_over_evaluated_text_positions(tiny_model, contexts) -> None:
    out = tiny_model.run_hooks(torch.stack(contexts), [HOOK])
    mean_D = out.activations[HOOK][out.mask_BT].mean(dim=0)
    evaluator = Evaluator(EvaluatorConfig(ablation="mean", model_batch_size=4))
    m = evaluator.evaluate(constant_sae(32, mean_D), tiny_model, contexts).metrics
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_ablated"], abs=1e-5)
    assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-5)  # predicting the mean explains nothing
    zero = Evaluator(EvaluatorConfig(ablation="zero")).evaluate(constant_sae(32, mean_D), tiny_model, contexts).metrics
    assert zero["ce_loss_ablated"] != pytest.approx(m["ce_loss_ablated"])  # the option changes the baseline


def test_special_positions_are_neither_replaced_nor_scored(tiny_model, contexts) -> None:
    # A constant SAE changes every text position; BOS (position 0) and EOS must keep their clean activations.
    # Scoring only text positions of the identity SAE, n_tokens counts them exactly.
    tokens_BT = torch.stack(contexts)
    mask_BT = tiny_model.text_mask(tokens_BT)
    assert not mask_BT[:, 0].any() and (~mask_BT).sum() > len(contexts)  # BOS and some EOS
    result = Evaluator(EvaluatorConfig()).evaluate(identity_sae(32), tiny_model, contexts)
    assert result.info["n_tokens"] == int(mask_BT.sum())
    assert result.info["n_prediction_positions"] == int(mask_BT[:, :-1].sum())  # no target after the last


def test_a_transcoders_output_replaces_its_output_hook(tiny_model, contexts) -> None:
    hook_in, hook_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    zero_tc = constant_sae(32, torch.zeros(32), hook_in, hook_out)
    m = Evaluator(EvaluatorConfig()).evaluate(zero_tc, tiny_model, contexts).metrics
    assert m["ce_loss_sae"] == pytest.approx(m["ce_loss_ablated"], abs=1e-6)  # = zero-ablating the MLP output
    # Splicing the MLP's own output back in is lossless; the identity of ln2's output is not.
    _, clean = tiny_model.run_with_capture(torch.stack(contexts[:1]), [hook_out])
    assert torch.equal(tiny_model.run_with_replacement(torch.stack(contexts[:1]), hook_out, clean.activations[hook_out]),
                       tiny_model.run_with_capture(torch.stack(contexts[:1]), [hook_out])[0])
    wrong = Evaluator(EvaluatorConfig()).evaluate(identity_sae(32, hook_in, hook_out), tiny_model, contexts).metrics
    assert wrong["ce_loss_score"] != pytest.approx(1.0)


def test_histogram_and_sparsity_counts_are_consistent(tiny_model, contexts) -> None:
    sae = identity_sae(32)
    with torch.no_grad():
        sae.b_E[:5] = -1e6  # these latents can never fire
    result = Evaluator(EvaluatorConfig()).evaluate(sae, tiny_model, contexts)
    assert result.metrics["n_dead"] == 5 and result.metrics["dead_fraction"] == 5 / 64
    assert result.histogram["never_fired"] == 5 and sum(result.histogram["counts"]) == 64 - 5
    assert result.to_json()["firing_frequency_histogram"] is result.histogram


def test_held_out_contexts_skip_whole_contexts_past_the_count(tiny_model) -> None:
    docs = synthetic_documents(60, seed=5)
    everything = list(pack_documents(docs, tiny_model.tokenizer, 16))
    special = torch.tensor(tiny_model.special_token_ids)
    text_per_context = [int((~torch.isin(c, special)).sum()) for c in everything]
    got = held_out_contexts(docs, tiny_model, 16, skip_tokens=text_per_context[0] + 1, n_contexts=3)
    assert [c.tolist() for c in got] == [c.tolist() for c in everything[2:5]]  # context 1 was partly read: skip it
    assert [c.tolist() for c in held_out_contexts(docs, tiny_model, 16, 0, 2)] == [c.tolist() for c in everything[:2]]
    assert held_out_contexts(docs, tiny_model, 16, skip_tokens=10**9, n_contexts=2) == []


@pytest.mark.slow
def test_identity_splice_on_the_real_smollm2() -> None:
    from lm_saes import LanguageModelConfig, TransformerLensLanguageModel

    model = TransformerLensLanguageModel(LanguageModelConfig(model_name="builtin:smollm2-135m"))
    docs = synthetic_documents(10, seed=7)
    contexts = list(pack_documents(docs, model.tokenizer, 32))[:2]
    hook = "blocks.2.hook_resid_post"
    logits_BTV, clean = model.run_with_capture(torch.stack(contexts), [hook])
    assert torch.equal(model.run_with_replacement(torch.stack(contexts), hook, clean.activations[hook]), logits_BTV)
    m = Evaluator(EvaluatorConfig()).evaluate(identity_sae(576, hook), model, contexts).metrics
    assert m["ce_loss_score"] == 1.0 and m["kl_div_sae"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < m["ce_loss_clean"] < m["ce_loss_ablated"] < 20  # finite, and ablating layer 2 hurts


def test_a_training_batchtopk_sae_is_evaluated_per_token_and_left_training(tiny_model, contexts) -> None:
    sae = SparseAutoEncoder(SAEConfig(hook_point_in=HOOK, d_model=32, expansion_factor=2, act_fn="batchtopk", top_k=4))
    with torch.no_grad():
        sae.activation_function.threshold.fill_(1e9)  # at inference nothing passes this threshold
    sae.train()
    m = Evaluator(EvaluatorConfig()).evaluate(sae, tiny_model, contexts).metrics
    assert m["l0"] == 0.0  # the per-token JumpReLU ran, not the batch-level top-k (which would give l0 = 4)
    assert sae.training
