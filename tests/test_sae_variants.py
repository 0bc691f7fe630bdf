"""The activation-function variants: definitions, the sparse TopK path, AuxK, and folding on save."""

import pytest
import torch

from lm_saes import SAEConfig, SparseAutoEncoder
from lm_saes.sae.activation_functions import ACTIVATION_FUNCTIONS
from lm_saes.sae import sparse_step
from lm_saes.sae.sparse_step import entries_above
from lm_saes.sae.sparse_topk import row_topk

ALL_ACT_FNS = sorted(ACTIVATION_FUNCTIONS)


def _sae(act_fn: str, seed: int = 0, **kw) -> SparseAutoEncoder:
    torch.manual_seed(seed)
    cfg = SAEConfig(hook_point_in="in", d_model=16, act_fn=act_fn, top_k=4, **{"expansion_factor": 8, **kw})
    sae = SparseAutoEncoder(cfg)
    with torch.no_grad():
        sae.b_E.normal_(0, 0.1)
        sae.b_D.normal_()
    return sae


def test_topk_keeps_the_k_largest_per_token() -> None:
    sae = _sae("topk")
    pre = (torch.randperm(128) - 60).float().unsqueeze(0)  # values -60..67, each once
    latents = sae.activation_function(pre)
    assert (latents != 0).sum().item() == 4
    assert sorted(latents[latents != 0].tolist()) == [64.0, 65.0, 66.0, 67.0]
    assert torch.equal(latents != 0, pre >= 64)


def test_batchtopk_shares_k_times_batch_and_learns_a_threshold_for_inference() -> None:
    sae = _sae("batchtopk").train()
    pre = torch.randn(32, 128)
    with torch.enable_grad():
        latents = sae.activation_function(pre)
    assert (latents != 0).sum().item() == 4 * 32
    assert (latents != 0).sum(dim=1).float().std() > 0  # tokens do not each get exactly k
    threshold = sae.activation_function.threshold.item()
    assert threshold == pytest.approx(latents[latents > 0].min().item())
    sae.eval()
    per_token = sae.activation_function(pre)
    assert torch.equal(per_token, pre * (pre > threshold))


def test_jumprelu_threshold_gets_a_gradient_only_near_the_threshold() -> None:
    # Both are given in the paper's units and scaled by sqrt(d_model) = 4: threshold 0.5, bandwidth 0.2.
    sae = _sae("jumprelu", jumprelu_init_threshold=0.125, jumprelu_bandwidth=0.05)
    pre = torch.tensor([[0.45, 0.55, 2.0, -1.0] * 32])
    latents = sae.activation_function(pre)
    assert torch.equal(latents, pre * (pre > 0.5))
    latents.sum().backward()
    grad = sae.activation_function.log_threshold.grad
    # d/dtheta of z H(z - theta) ~ -theta/eps inside the window |z - theta| < eps/2; chain rule through exp.
    assert grad[0].item() == pytest.approx(-0.5 / 0.2 * 0.5)
    assert grad[2].item() == 0 and grad[3].item() == 0


@pytest.mark.parametrize("penalty", ["tanh", "l0"])
def test_jumprelu_penalties(penalty: str) -> None:
    sae = _sae("jumprelu", jumprelu_sparsity=penalty, jumprelu_init_threshold=0.3)
    x = torch.randn(64, 16)
    out = sae.compute_loss(x, x, sparsity_coefficient=1.0)
    if penalty == "l0":
        assert out.sparsity.item() == pytest.approx(out.l0().item())
    else:
        f = out.latents_BS
        expected = torch.tanh(4.0 * f * sae.decoder_norms()).sum(-1).mean()
        assert out.sparsity.item() == pytest.approx(expected.item())


def test_sparse_topk_matches_the_dense_reference_in_outputs_and_gradients() -> None:
    x = torch.randn(64, 16, dtype=torch.float64)
    results = {}
    for sparse in (True, False):
        sae = _sae("topk", seed=1, sparse_topk=sparse, dtype=torch.float64)
        out = sae.compute_loss(x, x, sparsity_coefficient=0.0)
        out.loss.backward()
        results[sparse] = (out.reconstruction_BD.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0])
    for name in results[False][1]:
        torch.testing.assert_close(results[True][1][name], results[False][1][name], msg=name)


