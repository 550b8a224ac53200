"""
The sparse step: the SAE's encode-decode with the same loss and gradients as
`SAE.forward`'s dense reference, paying only for the (token, feature) pairs that fire.

Why a file of its own: it is an optimisation of the same maths, not the method, and it
needs machinery a reader of `sae.py` should not have to wade through first (custom
autograd functions, `embedding_bag`, a sparse CSR tensor). `SAE.forward(x, sparse=True)`
calls `sparse_encode_decode` in one line; `train.py` switches to it once few features
fire (its SPARSE_BELOW). The tests check that both paths give the same loss, firing
counts and gradients, and the same weights after an Adam step.

The maths. f is zero except at the active pairs (t, j), L0 per token of d_sae, and ReLU
passes no gradient where f = 0. With xc_t = x_t - b_dec and g_tj = dL/dpre_tj at the
active pairs:
    x_hat_t        = sum_{j active in t} f_tj W_dec_j + b_dec    (gather rows, add)
    dL/dW_dec_j    = sum_{t active in j} f_tj dL/dx_hat_t         (gather tokens, add)
    dL/dW_enc[:,j] = sum_{t active in j} g_tj xc_t
    dL/db_enc_j    = sum_{t active in j} g_tj
    dL/db_dec      = -sum_t sum_j g_tj W_enc[:,j] = -W_enc @ dL/db_enc    (one mat-vec)
    dL/df_tj       = dL/dx_hat_t . W_dec_j                        (only at the active pairs)
"gather rows, add" is F.embedding_bag(indices, table, offsets, per_sample_weights), bag by
bag, with the pairs grouped by token (row order) or by feature; dL/df is a matrix product
computed only at the active pairs (torch.sparse.sampled_addmm, "SDDMM"). One product stays
dense: the encoder's forward, since every pre-activation is needed to know which features fire.
"""

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


class ActivePairs(NamedTuple):
    """The firing (token, feature) pairs of a batch, grouped two ways for embedding_bag."""
    rows: torch.Tensor          # [nnz] token of each pair, sorted (row-major order)
    cols: torch.Tensor          # [nnz] feature of each pair (increasing within a token)
    row_offsets: torch.Tensor   # [batch + 1] where each token's pairs start, then nnz
    by_col: torch.Tensor        # [nnz] a permutation grouping the pairs by feature
    col_offsets: torch.Tensor   # [d_sae] where each feature's pairs start in that order
    fires: torch.Tensor         # [d_sae] pairs per feature (int32)


