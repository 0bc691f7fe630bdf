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


def test_l0_and_firing_counts_of_a_known_code() -> None:
    latents = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.5]])
    assert metrics.l0(latents).item() == (2 + 1 + 3) / 3
    assert metrics.firing_counts(latents).tolist() == [2, 2, 0, 2]


def test_mse_sums_over_features_and_averages_over_rows() -> None:
    x = torch.zeros(2, 3)
    x_hat = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    assert metrics.mse(x, x_hat).item() == (3 + 4) / 2
