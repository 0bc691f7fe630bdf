"""The training step on every device torch sees: the sparse steps against the dense reference, and a short
bf16 run. On a machine without CUDA only the CPU cases run; scripts/gpu_check.sh runs these on a GPU."""

from __future__ import annotations

import pytest
import torch

from lm_saes import SAEConfig, SparseAutoEncoder, Trainer, TrainerConfig

# Only the devices this machine has: a CPU-only run lists no CUDA case rather than counting skipped ones.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SPARSE_CASES = [("relu", {"sparse_max_density": 1.0}), ("jumprelu", {"sparse_max_density": 1.0}),
                ("batchtopk", {"sparse_max_density": 1.0}), ("topk", {"sparse_topk": True})]
DENSE = {"sparse_max_density": 0.0, "sparse_topk": False}


def _sae(act_fn: str, device: str, **kw) -> SparseAutoEncoder:
    torch.manual_seed(0)
    cfg = SAEConfig(hook_point_in="h", d_model=32, expansion_factor=8, act_fn=act_fn, top_k=8, device=device,
                    jumprelu_init_threshold=0.2, **kw)
    sae = SparseAutoEncoder(cfg)
    with torch.no_grad():
        sae.b_E.sub_(0.5 if act_fn == "relu" else 0.0)
    return sae


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("act_fn", "sparse"), SPARSE_CASES)
def test_sparse_step_matches_dense_on_device(device: str, act_fn: str, sparse: dict) -> None:
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for kw in (sparse, DENSE):
        sae = _sae(act_fn, device, **kw)
        out = sae.compute_loss(x, x, sparsity_coefficient=0.5)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in sae.named_parameters()}))
    (sparse_out, sparse_grads), (dense_out, dense_grads) = results
    assert sparse_out.latents_BS is None and dense_out.latents_BS is not None
    torch.testing.assert_close(sparse_out.reconstruction_BD, dense_out.reconstruction_BD, rtol=1e-4, atol=1e-4)
    assert torch.equal(sparse_out.firing_counts(256).cpu(), dense_out.firing_counts(256).cpu())
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "batchtopk", "topk"])
def test_a_short_bf16_run_trains_on_device(device: str, act_fn: str, tmp_path) -> None:
    sae = _sae(act_fn, device, sparse_max_density=0.3)  # dense at first, sparse once L0 falls
    g = torch.Generator().manual_seed(2)
    directions = torch.randn(16, 32, generator=g)
    batches = [{"h": torch.rand(256, 16, generator=g).pow(8) @ directions, "tokens": torch.zeros(256, dtype=torch.long)}
               for _ in range(20)]
    cfg = TrainerConfig(total_training_tokens=256 * 20, amp_dtype="bfloat16", log_frequency=10,
                        exp_result_path=str(tmp_path), l1_coefficient=0.3)
    first = sae.compute_loss(batches[0]["h"].to(device), batches[0]["h"].to(device), 0.0).mse.item()
    final = Trainer(cfg).fit(sae, iter(batches))
    assert final["mse"] < first
