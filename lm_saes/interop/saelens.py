"""The SAELens format both ways: `cfg.json` + `sae_weights.safetensors`, exactly as sae-lens 6.x writes them.

Checked against the real sae-lens (tests/test_interop_saelens.py runs it in its own venv), not its docs.

| ours (act_fn)          | SAELens `architecture`          | notes                                              |
|------------------------|---------------------------------|----------------------------------------------------|
| relu                   | standard                        |                                                    |
| topk                   | topk (`k`)                      | import folds `rescale_acts_by_decoder_norm` into W |
| jumprelu               | jumprelu (`threshold`)          | threshold = exp(log_threshold)                     |
| batchtopk              | jumprelu                        | its one threshold on every latent (as SAELens)     |
| matryoshka_batchtopk   | jumprelu                        | likewise (SAELens saves its own so too)            |
| gated                  | gated (`b_gate`, `b_mag`, `r_mag`) | no b_enc; both ways                             |
| relu transcoder        | transcoder                      | hook_point_out <-> metadata.hook_name_out          |
| jumprelu, batchtopk tr.| jumprelu_transcoder             |                                                    |
| relu (import only)     | jumprelu, every threshold <= 0  | relu(pre) * (pre > t) is relu(pre) then            |

SAELens's standard SAEs subtract b_dec from the input before encoding (`apply_b_dec_to_input`); ours do not,
so import folds it into the encoder bias (b_E = b_enc - b_dec W_enc) and export writes it off. Our
dataset-wise normalisation is folded into the weights before export, so `normalize_activations` is "none".
Everything else (gated transcoders, skip transcoders, per-token normalisations, hook_z, topk transcoders, ...) is one
UserInputError, never a silently different SAE.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

from lm_saes.config_base import dtype_name, parse_dtype
from lm_saes.errors import UserInputError
from lm_saes.sae.config import CONFIG_FILE

if TYPE_CHECKING:
    from lm_saes.runners.train import TrainSAESettings
    from lm_saes.sae.config import SAEConfig
    from lm_saes.sae.model import SparseAutoEncoder

SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"
"""The sae-lens release whose `save_model` output the export reproduces, written as metadata.sae_lens_version
(SAELens reads a cfg.json without a 6.x version as the older flat layout)."""

_EXPORT_ARCHITECTURES: dict[tuple[str, bool], str] = {
    # (act_fn, is_transcoder) -> SAELens architecture
    ("relu", False): "standard",
    ("topk", False): "topk",
    ("jumprelu", False): "jumprelu",
    ("batchtopk", False): "jumprelu",
    ("matryoshka_batchtopk", False): "jumprelu",
    ("gated", False): "gated",
    ("relu", True): "transcoder",
    ("jumprelu", True): "jumprelu_transcoder",
    ("batchtopk", True): "jumprelu_transcoder",
    ("matryoshka_batchtopk", True): "jumprelu_transcoder",
}
_IMPORT_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "transcoder", "jumprelu_transcoder")
_GATED_TENSORS = ("b_gate", "b_mag", "r_mag")
"""The gated SAE's own tensors, ours under activation_function.NAME; SAELens's gated SAE has no b_enc."""
_TRANSCODERS = ("transcoder", "jumprelu_transcoder")
_LLM_METADATA_KEYS = (  # sae_lens.loading.pretrained_sae_loaders.LLM_METADATA_KEYS: what pre-6 configs carry
    "model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
    "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
    "sae_lens_version", "sae_lens_training_version", "hook_name_out", "hook_head_index_out", "hf_hook_name",
    "hf_hook_name_out",
)


@dataclass(frozen=True)
class SAELensMetadata:
    """How the SAE was trained, as SAELens records it (cfg.json's `metadata`); None where unknown."""

    model_name: str | None = None
    """The model the SAE reads: a hub id, or ours (`builtin:smollm2-135m`)."""
    hook_name: str | None = None
    hook_name_out: str | None = None
    """Transcoders: the hook they reconstruct."""
    context_size: int | None = None
    dataset_path: str | None = None
    prepend_bos: bool | None = None
    exclude_special_tokens: bool | None = None
    """True: BOS, EOS and padding positions were left out of training (ours always are)."""

    @classmethod
    def from_settings(cls, settings: "TrainSAESettings") -> "SAELensMetadata":
        """What a run's settings say: its model, the first corpus it read, its context size.

        Our packing starts every context with the tokenizer's BOS and masks BOS, EOS and padding.
        """
        from lm_saes.activation import ActivationFactoryDatasetSource

        names = [s.name for s in settings.activation_factory.sources if isinstance(s, ActivationFactoryDatasetSource)]
        dataset = settings.datasets[names[0]].dataset_name_or_path if names else None
        return cls(model_name=settings.model.model_name, hook_name=settings.sae.hook_point_in,
                   hook_name_out=settings.sae.hook_point_out if settings.sae.is_transcoder else None,
                   context_size=settings.activation_factory.context_size, dataset_path=dataset,
                   prepend_bos=True, exclude_special_tokens=True)

    @classmethod
    def from_dict(cls, metadata: Mapping[str, Any]) -> "SAELensMetadata":
        return cls(**{f.name: metadata.get(f.name) for f in fields(cls)})


# --- export ----------------------------------------------------------------------------------------------

def export_architecture(cfg: "SAEConfig") -> str:
    """The SAELens architecture an SAE of ours is written as, or a UserInputError saying why there is none."""
    arch = _EXPORT_ARCHITECTURES.get((cfg.act_fn, cfg.is_transcoder))
    if arch is None:
        kind = "transcoder" if cfg.is_transcoder else "SAE"
        allowed = ", ".join(f"{a}{' transcoder' if t else ''}" for a, t in _EXPORT_ARCHITECTURES)
        raise UserInputError("sae.act_fn", cfg.act_fn, f"a {cfg.act_fn} {kind} has no SAELens 6 form "
                             f"(SAELens transcoders are ReLU or JumpReLU); exportable: {allowed}")
    return arch


def saelens_state_dict(sae: "SparseAutoEncoder") -> dict[str, torch.Tensor]:
    """Our folded weights under SAELens's names (W_enc (d_in, d_sae), W_dec (d_sae, d_out), ...)."""
    export_architecture(sae.cfg)
    folded = sae.folded_state_dict()
    state = {"W_enc": folded["W_E"], "b_enc": folded["b_E"], "W_dec": folded["W_D"], "b_dec": folded["b_D"]}
    if sae.cfg.act_fn == "jumprelu":
        state["threshold"] = folded["activation_function.log_threshold"].exp()
    elif sae.cfg.act_fn in ("batchtopk", "matryoshka_batchtopk"):  # inference: a JumpReLU, one threshold for all
        state["threshold"] = folded["activation_function.threshold"].expand(sae.cfg.d_sae)
    elif sae.cfg.act_fn == "gated":  # its pre-activations are x W_E (+ its own biases): b_E is unused
        del state["b_enc"]
        state.update({k: folded[f"activation_function.{k}"] for k in _GATED_TENSORS})
    return {k: v.contiguous() for k, v in state.items()}


def saelens_cfg_dict(cfg: "SAEConfig", metadata: SAELensMetadata | None = None) -> dict[str, Any]:
    """cfg.json's content, keys in the order SAELens's `SAEConfig.to_dict` writes them."""
    arch = export_architecture(cfg)
    meta = asdict(metadata or SAELensMetadata())
    meta.update(hook_name=cfg.hook_point_in, hook_name_out=cfg.hook_point_out if cfg.is_transcoder else None)
    if not cfg.is_transcoder:
        del meta["hook_name_out"]
    out: dict[str, Any] = {
        "d_in": cfg.d_model, "d_sae": cfg.d_sae, "dtype": dtype_name(cfg.dtype), "device": "cpu",
        "apply_b_dec_to_input": False,  # our encoder reads x as it is
        "normalize_activations": "none",  # our normalisation is folded into the weights
        "reshape_activations": "none",
        # sae_lens_training_version: None, as SAELens did not train it.
        "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None, **meta},
    }
    if arch == "topk":
        out.update(k=cfg.top_k, rescale_acts_by_decoder_norm=False)
    if arch in _TRANSCODERS:
        out["d_out"] = cfg.d_model
    out["architecture"] = arch
    return out


def save_saelens(
    sae: "SparseAutoEncoder", save_path: str | os.PathLike[str], metadata: SAELensMetadata | None = None
) -> Path:
    """Write `sae` as a SAELens folder (cfg.json + sae_weights.safetensors), both atomically; returns the
    weights' path. Refuses (UserInputError) an SAE that SAELens cannot express, before writing anything."""
    from lm_saes.run_dir import atomic_path, write_text_atomic

    cfg_dict = saelens_cfg_dict(sae.cfg, metadata)
    tensors = saelens_state_dict(sae)
    folder = Path(save_path)
    if (folder / CONFIG_FILE).exists():
        raise UserInputError("save_path", str(folder), f"holds an lm_saes SAE ({CONFIG_FILE}), whose weights share "
                             f"the name {SAELENS_WEIGHTS_FILE}; export into another folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SAELENS_WEIGHTS_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(folder / SAELENS_CFG_FILE, json.dumps(cfg_dict))  # one line, as SAELens's json.dump
    return path


# --- import ----------------------------------------------------------------------------------------------

def is_saelens_folder(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / SAELENS_CFG_FILE).is_file() and (Path(path) / SAELENS_WEIGHTS_FILE).is_file()


def read_saelens_cfg(path: str | os.PathLike[str]) -> dict[str, Any]:
    """cfg.json in the 6.x layout (older flat configs converted as SAELens itself converts them)."""
    raw = json.loads((Path(path) / SAELENS_CFG_FILE).read_text())
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if version and Version(version) >= Version("6.0.0-rc.0"):
        return raw
    return _pre_6_cfg(raw)


def _pre_6_cfg(raw: Mapping[str, Any]) -> dict[str, Any]:
    """sae_lens's handle_pre_6_0_config, for what we read: renamed keys, defaults, flat metadata."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    cfg = {renames.get(k, k): v for k, v in raw.items()}
    act_fn, k = cfg.get("activation_fn", "relu"), (cfg.get("activation_fn_kwargs") or {}).get("k")
    arch = "topk" if act_fn == "topk" and k is not None else cfg.get("architecture", "standard")
    if arch == "standard" and act_fn != "relu":  # sae-lens 6 would read it as a ReLU SAE: not what was trained
        raise UserInputError("activation_fn", act_fn, "this pre-6 SAELens config's activation is not relu or topk")
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        norm = "expected_average_only_in" if norm else "none"
    out = {key: cfg[key] for key in ("d_in", "d_sae", "d_out", "rescale_acts_by_decoder_norm") if key in cfg}
    out.update(architecture=arch, dtype=cfg.get("dtype", "float32"), normalize_activations=norm,
               apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
               reshape_activations=cfg.get("reshape_activations",
                                           "hook_z" if "hook_z" in (cfg.get("hook_name") or "") else "none"),
               metadata={key: v for key, v in cfg.items() if key in _LLM_METADATA_KEYS})
    if arch == "topk":
        out["k"] = k if k is not None else cfg["k"]
    return out


def read_saelens_metadata(path: str | os.PathLike[str]) -> SAELensMetadata:
    """The model, hooks, context size and dataset a SAELens folder records (None where it does not)."""
    return SAELensMetadata.from_dict(read_saelens_cfg(path).get("metadata") or {})


def _refused(where: str, key: str, value: Any, allowed: str) -> UserInputError:
    return UserInputError(f"{where}: {key}", value, allowed)


def _check_importable(cfg: Mapping[str, Any], where: str) -> None:
    """A UserInputError for any cfg.json setting our SparseAutoEncoder cannot reproduce exactly."""
    arch = cfg.get("architecture")
    if arch not in _IMPORT_ARCHITECTURES:
        raise _refused(where, "architecture", arch, f"not importable; importable: {', '.join(_IMPORT_ARCHITECTURES)}")
    if cfg.get("normalize_activations", "none") != "none":
        raise _refused(where, "normalize_activations", cfg["normalize_activations"],
                       "only 'none' is importable (fold the normalisation into the weights first, as "
                       "sae_lens's SAE.from_pretrained does for registry SAEs, then save_model)")
    if cfg.get("reshape_activations", "none") != "none":
        raise _refused(where, "reshape_activations", cfg["reshape_activations"],
                       "only 'none' is importable (we read (..., d_model) activations, not per-head hook_z)")
    for key in ("hook_head_index", "hook_head_index_out"):
        if (cfg.get("metadata") or {}).get(key) is not None:
            raise _refused(where, f"metadata.{key}", cfg["metadata"][key], "one head's SAEs are not importable")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    if arch in _TRANSCODERS and cfg.get("d_out", d_in) != d_in:
        raise _refused(where, "d_out", cfg["d_out"], f"must equal d_in ({d_in}): our transcoders keep d_model")
    if d_sae % d_in:
        raise _refused(where, "d_sae", d_sae, f"must be a multiple of d_in ({d_in}): our width is d_model * an integer")


def _checked_tensors(cfg: Mapping[str, Any], state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The file's tensors, with SAELens's own load-time conversions, and nothing we would drop silently."""
    state = dict(state)
    if "log_threshold" in state:  # older JumpReLU checkpoints; SAELens converts them the same way
        state["threshold"] = state.pop("log_threshold").exp()
    scale = state.pop("scaling_factor", None)  # SAELens ignores an all-ones finetuning scaling factor
    if scale is not None and not torch.all(scale == 1):
        raise _refused(where, "scaling_factor", "not all ones", "a finetuning scaling factor is not importable")
    if cfg["architecture"] == "gated":
        expected = {"W_enc", "W_dec", "b_dec", *_GATED_TENSORS}
    else:
        expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if "jumprelu" in cfg["architecture"] else set())
    if set(state) != expected:
        raise _refused(where, "tensors", sorted(state), f"expected exactly {sorted(expected)}")
    return state


def _act_fn_and_threshold(cfg: Mapping[str, Any], threshold_S: torch.Tensor | None, where: str) -> str:
    """relu, topk, gated or jumprelu. SAELens's JumpReLU is relu(pre) * (pre > t): a latent with t <= 0 is a plain
    ReLU, one with t > 0 is our JumpReLU with log_threshold = log t; a mix of the two has no form here."""
    if cfg["architecture"] in ("topk", "gated"):
        return cfg["architecture"]
    if threshold_S is None:
        return "relu"
    positive = int((threshold_S > 0).sum())
    if positive == threshold_S.numel():
        return "jumprelu"
    if positive == 0:
        return "relu"
    raise _refused(where, "threshold", f"{threshold_S.numel() - positive} of {threshold_S.numel()} latents <= 0",
                   "a JumpReLU threshold must be > 0 on every latent (we store its log), or <= 0 on every one (a ReLU)")


def _our_weights(cfg: Mapping[str, Any], state: dict[str, torch.Tensor], act_fn: str) -> dict[str, torch.Tensor]:
    """SAELens's weights as ours, in float64: x W_E + b_E equals SAELens's pre-activations (up to rounding)."""
    s = {k: v.double() for k, v in state.items()}
    if act_fn == "gated":
        return _our_gated_weights(cfg, s)
    W_E, b_E, W_D, b_D = s["W_enc"], s["b_enc"], s["W_dec"], s["b_dec"]
    if cfg.get("apply_b_dec_to_input", True) and cfg["architecture"] not in _TRANSCODERS:
        b_E = b_E - s["b_dec"] @ W_E  # (x - b_dec) W_enc + b_enc
    if act_fn == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens ranks pre * ||W_dec_i|| and decodes latents / ||W_dec_i||: fold both into the weights.
        norms_S = s["W_dec"].norm(dim=-1)
        W_E, b_E, W_D = W_E * norms_S, b_E * norms_S, W_D / norms_S[:, None]
    one = torch.ones((), dtype=torch.float64)  # the normalisation is in the weights already
    out = {"W_E": W_E, "b_E": b_E, "W_D": W_D, "b_D": b_D, "norm_factor_in": one, "norm_factor_out": one}
    if act_fn == "jumprelu":
        out["activation_function.log_threshold"] = s["threshold"].log()
    elif act_fn == "topk":  # the k it encodes with, a buffer of ours (a k schedule's last value)
        out["activation_function.k_current"] = torch.tensor(int(cfg["k"]))
    return out


def _our_gated_weights(cfg: Mapping[str, Any], s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens's gated SAE as ours: b_dec's subtraction from the input folded into both paths' biases
    ((x - b_dec) W_enc + b_gate, and exp(r_mag) times that product + b_mag)."""
    b_gate, b_mag = s["b_gate"], s["b_mag"]
    if cfg.get("apply_b_dec_to_input", True):
        shift_S = s["b_dec"] @ s["W_enc"]
        b_gate, b_mag = b_gate - shift_S, b_mag - s["r_mag"].exp() * shift_S
    one = torch.ones((), dtype=torch.float64)
    return {"W_E": s["W_enc"], "b_E": torch.zeros_like(b_gate), "W_D": s["W_dec"], "b_D": s["b_dec"],
            "norm_factor_in": one, "norm_factor_out": one, "activation_function.b_gate": b_gate,
            "activation_function.b_mag": b_mag, "activation_function.r_mag": s["r_mag"]}


def _our_config(
    cfg: Mapping[str, Any], act_fn: str, hook_in: str | None, hook_out: str | None, where: str
) -> "SAEConfig":
    from lm_saes.sae.config import SAEConfig

    meta = cfg.get("metadata") or {}
    hook_in = hook_in or meta.get("hook_name")
    is_transcoder = cfg["architecture"] in _TRANSCODERS
    hook_out = (hook_out or meta.get("hook_name_out")) if is_transcoder else None
    if hook_in is None:
        raise _refused(where, "metadata.hook_name", None, "no hook recorded; pass hook_point_in=")
    if is_transcoder and hook_out is None:
        raise _refused(where, "metadata.hook_name_out", None, "a transcoder with no output hook; pass hook_point_out=")
    extra = {"top_k": cfg["k"]} if act_fn == "topk" else {}
    return SAEConfig(hook_point_in=hook_in, hook_point_out=hook_out, d_model=cfg["d_in"],
                     expansion_factor=cfg["d_sae"] // cfg["d_in"], act_fn=act_fn,
                     dtype=parse_dtype(cfg.get("dtype", "float32")), activation_norm_folded=True, **extra)


def read_saelens(
    path: str | os.PathLike[str], hook_point_in: str | None = None, hook_point_out: str | None = None,
) -> tuple["SAEConfig", dict[str, torch.Tensor]]:
    """A SAELens folder as our SAEConfig and the state dict of our SparseAutoEncoder, whose encode/decode then
    give SAELens's outputs (SparseAutoEncoder.from_pretrained builds it). The hooks default to the recorded
    metadata."""
    folder = Path(path)
    where = str(folder / SAELENS_CFG_FILE)
    cfg = read_saelens_cfg(folder)
    _check_importable(cfg, where)
    state = _checked_tensors(cfg, load_file(str(folder / SAELENS_WEIGHTS_FILE)), where)
    act_fn = _act_fn_and_threshold(cfg, state.get("threshold"), where)
    return _our_config(cfg, act_fn, hook_point_in, hook_point_out, where), _our_weights(cfg, state, act_fn)
