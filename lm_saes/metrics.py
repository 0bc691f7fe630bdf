"""Reconstruction and sparsity metrics. One definition each, used by training and tests alike."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of tokens (in a training log window, or over an evaluation) counts
as dense."""


def mse(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared error summed over features. One fused pass forward and one backward (the
    training loss's term: subtract, square, sum and their backward were ~5 ms of a 4,096 x 576 step, this ~2.5)."""
    return F.mse_loss(x_hat_BD, x_BD, reduction="sum") / len(x_BD)


def explained_variance(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """1 - SSE / total variance about the batch mean (not about zero).

    Predicting the batch mean for every row gives exactly 0; a perfect reconstruction gives 1.
    """
    x = x_BD.float()
    residual = (x - x_hat_BD.float()).pow(2).sum()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return 1 - residual / total


def explained_variance_sums(x_BD: torch.Tensor, x_hat_BD: torch.Tensor,
                            mean_squared_error: torch.Tensor | None = None) -> torch.Tensor:
    """(d_model + 2,) float64 sums over rows: [SSE, sum ||x||^2, sum x (d_model)]. Sums add up across batches
    or data-parallel ranks; `explained_variance_from_sums` turns them into explained_variance's value.
    `mean_squared_error`: mean_b ||x - x_hat||^2 when the caller has it already (a training step's loss term),
    so SSE is not computed again."""
    # Sums over a row (or, for sum x, over the rows of one batch) in the inputs' precision, at least float32;
    # the rest in float64. Converting the inputs to float64 first cost a training step ~5%.
    x, x_hat = _at_least_float32(x_BD), _at_least_float32(x_hat_BD)
    if mean_squared_error is not None:
        sse = mean_squared_error.detach().double() * len(x)
    else:
        sse = (x - x_hat).pow(2).sum(dim=-1).double().sum()
    return torch.cat([torch.stack([sse, x.pow(2).sum(dim=-1).double().sum()]), x.sum(dim=0).double()])


def explained_variance_from_sums(sums: torch.Tensor, n_rows: int) -> float:
    """explained_variance over `n_rows` rows from their `explained_variance_sums` (added up): the total
    variance about the mean is sum ||x||^2 - ||sum x||^2 / n."""
    return float(explained_variance_tensor_from_sums(sums, n_rows))


def explained_variance_tensor_from_sums(sums: torch.Tensor, n_rows: int) -> torch.Tensor:
    """`explained_variance_from_sums` as a tensor on the sums' device (no host sync)."""
    sse, sum_sq, sum_x_D = sums[0], sums[1], sums[2:]
    return 1 - sse / (sum_sq - sum_x_D.pow(2).sum() / n_rows)


def l0(latents_BS: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero latents per row."""
    return (latents_BS != 0).float().sum(dim=-1).mean()


def firing_counts(latents_BS: torch.Tensor) -> torch.Tensor:
    """(d_sae,) number of rows on which each latent is non-zero."""
    # Summed as bytes into int16 (vectorised ~3x better than the default int64 sum), in blocks that cannot
    # overflow it.
    fired_BS = (latents_BS != 0).view(torch.uint8)
    counts_S = torch.zeros(latents_BS.shape[-1], dtype=torch.int32, device=latents_BS.device)
    for start in range(0, fired_BS.shape[0], _INT16_ROWS):
        counts_S += fired_BS[start : start + _INT16_ROWS].sum(dim=0, dtype=torch.int16)
    return counts_S


_INT16_ROWS = 32767
"""The most rows whose firing count int16 holds."""


# --- reconstruction, beyond EV and MSE -------------------------------------------------------------------

def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision is too coarse for sums over d_model; float64 (the running stats) is kept."""
    return x if x.dtype == torch.float64 else x.float()


def cosine_similarity(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean over rows of cos(x, x_hat); a zero row on either side counts as 0."""
    return torch.nn.functional.cosine_similarity(_at_least_float32(x_hat_BD), _at_least_float32(x_BD), dim=-1, eps=1e-12).mean()


def l2_ratio(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||x_hat|| / ||x||: below 1 means the SAE shrinks activations."""
    return (_at_least_float32(x_hat_BD).norm(dim=-1) / _at_least_float32(x_BD).norm(dim=-1).clamp_min(1e-12)).mean()


def relative_reconstruction_bias(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """E||x_hat||^2 / E[x . x_hat] (Wright & Sharkey 2024): 1 / the gamma minimising E||gamma x_hat - x||^2.

    1 means no systematic shrinkage; x_hat = 2x gives 2, x_hat = x/2 gives 0.5, and x_hat = 0 gives 0 (the
    limit of x_hat = c x as c -> 0).
    """
    x, x_hat = _at_least_float32(x_BD), _at_least_float32(x_hat_BD)
    return _bias(x_hat.pow(2).sum(dim=-1).mean(), (x * x_hat).sum(dim=-1).mean())


def _bias(x_hat_sq: Any, x_dot_x_hat: Any) -> Any:
    return x_hat_sq * 0 if x_hat_sq == 0 else x_hat_sq / x_dot_x_hat


class ReconstructionStats:
    """Running sums of the reconstruction metrics over many batches, so nothing is held but (d_model,) vectors.

    Every metric equals the batch function above applied to all rows at once (tests check this): EV is
    about the mean of ALL rows (per-batch sums of squares about the batch mean are merged exactly, Chan et
    al.), cosine similarity and L2 ratio are means over rows, and the bias is a ratio of sums over rows.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean_D: torch.Tensor | None = None
        self.sum_sq_centred = 0.0
        """Sum over rows of ||x - mean||^2, about the running mean of all rows seen."""
        self.sums = {"sse": 0.0, "cos": 0.0, "l2_ratio": 0.0, "x_hat_sq": 0.0, "x_dot_x_hat": 0.0}

    @torch.no_grad()
    def add(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        n_b = len(x_BD)
        if n_b == 0:
            return
        x, x_hat = x_BD.double(), x_hat_BD.double()
        mean_b = x.mean(dim=0)
        m2_b = (x - mean_b).pow(2).sum().item()
        if self.mean_D is None:
            self.mean_D, self.sum_sq_centred = mean_b, m2_b
        else:
            delta = mean_b - self.mean_D
            n_a = self.n
            self.sum_sq_centred += m2_b + delta.pow(2).sum().item() * n_a * n_b / (n_a + n_b)
            self.mean_D = self.mean_D + delta * n_b / (n_a + n_b)
        self.n += n_b
        self.sums["sse"] += mse(x, x_hat).item() * n_b
        self.sums["cos"] += cosine_similarity(x, x_hat).item() * n_b
        self.sums["l2_ratio"] += l2_ratio(x, x_hat).item() * n_b
        self.sums["x_hat_sq"] += x_hat.pow(2).sum().item()
        self.sums["x_dot_x_hat"] += (x * x_hat).sum().item()

    def summary(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no rows were added")
        s = self.sums
        return {
            "mse": s["sse"] / self.n,
            "explained_variance": 1 - s["sse"] / self.sum_sq_centred,
            "cosine_similarity": s["cos"] / self.n,
            "l2_ratio": s["l2_ratio"] / self.n,
            "relative_reconstruction_bias": _bias(s["x_hat_sq"], s["x_dot_x_hat"]),
        }


# --- sparsity over an evaluation -------------------------------------------------------------------------

LOG10_FREQUENCY_EDGES = [e / 2 for e in range(-16, 1)]
"""Histogram bin edges for log10(firing frequency): 1e-8 .. 1 in half-decade steps."""


def firing_frequency_histogram(counts_S: torch.Tensor, n_tokens: int) -> dict[str, list[float] | list[int] | int]:
    """Histogram of log10(fraction of tokens each latent fired on); never-firing latents counted apart.

    Frequencies below the first edge fall into the first bin; a frequency of exactly 1 into the last.
    """
    freq_S = counts_S.double() / n_tokens
    fired = freq_S[freq_S > 0]
    edges = torch.tensor(LOG10_FREQUENCY_EDGES, dtype=torch.float64)
    log_f = fired.log10().clamp(edges[0].item(), edges[-1].item())
    # bucketize(right=True) puts log_f == edge e_i into bin i; the top edge (log10 1 = 0) joins the last bin.
    bins = (torch.bucketize(log_f, edges, right=True) - 1).clamp(0, len(edges) - 2)
    counts = torch.bincount(bins, minlength=len(edges) - 1)
    return {"log10_edges": LOG10_FREQUENCY_EDGES, "counts": counts.tolist(), "never_fired": int((freq_S == 0).sum())}


# --- downstream: the SAE spliced into the model ----------------------------------------------------------

def next_token_ce(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """(B, T-1) cross-entropy of predicting token t+1 from position t (the last position has no target)."""
    log_probs = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    return -log_probs.gather(-1, tokens_BT[:, 1:, None].to(log_probs.device)).squeeze(-1)


def kl_divergence(logits_p_BTV: torch.Tensor, logits_q_BTV: torch.Tensor) -> torch.Tensor:
    """(B, T) KL(P || Q) of the next-token distributions at each position, in nats. P is the reference."""
    log_p = torch.log_softmax(logits_p_BTV.float(), dim=-1)
    log_q = torch.log_softmax(logits_q_BTV.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def recovered_fraction(ablated: float, spliced: float, clean: float) -> float | None:
    """(ablated - spliced) / (ablated - clean): 1 when splicing costs nothing, 0 when it is as bad as ablation.

    This is the CE loss score with CE values and the KL score with KL values (whose clean value is 0).
    None when ablation changes nothing, so the ratio is undefined.
    """
    if ablated == clean:
        return None
    return (ablated - spliced) / (ablated - clean)
