"""
Reference solutions and checks for analyze.ipynb: open this file when you want to read a solution.

Each exercise of the notebook has a reference here, under the same name, and a check that runs a
learner's function on seeded cases and compares it with the reference. A check enforces the
exercise's output contract (torch, dense, the dtypes and shapes the later cells index and print
with, each pair once with i < j), feeds the inputs the notebook produces (uncoalesced sparse
tensors in no order) and the post's scale (24,576 features, 2^20 tokens: counts past 2^8, 2^16
and products past 2^31, features that fire on every token or once, correlations of real size,
few non-zeros so that it takes seconds), counts every tensor the function holds at once against
a 1 GB budget, checks that inputs and the SAE come back unchanged, and runs in a forked process
so that a crash inside torch becomes a sentence. Its message names the first entry that
differs, expected against got, and the likely cause when it recognises one.

    from analyze_solutions import check
    cooccurrence = check(cooccurrence)   # prints "correct." or what differs; returns yours if
                                         # correct, else the reference, so the notebook goes on

Everything here works on sparse activations: torch COO tensors of shape [n_tokens, d_sae].
"""

import contextlib
import faulthandler
import inspect
import io
import math
import multiprocessing
import signal
import sys
import time
import warnings
import weakref
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

POST_WIDTH = 24_576          # features per SAE in the February 2024 release (32 x 768)
BIG_TOKENS = 1 << 20         # ~1M tokens: the scale the notebook's computations are built for
BUDGET = 1 << 30             # bytes of tensors a solution may hold at once in the post-width checks


# --------------------------------------------------------------------------------------------
# Exercise 1: which features fire together more than chance would predict?
# --------------------------------------------------------------------------------------------

def cooccurrence(fired: torch.Tensor, min_joint: int = 1, block: int = 2048):
    """fired: sparse [n_tokens, d_sae], 1 where a feature fires.
    Returns (single [d_sae], pairs [m, 2] with i < j, joint [m]): how many tokens each feature
    fires on, and every pair of features that fired together on at least `min_joint` tokens
    with that number.

    The full matrix fired.T @ fired would hold d_sae^2 counts (600M at 24,576 features), and even
    kept sparse it grows with the number of distinct pairs seen (GBs at 1M tokens). So: one block
    of features at a time, [block, n_tokens] @ [n_tokens, d_sae], keeping only the pairs at or
    above the threshold."""
    fired = fired.coalesce()
    n_tokens, d_sae = fired.shape
    token, feature = fired.indices()
    single = torch.bincount(feature, minlength=d_sae)                             # [d_sae]
    ones = torch.ones(fired._nnz())
    rows = torch.sparse_coo_tensor(fired.indices(), ones, fired.shape, is_coalesced=True).to_sparse_csr()
    order = torch.argsort(feature, stable=True)                                    # firings grouped by feature
    f_sorted, t_sorted = feature[order], token[order]
    del order
    starts = torch.searchsorted(f_sorted, torch.arange(0, d_sae + block, block)).tolist()
    pairs, joint = [], []
    for b, lo in enumerate(range(0, d_sae, block)):
        s, e, hi = starts[b], starts[b + 1], min(lo + block, d_sae)
        part = torch.sparse_coo_tensor(torch.stack([f_sorted[s:e] - lo, t_sorted[s:e]]), ones[s:e],
                                       (hi - lo, n_tokens), is_coalesced=True).to_sparse_csr()   # [block, n_tokens]
        counts = torch.sparse.mm(part, rows)                                      # CSR [block, d_sae]
        i = torch.repeat_interleave(torch.arange(hi - lo), counts.crow_indices().diff()) + lo
        j, c = counts.col_indices(), counts.values()
        keep = (i < j) & (c >= min_joint)
        pairs.append(torch.stack([i[keep], j[keep]], 1))
        joint.append(c[keep].round().long())
    return single, torch.cat(pairs), torch.cat(joint)


def lift_and_pvalue(single, pairs, joint, n_tokens: int):
    """single [d_sae], pairs [m, 2], joint [m] from cooccurrence.
    Returns (lift [m], p [m], float64): lift = joint * n_tokens / (c_i * c_j), and the chance of
    seeing at least `joint` tokens with both if the two fired independently: the joint count is
    then ~Poisson with mean E = c_i * c_j / n_tokens, and P(X >= k) = gammainc(k, E) (the
    regularised lower incomplete gamma function)."""
    c_i, c_j = single[pairs[:, 0]].double(), single[pairs[:, 1]].double()
    expected = c_i * c_j / n_tokens
    return joint.double() / expected, torch.special.gammainc(joint.double(), expected)


def circular_shift_null(acts: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The same activations with each feature's column rotated by its own random number of tokens:
    every feature keeps its density, its values and its runs of consecutive firings, but where
    one feature fires no longer tells where another does. Pairs that co-occur in this null
    co-occur by chance."""
    acts = acts.coalesce()
    n_tokens, d_sae = acts.shape
    token, feature = acts.indices()
    shift = torch.randint(0, n_tokens, (d_sae,), generator=generator)
    return torch.sparse_coo_tensor(torch.stack([(token + shift[feature]) % n_tokens, feature]), acts.values(),
                                   acts.shape).coalesce()


# --------------------------------------------------------------------------------------------
# Exercise 2: redundancy between SAEs of adjacent layers
# --------------------------------------------------------------------------------------------

def best_decoder_match(W_a, W_b, chunk: int = 1024):
    """W_a [d_a, d_in], W_b [d_b, d_in]: the decoder rows of two SAEs (of any norm).
    Returns (cos [d_a], idx [d_a]): for each feature of A, the index of the feature of B whose
    decoder row has the highest cosine similarity with it, and that cosine. A [d_a, d_b] matrix
    would be 600M entries at the post's width: `chunk` rows of A at a time."""
    W_a, W_b = F.normalize(W_a, dim=-1), F.normalize(W_b, dim=-1)
    best = [(part @ W_b.T).max(1) for part in W_a.split(chunk)]                  # [chunk, d_b] at a time
    return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])


