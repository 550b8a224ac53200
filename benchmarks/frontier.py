"""
Sparsity-fidelity frontier: our train() against SAELens's standard (ReLU + L1) SAE, on identical batches.

    python benchmarks/frontier.py sweep --trainer=ours --lr=4e-3,1.6e-2 --l1=4e-5,8e-5,1.6e-4
    python benchmarks/frontier.py sweep --trainer=saelens --lr=1e-3,4e-3 --l1=1,2,4
    python benchmarks/frontier.py sweep --trainer=ours --tag=topk --extra='{"method": "topk"}' --lr=4e-3 --k=16,32,64
    python benchmarks/frontier.py sweep --trainer=saelens_topk --lr=4e-3 --k=16,32,64
    python benchmarks/frontier.py synthetic
    python benchmarks/frontier.py report          # table + plot from the results file
    python benchmarks/frontier.py sweep --layer=5 --width=4608 ...   # another layer and width (own cache)
    python benchmarks/frontier.py report --layer=5 --width=4608 --png=frontier_L5.png

Real task: SmolLM2-135M residual activations (layer 2 unless --layer) of Python stdlib text, computed once and
cached, shuffled once; every trainer gets the same batches in the same order, b_dec starts at the
same geometric median, and every SAE is scored by the same code (sae.evaluate) on held-out
contexts. Synthetic task: known feature directions in superposition; the share of true features
that some decoder row matches at cosine > 0.9, at equal steps.
SAELens is an optional benchmark dependency: pip install "sae-lens>=6,<7".
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sources as S                                  # noqa: E402
import train as T                                    # noqa: E402
from sae import SAE, Config, activation_chunks, evaluate, geometric_median, make_held_out, \
    special_token_ids, token_contexts                 # noqa: E402

RESULTS = os.path.join(HERE, "frontier_results.jsonl")


def real_data(tokens: int, cache: str, layer: int = 2):
    """(model, held-out set, [tokens, 576] shuffled training activations of `layer`), the activations
    cached on disk."""
    model = S.load_smollm2("cpu")
    special = special_token_ids(model.tokenizer)
    corpus = S.open_corpus("python-stdlib")
    cfg = Config(eval_contexts=32)
    read = {}
    held_tokens = T.held_out_contexts(corpus, model.tokenizer, cfg, read)
    skip = read["rows"]
    held_out = make_held_out(model, held_tokens, layer, special)
    path = os.path.join(cache, f"smollm2_L{layer}_{tokens}.pt")
    if os.path.exists(path):
        return model, held_out, torch.load(path)
    contexts = token_contexts(S.documents(corpus, skip), model.tokenizer, 128, 32)
    chunks, n = [], 0
    for chunk in activation_chunks(model, contexts, layer, special):
        chunks.append(chunk)
        n += len(chunk)
        if n >= tokens:
            break
    acts = torch.cat(chunks)[:tokens]
    acts = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))]
    os.makedirs(cache, exist_ok=True)
    torch.save(acts, path)
    return model, held_out, acts


def train_ours(acts, d_sae, batch, lr, l1, warmup, **extra) -> SAE:
    import sae as sae_module
    enc_scale = extra.pop("enc_scale", 1.0)
    free_rows = extra.pop("free_rows", False)
    if extra.pop("batch_mse", False):     # experiment: normalise the MSE by the batch's mean centred norm
        sae_module.normalized_mse = lambda x_hat, x, norm: ((x_hat - x) ** 2).mean() / norm.mean()
    cfg = Config(d_in=acts.shape[1], expansion=d_sae // acts.shape[1], batch_size=batch,
                 total_tokens=len(acts) // batch * batch, lr=lr, l1_coeff=l1, warmup_steps=warmup,
                 dead_window=extra.pop("dead_window", dead_window(len(acts) // batch)),
                 eval_every=10**9, precision=extra.pop("precision", "float32"), **extra)
    torch.manual_seed(0)
    cls = FreeRowsTopK if free_rows else SAE
    sae = cls(cfg.d_in, cfg.d_sae, cfg.l1_coeff, cfg.method, mse_norm="centred", k=cfg.k)   # as measured
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(acts[:100_000]))
        sae.W_enc *= enc_scale              # experiment: a smaller encoder at the start
    T.train(sae, iter(acts.split(batch)), cfg)
    return sae.eval()


class FreeRowsTopK(SAE):
    """Experiment: TopK on free decoder rows, as SAELens trains it: rows start at norm 0.1 (the
    encoder their transpose), the top k are chosen on h_i * ||W_dec_i|| (the size of what feature i
    writes), and the update clips the gradient's norm to 1 instead of projecting and renormalising."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        with torch.no_grad():
            self.W_dec *= 0.1
            self.W_enc.copy_(self.W_dec.T)

    @property
    def unit_norm_decoder(self) -> bool:
        return False

    def activation(self, h):
        return super().activation(h * self.W_dec.norm(dim=-1))       # in units of unit-norm rows

    def decode(self, acts):
        return super().decode(acts / self.W_dec.norm(dim=-1))

    def forward(self, x, *args, sparse=False, **kw):      # the dense step: the sparse one knows neither override
        return super().forward(x, *args, sparse=False, **kw)