@pytest.mark.parametrize(("d_sae", "k"), [(256, 5), (256, 40), (100, 5)])  # 40*8 > 256 and 100 % 8: plain topk
def test_row_topk_finds_each_rows_k_largest(d_sae: int, k: int) -> None:
    pre_BS = torch.randn(50, d_sae, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pre_BS[0, ::32] += 10  # row 0's k largest all in one group (group j holds latents j, j + d_sae/8, ...)
    values_BK, indices_BK = row_topk(pre_BS, k)
    expected_BK = pre_BS.topk(k, dim=-1).indices
    assert torch.equal(indices_BK.sort(dim=-1).values, expected_BK.sort(dim=-1).values)
    assert torch.equal(values_BK, pre_BS.gather(1, indices_BK))


SPARSE_STEP_CASES = [("relu", {}), ("jumprelu", {"jumprelu_sparsity": "tanh"}), ("jumprelu", {"jumprelu_sparsity": "l0"}),
                     ("batchtopk", {})]


def _step_fp64(act_fn: str, max_density: float, **kw) -> tuple:
    """One fp64 loss and backward on a batch where about a fifth of the latents fire."""
    sae = _sae(act_fn, seed=1, dtype=torch.float64, sparse_max_density=max_density,
               jumprelu_init_threshold=0.3, jumprelu_bandwidth=0.1, **kw)
    with torch.no_grad():  # a bias that differs by latent: the sparse step adds it at the selected entries only
        jitter_S = 0.2 * torch.rand(sae.b_E.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        sae.b_E.copy_(jitter_S - (1.0 if act_fn == "relu" else 0.1))
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = sae.compute_loss(x, x, sparsity_coefficient=0.7)
    out.loss.backward()
    return sae, out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize(("act_fn", "kw"), SPARSE_STEP_CASES)
@pytest.mark.parametrize("branch", ["sparse", "sparse_column_blocks", "dense_switch"])
def test_sparse_step_matches_the_dense_reference(act_fn: str, kw: dict, branch: str, monkeypatch) -> None:
    # sparse_max_density 0 is the variant's own dense path; 1 always takes the sparse step; a tiny density makes
    # the switch decide dense, reusing the pre-activations it computed to decide. The tables here are too small
    # for a CPU's column blocks: blocks of 5 of the 16 columns (the last one short) stand in for them.
    ref_sae, ref, ref_grads = _step_fp64(act_fn, 0.0, **kw)
    if branch == "sparse_column_blocks":
        monkeypatch.setattr(sparse_step, "column_block", lambda table: 5)
    sae, out, grads = _step_fp64(act_fn, 1e-6 if branch == "dense_switch" else 1.0, **kw)
    assert (out.latents_BS is None) == (branch != "dense_switch")
    torch.testing.assert_close(out.reconstruction_BD, ref.reconstruction_BD)
    for name in ("loss", "mse", "sparsity"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), msg=name)
    assert torch.equal(out.firing_counts(128), ref.firing_counts(128)) and out.l0().item() == ref.l0().item()
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert ref_grads[name].abs().sum() > 0, name  # every gradient is exercised
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    for name, buffer in ref_sae.named_buffers():  # BatchTopK's threshold learns from the same selection
        torch.testing.assert_close(dict(sae.named_buffers())[name], buffer, msg=name)


@pytest.mark.parametrize("act_fn", ["relu", "topk", "batchtopk"])
def test_the_next_step_writes_into_a_sparse_steps_pre_activations_without_changing_its_gradients(act_fn: str) -> None:
    # A sparse step hands its (batch, d_sae) pre-activations back for the next step to write into; its own
    # outputs and gradients, taken after the next step ran, must be those of the step run alone.
    kw = {"sparse_topk": True} if act_fn == "topk" else {"sparse_max_density": 1.0}
    g = torch.Generator().manual_seed(6)
    x1, x2 = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    alone = _sae(act_fn, seed=1, **kw)
    ref = alone.compute_loss(x1, x1, 0.7)
    ref.loss.backward()
    sae = _sae(act_fn, seed=1, **kw)
    first = sae.compute_loss(x1, x1, 0.7)
    buffer = sparse_step._SPARE[((64, 128), torch.float32)]
    second = sae.compute_loss(x2, x2, 0.7)
    assert sparse_step._SPARE[((64, 128), torch.float32)] is buffer  # taken, written over, handed back
    assert not torch.equal(first.reconstruction_BD, second.reconstruction_BD)
    first.loss.backward()
    torch.testing.assert_close(first.reconstruction_BD, ref.reconstruction_BD, rtol=0, atol=0)
    for name, param in alone.named_parameters():
        torch.testing.assert_close(dict(sae.named_parameters())[name].grad, param.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("one_loud_row", [False, True])
@pytest.mark.parametrize("expansion_factor", [8, 32])  # 8: d_sae 128 = 8 x 4k, a plain topk; 32: row_topk's groups
def test_batchtopk_sparse_step_selects_the_batch_top_k(one_loud_row: bool, expansion_factor: int) -> None:
    # The sparse step searches each row's 4k largest; a row that keeps more than it offered (one row 50x
    # louder than the rest keeps nearly all of its latents) sends it to the whole batch instead.
    d_sae = 16 * expansion_factor
    saes = {density: _sae("batchtopk", seed=1, dtype=torch.float64, sparse_max_density=density,
                          expansion_factor=expansion_factor) for density in (0.0, 1.0)}
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(64, 16, dtype=torch.float64, generator=g)
        if one_loud_row:
            x[0] *= 50
        outs = {density: sae.compute_loss(x, x, 0.0) for density, sae in saes.items()}
        torch.testing.assert_close(outs[1.0].reconstruction_BD, outs[0.0].reconstruction_BD)
        assert torch.equal(outs[1.0].firing_counts(d_sae), outs[0.0].firing_counts(d_sae))
        assert saes[1.0].activation_function.threshold.item() == saes[0.0].activation_function.threshold.item()
        assert (outs[1.0].firing_counts(d_sae) > 0).sum() > 0
    assert saes[1.0].activation_function.threshold.item() > 0
    kept_by_row_0 = int((outs[0.0].latents_BS[0] > 0).sum())
    assert (kept_by_row_0 > 16) == one_loud_row  # 16 = the 4k the row offers


# 100: not a multiple of the group size, one latent per group; 16,400: groups of 16
@pytest.mark.parametrize("d_sae", [96, 100, 16_400])
@pytest.mark.parametrize("per_latent_cut", [False, True])
def test_entries_above_finds_every_entry_over_its_cut_row_by_row(d_sae: int, per_latent_cut: bool) -> None:
    g = torch.Generator().manual_seed(4)
    pre_BS = torch.randn(40, d_sae, dtype=torch.float64, generator=g)
    # cuts spread widely, so that a group's smallest cut lets through members that are below their own
    cut_S = torch.rand(d_sae, dtype=torch.float64, generator=g) * 3 if per_latent_cut else pre_BS.new_tensor(1.5)
    entries = entries_above(pre_BS, cut_S, max_density=1.0)
    assert entries is not None
    expected = (pre_BS > cut_S).nonzero()
    assert 0 < len(expected) < pre_BS.numel() // 5
    assert torch.all(entries.rows_N[1:] >= entries.rows_N[:-1])  # rows ascending: a CSR list
    order = (entries.rows_N * d_sae + entries.cols_N).argsort()
    torch.testing.assert_close(torch.stack([entries.rows_N, entries.cols_N], 1)[order], expected, rtol=0, atol=0)
    torch.testing.assert_close(entries.pre_N[order], pre_BS[expected[:, 0], expected[:, 1]], rtol=0, atol=0)
    assert entries_above(pre_BS, cut_S, max_density=0.01) is None  # denser than that: a dense step


@pytest.mark.parametrize("rows", [64, 130])  # one whole block of TRANSPOSE_BLOCK rows; two and a part
def test_contiguous_transpose_is_the_transpose(rows: int) -> None:
    a_SD = torch.randn(rows, 7, dtype=torch.float64)
    out_DS = sparse_step.contiguous_transpose(a_SD)
    assert out_DS.is_contiguous() and torch.equal(out_DS, a_SD.T)


@pytest.mark.parametrize("transposed", [False, True])
def test_weighted_row_sums_over_column_blocks_match_one_embedding_bag(transposed: bool) -> None:
    # 4,096 fp32 rows: blocks of 96 columns (1.5 MB), the last of 128 short; what the sparse step's bags read.
    table_RD = torch.randn(4096, 128, generator=torch.Generator().manual_seed(0))
    assert sparse_step.column_block(table_RD) == 96
    assert sparse_step.column_block(table_RD[:, :96]) is None  # one block would be the whole table
    assert sparse_step.column_block(torch.empty(20_000, 576)) is None  # too tall for 32 columns: read whole
    g = torch.Generator().manual_seed(1)  # 6,000 bags: the transposed result is written in two tiles of 4,096
    indices_N = torch.randint(0, 4096, (12_000,), generator=g)
    weights_N = torch.randn(12_000, generator=g)
    offsets_G = torch.arange(0, 12_000, 2)
    sums = sparse_step.weighted_row_sums(indices_N, table_RD, offsets_G, weights_N, transposed)
    expected_GD = torch.nn.functional.embedding_bag(indices_N, table_RD, offsets_G, mode="sum",
                                                    per_sample_weights=weights_N)
    assert sums.is_contiguous()
    torch.testing.assert_close(sums, expected_GD.T if transposed else expected_GD, rtol=0, atol=0)


def test_jumprelu_sparse_step_keeps_the_latents_just_below_the_threshold() -> None:
    # Their gradient moves the threshold (straight-through), so they are selected although they do not fire.
    _, out, _ = _step_fp64("jumprelu", 1.0)
    assert out.sparse is not None
    n_firing = int((out.sparse.values_N != 0).sum())
    assert 0 < n_firing < len(out.sparse.values_N)
    # the products (decoder, W_D's, W_E's and x's gradients) read the firing entries alone, in both orders
    firing = out.sparse.firing
    assert firing.take_M is not None and torch.equal(firing.take_M, out.sparse.values_N.nonzero().squeeze(1))
    assert torch.equal(firing.cols_M, out.sparse.cols_N[firing.take_M])
    assert sorted(firing.by_latent.order_N.tolist()) == firing.take_M.tolist()
    for name in ("relu", "topk", "batchtopk"):  # every entry they select fires: no `nonzero` (a GPU host sync)
        _, other, _ = _step_fp64(name, 1.0)
        assert other.sparse is not None and other.sparse.firing.take_M is None


def test_relu_dense_step_takes_its_l1_from_the_decoder_product() -> None:
    sae, out, grads = _step_fp64("relu", 0.0)
    expected = (out.latents_BS * sae.decoder_norms()).sum(dim=-1).mean()
    torch.testing.assert_close(out.sparsity, expected)
    sae.zero_grad()
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    latents = sae.encode_normalized(x)
    # the written-out loss (relu has no AuxK; the normalisation factors are 1)
    ((sae.decode_normalized(latents) - x).pow(2).sum(-1).mean() + 0.7 * (latents * sae.decoder_norms()).sum(-1).mean()).backward()
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_the_sparse_step_switches_on_the_batch_density() -> None:
    sae = _sae("relu", sparse_max_density=0.1)
    x = torch.randn(64, 16)
    with torch.no_grad():
        sae.b_E.fill_(10.0)  # every latent fires
    assert sae.compute_loss(x, x, 1.0).latents_BS is not None
    with torch.no_grad():
        sae.b_E.fill_(-10.0)
        sae.b_E[:3] = 100.0  # 3 of 128 fire: 2% density
    out = sae.compute_loss(x, x, 1.0)
    assert out.latents_BS is None and out.l0().item() == 3


def test_k_anneals_from_initial_to_final() -> None:
    sae = _sae("topk", top_k_initial=20, top_k_anneal_fraction=0.5)
    ks = []
    for fraction in (0.0, 0.25, 0.5, 0.9):
        sae.activation_function.set_progress(round(fraction * 100), 100)
        ks.append(sae.activation_function.k)
    assert ks == [20, 12, 4, 4]


def test_k_is_kept_on_the_host_and_a_loaded_state_dict_sets_it() -> None:
    # k is read once or twice a step; the host copy spares a GPU the sync of reading the buffer
    sae = _sae("topk", top_k_initial=20, top_k_anneal_fraction=0.5)
    af = sae.activation_function
    af.set_progress(25, 100)
    assert af.k == 12 and int(af.k_current) == 12
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    state["activation_function.k_current"].fill_(7)
    sae.load_state_dict(state)
    assert af.k == 7
    af.set_progress(90, 100)
    assert af.k == 4


def test_batchtopk_threshold_starts_at_the_smallest_positive_kept_value_then_moves_by_the_momentum() -> None:
    sae = _sae("batchtopk", batchtopk_threshold_momentum=0.25)
    af = sae.activation_function
    af._update_threshold(torch.tensor([-1.0, 0.0]))  # nothing positive: nothing learned
    assert not bool(af.threshold_initialized) and af.threshold.item() == 0.0
    af._update_threshold(torch.tensor([3.0, 0.0, 2.0, -5.0]))
    assert bool(af.threshold_initialized) and af.threshold.item() == 2.0
    af._update_threshold(torch.tensor([6.0, 4.0]))
    assert af.threshold.item() == pytest.approx(2.0 + 0.25 * (4.0 - 2.0))
    af._update_threshold(torch.tensor([0.0]))
    assert af.threshold.item() == pytest.approx(2.5)


def test_aux_k_trains_only_dead_latents_on_the_residual() -> None:
    sae = _sae("topk", aux_k=8)
    x = torch.randn(32, 16)
    dead = torch.zeros(128, dtype=torch.bool)
    assert sae.compute_loss(x, x, 0.0, dead_S=dead).aux_k.item() == 0.0
    dead[:40] = True
    out = sae.compute_loss(x, x, 0.0, dead_S=dead)
    assert 0 < out.aux_k.item()
    out.aux_k.backward()
    assert sae.W_E.grad[:, 40:].abs().sum() == 0 and sae.W_E.grad[:, :40].abs().sum() > 0
    assert sae.W_D.grad[40:].abs().sum() == 0


def test_relu_has_no_aux_k() -> None:
    sae = _sae("relu")
    x = torch.randn(8, 16)
    assert sae.compute_loss(x, x, 0.0, dead_S=torch.ones(128, dtype=torch.bool)).aux_k.item() == 0.0


@pytest.mark.parametrize("act_fn", ALL_ACT_FNS)
@pytest.mark.parametrize("transcoder", [False, True])
def test_outputs_on_raw_activations_survive_save_and_load(act_fn: str, transcoder: bool, tmp_path) -> None:
    sae = _sae(act_fn, **({"hook_point_out": "out"} if transcoder else {}))
    with torch.no_grad():
        sae.norm_factor_in.fill_(0.37)
        sae.norm_factor_out.fill_(2.9 if transcoder else 0.37)
    if act_fn == "batchtopk":  # give it a learned threshold, as training would
        with torch.enable_grad():
            sae.train().activation_function(torch.randn(64, 128))
    sae.eval()
    x = torch.randn(50, 16) * 7
    before = sae(x)
    sae.save_pretrained(tmp_path)
    loaded = SparseAutoEncoder.from_pretrained(tmp_path)
    assert loaded.cfg.activation_norm_folded
    assert loaded.norm_factor_in.item() == 1.0 and loaded.norm_factor_out.item() == 1.0
    torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already folded"):
        loaded.fold_activation_norm()


def test_folding_in_place_keeps_outputs() -> None:
    sae = _sae("relu")
    with torch.no_grad():
        sae.norm_factor_in.fill_(4.0)
        sae.norm_factor_out.fill_(4.0)
    x = torch.randn(10, 16)
    before = sae(x)
    sae.fold_activation_norm()
    torch.testing.assert_close(sae(x), before)


def test_gated_paths_share_the_encoder_and_the_aux_loss_leaves_the_decoder_alone() -> None:
    sae = _sae("gated")
    af = sae.activation_function
    with torch.no_grad():
        af.r_mag.fill_(0.5)
        af.b_gate.fill_(-0.2)
        af.b_mag.fill_(0.1)
    x = torch.randn(32, 16)
    pre = x @ sae.W_E
    expected = (pre - 0.2 > 0) * torch.relu(pre * torch.exp(torch.tensor(0.5)) + 0.1)
    torch.testing.assert_close(sae.encode_normalized(x), expected)
    aux = af.auxiliary_loss(x, pre, sae.W_D, sae.b_D, x)
    aux.backward()
    assert sae.W_D.grad is None and sae.W_E.grad.abs().sum() > 0 and af.b_gate.grad.abs().sum() > 0


def test_matryoshka_prefixes_reconstruct_from_the_one_batch_selection() -> None:
    sae = _sae("matryoshka_batchtopk", matryoshka_prefixes=[16, 0.25])
    af = sae.activation_function
    assert af.prefix_sizes() == [16, 32, 128]
    x = torch.randn(64, 16)
    out = sae.compute_loss(x, x, 0.0)
    latents = af.batch_select(sae.pre_activations(x), 4)  # the whole dictionary's k x batch
    assert (latents > 0).sum() <= 4 * 64 and (latents[:, :16] > 0).any() and (latents[:, 32:] > 0).any()
    expected = [(latents[:, :m] @ sae.W_D[:m] + sae.b_D - x).pow(2).sum(-1).mean() for m in (16, 32, 128)]
    # by default each prefix weighs in proportion to its size
    assert out.loss.item() == pytest.approx(sum(e.item() * m / 176 for e, m in zip(expected, (16, 32, 128))), rel=1e-5)
    equal = _sae("matryoshka_batchtopk", matryoshka_prefixes=[16, 0.25], matryoshka_prefix_weights=[1, 1, 1])
    equal.load_state_dict(sae.state_dict())
    assert equal.compute_loss(x, x, 0.0).loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


@pytest.mark.parametrize("weights", [[1, 1], [1, -1, 1], [0, 0, 0]])
def test_matryoshka_prefix_weights_are_one_per_prefix(weights) -> None:
    with pytest.raises(ValueError, match=r"sae.matryoshka_prefix_weights=.*one non-negative weight per prefix, 3"):
        _sae("matryoshka_batchtopk", matryoshka_prefixes=[16, 0.25], matryoshka_prefix_weights=weights)