def _column_sums(feat, val, d):
    """Per-feature sum and sum of squares of a sparse matrix's values: ([d], [d]) in float64."""
    zeros = torch.zeros(d, dtype=torch.float64)
    return zeros.index_add(0, feat, val), zeros.index_add(0, feat, val ** 2)


def activation_correlation(acts_a, acts_b, idx_a, idx_b, chunk: int = 4096):
    """acts_a sparse [n_tokens, d_a], acts_b sparse [n_tokens, d_b]: activations on the same tokens.
    idx_a, idx_b [k]: pairs of features. Returns [k]: the Pearson correlation over all tokens of
    feature idx_a[p] of A with feature idx_b[p] of B (0 where either never fires).

    From sparse sums, so nothing of size n_tokens x k is formed:
    cov = sum(ab)/n - mean(a) mean(b), var(a) = sum(a^2)/n - mean(a)^2, and sum(ab) only has
    terms on tokens where both fire: for each firing of a, look up whether b fires on that token."""
    acts_a, acts_b = acts_a.coalesce(), acts_b.coalesce()
    n, d_b = acts_a.shape[0], acts_b.shape[1]
    (a_tok, a_feat), a_val = acts_a.indices(), acts_a.values().double()
    (b_tok, b_feat), b_val = acts_b.indices(), acts_b.values().double()
    s_a, s_aa = _column_sums(a_feat, a_val, acts_a.shape[1])      # sum a, sum a^2  [d_a]
    s_b, s_bb = _column_sums(b_feat, b_val, d_b)
    b_keys = b_tok * d_b + b_feat                                 # sorted: coalesce orders by (token, feature)
    order = torch.argsort(a_feat, stable=True)                    # a's firings grouped by feature
    a_tok, a_val = a_tok[order], a_val[order]
    start = torch.searchsorted(a_feat[order], torch.arange(acts_a.shape[1] + 1))
    out = []
    for ia, ib in zip(idx_a.split(chunk), idx_b.split(chunk)):
        count = start[ia + 1] - start[ia]                         # firings of each a-feature of the chunk
        pair = torch.repeat_interleave(torch.arange(len(ia)), count)
        first = torch.repeat_interleave(start[ia] - torch.cumsum(count, 0) + count, count)
        at = first + torch.arange(len(pair))                      # positions of those firings in a's arrays
        key = a_tok[at] * d_b + ib[pair]                          # (token, b-feature) to look up
        loc = torch.searchsorted(b_keys, key).clamp_max(max(len(b_keys) - 1, 0))
        hit = b_keys[loc] == key if len(b_keys) else torch.zeros_like(key, dtype=torch.bool)
        s_ab = torch.zeros(len(ia), dtype=torch.float64).index_add_(0, pair[hit], a_val[at[hit]] * b_val[loc[hit]])
        cov = s_ab / n - s_a[ia] * s_b[ib] / n ** 2
        var = (s_aa[ia] / n - (s_a[ia] / n) ** 2).clamp_min(0) * (s_bb[ib] / n - (s_b[ib] / n) ** 2).clamp_min(0)
        out.append(torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), 0.0))
    return torch.cat(out).float()


# --------------------------------------------------------------------------------------------
# Exercise 3: causal tests
# --------------------------------------------------------------------------------------------

def ablate_features(sae, x, features):
    """x [n, d_in]: residual-stream activations; features [k]: feature indices.
    Returns x with those features' contributions to the SAE's reconstruction removed:
    x - sum_f acts_f(x) W_dec[f]. The SAE's error term (x - x_hat) stays in, so what changes
    downstream is caused by these features alone, not by the rest of the reconstruction."""
    acts = sae.encode(x)[:, features]                                             # [n, k]
    return x - acts @ sae.W_dec[features]


# --------------------------------------------------------------------------------------------
# Checks
#
# What each exercise must return (its contract) is what the notebook's later cells do with it:
# they index with the pairs and indices (int64), print counts with an integer format, compare
# p-values with a Bonferroni threshold near 1e-9 (float64), and add the ablated activations back
# into the model's residual stream (same shape and dtype). So a check enforces that contract
# exactly, then compares values with the reference on cases built from what the notebook and
# the post's scale produce: uncoalesced sparse inputs in no particular order, counts past 2^8,
# 2^16 and products past 2^31, features that fire on every token or only once, correlations of
# real size, all at the post's width (24,576 features) over ~1M tokens but with few non-zeros,
# so that a case runs in seconds.
# --------------------------------------------------------------------------------------------

class CheckFailed(AssertionError):
    pass


