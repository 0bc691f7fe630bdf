"""ExampleReservoir: the batched top-k merge equals a brute-force sort over the whole stream."""

from __future__ import annotations

import torch

from lm_saes.analysis.top_examples import PAD_TOKEN, ExampleReservoir, Window, context_candidates


def test_merging_batches_keeps_the_global_top_k_contexts_with_their_windows() -> None:
    torch.manual_seed(0)
    S, B, T, k, window = 5, 4, 10, 3, Window(before=2, after=1)
    reservoir = ExampleReservoir(S, k, window)
    all_latents, all_tokens = [], []
    for batch in range(6):
        latents_BTS = torch.relu(torch.randn(B, T, S))
        latents_BTS[:, :, 4] = 0  # a latent that never fires keeps no example
        tokens_BT = torch.randint(0, 100, (B, T))
        peaks_SB, _, tokens_SBW, acts_SBW = context_candidates(latents_BTS, tokens_BT, window)
        keys_SB = torch.where(peaks_SB > 0, peaks_SB, -torch.inf)
        reservoir.merge(keys_SB, peaks_SB, (batch * B + torch.arange(B)).expand(S, -1), tokens_SBW, acts_SBW)
        all_latents.append(latents_BTS)
        all_tokens.append(tokens_BT)
    latents_CTS, tokens_CT = torch.cat(all_latents), torch.cat(all_tokens)
    kept = reservoir.sorted_by_peak()
    for s in range(4):
        peaks_C, pos_C = latents_CTS[:, :, s].max(dim=1)
        best = peaks_C.argsort(descending=True)[:k]
        assert kept["context"][s].tolist() == best.tolist()
        assert torch.equal(kept["peak"][s], peaks_C[best])
        for slot, c in enumerate(best.tolist()):
            p = int(pos_C[c])
            expect = [int(tokens_CT[c, q]) if 0 <= q < T else PAD_TOKEN for q in range(p - 2, p + 2)]
            assert kept["tokens"][s, slot].tolist() == expect
            assert kept["acts"][s, slot, 2] == peaks_C[c]
    assert (kept["context"][4] == -1).all() and (kept["peak"][4] == 0).all()