def firing(pre_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positive entries of pre_acts [batch, d_sae], in row-major order:
    pre_acts.relu().nonzero(as_tuple=True), in about half the time.

    torch's nonzero costs per element it reads (~13 ms for [1024, 9216] here, the largest part of
    the step after the encoder product). After ReLU every entry that does not fire is all-zero
    bits, so a group of 8 bytes (4 bf16 or 2 fp32 values) read as one int64 is zero exactly when
    none of its entries fires: nonzero over the int64 view reads a quarter (bf16) as many
    elements, then a second nonzero looks inside the few groups that hold a firing entry.
    (ReLU, not pre_acts > 0: the same entries, and torch's bf16 ReLU is vectorised, its bf16
    comparison is not.)"""
    acts = pre_acts.relu()
    per = 8 // acts.element_size()                         # entries in 8 bytes
    if acts.shape[-1] % per or not acts.is_contiguous():
        return acts.nonzero(as_tuple=True)
    group_rows, groups = acts.view(torch.int64).nonzero(as_tuple=True)             # [n_groups]
    inside, offset = acts.view(len(acts), -1, per)[group_rows, groups].nonzero(as_tuple=True)
    return group_rows[inside], groups[inside] * per + offset


def active_pairs(pre_acts: torch.Tensor) -> ActivePairs:
    rows, cols = firing(pre_acts)
    per_row = torch.bincount(rows, minlength=pre_acts.shape[0])
    per_col = torch.bincount(cols, minlength=pre_acts.shape[1])
    return ActivePairs(rows, cols, F.pad(per_row.cumsum(0), (1, 0)), torch.argsort(cols, stable=True),
                       per_col.cumsum(0) - per_col, per_col.int())


def gather_sum(indices, table, offsets, weights):
    """Bag b: sum_k weights[k] * table[indices[k]] over k in offsets[b]..offsets[b+1]: [n_bags, d]."""
    return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)


def transposed(t: torch.Tensor, block: int = 128) -> torch.Tensor:
    """t.T.contiguous() of a [n, d] matrix, copied in blocks of `block` rows.

    The encoder's gradient comes out feature-major, [d_sae, d_in], and W_enc is [d_in, d_sae].
    torch copies a transposed matrix in one sweep that writes each output row across the whole
    input, so for [9216, 576] nearly every read misses the cache (~13 ms here); a block of 128
    rows (295 kB in fp32) stays in cache while it is written out (~3.5 ms, benchmarks/README.md)."""
    out = t.new_empty(t.shape[1], t.shape[0])
    for i in range(0, len(t), block):
        out[:, i:i + block] = t[i:i + block].T
    return out


class SparseEncode(torch.autograd.Function):
    """The pre-activations at the active pairs, read from the dense encoder forward;
    backward computes the encoder's and b_dec's gradients from those pairs only."""

    @staticmethod
    def forward(ctx, x_centred, W_enc, b_enc, b_dec, pre_acts, pairs: ActivePairs):
        ctx.save_for_backward(x_centred, W_enc)
        ctx.pairs = pairs
        return pre_acts[pairs.rows, pairs.cols].float()                          # [nnz]

    @staticmethod
    def backward(ctx, grad):                                                    # grad [nnz] = dL/dpre at pairs
        x_centred, W_enc = ctx.saved_tensors
        p = ctx.pairs
        grad_W_enc = gather_sum(p.rows[p.by_col], x_centred, p.col_offsets, grad[p.by_col])     # [d_sae, d_in]
        grad_b_enc = torch.zeros(W_enc.shape[1], device=grad.device).index_add_(0, p.cols, grad)
        return None, transposed(grad_W_enc), grad_b_enc, -(W_enc @ grad_b_enc), None, None


class SparseDecode(torch.autograd.Function):
    """sum_j f_tj W_dec_j over the active pairs: [batch, d_in] (the dense acts @ W_dec, without the zeros)."""

    @staticmethod
    def forward(ctx, values, W_dec, pairs: ActivePairs):
        ctx.save_for_backward(values, W_dec)
        ctx.pairs = pairs
        return gather_sum(pairs.cols, W_dec, pairs.row_offsets[:-1], values)

    @staticmethod
    def backward(ctx, grad):                                                    # grad [batch, d_in] = dL/dx_hat
        values, W_dec = ctx.saved_tensors
        p = ctx.pairs
        grad_W_dec = gather_sum(p.rows[p.by_col], grad, p.col_offsets, values[p.by_col])        # [d_sae, d_in]
        with warnings.catch_warnings():             # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(p.row_offsets, p.cols, torch.zeros_like(values),
                                              (len(grad), len(W_dec)), check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad, W_dec.T, beta=0.0).values()  # [nnz]
        return grad_values, grad_W_dec, None


def sparse_encode_decode(sae, x: torch.Tensor, l1_scale: float = 1.0):
    """(acts, l1_loss, x_hat, fires) of SAE.forward's dense branch, from the firing pairs only
    (for every method: TopK and BatchTopK choose their pairs, and have no L1 term).

    acts is a sparse COO tensor [batch, d_sae] (detached: the gradient flows through the
    pair values inside); l1_loss, x_hat [batch, d_in] and fires [d_sae] are as in the dense branch.
    """
    with torch.no_grad():
        pre_acts = sae.pre_acts(x)                        # the encoder, dense: [batch, d_sae]
        # which pairs fire: ReLU's positive pre-activations, or TopK's and BatchTopK's kept ones (their
        # activation is the pre-activation there and 0 elsewhere, so the pairs carry the same maths)
        pairs = active_pairs(pre_acts if not sae.topk else sae.activation(pre_acts))
        x_centred = x - sae.b_dec
    values = SparseEncode.apply(x_centred, sae.W_enc, sae.b_enc, sae.b_dec, pre_acts, pairs)   # [nnz] f > 0
    del pre_acts
    weights = sae.l1_weights()
    weighted = values if weights is None else values * weights[pairs.cols]
    l1_loss = (torch.zeros((), device=x.device) if sae.topk
               else l1_scale * sae.l1_coeff * weighted.sum() / len(x))
    x_hat = SparseDecode.apply(values, sae.W_dec, pairs) + sae.b_dec
    acts = torch.sparse_coo_tensor(torch.stack([pairs.rows, pairs.cols]), values.detach(),
                                   (len(x), sae.d_sae), is_coalesced=True, check_invariants=False)
    return acts, l1_loss, x_hat, pairs.fires