def fit_saelens(sl, acts, batch, lr, warmup, dead_feature_window: int, extra: dict):
    """SAELens's own SAETrainer on our batches, in our order, b_dec started at the same geometric median."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    with torch.no_grad():
        sl.b_dec.copy_(geometric_median(acts[:100_000]))
    steps = len(acts) // batch
    # lr_end: where a decay (lr_decay_steps > 0) ends; constant lr otherwise
    lr_end = extra.pop("lr_end", lr * 1e-3 if extra.get("lr_decay_steps") else lr)
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch,
                                   lr=lr, lr_end=lr_end, lr_warm_up_steps=warmup, device="cpu",
                                   dead_feature_window=dead_feature_window, feature_sampling_window=10**9,
                                   **extra)
    SAETrainer(trainer_cfg, sl, data_provider=iter(acts.split(batch))).fit()


def train_saelens(acts, d_sae, batch, lr, l1, warmup, **extra) -> SAE:
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(0)
    sl = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=acts.shape[1], d_sae=d_sae, l1_coefficient=l1,
                                                       dtype="float32", device="cpu"))
    fit_saelens(sl, acts, batch, lr, warmup, max(1, (len(acts) // batch) // 10), extra)
    ours = SAE(acts.shape[1], d_sae, mse_norm="centred")              # same equations: f = ReLU((x - b_dec) W_enc + b_enc)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(ours, name).copy_(getattr(sl, name))
    return ours.eval()


def train_saelens_topk(acts, d_sae, batch, lr, l1, warmup, k=32, batch_topk=False, **extra) -> SAE:
    """SAELens's own TopK (or BatchTopK) training SAE and trainer, defaults otherwise (AuxK with its
    k_aux = d_in / 2, decoder norms folded into the top-k choice), on the same batches as ours; the
    result converted to our unit-norm form, which encodes and decodes the same."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cls, cfg_cls = (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig) if batch_topk else \
        (TopKTrainingSAE, TopKTrainingSAEConfig)
    torch.manual_seed(0)
    sl = cls(cfg_cls(d_in=acts.shape[1], d_sae=d_sae, k=k, dtype="float32", device="cpu"))
    fit_saelens(sl, acts, batch, lr, warmup, dead_window(len(acts) // batch), extra)
    ours = SAE(acts.shape[1], d_sae, method="batchtopk" if batch_topk else "topk", k=k, mse_norm="centred")
    with torch.no_grad():                  # SAELens picks the top k of h * ||W_dec_i||: fold the norms in
        n = sl.W_dec.norm(dim=-1)
        ours.W_enc.copy_(sl.W_enc * n)
        ours.b_enc.copy_(sl.b_enc * n)
        ours.W_dec.copy_(sl.W_dec / n[:, None])
        ours.b_dec.copy_(sl.b_dec)
        if batch_topk:                     # its threshold is in those folded units already
            ours.threshold.fill_(float(sl.topk_threshold))
    return ours.eval()


def dead_window(steps: int) -> int:
    """The post's share of a run (5,000 of its 73,242 steps) as steps of this one: where a latent
    counts as dead for ghost grads or AuxK, the same for every trainer."""
    return max(1, round(5000 * steps / T.POST_STEPS))


TRAINERS = {"ours": train_ours, "saelens": train_saelens, "saelens_topk": train_saelens_topk,
            "saelens_batchtopk": lambda *a, **kw: train_saelens_topk(*a, batch_topk=True, **kw)}


@torch.no_grad()
def final_density(sae: SAE, acts: torch.Tensor) -> dict:
    """Share of features that never fire on (the first 600k of) the cached activations with the final
    weights (dead), and that fire on more than 1 % of them (dense, as density.py counts)."""
    acts = acts[:600_000]
    fires = sum((sae.encode(part) > 0).sum(0) for part in acts.split(8192))
    return {"dead_final": (fires == 0).float().mean().item(),
            "dense_final": (fires > 0.01 * len(acts)).float().mean().item()}


def sweep(args):
    model, held_out, acts = real_data(args.tokens, args.cache, args.layer)
    for lr in args.lr:
        for l1, k in [(0.0, int(k)) for k in args.k] if args.k else [(l1, None) for l1 in args.l1]:
            start = time.time()
            extra = {**(json.loads(args.extra) if args.extra else {}), **({"k": k} if k else {})}
            sae = TRAINERS[args.trainer](acts, args.width, args.batch, lr, l1, args.warmup, **extra)
            m = {**evaluate(sae, model, held_out, args.layer), **final_density(sae, acts)}
            row = {"task": f"smollm2_L{args.layer}", "trainer": args.trainer, "tag": args.tag, "lr": lr, "l1": l1,
                   "extra": extra, "tokens": args.tokens, "width": args.width, "batch": args.batch,
                   "seconds": round(time.time() - start, 1), **{k: m[k] for k in (
                       "explained_variance", "l0", "ce_recovered", "ce_increase", "kl_score", "l2_ratio",
                       "relative_reconstruction_bias", "dead_final", "dense_final")}}
            print(json.dumps(row), flush=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(row) + "\n")


def synthetic_batches(n_true=400, d_in=64, batch=1024, l0=6, sample_seed=0):
    """Sparse codes over n_true unit directions in d_in dims (superposition) around a non-zero centre.
    The directions, centre and frequencies are fixed; sample_seed picks the stream of samples."""
    g = torch.Generator().manual_seed(0)
    true = F.normalize(torch.randn(n_true, d_in, generator=g), dim=-1)
    centre = 2 * torch.randn(d_in, generator=g)
    freq = torch.rand(n_true, generator=g) * 2 * l0 / n_true            # varied feature frequencies
    g.manual_seed(1000 + sample_seed)

    def batches():
        while True:
            active = torch.rand(batch, n_true, generator=g) < freq
            yield (active * (0.5 + torch.rand(batch, n_true, generator=g))) @ true + centre
    return true, batches()


def synthetic(args):
    """Share of true features recovered (some decoder row at cosine > 0.9) with equal steps and width."""
    trainers = (("ours", args.lr, args.l1),) + ((("saelens", args.sl_lr, args.sl_l1),) if args.sl_l1 else ())
    for trainer, lr, l1 in [(t, lr, l1) for t, lrs, l1s in trainers for lr in lrs for l1 in l1s]:
        true, batches = synthetic_batches()
        acts = torch.cat([next(batches) for _ in range(args.steps)])
        extra = json.loads(args.extra) if args.extra and trainer == "ours" else {}
        sae = TRAINERS[trainer](acts, 512, 1024, lr, l1, 50, **extra)
        best = (F.normalize(sae.W_dec, dim=-1) @ true.T).max(0).values
        x = next(synthetic_batches(sample_seed=1)[1])
        acts_ = sae.encode(x)
        ev = 1 - ((sae.decode(acts_) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        row = {"task": "synthetic", "trainer": trainer, "tag": args.tag, "lr": lr, "l1": l1, "steps": args.steps,
               "recovered": (best > 0.9).float().mean().item(), "l0": (acts_ > 0).float().sum(-1).mean().item(),
               "explained_variance": ev.item()}
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


SAELENS_KIND = {"topk": "saelens_topk", "batchtopk": "saelens_batchtopk"}     # our method -> its SAELens trainer


def frontier(rows):
    """The points of one (trainer, tag, lr) sorted by L0."""
    return sorted(rows, key=lambda r: r["l0"])


def interpolate(points, l0: float, metric: str) -> float | None:
    """metric at this L0, linear in log L0 between the two nearest points (None outside their range;
    a point within 1 % of this L0 is taken as it is, as TopK's k 12 against another's 11.98)."""
    for p in points:
        if abs(math.log(l0 / p["l0"])) < 0.01:
            return p[metric]
    for a, b in zip(points, points[1:]):
        if a["l0"] <= l0 <= b["l0"]:
            t = math.log(l0 / a["l0"]) / math.log(b["l0"] / a["l0"])
            return a[metric] + t * (b[metric] - a[metric])
    return None


def report(args):
    rows = [json.loads(line) for line in open(args.results)]
    real = [r for r in rows if r["task"] == f"smollm2_L{args.layer}" and (r["width"], r["tokens"]) == (args.width, args.tokens)]
    groups = {}
    for r in real:
        groups.setdefault((r["trainer"], r["tag"] or "", r["lr"]), []).append(r)
    print(f"{'trainer':<10} {'tag':<12} {'lr':>8} {'l1':>8} {'L0':>7} {'EV':>6} {'CE rec':>7} {'CE incr':>7} {'KL':>6}")
    for key in sorted(groups):
        for r in frontier(groups[key]):
            print(f"{key[0]:<10} {key[1]:<12} {key[2]:>8.1e} {r['l1']:>8.1e} {r['l0']:>7.1f} "
                  f"{r['explained_variance']:>6.3f} {r['ce_recovered']:>7.3f} {r['ce_increase']:>7.3f} "
                  f"{r['kl_score']:>6.3f}")
    print("\nmatched L0 (log-L0 interpolation): each curve of ours against each SAELens curve")
    ours_curves = [k for k in sorted(groups) if k[0] == "ours" and (not args.only or args.only in k[1])]
    for ours in ours_curves:
        for theirs in (k for k in sorted(groups) if k[0] != "ours" and (not args.only or args.only in k[0] + k[1])):
            for p in frontier(groups[ours]):
                ev = interpolate(frontier(groups[theirs]), p["l0"], "explained_variance")
                ce = interpolate(frontier(groups[theirs]), p["l0"], "ce_recovered")
                if ev is not None:
                    print(f"  ours {ours[1] or 'plain'} lr {ours[2]:g} vs SAELens {theirs[1] or 'plain'} lr {theirs[2]:g}"
                          f" at L0 {p['l0']:6.1f}: EV {p['explained_variance']:.3f} vs {ev:.3f} ({p['explained_variance'] - ev:+.3f}),"
                          f" CE rec {p['ce_recovered']:.3f} vs {ce:.3f} ({p['ce_recovered'] - ce:+.3f})")
    print("\nagainst SAELens at its best at each L0: the highest EV of its curves of the same kind there")
    for ours in ours_curves:
        for p in frontier(groups[ours]):
            kind = SAELENS_KIND.get(p["extra"].get("method"), "saelens")
            best = [(interpolate(frontier(groups[t]), p["l0"], "explained_variance"), t)
                    for t in groups if t[0] == kind]
            best = [b for b in best if b[0] is not None]
            line = f"  ours {ours[1] or 'plain'} lr {ours[2]:g} at L0 {p['l0']:6.1f}: EV {p['explained_variance']:.3f}"
            if not best:
                print(f"{line}, no {kind} curve reaches this L0")
                continue
            ev, theirs = max(best)
            ce = interpolate(frontier(groups[theirs]), p["l0"], "ce_recovered")
            print(f"{line} vs {ev:.3f} ({p['explained_variance'] - ev:+.3f}; {theirs[1] or 'constant'} lr {theirs[2]:g}),"
                  f" CE rec {p['ce_recovered']:.3f} vs {ce:.3f} ({p['ce_recovered'] - ce:+.3f})")
    for r in rows:
        if r["task"] == "synthetic":
            print(f"synthetic {r['trainer']:<8} {r['tag'] or '':<10} lr {r['lr']:.1e} l1 {r['l1']:.1e} "
                  f"steps {r['steps']}: recovered {r['recovered']:.1%}, L0 {r['l0']:.1f}, EV {r['explained_variance']:.3f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keep = [c.split(":") for c in args.plot.split(",")] if args.plot else None
    for key in sorted(groups):
        if keep and not any(k[0] == key[0] and k[1] == key[1] and float(k[2]) == key[2] for k in keep):
            continue
        pts = frontier(groups[key])
        for ax, metric in zip(axes, ("explained_variance", "ce_recovered")):
            ax.plot([p["l0"] for p in pts], [p[metric] for p in pts], "o-",
                    label=f"{key[0]} {key[1] or 'constant lr'} lr={key[2]:g}")
    for ax, metric in zip(axes, ("explained variance", "CE recovered")):
        ax.set_xscale("log")
        ax.set_xlabel("L0")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, args.png), dpi=110)
    print(f"plot: benchmarks/{args.png}")


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("sweep", "synthetic", "report"))
    p.add_argument("--trainer", choices=tuple(TRAINERS), default="ours")
    p.add_argument("--lr", type=floats, default=[1e-3])
    p.add_argument("--l1", type=floats, default=[8e-5])
    p.add_argument("--k", type=floats, default=[], help="TopK / BatchTopK: sweep k (features per token) instead of --l1")
    p.add_argument("--only", default="", help="report: compare only curves whose trainer or tag contains this")
    p.add_argument("--sl_lr", type=floats, default=[4e-3])
    p.add_argument("--sl_l1", type=floats, default=[2.0])
    p.add_argument("--layer", type=int, default=2, help="the residual stream after this block")
    p.add_argument("--tokens", type=int, default=600_000)
    p.add_argument("--width", type=int, default=2304)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--steps", type=int, default=300, help="synthetic task: steps per trainer")
    p.add_argument("--tag", default="", help="a label for this variant in the table")
    p.add_argument("--extra", default="", help="JSON of extra Config (ours) or SAETrainerConfig fields")
    p.add_argument("--plot", default="", help="report: the curves to draw, as trainer:tag:lr,... (default all)")
    p.add_argument("--png", default="frontier.png", help="report: the plot's file name, in benchmarks/")
    p.add_argument("--cache", default=os.path.join(HERE, ".cache"))
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    {"sweep": sweep, "synthetic": synthetic, "report": report}[args.what](args)


if __name__ == "__main__":
    main()
