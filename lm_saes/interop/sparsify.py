"""EleutherAI sparsify's format, read: `cfg.json` + `sae.safetensors` in one folder per hookpoint, as
`SparseCoder.save_to_disk` (eai-sparsify 1.x) writes them.

Checked against the real eai-sparsify (tests/test_interop_sparsify.py runs it in the peer venv), not its docs.

sparsify's TopK SAE encodes topk(relu((x - b_dec) W_encᵀ + b_enc)) and decodes latents W_dec + b_dec; ours reads
x as it is, so import folds b_dec into the encoder bias (b_E = b_enc - W_enc b_dec). Its transcoders
(`transcode`) read x as it is. What has no form here is one UserInputError: `groupmax`, skip connections,
a folder saved without its decoder, a width that is not a multiple of d_in.

sparsify records no hook, only the folder's name: the module path of the hookpoint in the Hugging Face model
(`layers.6`, `h.6`, `layers.6.mlp`). The common ones map to TransformerLens hooks (`HOOKPOINTS`); any other
needs `hook_point_in=` (and `hook_point_out=` for a transcoder).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from lm_saes.errors import UserInputError

if TYPE_CHECKING:
    from lm_saes.sae.config import SAEConfig

SPARSIFY_CFG_FILE = "cfg.json"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"

HOOKPOINTS: dict[str, tuple[str, str, str]] = {
    # a hookpoint's HF module path (its layer's number as (\d+)) -> (SAE hook, transcoder in, transcoder out)
    r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)":
        ("blocks.{n}.hook_resid_post", "blocks.{n}.hook_resid_pre", "blocks.{n}.hook_resid_post"),
    r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.mlp":
        ("blocks.{n}.hook_mlp_out", "blocks.{n}.ln2.hook_normalized", "blocks.{n}.hook_mlp_out"),
}


def is_sparsify_folder(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / SPARSIFY_CFG_FILE).is_file() and (Path(path) / SPARSIFY_WEIGHTS_FILE).is_file()


def hooks_of_hookpoint(hookpoint: str, transcoder: bool) -> tuple[str, str | None] | None:
    """The TransformerLens hooks of a sparsify hookpoint (the folder's name), or None when it is not a known one."""
    for pattern, (sae_hook, tc_in, tc_out) in HOOKPOINTS.items():
        match = re.fullmatch(pattern, hookpoint)
        if match:
            n = match.group(1)
            return (tc_in.format(n=n), tc_out.format(n=n)) if transcoder else (sae_hook.format(n=n), None)
    return None


def _refused(where: str, key: str, value: Any, allowed: str) -> UserInputError:
    return UserInputError(f"{where}: {key}", value, allowed)


def _check_importable(cfg: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> int:
    """The SAE's width, or a UserInputError for what our SparseAutoEncoder cannot reproduce exactly."""
    if cfg.get("activation", "topk") != "topk":
        raise _refused(where, "activation", cfg["activation"], "only topk is importable (groupmax has no form here)")
    if cfg.get("skip_connection") or "W_skip" in state:
        raise _refused(where, "skip_connection", True, "a skip connection (W_skip) is not importable")
    expected = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    if set(state) != expected:
        raise _refused(where.replace(SPARSIFY_CFG_FILE, SPARSIFY_WEIGHTS_FILE), "tensors", sorted(state),
                       f"expected exactly {sorted(expected)} (a folder saved with its decoder)")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg["expansion_factor"])
    if d_sae % d_in:
        raise _refused(where, "num_latents", d_sae, f"must be a multiple of d_in ({d_in}): our width is d_model * an integer")
    return d_sae


def _hooks(folder: Path, transcoder: bool, hook_in: str | None, hook_out: str | None, where: str) -> tuple[str, str | None]:
    known = hooks_of_hookpoint(folder.resolve().name, transcoder)
    hook_in = hook_in or (known[0] if known else None)
    hook_out = (hook_out or (known[1] if known else None)) if transcoder else None
    if hook_in is None or (transcoder and hook_out is None):
        key = "hook_point_in" if hook_in is None else "hook_point_out"
        raise _refused(where, "hookpoint", folder.resolve().name,
                       f"not a hookpoint we can name in TransformerLens (layers.N, h.N, layers.N.mlp); pass {key}=")
    return hook_in, hook_out


def read_sparsify(
    path: str | os.PathLike[str], hook_point_in: str | None = None, hook_point_out: str | None = None,
) -> tuple["SAEConfig", dict[str, torch.Tensor]]:
    """A sparsify folder as our SAEConfig and the state dict of our SparseAutoEncoder, whose encode/decode then
    give sparsify's outputs (its sparse top-k scattered into d_sae)."""
    from lm_saes.sae.config import SAEConfig

    folder = Path(path)
    where = str(folder / SPARSIFY_CFG_FILE)
    cfg = json.loads((folder / SPARSIFY_CFG_FILE).read_text())
    state = load_file(str(folder / SPARSIFY_WEIGHTS_FILE))
    d_sae = _check_importable(cfg, state, where)
    transcoder = bool(cfg.get("transcode", False))
    hook_in, hook_out = _hooks(folder, transcoder, hook_point_in, hook_point_out, where)
    dtype = state["encoder.weight"].dtype
    s = {k: v.double() for k, v in state.items()}
    W_enc_SD = s["encoder.weight"]
    b_E_S = s["encoder.bias"] if transcoder else s["encoder.bias"] - W_enc_SD @ s["b_dec"]  # (x - b_dec) W_encᵀ
    one = torch.ones((), dtype=torch.float64)  # sparsify normalises nothing
    ours = {"W_E": W_enc_SD.T, "b_E": b_E_S, "W_D": s["W_dec"], "b_D": s["b_dec"],
            "norm_factor_in": one, "norm_factor_out": one,
            "activation_function.k_current": torch.tensor(int(cfg["k"]))}
    sae_cfg = SAEConfig(hook_point_in=hook_in, hook_point_out=hook_out, d_model=int(cfg["d_in"]),
                        expansion_factor=d_sae // int(cfg["d_in"]), act_fn="topk", top_k=int(cfg["k"]),
                        dtype=dtype, activation_norm_folded=True)
    return sae_cfg, ours