class MemoryBudget(TorchDispatchMode):
    """Adds up the bytes of the tensors a function creates, while they are alive, and stops it
    (CheckFailed) as soon as they hold more than `limit` bytes at once: a list of many small
    pieces counts as much as one big tensor. A dense tensor whose size can be told from the
    arguments (to_dense, factories, matrix products) is refused before it is made, so that a
    check never fills the machine's memory. A view or an in-place result shares a storage that
    is already counted (or is the caller's), and a sparse tensor counts its indices and values."""

    FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn")

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.live, self.peak = limit, 0, 0
        self._counted = set()                                   # data_ptr of each live counted storage

    def _refuse(self, size, func, what):
        raise CheckFailed(
            f"at the post's width your function holds more than {self.limit / 2**30:.0f} GB of tensors at once "
            f"({(self.live + size) / 2**30:.2f} GB when it was stopped, {what} in {func}): keep it sparse, "
            f"work in blocks, and keep only what the result needs from each block")

    def _before(self, func, shape, itemsize):
        size = math.prod(shape) * itemsize
        if self.live + size > self.limit:
            self._refuse(size, func, f"about to make a dense {list(shape)} tensor")

    def _free(self, key, size):
        self._counted.discard(key)
        self.live -= size

    def _count(self, storage, func, inputs):
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._counted or key in inputs:
            return
        self._counted.add(key)
        self.live += size
        weakref.finalize(storage, self._free, key, size)
        self.peak = max(self.peak, self.live)
        if self.live > self.limit:
            self._refuse(0, func, "the last piece made")

    @staticmethod
    def _storages(t):
        if t.layout == torch.strided:
            return [t.untyped_storage()]
        if t.layout == torch.sparse_coo:
            return [t._indices().untyped_storage(), t._values().untyped_storage()]
        if t.layout == torch.sparse_csr:
            return [s.untyped_storage() for s in (t.crow_indices(), t.col_indices(), t.values())]
        return []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        first = args[0] if args else None
        if "to_dense" in name and isinstance(first, torch.Tensor):
            self._before(func, first.shape, first.element_size())
        elif name in self.FACTORIES and args and isinstance(first, (list, tuple, torch.Size)):
            self._before(func, first, 8 if kwargs.get("dtype") in (torch.float64, torch.int64) else 4)
        elif name in ("mm", "matmul", "addmm") and len(args) >= 2:
            a, b = args[-2], args[-1]                                            # dense out unless both are sparse
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim() == 2 \
                    and not (a.is_sparse and b.is_sparse):
                self._before(func, (a.shape[0], b.shape[1]), a.element_size())
        out = func(*args, **kwargs)
        flat = [a for a in list(args) + list(kwargs.values())
                for a in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(a, torch.Tensor)]
        inputs = {s.data_ptr() for a in flat for s in self._storages(a)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                for s in self._storages(t):
                    self._count(s, func, inputs)
        return out


def _case(what: str):
    """Says which case runs next (a crash in a separate process is then reported with its name)."""
    _CURRENT["case"] = what
    if _CURRENT.get("report"):
        _CURRENT["report"](what)


_CURRENT = {}


# ---- inputs ---------------------------------------------------------------------------------

def _uncoalesced(indices, values, shape, generator):
    """A sparse COO tensor with these (distinct) entries stored in a random order and not marked
    coalesced: the notebook builds its `fired` matrices this way, and a function that reads
    `.indices()` without `.coalesce()`, or assumes the entries sorted, fails on it."""
    order = torch.randperm(indices.shape[1], generator=generator)
    return torch.sparse_coo_tensor(indices[:, order], values[order], shape)


def _distinct(indices, shape):
    """The distinct (row, column) pairs of indices [2, n], in row-major order."""
    key = torch.unique(indices[0] * shape[1] + indices[1])
    return torch.stack([key // shape[1], key % shape[1]])


def _sparse(n_tokens, d_sae, nnz, generator, values=None):
    """A random sparse [n_tokens, d_sae] activation matrix with about nnz non-zeros (coalesced)."""
    idx = torch.stack([torch.randint(0, n_tokens, (nnz,), generator=generator),
                       torch.randint(0, d_sae, (nnz,), generator=generator)])
    v = torch.rand(nnz, generator=generator) + 0.1 if values is None else values
    return torch.sparse_coo_tensor(idx, v, (n_tokens, d_sae)).coalesce()


def _binary(t):
    """t sparse -> the same pattern with every stored value 1 (duplicates summed first, then set to 1)."""
    t = t.coalesce()
    return torch.sparse_coo_tensor(t.indices(), torch.ones(t._nnz()), t.shape, is_coalesced=True)


def _snapshot(x):
    if isinstance(x, torch.nn.Module):
        return {k: v.detach().clone() for k, v in x.state_dict().items()}
    if isinstance(x, torch.Tensor) and x.layout == torch.sparse_coo:
        return x._indices().clone(), x._values().clone()
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    return x


def _unchanged(what, before, x):
    after = _snapshot(x)
    if isinstance(before, dict):
        changed = [k for k in before if not torch.equal(before[k], after[k])]
    elif isinstance(before, tuple):
        changed = [] if all(torch.equal(b, a) for b, a in zip(before, after)) else ["its entries"]
    else:
        changed = [] if torch.equal(before, after) else ["its values"]
    if changed:
        raise CheckFailed(f"your function changed {what} in place ({', '.join(changed)}): later cells use it "
                          f"again, so work on a copy (x - y, not x -= y; F.normalize(W, dim=-1), not W /= W.norm(...))")


def _call(fn, ref, *args, **kwargs):
    """fn(*args) with every tensor argument (and the SAE) checked unchanged afterwards; `ref`, the
    reference of the same exercise, names the arguments."""
    names = list(inspect.signature(ref).parameters)
    before = [_snapshot(a) for a in args] + [_snapshot(v) for v in kwargs.values()]
    out = fn(*args, **kwargs)
    for name, b, a in zip(names[:len(args)] + list(kwargs), before, list(args) + list(kwargs.values())):
        if isinstance(a, (torch.Tensor, torch.nn.Module)):
            _unchanged("the SAE" if isinstance(a, torch.nn.Module) else f"its input {name}", b, a)
    return out


# ---- the output contract ------------------------------------------------------------------------

def _parts(what, out, n):
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise CheckFailed(f"{what} must return a tuple of {n} tensors, got "
                          f"{type(out).__name__}{f' of {len(out)}' if isinstance(out, (tuple, list)) else ''}")
    return out


def _tensor(what, t, shape, kind, why):
    """t must be a dense torch tensor of this shape; kind: 'int64', 'float64' or 'float'."""
    if not isinstance(t, torch.Tensor):
        hint = " (torch.from_numpy turns a numpy array into one)" if type(t).__module__ == "numpy" else ""
        raise CheckFailed(f"{what} must be a torch tensor, got {type(t).__name__}{hint}")
    if t.layout != torch.strided:
        raise CheckFailed(f"{what} must be a dense tensor, got a {str(t.layout).split('.')[-1]} one ({why}): "
                          f"call .to_dense() on the result, a vector is small")
    if list(t.shape) != list(shape):
        raise CheckFailed(f"{what}: expected shape {list(shape)}, got {list(t.shape)}")
    ok = {"int64": t.dtype == torch.int64, "float64": t.dtype == torch.float64,
          "float": t.is_floating_point()}[kind]
    if not ok:
        want = {"int64": "int64 (torch.long)", "float64": "float64", "float": "a floating-point dtype"}[kind]
        raise CheckFailed(f"{what} must hold {want}, got {t.dtype} ({why})")
    return t


def _first_bad(got, expected, atol, rtol):
    """Indices where got and expected (dense, same shape) differ beyond tolerance."""
    return (~torch.isclose(got.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True)).nonzero()


def _same(what, got, expected, atol=1e-5, rtol=1e-4, label=None, hint=None):
    """got == expected within tolerance; else says how many differ, the first one (with `label(i)`
    naming it) expected vs got, and `hint(got, expected, bad)` if it recognises the cause."""
    bad = _first_bad(got, expected, atol, rtol)
    if len(bad):
        at = tuple(bad[0].tolist())
        name = label(at[0]) if label else f"at {at if len(at) > 1 else at[0]}"
        cause = hint(got, expected, bad) if hint else None
        raise CheckFailed(f"{what}: {len(bad)} of {got.numel()} entries differ; {name}: expected "
                          f"{expected[at].item():.6g}, got {got[at].item():.6g}" + (f". Likely cause: {cause}" if cause else ""))


def _count_hint(got, expected, bad):
    """A recognisable reason for wrong counts: integers that wrap, or float16 that stops counting."""
    g, e = got[bad[:, 0]].long(), expected[bad[:, 0]].long()
    for bits in (8, 16, 32):
        if ((e - g) % (1 << bits) == 0).all() and (g.abs() < 1 << bits).all() and (e >= 1 << (bits - 1)).any():
            return (f"counts in {bits}-bit integers wrap around (past {(1 << (bits - 1)) - 1:,} signed, "
                    f"{(1 << bits) - 1:,} unsigned); count in int64")
    if (g == 2048).any() and (e > 2048).any():
        return "float16 stops counting at 2,048 (1 + 2048 rounds back to 2048); count in int64 or float64"
    if (g == 1 << 24).any() and (e > 1 << 24).any():
        return "float32 stops counting at 2^24; count in int64"
    return None


# ---- Exercise 1: co-occurrence --------------------------------------------------------------------

def _check_pairs(what, got, expected, min_joint):
    """got, expected: (single, pairs, joint). Pairs may come in any order but each once, with i < j."""
    single, pairs, joint = got
    d_sae = expected[0].shape[0]
    _tensor(f"{what}: single", single, [d_sae], "int64", "the notebook indexes and prints counts as integers")
    if not isinstance(pairs, torch.Tensor) or pairs.dim() != 2 or pairs.shape[-1] != 2:
        raise CheckFailed(f"{what}: pairs must be an [m, 2] tensor, got "
                          f"{list(pairs.shape) if isinstance(pairs, torch.Tensor) else type(pairs).__name__}")
    m = pairs.shape[0]
    _tensor(f"{what}: pairs", pairs, [m, 2], "int64", "later cells index features with them")
    _tensor(f"{what}: joint", joint, [m], "int64", "the notebook prints and thresholds them as integers")
    _same(f"{what}: single (tokens each feature fires on)", single, expected[0], atol=0, rtol=0, hint=_count_hint)
    if m and (pairs[:, 0] >= pairs[:, 1]).any():
        k = (pairs[:, 0] >= pairs[:, 1]).nonzero()[0, 0].item()
        if (pairs == pairs[k].flip(0)).all(1).any():
            raise CheckFailed(f"{what}: pair {tuple(pairs[k].flip(0).tolist())} appears as both (i, j) and (j, i): give "
                              f"each pair once, with i < j (later cells would count it twice)")
        raise CheckFailed(f"{what}: pair {tuple(pairs[k].tolist())} has i >= j: give each pair once, as (i, j) with "
                          f"i < j (a feature is not paired with itself)")
    key = pairs[:, 0] * d_sae + pairs[:, 1]
    unique, counts = torch.unique(key, return_counts=True)
    if len(unique) < m:
        k = unique[counts.argmax()].item()
        raise CheckFailed(f"{what}: pair {(k // d_sae, k % d_sae)} appears {counts.max().item()} times: give each pair "
                          f"once (later cells would count it twice)")
    e_key = expected[1][:, 0] * d_sae + expected[1][:, 1]
    e_order, g_order = torch.argsort(e_key), torch.argsort(key)
    e_key, e_joint, g_key, g_joint = e_key[e_order], expected[2][e_order], key[g_order], joint[g_order]
    missing = e_key[~torch.isin(e_key, g_key)]
    extra = g_key[~torch.isin(g_key, e_key)]
    if len(missing) or len(extra):
        pair = lambda k: (k // d_sae, k % d_sae)
        msg = f"{what}: {len(missing)} pairs missing, {len(extra)} extra"
        if len(missing):
            k = missing[0].item()
            c = e_joint[torch.searchsorted(e_key, missing[:1])].item()
            msg += f"; e.g. {pair(k)} fired together {c} times and is missing"
            if c == min_joint:
                msg += f" (exactly min_joint={min_joint}: keep joint >= min_joint, not >)"
        if len(extra):
            k = extra[0].item()
            c = g_joint[torch.searchsorted(g_key, extra[:1])].item()
            msg += f"; e.g. {pair(k)} is extra, with joint {c}"
            if c < min_joint:
                msg += f" (below min_joint={min_joint})"
        raise CheckFailed(msg)
    _same(f"{what}: joint (tokens on which both fire)", g_joint, e_joint, atol=0, rtol=0,
          label=lambda n: f"pair {(e_key[n].item() // d_sae, e_key[n].item() % d_sae)}", hint=_count_hint)


def _cooccurrence_scale_case(g, n_tokens, d_sae, cluster, cluster_tokens):
    """Few random firings, plus: two features that fire on every token (a pair counted 2^20 times),
    one on 70,000 tokens (past 2^16), a pair together 300 times (past 2^8), a pair exactly at
    min_joint=2 and one below it, features that fire once, and a `cluster` of features that all
    fire on the same `cluster_tokens` tokens (many pairs past 2,048; a solution that lists the pairs
    of every token holds tokens x L0^2 of them)."""
    f = torch.randperm(d_sae, generator=g)
    on_1, on_2, c70k, d, e, h, i, j, l = f[:9].tolist()
    group, rest = f[9:9 + cluster], f[9 + cluster:]
    every, t = torch.arange(n_tokens), torch.randperm(n_tokens, generator=g)
    feature = lambda f_, tok: torch.stack([tok, torch.full_like(tok, f_)])
    parts = [torch.stack([torch.randint(0, n_tokens, (20_000,), generator=g),
                          rest[torch.randint(0, len(rest), (20_000,), generator=g)]]),
             feature(on_1, every), feature(on_2, every), feature(c70k, t[:70_000]),
             feature(d, t[:350]), feature(e, torch.cat([t[:300], t[350:370]])),
             feature(h, t[400:402]), feature(i, t[400:402]), feature(j, t[410:412]), feature(l, t[411:413])]
    ct = t[1000:1000 + cluster_tokens]
    parts.append(torch.stack([ct.repeat_interleave(cluster), group.repeat(cluster_tokens)]))
    idx = torch.cat(parts, 1)
    idx = _distinct(idx, (n_tokens, d_sae))
    return _uncoalesced(idx, torch.ones(idx.shape[1]), (n_tokens, d_sae), g)


def _cases_cooccurrence(ref):
    g = torch.Generator().manual_seed(1)
    # feature 3 never fires, (0, 1) fire together 3 times, (0, 2) and (1, 2) once
    fired = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float)
    small = _uncoalesced(fired.to_sparse().indices(), torch.ones(8), (5, 4), g)
    cases = [(f"a small case by hand, min_joint={m}", small, m) for m in (1, 2, 3, 4)]
    for n_tokens, d_sae, nnz, min_joint in ((300, 40, 1500, 3), (200, 7000, 4000, 2)):
        t = _binary(_sparse(n_tokens, d_sae, nnz, g))
        cases.append((f"{n_tokens} tokens x {d_sae} features, min_joint={min_joint}",
                      _uncoalesced(t.indices(), t.values(), t.shape, g), min_joint))
    cases.append(("the post's width (24,576 features, 2^20 tokens), min_joint=2",
                  _cooccurrence_scale_case(g, BIG_TOKENS, POST_WIDTH, cluster=200, cluster_tokens=6000), 2))
    for what, fired, min_joint in cases:
        expected = ref(fired, min_joint=min_joint)
        yield Case(what, (fired,), {"min_joint": min_joint}, fired.shape[1] == POST_WIDTH,
                   lambda got, what=what, expected=expected, m=min_joint:
                   _check_pairs(what, _parts("cooccurrence", got, 3), expected, m))


def hypergeometric_tail(single, pairs, joint, n_tokens: int):
    """P(X >= joint) for X ~ Hypergeometric(n_tokens, c_i, c_j): the exact chance, given how many
    tokens each feature fires on, that they share at least `joint` tokens if placed at random. The
    Poisson tail of `lift_and_pvalue` approximates it; both are accepted by the check. float64."""
    out = torch.empty(len(joint), dtype=torch.float64)
    lg = lambda v: torch.lgamma(v + 1.0)
    n = torch.tensor(float(n_tokens), dtype=torch.float64)
    for m, ((i, j), k) in enumerate(zip(pairs.tolist(), joint.tolist())):
        a, b = float(single[i]), float(single[j])
        if k > min(a, b):
            out[m] = 0.0
            continue
        x = torch.arange(k, min(a, b) + 1, dtype=torch.float64)
        log_p = (lg(torch.tensor(a)) - lg(x) - lg(a - x) + lg(n - a) - lg(b - x) - lg(n - a - b + x)
                 - lg(n) + lg(torch.tensor(b)) + lg(n - b))
        out[m] = torch.logsumexp(log_p, 0).exp().clamp_max(1.0)
    return out


def _pvalue_hint(got, expected, bad):
    g, e = got[bad[:, 0]], expected[bad[:, 0]]
    if ((g - (1 - e)).abs() < 1e-6).all():
        return "that is 1 - p: the chance of a count this high or higher is the upper tail, P(X >= joint)"
    return None


def _cases_lift_and_pvalue(ref):
    g = torch.Generator().manual_seed(2)
    cases = []
    d_sae, n_tokens = 50, 10_000
    single = torch.randint(1, 3000, (d_sae,), generator=g)                       # every feature a distinct count
    single[7] = 1                                                                # one feature that fired once
    i = torch.randint(0, d_sae - 1, (400,), generator=g)
    j = i + 1 + (torch.rand(400, generator=g) * (d_sae - 1 - i)).long()
    pairs = torch.stack([i, j], 1)
    joint = torch.minimum(single[i], single[j]).double().mul(torch.rand(400, generator=g)).long().clamp_min(1)
    pairs[0], joint[0] = torch.tensor([7, 8]), 1                                 # rare x anything
    single[10] = single[11] = 20
    pairs[1], joint[1] = torch.tensor([10, 11]), 20                              # p ~ 1e-46: below float32's range
    cases.append((f"{d_sae} features, {n_tokens:,} tokens", single, pairs, joint, n_tokens, 1))
    # the post's scale: counts past 2^16 and products of two counts past 2^31
    n_tokens = BIG_TOKENS
    single = torch.randint(1, 4000, (POST_WIDTH,), generator=g)
    single[:4] = torch.tensor([n_tokens, n_tokens, 70_000, 6_000])              # always on, always on, 70k, 6k
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 3], [2, 3], [1, 4], [2, 5]])
    joint = torch.tensor([n_tokens, 70_000, 70_000, 6_000, 1_200, single[4].item(), 40])
    extra = torch.randint(4, POST_WIDTH, (64, 2), generator=g)
    extra = extra[extra[:, 0] != extra[:, 1]].sort(1).values
    joint_extra = torch.minimum(single[extra[:, 0]], single[extra[:, 1]]).double() \
        .mul(torch.rand(len(extra), generator=g)).long().clamp_min(1)
    cases.append(("the post's scale (2^20 tokens, counts up to 2^20)", single, torch.cat([pairs, extra]),
                  torch.cat([joint, joint_extra]), n_tokens, None))
    for what, single, pairs, joint, n_tokens, tiny in cases:
        yield Case(what, (single, pairs, joint, n_tokens), {}, False,
                   lambda got, c=(what, single, pairs, joint, n_tokens, tiny, ref(single, pairs, joint, n_tokens)):
                   _check_pvalues(got, *c))


