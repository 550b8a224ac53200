"""
The post's tricks one at a time, at the CPU preset's size with the post's method (BASE below),
and the preset itself: one `python train.py 2,3,5` call per setting.

    python benchmarks/ablation.py run preset [--seed=1]   # train one setting, then measure it
    python benchmarks/ablation.py measure runs/ablation/<run> --setting=NAME   # measure a finished run
    python benchmarks/ablation.py table                   # every measured run, one row per layer
    python benchmarks/ablation.py compare                 # each setting's change from BASE
    python benchmarks/ablation.py seeds preset            # one setting over its seeds, and its change from BASE

`run` calls train.py itself (the same code path as `python train.py 2`, only the setting's
flags added), then measures each layer's SAE on data no training step saw:
- EV, L0 and CE recovered on 256 contexts after the training rows (~32k tokens, 8 x the run's
  own 32), with standard errors from a bootstrap over groups of 8 consecutive contexts (1,000
  resamples; contexts of one document are correlated, so groups, not single contexts);
- dead, dense and the histogram's mode with the final weights on the 1M tokens after the
  training rows (density.py).
Each row goes to ablation_results.jsonl beside this file. On 2 cores with AMX a setting
costs 13-16 minutes of training and ~10 of measuring (a seed's clean and zero-ablated passes
are kept after its first setting); on 2 cores without AMX ~25 and ~23; asserts nothing.
"""

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import sources as S                                              # noqa: E402
from density import fresh_density                                # noqa: E402
from sae import SAE, evaluate, make_held_out, special_token_ids, token_contexts   # noqa: E402

LAYERS = "2,3,5"
LONG_WINDOW = "--dead_window=977"          # 1M tokens: long enough to tell rare features from dead ones
BASE = "the February method"               # the post's method at the preset's size: its tricks are toggled on it
FEB = "--method=feb2024"                   # typed: the CPU preset's own method is apr2024 (its lr and L1 differ)
SETTINGS = {                               # name -> the flags; each trick setting changes one thing from BASE
    "preset": [],                          # the CPU preset as it stands: the April method, lr 4e-3, L1 3.5e-5
    BASE: [FEB],
    "ghost grads, the post's window": [FEB, "--ghost_grads=True"],
    "ghost grads, 1M-token window": [FEB, "--ghost_grads=True", LONG_WINDOW],
    "ghost grads as released, exp(relu(h))": [FEB, "--ghost_grads=True", "--ghost_exp=relu_h"],   # the post's window
    "ghost grads, the post's window, lr 4e-3": [FEB, "--ghost_grads=True", "--lr=4e-3"],
    "ghost grads, 1M-token window, lr 4e-3": [FEB, "--ghost_grads=True", LONG_WINDOW, "--lr=4e-3"],
    "no ghost grads, lr 4e-3": [FEB, "--lr=4e-3"],
    "no LR warmup": [FEB, "--warmup_steps=0"],
    "b_dec starts at the mean": [FEB, "--b_dec_init=mean"],
    "b_dec starts at zero": [FEB, "--b_dec_init=zeros"],
    "the release's MSE normaliser": [FEB, "--mse_norm=uncentred"],
    # the April method: lr and L1 typed, so each row stays reproducible whatever the preset gives it
    "the April method, L1 5.5e-5": ["--method=apr2024", "--l1_coeff=5.5e-5", "--lr=8e-3"],   # frontier.py's L1 for L0 ~28: L0 8-14 here
    "the April method, L1 2.3e-5": ["--method=apr2024", "--l1_coeff=2.3e-5", "--lr=8e-3"],   # scaled from that run for L0 ~28
    "the April method, lr 4e-3": ["--method=apr2024", "--l1_coeff=2.3e-5", "--lr=4e-3"],
}
RESULTS = os.path.join(HERE, "ablation_results.jsonl")
OUT = os.path.join(HERE, "..", "runs", "ablation")


def base_losses(model, tokens, layer, special, group: int) -> list[tuple[float, float]]:
    """(clean CE, zero-ablated CE) of each group of contexts: the same for every SAE of a layer that
    read the same data, so computed once and kept in OUT (two of the three model passes)."""
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"base_L{layer}_g{group}_{hashlib.sha1(tokens.numpy().tobytes()).hexdigest()[:12]}.json")
    if os.path.exists(path):
        return json.load(open(path))
    losses = [(h.ce_clean, h.ce_zero) for h in (make_held_out(model, part, layer, special)
                                                for part in tokens.split(group))]
    with open(path, "w") as f:
        json.dump(losses, f)
    return losses


