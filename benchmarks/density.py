"""
Feature density of a trained SAE, measured with the final weights on fresh tokens.

    python benchmarks/density.py runs/<run> [runs/<run2> ...] [--tokens=1000000]

train.py's sparsity.safetensors counts firings during the last 1M-2M training tokens,
while the weights were still changing: when L0 was still falling, that window overstates
the final SAE's densities. This reads the run's cfg.json, streams the tokens that come
after the rows the run read (so none were trained on), encodes them with the saved SAE and
prints the density histogram, dead and dense shares, and the mode.
Several runs of one `train.py` call (layers or L1 coefficients trained together) share
one model forward pass.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sources as S                                              # noqa: E402
from sae import SAE, activation_chunks, density_histogram, log10_density, special_token_ids, \
    token_contexts                                               # noqa: E402


def fresh_density(runs: list[str], tokens: int = 1_000_000) -> list[dict]:
    """Each run's SAE encodes the `tokens` tokens after everything its training read (one model
    forward for all the runs): per run its firing counts, L0, dead / dense / very dense shares and
    the histogram's mode. The runs must have read the same data (one train.py call)."""
    cfgs = [json.load(open(os.path.join(run, "cfg.json"))) for run in runs]
    shared = ("model", "dataset", "seed", "rows_read", "context_size", "model_batch")
    cfg = cfgs[0]
    if any(c.get(k) != cfg.get(k) for c in cfgs for k in shared):
        sys.exit(f"These runs read different data (they differ in one of {', '.join(shared)}): "
                 "measure them one call each.")
    saes = [SAE.load(run).eval() for run in runs]
    layers = sorted({c["layer"] for c in cfgs})
    if not S.hub_status()[0]:
        S.go_offline()
    model = S.load_model(cfg["model"], "cpu")
    corpus = S.open_corpus(cfg["dataset"], cfg["seed"])
    docs = S.documents(corpus, skip=cfg["rows_read"])              # after everything training read
    contexts = token_contexts(docs, model.tokenizer, cfg["context_size"], cfg["model_batch"])
    special = special_token_ids(model.tokenizer)
    counts, n = [torch.zeros(sae.d_sae, dtype=torch.long) for sae in saes], 0
    with torch.no_grad():
        for chunk in activation_chunks(model, contexts, layers, special):     # [n, n_layers, d_in]
            for part in chunk.split(1024):
                for sae, c, count in zip(saes, cfgs, counts):
                    count += (sae.encode(part[:, layers.index(c["layer"])]) > 0).sum(0)
                n += len(part)
            if n >= tokens:
                break
    if cfg.get("passes", 1) > 1 or n < tokens:
        print(f"note: the corpus gave {n:,} tokens after the training rows"
              + (" (training read it more than once, so these were trained on)" if cfg.get("passes", 1) > 1 else ""))
    results = []
    for count in counts:
        density = count.double() / n
        log_density = log10_density(density)
        hist = torch.histc(log_density.clamp(-10, -1e-6), bins=20, min=-10, max=0)
        results.append({"tokens": n, "l0": count.sum().item() / n, "dead": (count == 0).float().mean().item(),
                        "dense": (density > 1e-2).float().mean().item(),
                        "very_dense": (density > 1e-1).float().mean().item(),
                        "mode": -10 + 0.5 * hist.argmax().item(), "log_density": log_density})
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders written by train.py (one call, or the same data)")
    p.add_argument("--tokens", type=int, default=1_000_000)
    args = p.parse_args()
    for run, r in zip(args.runs, fresh_density(args.runs, args.tokens)):
        print(f"{run}: {len(r['log_density'])} features, {r['tokens']:,} fresh tokens, L0 {r['l0']:.2f}")
        print(f"dead (never fired) {r['dead']:.1%}, dense (> 1e-2) {r['dense']:.1%}, very dense (> 1e-1) "
              f"{r['very_dense']:.2%}; histogram mode [{r['mode']:.1f}, {r['mode'] + 0.5:.1f})")
        print(density_histogram(r["log_density"]))


if __name__ == "__main__":
    main()
