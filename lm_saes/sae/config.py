"""SAEConfig: the shape and kind of a sparse autoencoder (or transcoder)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from lm_saes.config_base import BaseConfig, Device, DType
from lm_saes.errors import UserInputError
from lm_saes.sae.activation_functions import ACTIVATION_FUNCTIONS

CONFIG_FILE = "config.json"


class SAEConfig(BaseConfig):
    hook_point_in: str
    """The hook the SAE reads, e.g. `blocks.6.hook_resid_post`."""
    hook_point_out: str | None = None
    """The hook it reconstructs; None or equal to hook_point_in is an SAE, anything else a transcoder."""
    d_model: int | None = Field(None, gt=0)
    """The model's hidden size; None means "take it from the model" (the runner fills it in and checks it)."""
    expansion_factor: int = Field(8, gt=0)
    act_fn: str = "relu"
    """One of the registry in lm_saes/sae/activation_functions.py: relu, topk, batchtopk, jumprelu,
    matryoshka_batchtopk, gated."""
    dtype: DType = torch.float32
    device: Device = "cpu"

    # --- topk and batchtopk ---
    top_k: int = Field(50, gt=0)
    """Active latents per token (topk), or on average per token over a batch (batchtopk)."""
    top_k_initial: int | None = Field(None, gt=0)
    """Start training with this k and anneal linearly to top_k (None: constant k)."""
    top_k_anneal_fraction: float = Field(0.0, ge=0, le=1)
    """Fraction of training over which k anneals from top_k_initial to top_k."""
    aux_k: int = Field(512, ge=0)
    """AuxK: how many dead latents model the residual (0 turns AuxK off)."""
    aux_k_coefficient: float = Field(1 / 32, ge=0)
    """Weight of the AuxK loss relative to the reconstruction loss, both normalised as in the reference
    (Gao et al., 2024: normalised MSE + aux_k_coefficient x the AuxK residual's normalised MSE)."""
    unit_decoder_norm: bool | None = None
    """Hold every decoder row at unit norm while training (the gradient's component along the row is removed
    before each step, the row renormalised after it). None: the variant's default, true for the TopK family
    (topk, batchtopk, matryoshka_batchtopk), as in the reference, so that a latent cannot win the top k by a
    small decoder norm, and for gated, as in its paper."""
    sparse_topk: bool = True
    """topk: decode by gathering the k decoder rows and backpropagate only through the selected latents.
    False runs the dense reference (same outputs and gradients, d_sae/k times more work)."""
    sparse_max_density: float = Field(0.06, ge=0, le=1)
    """relu, jumprelu, batchtopk: a training step whose batch needs at most this fraction of its (batch x d_sae)
    latents (those firing; for jumprelu also those just below the threshold, whose gradient moves it) decodes
    and backpropagates through those alone (sae/sparse_step.py), with the dense step's outputs and gradients.
    Decided per step, so a run goes sparse as its L0 falls. On a 2-core CPU (relu, d_model 576) the sparse step
    against the dense one: 8x batch 1,024 1.47x at density 0.04, 1.15x at 0.06, 0.98x at 0.08; 8x batch 4,096
    1.82x at 0.06; 32x batch 1,024 1.06x at 0.06, 0.92x at 0.10. So 0.06 sits under the crossover everywhere
    measured; 0 always runs the dense reference."""
    batchtopk_threshold_momentum: float = Field(0.01, gt=0, le=1)
    """batchtopk: moving-average rate of the inference threshold (the smallest kept activation)."""
    matryoshka_prefixes: list[float] | None = None
    """matryoshka_batchtopk: the nested prefixes that each reconstruct the input, as latent counts (>= 1) or
    fractions of d_sae (< 1); the whole dictionary is always the last. None: the whole dictionary only."""
    matryoshka_prefix_weights: list[float] | None = None
    """matryoshka_batchtopk: the weight of each prefix's squared error in the loss, smallest prefix first and the
    whole dictionary last (one more than matryoshka_prefixes; normalised to sum 1). None: proportional to the
    prefix's size. Equal weights (e.g. [1, 1, 1]) are Bussmann et al.'s and SAELens's loss; with one selection
    over the dictionary they load every term onto the first latents, and on the built-in corpus they give twice
    plain BatchTopK's dense latents (62 vs 31 of 4,608 after 90K tokens), size weights 1.3x (README)."""
    batchtopk_threshold_window: float = Field(0.1, gt=0, le=1)
    """batchtopk: the last fraction of training over which the inference threshold is the plain mean of the
    batches' smallest kept activations (at least one step), so that it fits the final weights."""

    # --- jumprelu ---
    jumprelu_init_threshold: float = Field(0.1, gt=0)
    """Initial per-latent threshold in units of inputs of unit mean squared norm (the paper's; it uses 0.001
    over ~100K steps): it is multiplied by sqrt(d_model), since the SAE's inputs have mean norm sqrt(d_model).
    A threshold learns in log space, at most ~lr per Adam step, so a short run needs it to start near its
    final scale."""
    jumprelu_bandwidth: float = Field(0.05, gt=0)
    """Width of the rectangle kernel of the straight-through estimator, in the same units as the threshold."""
    jumprelu_sparsity: Literal["tanh", "l0"] = "tanh"
    """The penalty: sum tanh(c f ||W_D||) or the L0 count (both through the estimator)."""
    jumprelu_tanh_scale: float = Field(4.0, gt=0)
    """c in the tanh penalty."""
    jumprelu_lr_factor: float = Field(10.0, gt=0)
    """The threshold's learning rate relative to trainer.lr: 10, so that a log threshold can travel in a
    budget of a few hundred steps."""

    # --- gated ---
    gated_lr_factor: float = Field(10.0, gt=0)
    """gated: the learning rate of r_mag, b_gate and b_mag relative to trainer.lr. The sparsity penalty shrinks
    the shared W_E, which r_mag (a log scale) must make up for in the magnitude path, and b_gate must travel to
    the gate's threshold; at trainer.lr, at most ~lr per Adam step, neither keeps up in a run of a few hundred
    steps (10 recovers planted features at 300 steps; 1: mean max cosine 0.77 at the same penalty)."""

    # --- state of saved weights ---
    activation_norm_folded: bool = False
    """True in a saved SAE: the dataset-wise normalisation factors are folded into W_E, W_D and b_D, so the
    weights act on raw activations directly. Set by save_pretrained; folding twice is refused."""

    @field_validator("act_fn")
    @classmethod
    def _known_act_fn(cls, value: str) -> str:
        if value not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"unknown activation function; allowed: {', '.join(ACTIVATION_FUNCTIONS)}")
        return value

    @model_validator(mode="after")
    def _one_weight_per_prefix(self) -> "SAEConfig":
        weights = self.matryoshka_prefix_weights
        if weights is None:
            return self
        n_prefixes = len(self.matryoshka_prefixes or []) + 1
        if len(weights) != n_prefixes or min(weights) < 0 or sum(weights) <= 0:
            raise UserInputError("sae.matryoshka_prefix_weights", weights,
                                 f"one non-negative weight per prefix, {n_prefixes} here (the "
                                 f"{len(self.matryoshka_prefixes or [])} of sae.matryoshka_prefixes and the whole "
                                 "dictionary last), not all zero")
        return self

    @property
    def hook_point_target(self) -> str:
        return self.hook_point_out or self.hook_point_in

    @property
    def is_transcoder(self) -> bool:
        return self.hook_point_target != self.hook_point_in

    @property
    def d_sae(self) -> int:
        if self.d_model is None:
            raise ValueError("d_model is not set yet; it is taken from the model when the SAE is built")
        return self.d_model * self.expansion_factor

    def save_hyperparameters(self, save_path: str | os.PathLike[str]) -> Path:
        """Write `config.json` (atomically) into `save_path`, creating the folder if needed."""
        from lm_saes.run_dir import write_json_atomic

        path = Path(save_path) / CONFIG_FILE
        write_json_atomic(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> "SAEConfig":
        return cls.model_validate(json.loads((Path(path) / CONFIG_FILE).read_text()))