@torch.no_grad()
def group_stats(sae, model, tokens, layer, special, group: int = 8) -> list[dict]:
    """Sums over each group of `group` contexts, from which any resample's metrics follow exactly."""
    rows = []
    for part, (ce_clean, ce_zero) in zip(tokens.split(group), base_losses(model, tokens, layer, special, group)):
        # the activations as make_held_out takes them; its two baseline passes come from the cache
        held = make_held_out(model, part, layer, special, with_ce=False)._replace(ce_clean=ce_clean, ce_zero=ce_zero)
        m = evaluate(sae, model, held, layer, with_kl=False)
        x = held.resid[held.keep]
        # the group's squared error, from its EV (evaluate centres on the group's own mean)
        err = (1 - m["explained_variance"]) * ((x - x.mean(0)) ** 2).sum().item()
        n_ce = held.keep[:, 1:].sum().item()                      # the scored next-token targets
        rows.append({"n": len(x), "err": err, "sq": (x ** 2).sum().item(),
                     "sum_x": x.sum(0).double(), "l0": m["l0"] * len(x), "n_ce": n_ce,
                     "ce_sae": m["ce_sae"] * n_ce, "ce_clean": ce_clean * n_ce, "ce_zero": ce_zero * n_ce})
    return rows


def metrics_of(rows: list[dict]) -> dict:
    total = lambda k: sum(r[k] for r in rows)
    n, sum_x = total("n"), sum(r["sum_x"] for r in rows)
    centred = total("sq") - (sum_x ** 2).sum().item() / n        # sum ||x - mean||^2, the mean of these rows
    ce_sae, ce_clean, ce_zero = total("ce_sae"), total("ce_clean"), total("ce_zero")
    return {"explained_variance": 1 - total("err") / centred, "l0": total("l0") / n,
            "ce_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean),
            "ce_increase": (ce_sae - ce_clean) / total("n_ce")}


