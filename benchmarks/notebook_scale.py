"""
Time and peak memory of analyze.ipynb's computations at the post's width over ~1M tokens.

    python benchmarks/notebook_scale.py [--tokens=1048576] [--d_sae=24576] [--l0=30] [--d_in=768]

The notebook analyses 65k tokens by default; this runs its reference solutions
(analyze_solutions.py) on synthetic sparse activations of the size the post's SAEs give:
d_sae features (24,576 = 32 x 768, the post's width), `tokens` tokens, L0 features firing per
token with densities spread over three decades (1e-5 to 1e-2, like a healthy SAE's histogram),
and two layers' worth (A and B) for the cross-layer functions. It prints each step's time and the
process's peak resident memory after it (which only grows), so the last line is the whole
pipeline's peak.
"""

import argparse
import os
import resource
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import analyze_solutions as A                                      # noqa: E402

warnings.filterwarnings("ignore", message=".*[Ss]parse")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6          # Linux reports KiB


def synthetic_acts(n_tokens, d_sae, l0, generator, chunk=1 << 16):
    """Sparse [n_tokens, d_sae]: feature f fires on ~density_f of tokens, log10 densities uniform in
    [-5, -2] rescaled so that the mean number of features per token is l0. Built a block of
    tokens at a time, already in coalesced order, so that making it costs little beyond its size."""
    p = 10 ** (torch.rand(d_sae, generator=generator) * 3 - 5)
    keys = []
    for lo in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - lo)
        feature = torch.multinomial(p, int(n * l0), replacement=True, generator=generator)
        token = torch.randint(lo, lo + n, (len(feature),), generator=generator)
        keys.append(torch.unique(token * d_sae + feature))                     # sorted, no repeats
    keys = torch.cat(keys)
    indices = torch.stack([keys // d_sae, keys % d_sae])
    del keys
    values = torch.rand(indices.shape[1], generator=generator) + 0.1
    return torch.sparse_coo_tensor(indices, values, (n_tokens, d_sae), is_coalesced=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--d_sae", type=int, default=A.POST_WIDTH)
    p.add_argument("--l0", type=float, default=30)
    p.add_argument("--d_in", type=int, default=768)
    p.add_argument("--min_joint", type=int, default=5)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    print(f"{args.tokens:,} tokens, {args.d_sae:,} features, L0 {args.l0}, d_in {args.d_in}; "
          f"{torch.get_num_threads()} threads; peak memory before: {peak_gb():.2f} GB")

    def step(name, fn):
        t = time.perf_counter()
        out = fn()
        print(f"{name:<48} {time.perf_counter() - t:7.1f} s   peak {peak_gb():5.2f} GB")
        return out

    acts_a = step("activations A (synthetic, sparse)", lambda: synthetic_acts(args.tokens, args.d_sae, args.l0, g))
    acts_b = step("activations B", lambda: synthetic_acts(args.tokens, args.d_sae, args.l0, g))
    print(f"   nnz per layer {acts_a._nnz():,}")
    fired = torch.sparse_coo_tensor(acts_a.indices(), torch.ones(acts_a._nnz()), acts_a.shape, is_coalesced=True)
    single, pairs, joint = step(f"cooccurrence (min_joint={args.min_joint})",
                                lambda: A.cooccurrence(fired, min_joint=args.min_joint))
    print(f"   {len(joint):,} pairs kept")
    lift, pv = step("lift_and_pvalue", lambda: A.lift_and_pvalue(single, pairs, joint, args.tokens))
    null = step("circular_shift_null", lambda: A.circular_shift_null(acts_a, g))
    del null
    W_a, W_b = torch.randn(args.d_sae, args.d_in, generator=g), torch.randn(args.d_sae, args.d_in, generator=g)
    cos, idx = step("best_decoder_match (A -> B)", lambda: A.best_decoder_match(W_a, W_b))
    step("activation_correlation (every A feature, its match)",
         lambda: A.activation_correlation(acts_a, acts_b, torch.arange(args.d_sae), idx))
    print(f"peak resident memory of the whole pipeline: {peak_gb():.2f} GB")


if __name__ == "__main__":
    main()
