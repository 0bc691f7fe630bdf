"""Runs the real sae-lens, in its own venv (scripts/saelens_venv.sh), for tests/test_interop_saelens.py.

    SAELENS_PYTHON tests/saelens_driver.py JOBS.json   -> one JSON line per job on stdout

Jobs (a JSON list, run in order, one sae-lens import for all):
  {"op": "create", "arch": NAME, "dir": DIR, "seed": N}   SAELens builds a random SAE of that kind and saves it
  {"op": "run", "dir": DIR, "inputs": F, "outputs": G}     SAE.load_from_disk(DIR); writes to G its encode(x_BD),
                                                           decode(encode(x_BD)) and decode(latents_BS) of F
This file imports only sae-lens and torch: it never runs in our venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE, K = 16, 64, 4
SAE_META = {"model_name": "tiny-test-model", "hook_name": "blocks.1.hook_resid_post", "context_size": 32,
            "dataset_path": "tiny/dataset", "prepend_bos": True}
TRANSCODER_META = {**SAE_META, "hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out"}


def _randomize(sae: Any, threshold: str | None) -> None:
    """Non-trivial biases (so b_dec's subtraction matters), uneven decoder norms, thresholds that bite."""
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name in ("b_enc", "b_dec", "b_gate", "b_mag", "r_mag"):
                param.copy_(torch.randn_like(param) * 0.3)
            elif name == "W_enc":
                param.copy_(torch.randn_like(param) * 0.5)
            elif name == "W_dec":
                param.mul_(torch.rand(param.shape[0], 1) * 1.5 + 0.25)
            elif name == "W_skip":
                param.copy_(torch.randn_like(param) * 0.05)
        if threshold == "positive":
            sae.threshold.copy_(torch.rand(D_SAE) * 0.9 + 0.1)
        elif threshold == "mixed":
            sae.threshold.copy_(torch.rand(D_SAE) - 0.5)


def _inference_sae(arch: str) -> tuple[Any, str | None]:
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(**(TRANSCODER_META if "transcoder" in arch else SAE_META))
    common: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "metadata": meta}
    tc = {**common, "d_out": D_IN, "apply_b_dec_to_input": False}
    table: dict[str, tuple[Any, str | None]] = {
        "standard": (sl.StandardSAE(sl.StandardSAEConfig(**common)), None),
        "standard_no_b_dec_input": (sl.StandardSAE(sl.StandardSAEConfig(**common, apply_b_dec_to_input=False)), None),
        "standard_layer_norm": (
            sl.StandardSAE(sl.StandardSAEConfig(**common, normalize_activations="layer_norm")), None),
        "topk": (sl.TopKSAE(sl.TopKSAEConfig(**common, k=K)), None),
        "topk_rescaled": (sl.TopKSAE(sl.TopKSAEConfig(**common, k=K, rescale_acts_by_decoder_norm=True)), None),
        "jumprelu": (sl.JumpReLUSAE(sl.JumpReLUSAEConfig(**common)), "positive"),
        "jumprelu_zero_threshold": (sl.JumpReLUSAE(sl.JumpReLUSAEConfig(**common)), None),
        "jumprelu_mixed_threshold": (sl.JumpReLUSAE(sl.JumpReLUSAEConfig(**common)), "mixed"),
        "gated": (sl.GatedSAE(sl.GatedSAEConfig(**common)), None),
        "transcoder": (sl.Transcoder(sl.TranscoderConfig(**tc)), None),
        "jumprelu_transcoder": (sl.JumpReLUTranscoder(sl.JumpReLUTranscoderConfig(**tc)), "positive"),
        "skip_transcoder": (sl.SkipTranscoder(sl.SkipTranscoderConfig(**tc)), None),
    }
    return table[arch]


def _training_sae(arch: str) -> Any:
    """SAELens's training classes, saved the way its trainer saves them (save_inference_model)."""
    import sae_lens as sl

    common: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "k": K}
    if arch == "topk_trained":
        return sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(**common))
    if arch == "batchtopk_trained":
        return sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(**common))
    return sl.MatryoshkaBatchTopKTrainingSAE(
        sl.MatryoshkaBatchTopKTrainingSAEConfig(**common, matryoshka_widths=[D_SAE // 4, D_SAE]))


def create(arch: str, folder: str, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    if arch.endswith("_trained"):
        sae = _training_sae(arch)
        _randomize(sae, None)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.1)
        for key, value in SAE_META.items():  # as SAELens's training runner fills it in before saving
            setattr(sae.cfg.metadata, key, value)
        sae.save_inference_model(folder)
    else:
        sae, threshold = _inference_sae(arch)
        _randomize(sae, threshold)
        sae.save_model(folder)
    return {"op": "create", "arch": arch, "class": type(sae).__name__}


def run(folder: str, inputs: str, outputs: str) -> dict[str, Any]:
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder)
    tensors = load_file(inputs)
    with torch.no_grad():
        latents_BS = sae.encode(tensors["x_BD"])
        result = {"latents_BS": latents_BS, "reconstruction_BD": sae.decode(latents_BS),
                  "decoded_BD": sae.decode(tensors["latents_BS"]), "forward_BD": sae(tensors["x_BD"])}
    save_file({k: v.contiguous() for k, v in result.items()}, outputs)
    return {"op": "run", "dir": folder, "class": type(sae).__name__, "architecture": sae.cfg.architecture(),
            "metadata": sae.cfg.metadata.to_dict()}


def main(jobs_file: str) -> None:
    for job in json.loads(Path(jobs_file).read_text()):
        try:
            if job["op"] == "create":
                answer = create(job["arch"], job["dir"], job.get("seed", 0))
            else:
                answer = run(job["dir"], job["inputs"], job["outputs"])
        except Exception as error:  # reported per job: a refusal by SAELens is a result too
            answer = {"op": job["op"], "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