def _check_pvalues(got, what, single, pairs, joint, n_tokens, tiny, expected):
    lift, p = _parts("lift_and_pvalue", got, 2)
    elift, ep = expected
    m = len(joint)
    _tensor(f"{what}: lift", lift, [m], "float64", "use float64: counts past 2^24 and their products lose digits in float32")
    _tensor(f"{what}: p", p, [m], "float64", "the notebook compares p with thresholds far below float32's smallest value")
    label = lambda n: f"pair {tuple(pairs[n].tolist())} (c_i {single[pairs[n, 0]].item():,}, c_j " \
                      f"{single[pairs[n, 1]].item():,}, joint {joint[n].item():,})"
    products = single[pairs[:, 0]].double() * single[pairs[:, 1]].double()
    _same(f"{what}: lift", lift, elift, label=label, hint=lambda g_, e_, bad: (
        "c_i * c_j passes 2^31 here and wraps in 32-bit integers: multiply in float64 (or int64)"
        if (products[bad[:, 0]] >= 2 ** 31).any() else None))
    if ((p < 0) | (p > 1)).any():
        raise CheckFailed(f"{what}: p must be a probability in [0, 1]; got {p[(p < 0) | (p > 1)][0].item():.4g}")
    if tiny is not None and p[tiny] == 0:
        raise CheckFailed(f"{what}: the p-value of pair {tuple(pairs[tiny].tolist())} is about {ep[tiny].item():.0e} "
                          f"and came out 0: compute in float64 (float32 stops near 1e-45)")
    log_p = p.clamp_min(1e-300).log10()
    if _first_bad(log_p, ep.clamp_min(1e-300).log10(), 1e-3, 1e-4).numel():
        hyper = hypergeometric_tail(single, pairs, joint, n_tokens)           # the exact test is right too
        if not _first_bad(log_p, hyper.clamp_min(1e-300).log10(), 1e-3, 1e-4).numel():
            return
        _same(f"{what}: log10 p (the Poisson tail; the exact hypergeometric tail is accepted too)", log_p,
              ep.clamp_min(1e-300).log10(), atol=1e-3, label=label,
              hint=lambda g_, e_, bad: _pvalue_hint(p, ep, bad) or (
                  "this looks like float32 arithmetic (gammainc loses digits for counts this large)"
                  if joint[bad[:, 0]].max() > 10_000 else None))


