import math

import pytest
import torch

from lm_saes import metrics


def test_explained_variance_of_predicting_the_mean_is_zero() -> None:
    x = torch.randn(64, 8) * 3 + 5  # a large mean: EV computed about zero would be far from 0 here
    mean = x.mean(dim=0, keepdim=True).expand_as(x)
    assert abs(metrics.explained_variance(x, mean).item()) < 1e-6


def test_explained_variance_of_a_perfect_reconstruction_is_one() -> None:
    x = torch.randn(64, 8)
    assert metrics.explained_variance(x, x.clone()).item() == 1.0


def test_explained_variance_closed_form_for_scaled_residual() -> None:
    # x_hat = mean + 0.5 (x - mean): the residual is half the centred signal, so EV = 1 - 0.25.
    x = torch.randn(128, 4) + 2
    mean = x.mean(dim=0, keepdim=True)
    assert abs(metrics.explained_variance(x, mean + 0.5 * (x - mean)).item() - 0.75) < 1e-5


def test_explained_variance_from_sums_added_over_parts_equals_the_batch_function() -> None:
    # Data-parallel ranks add their parts' sums; parts with different means make a mean-of-EVs wrong.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 6, generator=g), torch.randn(24, 6, generator=g) + 3])
    x_hat = x + 0.4 * torch.randn(x.shape, generator=g)
    sums = metrics.explained_variance_sums(x[:40], x_hat[:40]) + metrics.explained_variance_sums(x[40:], x_hat[40:])
    whole = metrics.explained_variance(x, x_hat).item()
    assert metrics.explained_variance_from_sums(sums, 64) == pytest.approx(whole, rel=1e-6)
    # a training step hands over its loss's MSE instead of a second pass for SSE: the same sums
    mse_parts = [(x_hat[part] - x[part]).pow(2).sum(-1).mean() for part in (slice(0, 40), slice(40, 64))]
    given = sum(metrics.explained_variance_sums(x[p], x_hat[p], m) for p, m in zip((slice(0, 40), slice(40, 64)), mse_parts))
    torch.testing.assert_close(given, sums, rtol=1e-6, atol=0)  # the MSE was summed in float32
    halves = (metrics.explained_variance(x[:40], x_hat[:40]).item() * 40 + metrics.explained_variance(x[40:], x_hat[40:]).item() * 24) / 64
    assert abs(halves - whole) > 1e-2  # what averaging the parts' EVs would have reported instead


def test_l0_and_firing_counts_of_a_known_code() -> None:
    latents = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.5]])
    assert metrics.l0(latents).item() == (2 + 1 + 3) / 3
    assert metrics.firing_counts(latents).tolist() == [2, 2, 0, 2]


def test_mse_sums_over_features_and_averages_over_rows() -> None:
    x = torch.zeros(2, 3)
    x_hat = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    assert metrics.mse(x, x_hat).item() == (3 + 4) / 2


# --- reconstruction beyond EV --------------------------------------------------------------------------------

def test_doubling_the_input_has_cosine_one_l2_ratio_two_and_bias_two() -> None:
    x = torch.randn(50, 6) + 1
    assert abs(metrics.cosine_similarity(x, 2 * x).item() - 1) < 1e-6
    assert abs(metrics.l2_ratio(x, 2 * x).item() - 2) < 1e-6
    assert abs(metrics.relative_reconstruction_bias(x, 2 * x).item() - 2) < 1e-6
    assert abs(metrics.relative_reconstruction_bias(x, 0.5 * x).item() - 0.5) < 1e-6


def test_cosine_of_orthogonal_and_opposite_rows() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    x_hat = torch.tensor([[0.0, 3.0], [-2.0, -2.0]])
    assert metrics.cosine_similarity(x, x_hat).item() == pytest.approx(-0.5)  # (0 + -1) / 2


def test_relative_reconstruction_bias_is_a_ratio_of_sums_not_a_mean_of_ratios() -> None:
    # Rows: x_hat = 2x on a row of norm 1, x_hat = x on a row of norm 3: (4 + 9) / (2 + 9).
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    x_hat = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert abs(metrics.relative_reconstruction_bias(x, x_hat).item() - 13 / 11) < 1e-6


