"""
Reference solutions and checks for analyze.ipynb: open this file when you want to read a solution.

Each exercise of the notebook has a reference here, under the same name, and a check that
compares a learner's function with it on random inputs built to tell plausible mistakes apart
(arguments swapped, thresholds off by one, features that never fire, decoder rows that are not
unit norm) and on one case at the post's width (24,576 features) with few non-zeros, run under
a memory budget so that a solution that densifies fails at once with a message instead of
filling the machine's memory.

    from analyze_solutions import check
    cooccurrence = check(cooccurrence)   # prints "correct." or what differs; returns yours if
                                         # correct, else the reference, so the notebook goes on

Everything here works on sparse activations: torch COO tensors of shape [n_tokens, d_sae].
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

POST_WIDTH = 24_576          # features per SAE in the February 2024 release (32 x 768)
BIG_TOKENS = 1 << 20         # ~1M tokens: the scale the notebook's computations are built for
BUDGET = 1 << 30             # bytes any single dense tensor may take in the post-width checks


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
# --------------------------------------------------------------------------------------------

class CheckFailed(AssertionError):
    pass


class MemoryBudget(TorchDispatchMode):
    """Refuses any dense tensor larger than `limit` bytes: before the op where its size can be told
    from the arguments (to_dense, factories, matrix products), after it otherwise."""

    FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn")

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def _refuse(self, func, shape, itemsize=4):
        size = math.prod(shape) * itemsize
        if size > self.limit:
            raise CheckFailed(
                f"at the post's width your function makes a dense {list(shape)} tensor ({size / 1e9:.1f} GB, "
                f"in {func}): keep it sparse, or work in blocks")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        first = args[0] if args else None
        if "to_dense" in name and isinstance(first, torch.Tensor):
            self._refuse(func, first.shape, first.element_size())
        elif name in self.FACTORIES and args and isinstance(first, (list, tuple, torch.Size)):
            self._refuse(func, first)
        elif name in ("mm", "matmul", "addmm") and len(args) >= 2:
            a, b = args[-2], args[-1]                                            # dense out unless both are sparse
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim() == 2 \
                    and not (a.is_sparse and b.is_sparse):
                self._refuse(func, (a.shape[0], b.shape[1]), 4)
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._refuse(func, t.shape, t.element_size())
        return out


def _sparse(n_tokens, d_sae, nnz, generator, values=None):
    """A random sparse [n_tokens, d_sae] activation matrix with about nnz non-zeros."""
    idx = torch.stack([torch.randint(0, n_tokens, (nnz,), generator=generator),
                       torch.randint(0, d_sae, (nnz,), generator=generator)])
    v = torch.rand(nnz, generator=generator) + 0.1 if values is None else values
    return torch.sparse_coo_tensor(idx, v, (n_tokens, d_sae)).coalesce()


def _binary(t):
    """t sparse -> the same pattern with every stored value 1 (duplicates summed first, then set to 1)."""
    t = t.coalesce()
    return torch.sparse_coo_tensor(t.indices(), torch.ones(t._nnz()), t.shape, is_coalesced=True)


def _dense_t(t):
    return t.to_dense() if t.is_sparse else t


def _same(what, got, expected, atol=1e-5, rtol=1e-4):
    got, expected = _dense_t(torch.as_tensor(got)), _dense_t(torch.as_tensor(expected))
    if got.shape != expected.shape:
        raise CheckFailed(f"{what}: expected shape {list(expected.shape)}, got {list(got.shape)}")
    if not torch.allclose(got.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True):
        bad = (~torch.isclose(got.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True)).nonzero()
        at = tuple(bad[0].tolist())
        raise CheckFailed(f"{what}: {len(bad)} of {got.numel()} entries differ, e.g. at {at}: "
                          f"expected {expected[at].item():.6g}, got {got[at].item():.6g}")


def _pairs_as_dict(single, pairs, joint):
    return {tuple(p): c for p, c in zip(pairs.tolist(), joint.tolist())}


def _test_cooccurrence(fn, ref):
    g = torch.Generator().manual_seed(1)
    # a small case by hand: feature 3 never fires, (0, 1) fire together 3 times, (0, 2) and (1, 2) once
    fired = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float)
    for min_joint in (1, 2, 3, 4):
        got, exp = fn(fired.to_sparse(), min_joint=min_joint), ref(fired.to_sparse(), min_joint=min_joint)
        _same(f"single (small case, min_joint={min_joint})", got[0], exp[0])
        if _pairs_as_dict(*got) != _pairs_as_dict(*exp):
            raise CheckFailed(f"small case, min_joint={min_joint}: expected pairs {_pairs_as_dict(*exp)}, got "
                              f"{_pairs_as_dict(*got)} (each pair once with i < j, joint >= min_joint kept)")
    # random cases, some counts exactly at the threshold
    for n_tokens, d_sae, nnz, min_joint in ((300, 40, 1500, 3), (200, 7000, 4000, 2)):
        fired = _binary(_sparse(n_tokens, d_sae, nnz, g))
        got, exp = fn(fired, min_joint=min_joint), ref(fired, min_joint=min_joint)
        _same(f"single ({n_tokens} tokens x {d_sae} features)", got[0], exp[0])
        g_d, e_d = _pairs_as_dict(*got), _pairs_as_dict(*exp)
        if g_d != e_d:
            extra, missing = set(g_d) - set(e_d), set(e_d) - set(g_d)
            wrong = [p for p in set(g_d) & set(e_d) if g_d[p] != e_d[p]]
            raise CheckFailed(f"{n_tokens} tokens x {d_sae} features, min_joint={min_joint}: {len(missing)} pairs "
                              f"missing, {len(extra)} extra, {len(wrong)} with a wrong count "
                              f"(e.g. {(sorted(missing) + sorted(extra) + wrong)[:3]})")
    # the post's width, ~1M tokens, few non-zeros, under the memory budget
    fired = _binary(_sparse(BIG_TOKENS, POST_WIDTH, 20_000, g))
    hot = torch.randint(0, POST_WIDTH, (2,), generator=g)                         # a pair firing together often
    extra = torch.stack([torch.arange(0, BIG_TOKENS, 9973).repeat_interleave(2), hot.repeat(106)[:2 * 106]])
    fired = _binary(torch.sparse_coo_tensor(torch.cat([fired.indices(), extra], 1),
                                            torch.ones(fired._nnz() + extra.shape[1]), fired.shape))
    exp = ref(fired, min_joint=2)
    with MemoryBudget(BUDGET):
        got = fn(fired, min_joint=2)
    _same("single (post's width)", got[0], exp[0])
    if _pairs_as_dict(*got) != _pairs_as_dict(*exp):
        raise CheckFailed("at the post's width (24,576 features, 1M tokens) the pairs differ from the reference")


def _test_lift_and_pvalue(fn, ref):
    g = torch.Generator().manual_seed(2)
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
    lift, p = fn(single, pairs, joint, n_tokens)
    elift, ep = ref(single, pairs, joint, n_tokens)
    _same("lift", lift, elift)
    p = torch.as_tensor(p).double()
    if p.shape != ep.shape:
        raise CheckFailed(f"p: expected shape {list(ep.shape)}, got {list(p.shape)}")
    _same("log10 p", p.clamp_min(1e-300).log10(), ep.clamp_min(1e-300).log10(), atol=1e-3, rtol=1e-4)
    if p[1] == 0:
        raise CheckFailed("p: a tiny p-value came out 0: compute in float64 (float32 stops near 1e-45)")


def _test_best_decoder_match(fn, ref):
    g = torch.Generator().manual_seed(3)
    d_a, d_b, d_in = 37, 61, 16                                                  # distinct sizes, chunk not dividing d_a
    W_b = torch.randn(d_b, d_in, generator=g) * torch.rand(d_b, 1, generator=g).add(0.2) * 3   # rows not unit norm
    match = torch.randint(0, d_b, (d_a,), generator=g)
    W_a = (W_b[match] / W_b[match].norm(dim=-1, keepdim=True) + 0.3 * torch.randn(d_a, d_in, generator=g)) \
        * torch.rand(d_a, 1, generator=g).add(0.1) * 5
    got, exp = fn(W_a, W_b, chunk=10), ref(W_a, W_b, chunk=10)
    _same("idx", got[1], exp[1])
    _same("cos", got[0], exp[0])
    # the post's width: a [24,576, 24,576] similarity matrix would be 2.4 GB
    W_a, W_b = torch.randn(POST_WIDTH, 32, generator=g), torch.randn(POST_WIDTH, 32, generator=g)
    exp = ref(W_a, W_b)
    with MemoryBudget(BUDGET):
        got = fn(W_a, W_b)
    _same("idx (post's width)", got[1], exp[1])


def _test_activation_correlation(fn, ref):
    g = torch.Generator().manual_seed(4)
    n, d_a, d_b = 500, 12, 9
    a = torch.relu(torch.randn(n, d_a, generator=g) - 0.5)
    b = torch.relu(torch.randn(n, d_b, generator=g) - 0.5)
    b[:, 0] = 2 * a[:, 3] + (a[:, 3] > 0) * 0.5                               # b0 follows a3
    b[:, 1] = 0                                                                  # a feature of B that never fires
    a[:, 5] = 0                                                                  # and one of A
    b[::3, 2] = 0
    idx_a = torch.tensor([3, 0, 5, 1, 3, 11, 2])
    idx_b = torch.tensor([0, 1, 4, 2, 8, 0, 2])                                  # distinct from idx_a
    got = fn(a.to_sparse(), b.to_sparse(), idx_a, idx_b)
    exp = ref(a.to_sparse(), b.to_sparse(), idx_a, idx_b)
    _same("correlations (pairs (3,0), (0,1 never fires), (5 never fires,4), ...)", got, exp, atol=1e-4)
    # the post's width, ~1M tokens: densifying [n_tokens, k] columns would take GBs
    acts_a = _sparse(BIG_TOKENS, POST_WIDTH, 30_000, g)
    acts_b = _sparse(BIG_TOKENS, POST_WIDTH, 30_000, g)
    idx_a = torch.randperm(POST_WIDTH, generator=g)[:4096]
    idx_b = torch.randint(0, POST_WIDTH, (4096,), generator=g)
    exp = ref(acts_a, acts_b, idx_a, idx_b)
    with MemoryBudget(BUDGET):
        got = fn(acts_a, acts_b, idx_a, idx_b)
    _same("correlations (post's width)", got, exp, atol=1e-4)


def _test_ablate_features(fn, ref):
    from sae import SAE
    g = torch.Generator().manual_seed(5)
    sae = SAE(16, 64, 1e-3)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, generator=g) * 3 + 0.2)                # rows not unit norm
        sae.b_dec.copy_(torch.randn(16, generator=g))
        sae.b_enc.copy_(torch.randn(64, generator=g) * 0.5)
    x = torch.randn(40, 16, generator=g) * 2
    fires = (sae.encode(x) > 0).sum(0)
    features = torch.tensor([fires.argmax().item(), fires.argmin().item(), 3])   # often, rarely (or never), any
    _same("ablated x", fn(sae, x, features), ref(sae, x, features), atol=1e-4)
    _same("ablated x, no features", fn(sae, x, features[:0]), x, atol=1e-5)


TESTS = {"cooccurrence": (_test_cooccurrence, cooccurrence),
         "lift_and_pvalue": (_test_lift_and_pvalue, lift_and_pvalue),
         "best_decoder_match": (_test_best_decoder_match, best_decoder_match),
         "activation_correlation": (_test_activation_correlation, activation_correlation),
         "ablate_features": (_test_ablate_features, ablate_features)}


def run_check(fn: Callable) -> str | None:
    """None if `fn` agrees with the reference of the same name on every case, else what differs."""
    test, ref = TESTS[fn.__name__]
    try:
        with torch.no_grad():
            test(fn, ref)
    except NotImplementedError:
        return "not written yet"
    except CheckFailed as e:
        return str(e)
    except Exception as e:                                                       # a crash is a failed check too
        return f"it raised {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return None


def check(fn: Callable) -> Callable:
    """Check a learner's function against the reference of the same name and print the verdict.
    Returns the learner's function if it is correct, else the reference, so later cells run."""
    problem = run_check(fn)
    if problem is None:
        print(f"{fn.__name__}: correct.")
        return fn
    print(f"{fn.__name__}: {problem}. The rest of the notebook uses the reference (analyze_solutions.py).")
    return TESTS[fn.__name__][1]