# ---- Exercise 2: redundancy ---------------------------------------------------------------------

def _cases_best_decoder_match(ref):
    g = torch.Generator().manual_seed(3)
    d_a, d_b, d_in = 37, 61, 16                                                  # distinct sizes, chunk not dividing d_a
    W_b = torch.randn(d_b, d_in, generator=g) * torch.rand(d_b, 1, generator=g).add(0.2) * 3   # rows not unit norm
    match = torch.randint(0, d_b, (d_a,), generator=g)
    W_a = (W_b[match] / W_b[match].norm(dim=-1, keepdim=True) + 0.3 * torch.randn(d_a, d_in, generator=g)) \
        * torch.rand(d_a, 1, generator=g).add(0.1) * 5
    W_a[0] = -W_b[match[0]]                                     # its best match is not the row it is opposite to
    cases = [("a small case", W_a, W_b, 10)]
    W_b = torch.randn(POST_WIDTH, 32, generator=g)
    match = torch.randperm(POST_WIDTH, generator=g)[::3]
    W_a = torch.randn(POST_WIDTH, 32, generator=g)
    W_a[::3] = W_b[match] * 2 + 0.5 * torch.randn(len(match), 32, generator=g)   # a third have a close match
    cases.append(("the post's width (24,576 x 24,576 features)", W_a, W_b, 1024))
    for what, W_a, W_b, chunk in cases:
        yield Case(what, (W_a, W_b), {"chunk": chunk}, W_a.shape[0] == POST_WIDTH,
                   lambda got, what=what, expected=ref(W_a, W_b, chunk=chunk): _check_matches(what, got, expected))


