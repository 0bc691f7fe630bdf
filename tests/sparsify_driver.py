"""Runs the real eai-sparsify, in the peer venv (scripts/saelens_venv.sh), for tests/test_interop_sparsify.py.

    PEER_PYTHON tests/sparsify_driver.py JOBS.json   -> one JSON line per job on stdout

Jobs (a JSON list, run in order):
  {"op": "create", "dir": DIR, "seed": N, "d_in": D, "num_latents": S, "k": K, "transcode": bool,
   "activation": "topk", "skip_connection": false}
      sparsify builds a SparseCoder, gets random non-trivial weights (biases included, so b_dec's subtraction
      matters) and saves it with save_to_disk
  {"op": "run", "dir": DIR, "inputs": F, "outputs": G}
      SparseCoder.load_from_disk(DIR); writes to G its encode(x) scattered into (batch, num_latents) and its
      forward's reconstruction of F's x_BD
This file imports only sparsify and torch: it never runs in our venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def create(job: dict[str, Any]) -> dict[str, Any]:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(job["seed"])
    cfg = SparseCoderConfig(activation=job.get("activation", "topk"), num_latents=job["num_latents"], k=job["k"],
                            transcode=job.get("transcode", False), skip_connection=job.get("skip_connection", False))
    coder = SparseCoder(job["d_in"], cfg)
    with torch.no_grad():
        coder.encoder.bias.copy_(torch.randn_like(coder.encoder.bias) * 0.3)
        coder.b_dec.copy_(torch.randn_like(coder.b_dec) * 0.3)
        coder.W_dec.copy_(torch.randn_like(coder.W_dec) * 0.2)
    coder.save_to_disk(job["dir"])
    return {"op": "create", "dir": job["dir"], "num_latents": coder.num_latents}


def run(job: dict[str, Any]) -> dict[str, Any]:
    from sparsify import SparseCoder

    coder = SparseCoder.load_from_disk(job["dir"])
    x_BD = load_file(job["inputs"])["x_BD"]
    with torch.no_grad():
        top_acts_BK, top_indices_BK, _ = coder.encode(x_BD)
        latents_BS = torch.zeros(x_BD.shape[0], coder.num_latents).scatter(-1, top_indices_BK, top_acts_BK)
        recon_BD = coder(x_BD).sae_out
    save_file({"latents_BS": latents_BS.contiguous(), "recon_BD": recon_BD.contiguous()}, job["outputs"])
    return {"op": "run", "dir": job["dir"]}


def main() -> None:
    for job in json.loads(Path(sys.argv[1]).read_text()):
        print(json.dumps({"create": create, "run": run}[job["op"]](job)), flush=True)


if __name__ == "__main__":
    main()
