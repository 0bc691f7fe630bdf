"""What the trainer counts between steps: one step's totals over the global batch, the log window's sums, and
the counters a checkpoint holds besides the weights and the optimizer."""

from __future__ import annotations

import math

import torch

from lm_saes import metrics
from lm_saes.checkpoint import Checkpoint
from lm_saes.sae import SAELoss

_TOTALS = ("n", "mse", "sparsity_loss", "aux_k_loss", "l0", "diverged", "preempted")
"""The scalars at the head of a step's totals: the row count, the step metrics times rows, and two flags."""


@torch.no_grad()
def step_totals(out: SAELoss, n: int, d_sae: int, preempted: bool) -> torch.Tensor:
    """This rank's step as one float64 vector of sums over its rows, so that one all-reduce makes it the global
    batch's: the `_TOTALS` scalars, explained_variance_sums (d_model + 2), then the (d_sae,) firing counts.
    L0 is read off the firing counts (their total over the rows), not counted again over the latents."""
    fired_S = out.firing_counts(d_sae).double()
    sums = torch.stack([out.mse.double() * n, out.sparsity.double() * n, out.aux_k.double() * n, fired_S.sum()])
    # new_full, not new_tensor: a fill on the device, where new_tensor copies a host value over (a sync on a GPU)
    flags = torch.stack([(~torch.isfinite(out.loss)).double(), sums.new_full((), float(preempted))])
    ev_sums = metrics.explained_variance_sums(out.target_BD, out.reconstruction_BD, out.mse)
    return torch.cat([sums.new_full((1,), float(n)), sums, flags, ev_sums, fired_S])


class StepTotals:
    """A step's totals over the global batch (after the all-reduce). They stay on the device: only the two
    flags are read back every step (a host sync, which stalls a GPU); the metrics are read at log steps."""

    def __init__(self, totals: torch.Tensor, d_model: int, n_global: int) -> None:
        self.n = n_global
        """The global batch's rows (the host's count, the same as totals[0])."""
        self.sums = totals[1:5]
        """mse, sparsity_loss, aux_k_loss and l0, each times the rows."""
        self.ev_sums = totals[len(_TOTALS) : len(_TOTALS) + d_model + 2]
        self.fired_S = totals[len(_TOTALS) + d_model + 2 :].long()
        diverged, preempted = totals[5:7].tolist()
        self.diverged, self.preempted = diverged > 0, preempted > 0


_WINDOW_SUMS = ("mse", "sparsity_loss", "aux_k_loss", "explained_variance", "l0")
"""In a checkpoint's state.window_sums in this order, after the token count."""


class Window:
    """Token-weighted sums of the step metrics between two log lines, kept on the device until a log step."""

    def __init__(self, d_sae: int, device: str) -> None:
        self.n_tokens = 0
        self.sums = torch.zeros(len(_WINDOW_SUMS), dtype=torch.float64, device=device)
        """The `_WINDOW_SUMS`, each times the rows."""
        self.fired_S = torch.zeros(d_sae, dtype=torch.long, device=device)

    def add(self, totals: StepTotals) -> torch.Tensor:
        """Accumulate one step; return its (d_sae,) firing counts."""
        n = totals.n
        self.n_tokens += n
        self.sums[:3] += totals.sums[:3]
        self.sums[3] += metrics.explained_variance_tensor_from_sums(totals.ev_sums, n) * n
        self.sums[4] += totals.sums[3]
        self.fired_S += totals.fired_S
        return totals.fired_S

    def summary(self, tokens_since_fired_S: torch.Tensor, dead_window: int) -> dict[str, float | int]:
        result: dict[str, float | int] = {k: v / self.n_tokens for k, v in zip(_WINDOW_SUMS, self.sums.tolist())}
        d_sae = len(self.fired_S)
        n_dead = int((tokens_since_fired_S >= dead_window).sum())
        result["dead_fraction"] = n_dead / d_sae
        result["n_dead"] = n_dead
        result["n_dense"] = int((self.fired_S > metrics.DENSE_FREQUENCY * self.n_tokens).sum())
        if not all(math.isfinite(float(v)) for v in result.values()):
            raise FloatingPointError(f"non-finite training metrics: {result}")
        return result


class TrainingState:
    """The counters a checkpoint must hold besides the weights and the optimizer."""

    def __init__(self, d_sae: int, device: str) -> None:
        self.d_sae, self.device = d_sae, device
        self.step = 0
        self.tokens_seen = 0
        self.tokens_since_fired_S = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.window = Window(d_sae, device)

    def record(self, totals: StepTotals) -> None:
        """Count one finished step of the global batch: its tokens, its firings and its window sums."""
        n_global = totals.n
        fired_S = self.window.add(totals) > 0
        self.tokens_since_fired_S += n_global
        self.tokens_since_fired_S[fired_S] = 0
        self.tokens_seen += n_global
        self.step += 1

    def window_summary(self, dead_feature_window: int) -> dict[str, float | int]:
        """The window's metrics. Dead: no firing for `dead_feature_window` tokens, or ever in a shorter run."""
        return self.window.summary(self.tokens_since_fired_S, min(dead_feature_window, self.tokens_seen))

    def start_window(self) -> None:
        self.window = Window(self.d_sae, self.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        w = self.window
        return {
            "state.tokens_since_fired": self.tokens_since_fired_S,
            "state.window_fired": w.fired_S,
            "state.window_sums": torch.cat([w.sums.new_tensor([w.n_tokens]), w.sums]).cpu(),
            "rng.torch": torch.get_rng_state(),
            **({"rng.cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
        }

    def load(self, checkpoint: Checkpoint) -> None:
        t, device = checkpoint.tensors, self.tokens_since_fired_S.device
        self.step, self.tokens_seen = int(checkpoint.meta["step"]), int(checkpoint.meta["tokens_seen"])
        self.tokens_since_fired_S = t["state.tokens_since_fired"].to(device)
        self.window.fired_S = t["state.window_fired"].to(device)
        sums = t["state.window_sums"].to(device)
        self.window.n_tokens = int(sums[0])
        self.window.sums = sums[1:].clone()
        torch.set_rng_state(t["rng.torch"])
        if "rng.cuda" in t and torch.cuda.is_available():
            torch.cuda.set_rng_state(t["rng.cuda"])