def _check_matches(what, got, expected):
    cos, idx = _parts("best_decoder_match", got, 2)
    _tensor(f"{what}: cos", cos, expected[0].shape, "float", "cosines")
    _tensor(f"{what}: idx", idx, expected[1].shape, "int64", "later cells index layer L+1's features with it")
    _same(f"{what}: idx (the best match of each row of W_a)", idx, expected[1], atol=0, rtol=0,
          label=lambda n: f"row {n} of W_a", hint=lambda g_, e_, bad: (
              "rows of different norms: compare directions (normalise both W_a and W_b), and keep the sign "
              "(the most negative cosine is the opposite direction, not a match)"))
    _same(f"{what}: cos", cos, expected[0], atol=1e-4, label=lambda n: f"row {n} of W_a", hint=lambda g_, e_, bad: (
        "a cosine lies in [-1, 1]: divide by both rows' norms" if (g_.abs() > 1 + 1e-4).any() else None))


def _correlation_scale_case(g, n_tokens, d):
    """Two sparse [n_tokens, d] matrices, uncoalesced, and pairs (idx_a = every feature of A, as the
    notebook asks): few random firings, plus an always-on pair (values ~10 and ~6, correlation ~0.6:
    single-pass float32 sums lose it), a pair of real correlation (~0.9) on 5,000 tokens, a pair
    that fires once on the same token, and features that never fire."""
    z, z2 = torch.randn(n_tokens, generator=g), torch.randn(n_tokens, generator=g)
    every = torch.arange(n_tokens)
    t = torch.randperm(n_tokens, generator=g)
    u = torch.rand(5000, generator=g) * 1.5 + 0.5
    f_a, f_b = torch.randperm(d, generator=g)[:3], torch.randperm(d, generator=g)[:3]
    mats = []
    for f, ((vals_on, tok_p, vals_p), (tok_1, val_1)) in zip(
            (f_a, f_b),
            (((10 + 0.3 * z, t[:5000], u), (t[6000:6001], torch.tensor([0.7]))),
             ((6 + 0.3 * (0.6 * z + 0.8 * z2), torch.cat([t[:5000], t[5000:6000]]),
               torch.cat([2 * u + 0.3 * torch.randn(5000, generator=g), torch.rand(1000, generator=g) + 0.5])),
              (t[6000:6001], torch.tensor([2.5]))))):
        rnd = _sparse(n_tokens, d, 30_000, g)
        busy = torch.isin(rnd.indices()[1], f)
        idx = torch.cat([rnd.indices()[:, ~busy], torch.stack([every, torch.full_like(every, f[0])]),
                         torch.stack([tok_p, torch.full_like(tok_p, f[1])]),
                         torch.stack([tok_1, torch.full_like(tok_1, f[2])])], 1)
        vals = torch.cat([rnd.values()[~busy], vals_on, vals_p, val_1])
        mats.append(_uncoalesced(idx, vals.float(), (n_tokens, d), g))
    idx_a = torch.arange(d)
    idx_b = torch.randint(0, d, (d,), generator=g)
    idx_b[f_a] = f_b
    return mats[0], mats[1], idx_a, idx_b, f_a


