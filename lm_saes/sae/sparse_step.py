"""Training on the firing latents only, for any variant whose latents are sparse (ReLU, JumpReLU, TopK and
BatchTopK).

The encoder's forward stays dense: every pre-activation is needed to know which latents fire. The variant then
names the entries of the (batch, d_sae) latents the step needs (those that fire, plus any whose gradient is not
zero although they do not fire, e.g. JumpReLU's below-threshold window), as a CSR-style list sorted by row:
values, rows, cols and each row's offset; ReLU and JumpReLU name them by a cut per latent (`sparse_cut`: x W_E is
compared with cut - b_E by `entries_above`, which reads the dense matrix once, by group maxima). Everything after
that touches only those entries, and the products only those of them that fire (`Firing`): the decoder is a bag of
the firing rows of W_D, and the encoder's backward multiplies a sparse (batch x d_sae) gradient into dense
matrices, never forming a tokens x d_sae tensor. On a CPU the bags read their tables in cache-sized column
blocks (`weighted_row_sums`), and the step's large outputs are written into tensors recycled from the step before
(`recycle`), not fresh ones.

`dense_pre` is the other branch of the same switch: the pre-activations already computed for the decision,
handed to autograd with the usual dense backward, so a dense step does not multiply twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Firing(NamedTuple):
    """The selected entries that fire, which are all that the step's products read: the decoder, W_D's and W_E's
    gradients and x's. A variant whose selection also holds entries that do not fire (JumpReLU's window below its
    threshold, selected for the threshold's gradient: at 8x ~400 entries per row against ~50 firing) names the
    firing ones once per step (`ActivationFunction.sparse_firing`); the entries that do not fire have a zero
    value and a zero gradient there, so leaving them out changes no sum."""

    take_M: torch.Tensor | None
    """Their positions in the selected list (ascending), or None: every selected entry fires."""
    cols_M: torch.Tensor
    offsets_B: torch.Tensor
    """Where each row's firing entries start."""
    by_latent: ByLatent
    """The firing entries in latent order, for the backward's G^T products (`order_N` indexes the whole list)."""

    def take(self, values_N: torch.Tensor) -> torch.Tensor:
        """The firing entries' values, from values at every selected entry."""
        return values_N if self.take_M is None else values_N.index_select(0, self.take_M)

    @classmethod
    def of(cls, rows_N: torch.Tensor, cols_N: torch.Tensor, offsets_B: torch.Tensor, d_sae: int,
           take_M: torch.Tensor | None) -> Firing:
        if take_M is None:
            return cls(None, cols_N, offsets_B, ByLatent.of(rows_N, cols_N, d_sae))
        rows_M, cols_M = rows_N.index_select(0, take_M), cols_N.index_select(0, take_M)
        by_latent = ByLatent.of(rows_M, cols_M, d_sae)
        return cls(take_M, cols_M, row_offsets(rows_M, len(offsets_B)),
                   by_latent._replace(order_N=take_M.index_select(0, by_latent.order_N)))