def test_running_stats_over_batches_equal_the_batch_functions_on_all_rows() -> None:
    g = torch.Generator().manual_seed(0)
    # Batches with different means: EV about each batch's own mean would differ from EV about the global mean.
    xs = [torch.randn(n, 5, generator=g) + shift for n, shift in ((7, 0.0), (30, 4.0), (1, -2.0), (12, 1.0))]
    x_hats = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xs]
    stats = metrics.ReconstructionStats()
    for x, x_hat in zip(xs, x_hats):
        stats.add(x, x_hat)
    x, x_hat = torch.cat(xs), torch.cat(x_hats)
    got = stats.summary()
    assert got["explained_variance"] == pytest.approx(metrics.explained_variance(x, x_hat).item(), rel=1e-6)
    assert got["mse"] == pytest.approx(metrics.mse(x, x_hat).item(), rel=1e-6)
    assert got["cosine_similarity"] == pytest.approx(metrics.cosine_similarity(x, x_hat).item(), rel=1e-6)
    assert got["l2_ratio"] == pytest.approx(metrics.l2_ratio(x, x_hat).item(), rel=1e-6)
    assert got["relative_reconstruction_bias"] == pytest.approx(metrics.relative_reconstruction_bias(x, x_hat).item(), rel=1e-6)


def test_running_explained_variance_of_the_global_mean_is_zero() -> None:
    xs = [torch.randn(16, 4) + 10 * i for i in range(3)]
    mean = torch.cat(xs).mean(dim=0, keepdim=True)
    stats = metrics.ReconstructionStats()
    for x in xs:
        stats.add(x, mean.expand_as(x))
    assert abs(stats.summary()["explained_variance"]) < 1e-9


# --- sparsity ------------------------------------------------------------------------------------------------

def test_firing_frequency_histogram_bins_log10_frequencies() -> None:
    counts = torch.tensor([0, 0, 1, 10, 100, 1000, 1000])  # of 1000 tokens: never x2, 1e-3, 1e-2, 1e-1, 1, 1
    hist = metrics.firing_frequency_histogram(counts, 1000)
    edges = hist["log10_edges"]
    assert hist["never_fired"] == 2 and sum(hist["counts"]) == 5
    by_edge = {edges[i]: c for i, c in enumerate(hist["counts"]) if c}
    assert by_edge == {-3.0: 1, -2.0: 1, -1.0: 1, -0.5: 2}  # a frequency of exactly 1 lands in the top bin


# --- downstream ----------------------------------------------------------------------------------------------

def test_cross_entropy_of_uniform_logits_is_log_vocab_and_targets_are_shifted() -> None:
    tokens = torch.tensor([[3, 1, 4, 1]])
    assert torch.allclose(metrics.next_token_ce(torch.zeros(1, 4, 7), tokens), torch.full((1, 3), math.log(7)))
    logits = torch.full((1, 4, 7), -1e4)
    logits[0, torch.arange(3), tokens[0, 1:]] = 0.0  # position t puts all mass on token t+1
    assert metrics.next_token_ce(logits, tokens).abs().max().item() < 1e-6


def test_kl_of_identical_distributions_is_zero_and_matches_a_closed_form() -> None:
    logits = torch.randn(2, 5, 11)
    assert metrics.kl_divergence(logits, logits).abs().max().item() < 1e-6
    # P = (1/2, 1/2), Q = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3).
    p = torch.tensor([[[0.0, 0.0]]])
    q = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert abs(metrics.kl_divergence(p, q).item() - expected) < 1e-6


def test_recovered_fraction_is_right_side_up() -> None:
    # Clean 2.0, SAE 2.5, ablated 7.0: the SAE recovers 4.5 of the 5.0 nats ablation loses.
    assert metrics.recovered_fraction(ablated=7.0, spliced=2.5, clean=2.0) == pytest.approx(0.9)
    assert metrics.recovered_fraction(ablated=7.0, spliced=2.0, clean=2.0) == 1.0
    assert metrics.recovered_fraction(ablated=7.0, spliced=7.0, clean=2.0) == 0.0
    assert metrics.recovered_fraction(ablated=7.0, spliced=9.0, clean=2.0) < 0  # worse than ablation
    assert metrics.recovered_fraction(ablated=2.0, spliced=2.5, clean=2.0) is None


def test_relative_reconstruction_bias_of_a_zero_reconstruction_is_zero() -> None:
    x = torch.randn(8, 3)
    assert metrics.relative_reconstruction_bias(x, torch.zeros_like(x)).item() == 0.0
    stats = metrics.ReconstructionStats()
    stats.add(x, torch.zeros_like(x))
    assert stats.summary()["relative_reconstruction_bias"] == 0.0