def _cases_activation_correlation(ref):
    g = torch.Generator().manual_seed(4)
    n, d_a, d_b = 500, 12, 9
    a = torch.relu(torch.randn(n, d_a, generator=g) - 0.5)
    b = torch.relu(torch.randn(n, d_b, generator=g) - 0.5)
    b[:, 0] = 2 * a[:, 3] + (a[:, 3] > 0) * 0.5                               # b0 follows a3
    b[:, 1] = 0                                                                  # a feature of B that never fires
    a[:, 5] = 0                                                                  # and one of A
    b[::3, 2] = 0
    a[:, 7] = 3 + torch.rand(n, generator=g)                                     # fires on every token
    b[:, 6] = a[:, 7] * 0.5 + torch.rand(n, generator=g)
    idx_a = torch.tensor([3, 0, 5, 1, 3, 11, 2, 7])
    idx_b = torch.tensor([0, 1, 4, 2, 8, 0, 2, 6])                               # distinct from idx_a
    sa, sb = a.to_sparse(), b.to_sparse()
    cases = [("a small case: pairs (3,0), (0,1 never fires), (5 never fires,4), ...",
              _uncoalesced(sa.indices(), sa.values(), sa.shape, g), _uncoalesced(sb.indices(), sb.values(), sb.shape, g),
              idx_a, idx_b, None)]
    cases.append(("the post's width (24,576 features, 2^20 tokens)",) + _correlation_scale_case(g, BIG_TOKENS, POST_WIDTH))
    for what, acts_a, acts_b, idx_a, idx_b, planted in cases:
        yield Case(what, (acts_a, acts_b, idx_a, idx_b), {}, planted is not None,
                   lambda got, c=(what, idx_a, idx_b, planted, ref(acts_a, acts_b, idx_a, idx_b)): _check_correlations(got, *c))


def _check_correlations(got, what, idx_a, idx_b, planted, expected):
    _tensor(what, got, [len(idx_a)], "float", "correlations")
    label = lambda k: f"pair {k} (feature {idx_a[k].item()} of A, {idx_b[k].item()} of B)"
    if planted is not None:                                                      # the planted pairs first: real sizes
        _same(f"{what}, planted pairs (always on; correlated on 5,000 tokens; once)", got[planted],
              expected[planted], atol=1e-4, label=lambda k: label(planted[k].item()), hint=lambda g_, e_, bad: (
                  "sums in float32 lose the variance of a feature that fires on every token: sum in float64"
                  if bad[:, 0].tolist() == [0] else
                  "the products a * b on shared tokens are lost: if you look tokens up by a key such as "
                  "token * d_b + feature, it passes 2^31 at 2^20 tokens (use int64)"))
    _same(what, got, expected, atol=1e-4, label=label, hint=lambda g_, e_, bad: (
        "a feature that never fires has correlation 0 by this exercise's convention (not nan)"
        if torch.isnan(g_[bad[:, 0]]).any() else None))


# ---- Exercise 3: causal tests ---------------------------------------------------------------------

def _cases_ablate_features(ref):
    from sae import SAE
    g = torch.Generator().manual_seed(5)
    sae = SAE(16, 64, 1e-3)
    with torch.no_grad():
        sae.W_dec.copy_(F.normalize(torch.randn(64, 16, generator=g), dim=-1) * (torch.rand(64, 1, generator=g) * 3 + 0.2))
        sae.W_enc.copy_(torch.randn(16, 64, generator=g) * 0.3)                  # rows not unit norm, encoder untied
        sae.b_dec.copy_(torch.randn(16, generator=g))
        sae.b_enc.copy_(torch.randn(64, generator=g) * 0.5)
    x = torch.randn(40, 16, generator=g) * 2
    fires = (sae.encode(x) > 0).sum(0)
    features = torch.tensor([fires.argmax().item(), fires.argmin().item(), 3])   # often, rarely (or never), any
    for what, feats in (("three features", features), ("no features", features[:0])):
        yield Case(what, (sae, x, feats), {}, False, lambda got, what=what, expected=ref(sae, x, feats), x=x:
                   _check_ablated(what, got, expected, x))