class SparseLatents(NamedTuple):
    """The selected entries of a batch's latents, sorted by row; the others are zero and carry no gradient."""

    values_N: torch.Tensor
    """The latents there (0 at an entry selected only for its gradient)."""
    rows_N: torch.Tensor
    cols_N: torch.Tensor
    offsets_B: torch.Tensor
    """Where each row's entries start in the lists (its end is the next row's start)."""
    firing: Firing
    """Those of them that fire, which the products read."""

    def decode_with_norms(self, W_D_SD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over a row's entries of value * W_D[col] (no bias), W_D's row norms, as `row_norms`). One autograd
        node for both, so W_D's gradient from a penalty on the norms is added into the decoder's in place (one
        pass over W_D, where separate nodes cost a product, a fresh W_D-sized tensor and autograd's sum). Under
        autocast the values may come in a lower precision than W_D; the products run at W_D's."""
        return _SparseDecode.apply(self.values_N.to(W_D_SD.dtype), W_D_SD, self.cols_N, self.offsets_B, self.firing)

    def firing_counts(self, d_sae: int) -> torch.Tensor:
        """(d_sae,) number of rows on which each latent is non-zero. A scatter-add: no host sync on a GPU (a
        masked selection and bincount each read a size back), and a fifth of their time on a CPU."""
        fired_N = (self.values_N != 0).long()
        return torch.zeros(d_sae, dtype=torch.long, device=fired_N.device).scatter_add_(0, self.cols_N, fired_N)


class ByLatent(NamedTuple):
    """A step's entries in latent order (G^T as a CSR list, G the sparse (batch, d_sae) matrix): sorted once,
    for both products G^T dense of the backward (W_D's gradient and W_E's)."""

    order_N: torch.Tensor
    """Entry positions, sorted by latent (stably, so rows ascend within one); with `Firing`, positions in the
    whole selected list of the firing entries alone."""
    rows_N: torch.Tensor
    cols_N: torch.Tensor
    offsets_S: torch.Tensor
    """Where each latent's entries start."""

    @classmethod
    def of(cls, rows_N: torch.Tensor, cols_N: torch.Tensor, d_sae: int) -> "ByLatent":
        cols_sorted_N, order_N = torch.sort(cols_N.int(), stable=True)  # int32 sorts in half the time of int64
        return cls(order_N, rows_N[order_N], cols_sorted_N, row_offsets(cols_sorted_N, d_sae))

    def transposed_product(self, values_N: torch.Tensor, dense_BD: torch.Tensor,
                           transposed: bool = False) -> torch.Tensor:
        """(d_sae, d) G^T dense, G holding `values_N` (in entry order) at the entries; with `transposed`, its
        transpose (d, d_sae), contiguous. Latent s's row is the sum of its entries' dense rows weighted by their
        values: a bag of rows (`weighted_row_sums`). On a CPU that and the shared sort take about half the time of
        sparse addmm's scatter of an uncoalesced COO matrix (~200K entries: 13 vs 25 ms at 8x, 25 vs 47 ms at
        32x)."""
        return weighted_row_sums(self.rows_N, dense_BD, self.offsets_S, values_N.index_select(0, self.order_N),
                                 transposed)


CACHE_BLOCK_BYTES = 3 << 19
"""A gathered table's columns are taken in blocks of about this size (1.5 MB) on a CPU, so the block stays in a
core's L2 cache (2 MB on the 2-core Xeon measured) while every bag reads its rows: at 8x, batch 4,096, the
decoder's bag takes 3.9 vs 6.8 ms and a G^T product 3.6 vs 6.7 ms, and W_E's gradient, written transposed block
by block, 5.0 vs 9.4 ms (the product, then `contiguous_transpose`). A table too tall for a block of 32 columns
(W_D at 32x) is read whole: narrower blocks lose more to the bags' bookkeeping than they gain."""


def column_block(table_RD: torch.Tensor) -> int | None:
    """Columns per block of `table_RD` for `weighted_row_sums` (a multiple of 16), or None: take it whole."""
    if table_RD.device.type != "cpu":
        return None
    width = CACHE_BLOCK_BYTES // (table_RD.shape[0] * table_RD.element_size()) // 16 * 16
    return width if 32 <= width < table_RD.shape[1] else None


def weighted_row_sums(indices_N: torch.Tensor, table_RD: torch.Tensor, offsets_G: torch.Tensor,
                      weights_N: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """(bags, d): bag g's row is the sum of weight * table[index] over its entries (offsets_G[g] on); with
    `transposed`, (d, bags) contiguous. An `embedding_bag`, over column blocks of the table on a CPU
    (`column_block`); the transposed result is written block by block as it comes, in tiles of a block's rows
    that fit the same cache budget (at 32x: 10.3 vs 14.0 ms for W_E's gradient, against one strided copy per
    block)."""
    width = column_block(table_RD)
    if width is None:
        sums_GD = F.embedding_bag(indices_N, table_RD, offsets_G, mode="sum", per_sample_weights=weights_N)
        return contiguous_transpose(sums_GD) if transposed else sums_GD
    d = table_RD.shape[1]
    out = spare_or_empty((d, len(offsets_G)) if transposed else (len(offsets_G), d), table_RD)
    for start in range(0, d, width):
        block = F.embedding_bag(indices_N, table_RD[:, start:start + width], offsets_G, mode="sum",
                                per_sample_weights=weights_N)
        if transposed:
            tile = max(1, CACHE_BLOCK_BYTES // (width * block.element_size()))
            for first in range(0, len(block), tile):
                out[start:start + width, first:first + tile] = block[first:first + tile].T
        else:
            out[:, start:start + width] = block
    return out


TRANSPOSE_BLOCK = 64
"""Rows per block in `contiguous_transpose`: a block's rows and columns stay in cache."""


def contiguous_transpose(a_SD: torch.Tensor) -> torch.Tensor:
    """a^T, contiguous. Autograd would make this copy itself to match W_E's layout, as one strided copy; on a CPU
    copying block by block takes half as long (2.6 vs 5.0 ms at 576 x 4,608). On a GPU: a.T, one kernel."""
    if a_SD.device.type != "cpu":
        return a_SD.T
    out_DS = spare_or_empty((a_SD.shape[1], a_SD.shape[0]), a_SD)
    for start in range(0, a_SD.shape[0], TRANSPOSE_BLOCK):
        out_DS[:, start:start + TRANSPOSE_BLOCK].copy_(a_SD[start:start + TRANSPOSE_BLOCK].T)
    return out_DS


def _norm_grad_scale(grad_S: torch.Tensor, norms_S: torch.Tensor) -> torch.Tensor:
    """(d_sae, 1) d loss / d W[s] = W[s] * this, from d loss / d ||W[s]||; 0 for a zero row, as autograd's."""
    return (grad_S / norms_S).masked_fill_(norms_S == 0, 0).unsqueeze(1)


class _RowNorms(torch.autograd.Function):
    """||W[s]|| for each row s, with a backward of one pass over W: W * (grad / norm) per row. autograd's own
    divides W by the norms, then multiplies by the gradient, two passes over the decoder in every dense
    relu/jumprelu/gated step: 4.5 vs 2.3 ms at 8x on a 2-core CPU."""

    @staticmethod
    def forward(ctx, W_SD):  # type: ignore[override]
        norms_S = torch.linalg.vector_norm(W_SD, dim=1)
        ctx.save_for_backward(W_SD, norms_S)
        return norms_S

    @staticmethod
    def backward(ctx, grad_S):  # type: ignore[override]
        W_SD, norms_S = ctx.saved_tensors
        return W_SD * _norm_grad_scale(grad_S, norms_S).to(W_SD.dtype)


def row_norms(W_SD: torch.Tensor) -> torch.Tensor:
    """(d_sae,) the norm of each row of W, differentiable (`_RowNorms`)."""
    return _RowNorms.apply(W_SD)


class _SparseDecode(torch.autograd.Function):
    """embedding_bag's forward over the firing entries (`Firing`), and W_D's row norms; a backward that does not sort
    (embedding_bag's own sorts the indices for W's gradient, several times the cost of the products on a CPU):
    W_D's gradient is a product over the step's entries in latent order (`ByLatent`, sorted once for it and
    W_E's), to which the norms' gradient is added in place. The values' gradient is taken at every selected
    entry (one that does not fire moves JumpReLU's threshold); the decoding and W_D's gradient read the firing
    ones only."""

    @staticmethod
    def forward(ctx, values_N, W_D_SD, cols_N, offsets_B, firing):  # type: ignore[override]
        norms_S = torch.linalg.vector_norm(W_D_SD, dim=1)
        ctx.save_for_backward(values_N, W_D_SD, cols_N, offsets_B, norms_S)
        ctx.by_latent = firing.by_latent  # index tensors, no autograd history
        ctx.set_materialize_grads(False)  # the norms' gradient is None when no penalty reads them (TopK)
        return weighted_row_sums(firing.cols_M, W_D_SD, firing.offsets_B, firing.take(values_N)), norms_S

    @staticmethod
    def backward(ctx, grad_BD, grad_norms_S):  # type: ignore[override]
        values_N, W_D_SD, cols_N, offsets_B, norms_S = ctx.saved_tensors
        grad_values = grad_W_D = None
        if ctx.needs_input_grad[0] and grad_BD is not None:  # <grad[row], W_D[col]> at each entry
            grad_values = sampled_dots(grad_BD.contiguous(), W_D_SD, offsets_B, cols_N)
        if ctx.needs_input_grad[1]:
            scale_S1 = None if grad_norms_S is None else _norm_grad_scale(grad_norms_S, norms_S).to(W_D_SD.dtype)
            if grad_BD is not None:
                grad_W_D = ctx.by_latent.transposed_product(values_N, grad_BD)
                if scale_S1 is not None:
                    grad_W_D.addcmul_(W_D_SD, scale_S1)
            elif scale_S1 is not None:
                grad_W_D = W_D_SD * scale_S1
        return grad_values, grad_W_D, None, None, None


def sampled_dots(a_BD: torch.Tensor, b_SD: torch.Tensor, offsets_B: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
    """<a[row], b[col]> at each entry of a CSR list: a sampled dense-dense product (`sampled_addmm`). On a CPU
    over column blocks when both tables have them (`column_block`), summed: 8.7 vs 10.5 ms at 8x; at 32x W_D is
    too tall for a block, and blocks of a single table were slower there (17 vs 15 ms)."""
    widths = [column_block(a_BD), column_block(b_SD)]
    width = None if None in widths else min(widths)
    crow = torch.cat([offsets_B, offsets_B.new_full((1,), len(cols_N))])  # a fill: new_tensor is a host copy
    dots_N = None
    for start in range(0, a_BD.shape[1], width or a_BD.shape[1]):
        stop = start + (width or a_BD.shape[1])
        with warnings.catch_warnings():  # "CSR support is in beta": sampled_addmm has been stable since 1.13
            warnings.simplefilter("ignore", UserWarning)
            # written into itself, so no copy of the pattern is made; zeros, as beta * NaN is NaN
            out = torch.sparse_csr_tensor(crow, cols_N, a_BD.new_zeros(len(cols_N)), (len(a_BD), len(b_SD)),
                                          check_invariants=False)
        block_N = torch.sparse.sampled_addmm(out, a_BD[:, start:stop], b_SD[:, start:stop].T, beta=0.0,
                                             out=out).values()
        dots_N = block_N if dots_N is None else dots_N.add_(block_N)
    assert dots_N is not None
    return dots_N


class Entries(NamedTuple):
    """Entries of a (batch, d_sae) matrix of pre-activations, rows ascending (within a row, any order)."""

    rows_N: torch.Tensor
    cols_N: torch.Tensor
    pre_N: torch.Tensor
    """The pre-activations there."""

    @classmethod
    def from_flat(cls, pre_BS: torch.Tensor, flat_N: torch.Tensor) -> "Entries":
        """At sorted flat indices into pre_BS.flatten()."""
        d_sae = pre_BS.shape[1]
        return cls(flat_N // d_sae, flat_N % d_sae, pre_BS.flatten()[flat_N])


def row_offsets(rows_N: torch.Tensor, batch: int) -> torch.Tensor:
    """Where each row's entries start in a list sorted by row (CSR's row pointers, less the last). A binary
    search per row: no host sync on a GPU (bincount reads its input's maximum back first), and on a CPU half the
    time of bincount and cumsum (0.14 vs 0.27 ms for 200K entries)."""
    return torch.searchsorted(rows_N, torch.arange(batch, dtype=rows_N.dtype, device=rows_N.device))


DENSITY_SAMPLE_ROWS = 64
"""Rows of the batch whose density decides the path: counting the whole batch costs a sparse step a tenth of its
time, a sample of this size a few hundredths of a percent (64 x d_sae entries estimate a density near the 6%
default within a few percent of itself); either path is exact, so an estimate only moves the crossover."""

SELECT_GROUP = 8
"""Latents per group in `entries_above`'s first pass (and `sparse_topk.row_topk`'s). A comparison over every
entry writes a (batch, d_sae) mask that `nonzero` then reads again (together about the encoder's forward on a
CPU); the group maxima read the matrix once and write an eighth of it, and with ~1% of latents above their cut
about a tenth of the groups are read again."""

WIDE_SELECT_GROUP, WIDE_FROM = 16, 16_384
"""From this many latents on, `entries_above` takes groups of 16: the maxima pass then writes half as much, which
outweighs reading twice the members of each group read again (2-core CPU, ~48 entries per row of 4,096: 8x
20 vs 23 ms with groups of 8 vs 16, 32x 59 vs 47 ms)."""


def entries_above(pre_BS: torch.Tensor, cut_S: torch.Tensor, max_density: float) -> Entries | None:
    """The entries where pre > cut (a scalar, or one cut per latent), or None when more than `max_density` of a
    sample of rows are (a dense step is then cheaper). One host sync: the count decides the path.

    Group j holds latents j, j + n_groups, j + 2 n_groups, ...: strided, so its maximum is an elementwise maximum
    of contiguous slices, and the groups that may hold an entry come out row by row, as do their members that do.
    A group is read again when its largest pre-activation exceeds its smallest cut, so no entry is missed; the
    members are then compared with their own cuts, the same comparison as over the dense matrix."""
    batch, d_sae = pre_BS.shape
    sample_RS = pre_BS[:DENSITY_SAMPLE_ROWS] > cut_S
    if int(torch.count_nonzero(sample_RS)) > max_density * sample_RS.numel():
        return None
    group = WIDE_SELECT_GROUP if d_sae >= WIDE_FROM and d_sae % WIDE_SELECT_GROUP == 0 else SELECT_GROUP
    group = group if d_sae % group == 0 else 1
    n_groups = d_sae // group
    pre_BgG = pre_BS.view(batch, group, n_groups)
    cut_gG = cut_S.expand(d_sae).view(group, n_groups)
    rows_H, groups_H = (pre_BgG.amax(dim=1) > cut_gG.amin(dim=0)).nonzero().unbind(1)
    pre_Hg = pre_BgG[rows_H, :, groups_H]
    # index_select: half the time of advanced indexing for these rows (0.9 vs 1.8 ms at 32x)
    cut_Hg = cut_S if cut_S.dim() == 0 else cut_gG.T.contiguous().index_select(0, groups_H)
    hits_N, members_N = (pre_Hg > cut_Hg).nonzero().unbind(1)
    return Entries(rows_H[hits_N], members_N * n_groups + groups_H[hits_N], pre_Hg[hits_N, members_N])


def encoder_grads(
    needs_input_grad: tuple[bool, ...], x_BD: torch.Tensor, W_E_DS: torch.Tensor, grad_N: torch.Tensor,
    firing: Firing,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad x, grad W_E, grad b_E) of pre = x W_E + b_E from the pre-activations' gradient at the selected entries
    (zero at those that do not fire, so the products read the firing ones only)."""
    grad_N = grad_N.to(x_BD.dtype)  # autocast: the sparse products run at the weights' precision
    d_sae = W_E_DS.shape[1]
    grad_x = grad_W_E = grad_b_E = None
    if needs_input_grad[0] or needs_input_grad[2]:
        grad_M = firing.take(grad_N)
    if needs_input_grad[0]:
        # grad_x[b] = sum over b's entries of g * W_E[:, col]: a weighted bag of W_E's columns.
        grad_x = F.embedding_bag(firing.cols_M, W_E_DS.T.contiguous(), firing.offsets_B, mode="sum",
                                 per_sample_weights=grad_M)
    if needs_input_grad[1]:
        # grad_W_E = x^T G with G the sparse (batch x d_sae) gradient: (G^T x)^T as a sparse-dense product.
        grad_W_E = firing.by_latent.transposed_product(grad_N, x_BD, transposed=True)
    if needs_input_grad[2]:
        grad_b_E = torch.zeros(d_sae, dtype=grad_N.dtype, device=grad_N.device).index_add_(0, firing.cols_M, grad_M)
    return grad_x, grad_W_E, grad_b_E


class _SparsePre(torch.autograd.Function):
    """Pre-activations at selected entries, computed without autograd (returned as the caller's own tensor, as
    `_DensePre` does); backward: encoder_grads."""

    @staticmethod
    def forward(ctx, x_BD, W_E_DS, b_E_S, pre_N, firing):  # type: ignore[override]
        ctx.mark_dirty(pre_N)
        ctx.save_for_backward(x_BD, W_E_DS)
        ctx.firing = firing  # index tensors, no autograd history
        return pre_N

    @staticmethod
    def backward(ctx, grad_N):  # type: ignore[override]
        x_BD, W_E_DS = ctx.saved_tensors
        grads = encoder_grads(ctx.needs_input_grad, x_BD, W_E_DS, grad_N, ctx.firing)
        return *grads, None, None


class _DensePre(torch.autograd.Function):
    """Pre-activations computed without autograd, given the dense backward of x W_E + b_E. They are returned as
    the caller's own tensor (mark_dirty, not a view), so an activation may overwrite them in place."""

    @staticmethod
    def forward(ctx, x_BD, W_E_DS, b_E_S, pre_BS):  # type: ignore[override]
        ctx.mark_dirty(pre_BS)
        ctx.save_for_backward(x_BD, W_E_DS)
        return pre_BS

    @staticmethod
    def backward(ctx, grad_BS):  # type: ignore[override]
        x_BD, W_E_DS = ctx.saved_tensors
        low = grad_BS.dtype  # under autocast the products run in its dtype, as autocast's own addmm would
        grad_x = grad_BS @ W_E_DS.to(low).T if ctx.needs_input_grad[0] else None
        grad_W_E = grad_b_E = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # [x | 1]^T G: b_E's gradient (G's column sums) as one more row of W_E's product, not a pass over G
            x_1 = torch.cat([x_BD.to(low), x_BD.new_ones((x_BD.shape[0], 1), dtype=low)], dim=1)
            grad_E = x_1.T @ grad_BS
            grad_W_E, grad_b_E = grad_E[:-1], grad_E[-1]
        return grad_x, grad_W_E, grad_b_E, None


_SPARE: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}
"""CPU tensors that nothing refers to any more (`recycle`), one per shape and dtype, for the next tensor of that
shape to be written into: a sparse step's (batch, d_sae) pre-activations, and the SAE's gradients once the
optimizer has stepped (the trainer hands them back), which the sparse backward's products write into
(`spare_or_empty`). A tensor over 32 MB comes fresh from the OS on every allocation (glibc maps it anew), and
faulting its pages in costs about a fifth of the encoder's product (8x: 86 vs 69 ms, 32x: 342 vs 282 ms); at 32x
W_E's and W_D's gradients are 42 MB each. One per shape, not per SAE: a grouped sweep keeps one of each per
width, shared by the SAEs of that width, which step in turn."""


def spare_or_empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `shape` in `like`'s dtype and device: a recycled one when there is one."""
    spare = _SPARE.pop((tuple(shape), like.dtype), None) if like.device.type == "cpu" else None
    return like.new_empty(shape) if spare is None else spare


def recycle(tensor: torch.Tensor) -> None:
    """Hand back a tensor that nothing refers to any more (a sparse step's pre-activations once its entries are
    copied out; a gradient the optimizer has used), for the next one of its shape to write into. CPU only:
    CUDA's allocator already reuses memory."""
    if tensor.device.type == "cpu" and tensor.is_contiguous():
        _SPARE[(tuple(tensor.shape), tensor.dtype)] = tensor


def recycle_grads(params: Iterable[torch.Tensor]) -> None:
    """Hand back the parameters' gradients, for the step about to clear them (zero_grad(set_to_none=True)):
    the trainer's, after the optimizer has stepped and before the next backward."""
    for param in params:
        if param.grad is not None:
            recycle(param.grad)


def pre_activations_once(x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor | None,
                         reuse: bool = True) -> torch.Tensor:
    """x W_E + b_E (x W_E when b_E is None) without autograd: the values a variant selects from; `dense_pre` or
    `sparse_pre` then attaches the gradient of the branch taken. With `reuse` (the caller expects a sparse step,
    which gives the buffer back), written into a recycled buffer when there is one of its shape (under autocast
    in autocast's dtype, as autocast's own addmm would compute it); a dense step keeps its pre-activations for
    the backward."""
    device = x_BD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_BD.dtype
    key = ((x_BD.shape[0], W_E_DS.shape[1]), dtype)
    spare = _SPARE.pop(key, None) if reuse and device == "cpu" else None
    with torch.no_grad():
        if b_E_S is None:
            return torch.mm(x_BD, W_E_DS) if spare is None else torch.mm(x_BD.to(dtype), W_E_DS.to(dtype), out=spare)
        if spare is None:
            return torch.addmm(b_E_S, x_BD, W_E_DS)
        return torch.addmm(b_E_S.to(dtype), x_BD.to(dtype), W_E_DS.to(dtype), out=spare)


def select_above_cut(x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor, cut_S: torch.Tensor,
                     max_density: float, reuse: bool) -> tuple[Entries | None, torch.Tensor]:
    """(the entries where pre = x W_E + b_E > cut, the (batch, d_sae) matrix they were read from), or (None, pre)
    when a dense step is cheaper (`entries_above`). x W_E is compared with cut - b_E, and the bias is added at
    the entries only, or over the whole matrix for a dense step: addmm writes the bias over its output before
    the product, a pass over (batch, d_sae) that costs the product 4% at 8x and 7% at 32x (batch 4,096, CPU).
    In floating point, x W_E + b > 0 exactly when x W_E > -b, so ReLU selects the entries it did with the bias."""
    product_BS = pre_activations_once(x_BD, W_E_DS, None, reuse)
    b_S = b_E_S.detach().to(product_BS.dtype)
    entries = entries_above(product_BS, cut_S - b_S, max_density)
    if entries is None:
        return None, product_BS.add_(b_S)
    return entries._replace(pre_N=entries.pre_N + b_S[entries.cols_N]), product_BS


def release_recycled() -> None:
    """Free the recycled tensors (training ended: `Trainer.fit` and `fit_together` call this), so that a process
    that trains and then does other work does not keep a (batch, d_sae) tensor and gradients per width."""
    _SPARE.clear()


def dense_pre(x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor, pre_BS: torch.Tensor) -> torch.Tensor:
    return _DensePre.apply(x_BD, W_E_DS, b_E_S, pre_BS)


def sparse_pre(x_BD: torch.Tensor, W_E_DS: torch.Tensor, b_E_S: torch.Tensor, entries: Entries,
               firing_M: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Firing]:
    """(pre_N, rows, cols, offsets, the firing ones) of the selected entries, pre_N with the sparse encoder
    backward; `firing_M`: the positions of those that fire (`ActivationFunction.sparse_firing`), None for all."""
    rows_N, cols_N, pre_N = entries
    offsets_B = row_offsets(rows_N, x_BD.shape[0])
    firing = Firing.of(rows_N, cols_N, offsets_B, W_E_DS.shape[1], firing_M)
    pre_N = _SparsePre.apply(x_BD, W_E_DS, b_E_S, pre_N, firing)
    return pre_N, rows_N, cols_N, offsets_B, firing