def bootstrap(rows: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    """Each metric on all groups, and its standard error over resamples of the groups."""
    g = torch.Generator().manual_seed(seed)
    draws = [metrics_of([rows[i] for i in torch.randint(len(rows), (len(rows),), generator=g)])
             for _ in range(resamples)]
    point = metrics_of(rows)
    return {**point, **{f"{k}_se": torch.tensor([d[k] for d in draws]).std().item() for k in point}}


def measure(run_dir: str, setting: str = "", n_contexts: int = 256) -> list[dict]:
    folders = sorted(glob.glob(os.path.join(run_dir, "L*")))
    cfg = json.load(open(os.path.join(folders[0], "cfg.json")))
    if not S.hub_status()[0]:
        S.go_offline()
    model = S.load_model(cfg["model"], "cpu")
    corpus = S.open_corpus(cfg["dataset"], cfg["seed"])
    docs = S.documents(corpus, skip=cfg["rows_read"])              # after everything training read
    contexts = token_contexts(docs, model.tokenizer, cfg["context_size"], 32)
    tokens = torch.cat([t for _, t in zip(range(n_contexts // 32), contexts)])
    special = special_token_ids(model.tokenizer)
    results = []
    for folder, dens in zip(folders, fresh_density(folders)):
        layer_cfg = json.load(open(os.path.join(folder, "cfg.json")))
        sae = SAE.load(folder).eval()
        row = {"setting": setting, "run": os.path.relpath(folder, os.path.join(HERE, "..")),
               "layer": layer_cfg["layer"], "seed": layer_cfg["seed"], "contexts": len(tokens),
               **bootstrap(group_stats(sae, model, tokens, layer_cfg["layer"], special)),
               **{f"final_{k}": v for k, v in dens.items() if k != "log_density"}}
        print(json.dumps(row))
        results.append(row)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
    return results


def run(setting: str, seed: int):
    argv = [sys.executable, "train.py", LAYERS, *SETTINGS[setting], f"--seed={seed}", f"--out_dir={OUT}"]
    print(" ".join(argv[1:]), flush=True)
    before = set(glob.glob(os.path.join(OUT, "*")))
    start = time.perf_counter()
    subprocess.run(argv, cwd=os.path.join(HERE, ".."), check=True)
    print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
    (run_dir,) = set(glob.glob(os.path.join(OUT, "*"))) - before
    measure(run_dir, setting)


def results() -> list[dict]:
    return [json.loads(line) for line in open(RESULTS)]


def latest(rows: list[dict], setting: str) -> dict:
    """(seed, layer) -> the setting's latest row for it (a rerun replaces an earlier measurement)."""
    return {(r["seed"], r["layer"]): r for r in rows if r["setting"] == setting}


def table():
    """Every measured run, one row per layer, as benchmarks/README.md shows them: a run's setting,
    flags and seed on its first row only."""
    rows = results()
    print("| setting | flags | seed | layer | EV | L0 | CE recovered | dead | dense | mode |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    previous = None
    for r in rows:
        run = os.path.dirname(r["run"])
        flags = " ".join(f"`{f}`" for f in SETTINGS.get(r["setting"], [])) or "(none)"
        head = f"{r['setting']} | {flags} | {r['seed']}" if run != previous else "| |"
        previous = run
        mode = "dead" if r["final_mode"] == -10 else f"10^{r['final_mode']:g}..10^{r['final_mode'] + 0.5:g}"
        print(f"| {head} | {r['layer']} | {r['explained_variance']:.4f} ± {r['explained_variance_se']:.4f} | "
              f"{r['l0']:.1f} ± {r['l0_se']:.1f} | {r['ce_recovered']:.4f} ± {r['ce_recovered_se']:.4f} | "
              f"{r['final_dead']:.1%} | {r['final_dense']:.1%} | {mode} |".replace("%", " %"))


def compare():
    """One line per setting and seed: each layer's change from BASE with that seed (its latest
    row), the layer's L0 and its dead share."""
    rows = results()
    base = latest(rows, BASE)
    runs = dict.fromkeys((r["setting"], r["seed"]) for r in rows if r["setting"] != BASE)
    print("| setting | seed | EV change, layers in order | CE rec. change | L0 | dead (final weights) |")
    print("|---|---|---|---|---|---|")
    for name, seed in runs:
        mine = sorted((r for r in rows if (r["setting"], r["seed"]) == (name, seed)), key=lambda r: r["layer"])
        if any((seed, r["layer"]) not in base for r in mine):
            print(f"| {name} | {seed} | no row of {BASE} for this seed and layer: run `ablation.py run '{BASE}' --seed={seed}` |")
            continue
        diff = lambda k: " / ".join(f"{r[k] - base[seed, r['layer']][k]:+.4f}" for r in mine)
        each = lambda k, spec: " / ".join(format(r[k], spec) for r in mine)
        print(f"| {name} | {seed} | {diff('explained_variance')} | {diff('ce_recovered')} | {each('l0', '.1f')} | "
              f"{each('final_dead', '.1%')} |")


def seeds(setting: str):
    """One line per layer: the setting's metrics as mean ± standard deviation between its seeds (each
    seed's latest row), and its change from BASE paired by seed, the same statistic."""
    rows = results()
    mine, base = latest(rows, setting), latest(rows, BASE)
    sd = lambda v: torch.tensor(v, dtype=torch.float64).std().item() if len(v) > 1 else float("nan")
    stat = lambda v, spec: f"{sum(v) / len(v):{spec}} ± {sd(v):{spec.lstrip('+')}}"
    print(f"{setting}: seeds {sorted({s for s, _ in mine})}; change from {BASE} over the seeds both have")
    print("| layer | EV | L0 | CE recovered | dead | dense | EV change | CE rec. change | L0 change |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layer in sorted({l for _, l in mine}):
        rs = [r for (s, l), r in sorted(mine.items()) if l == layer]
        pairs = [(r, base[s, l]) for (s, l), r in sorted(mine.items()) if l == layer and (s, l) in base]
        col = lambda k, spec: stat([r[k] for r in rs], spec)
        diff = lambda k, spec: stat([a[k] - b[k] for a, b in pairs], spec) if pairs else "no base row"
        print(f"| {layer} | {col('explained_variance', '.4f')} | {col('l0', '.1f')} | {col('ce_recovered', '.4f')} | "
              f"{col('final_dead', '.1%')} | {col('final_dense', '.1%')} | {diff('explained_variance', '+.4f')} | "
              f"{diff('ce_recovered', '+.4f')} | {diff('l0', '+.1f')} |".replace("%", " %"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["run", "measure", "table", "compare", "seeds"])
    p.add_argument("target", nargs="?", help=f"run, seeds: a setting ({', '.join(SETTINGS)}); measure: a run folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setting", default="", help="measure: the setting's name for its rows")
    args = p.parse_args()
    if args.what == "run":
        if args.target not in SETTINGS:
            sys.exit(f"Unknown setting {args.target!r}: choose one of {', '.join(SETTINGS)}.")
        run(args.target, args.seed)
    elif args.what == "measure":
        measure(args.target, args.setting)
    elif args.what == "compare":
        compare()
    elif args.what == "seeds":
        seeds(args.target or "preset")
    else:
        table()


if __name__ == "__main__":
    main()