def _check_ablated(what, got, expected, x):
    _tensor(f"ablated x ({what})", got, list(x.shape), "float", "it goes back into the residual stream")
    if got.dtype != x.dtype:
        raise CheckFailed(f"ablated x ({what}) must have x's dtype {x.dtype}, got {got.dtype}")
    _same(f"ablated x ({what})", got, expected, atol=1e-4, label=lambda r: f"token {r}",
          hint=lambda g_, e_, bad: "only the chosen features' terms acts_f(x) W_dec[f] are removed: x itself stays, "
                                   "with the SAE's error (x - x_hat) and every other feature")


class Case(NamedTuple):
    what: str                   # named in messages
    args: tuple
    kwargs: dict
    big: bool                   # at the post's width: run under the memory budget
    compare: Callable           # compare(output): raises CheckFailed with what differs


TESTS = {"cooccurrence": (_cases_cooccurrence, cooccurrence),
         "lift_and_pvalue": (_cases_lift_and_pvalue, lift_and_pvalue),
         "best_decoder_match": (_cases_best_decoder_match, best_decoder_match),
         "activation_correlation": (_cases_activation_correlation, activation_correlation),
         "ablate_features": (_cases_ablate_features, ablate_features)}
_CASES = {}                     # built once per exercise, in the notebook's process: its reference answers too


def cases(name: str) -> list:
    """The seeded cases of one exercise, with the reference's answers (built on first use)."""
    if name not in _CASES:
        make, ref = TESTS[name]
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _CASES[name] = list(make(ref))
    return _CASES[name]

SIGNALS = {signal.SIGFPE: "SIGFPE, an arithmetic fault inside torch",
           signal.SIGSEGV: "SIGSEGV, a memory fault inside torch",
           signal.SIGKILL: "SIGKILL: the system stopped it, most likely for using too much memory",
           signal.SIGABRT: "SIGABRT, torch aborted"}
TIMEOUT = 300                                   # seconds a check may take (each case takes seconds)


def _verdict(fn) -> str | None:
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)                 # a function that draws random numbers draws the same ones
            for case in cases(fn.__name__):
                _case(case.what)
                with MemoryBudget(BUDGET) if case.big else contextlib.nullcontext():
                    got = _call(fn, TESTS[fn.__name__][1], *case.args, **case.kwargs)
                case.compare(got)
    except NotImplementedError:
        return "not written yet"
    except CheckFailed as e:
        return str(e)
    except Exception as e:                                                       # a crash is a failed check too
        text = str(e).splitlines()[0][:300] if str(e) else ""
        hint = (". The notebook passes sparse tensors that are not coalesced: call .coalesce() first"
                if "uncoalesced" in text else "")
        return f"on {_CURRENT.get('case', 'its first case')} it raised {type(e).__name__}: {text}{hint}"
    return None


def _isolated(fn) -> str | None:
    """_verdict(fn) run in a forked child process, so that a function that crashes the process
    (a segfault, an arithmetic fault inside torch, the system killing it for memory) or never
    returns becomes a message and the notebook's kernel lives on. The child starts as a copy of
    this process, so a function defined in a notebook needs no pickling; it uses one thread,
    since OpenMP's thread pool does not survive a fork. Where fork is not safe (Windows, macOS)
    the check runs in this process."""
    if not sys.platform.startswith("linux"):
        return _verdict(fn)
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)

    def child():
        faulthandler.disable()                                 # a crash is reported as a sentence, not a dump
        torch.set_num_threads(1)
        sys.stdout = sys.stderr = io.StringIO()                # the learner's prints stay in the child
        _CURRENT["report"] = lambda what: writer.send(("case", what))
        writer.send(("verdict", _verdict(fn)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                        # "this process is multi-threaded": the child only computes
        process = ctx.Process(target=child, daemon=True)
        process.start()
    writer.close()
    case, deadline = "its first case", time.time() + TIMEOUT
    try:
        while reader.poll(max(0.0, deadline - time.time())):
            kind, value = reader.recv()
            if kind == "verdict":
                return value
            case = value
        process.kill()
        return f"it did not finish within {TIMEOUT} s on {case} (each case takes seconds for the reference)"
    except EOFError:                                             # the child died before it answered
        process.join()
        code = -process.exitcode if process.exitcode and process.exitcode < 0 else None
        why = SIGNALS.get(code, f"exit status {process.exitcode}")
        hint = ""
        if code == signal.SIGFPE:
            hint = (": torch's CPU kernels for sparse tensors fail this way on uncoalesced tensors of more than "
                    "2^31 elements (index_select on a [2^20, 24,576] matrix makes one): call .coalesce() on such a "
                    "tensor before you multiply or sum it, or work from its indices() and values()")
        elif code == signal.SIGKILL:
            hint = ": look for a dense tensor of [tokens, features] or a list that grows with the tokens"
        return (f"it crashed the process on {case} ({why}){hint}. The check ran it in a separate process, "
                f"so the notebook is unharmed")
    finally:
        process.join(timeout=1)
        reader.close()


def run_check(fn: Callable, isolate: bool = True) -> str | None:
    """None if `fn` meets its exercise's contract and agrees with the reference of the same name
    on every case, else a sentence saying what differs."""
    cases(fn.__name__)                           # built here, so the child process inherits them
    return _isolated(fn) if isolate else _verdict(fn)


def check(fn: Callable) -> Callable:
    """Check a learner's function against the reference of the same name and print the verdict.
    Returns the learner's function if it is correct, else the reference, so later cells run."""
    problem = run_check(fn)
    if problem is None:
        print(f"{fn.__name__}: correct.")
        return fn
    print(f"{fn.__name__}: {problem}. The rest of the notebook uses the reference (analyze_solutions.py).")
    return TESTS[fn.__name__][1]
