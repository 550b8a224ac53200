"""
What does bf16 cost in quality? The same SAE trained twice on the same tokens of the offline model
(SmolLM2-135M, layer 2, the Python stdlib corpus): once in fp32, once in bf16 (model forward under
bf16 autocast with the activations stored in bf16, and the SAE step under bf16 autocast with fp32
weights and Adam). Both are scored on the same held-out tokens, with fp32 activations.

    python benchmarks/bf16_quality.py                 # 1M tokens each, ~10 minutes on 2 CPU cores
    python benchmarks/bf16_quality.py --tokens 300000

Prints numbers; asserts nothing.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch                                                        # noqa: E402
import train as T                                                   # noqa: E402
import sources as S                                                 # noqa: E402
from sae import (SAE, Config, activation_chunks, evaluate, make_held_out,   # noqa: E402
                 special_token_ids, token_contexts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--layer", type=int, default=2)
    args = p.parse_args()
    T.use_onednn_fp32_matmul()
    model = S.load_smollm2()
    # the CPU preset's SAE: expansion 8, batch 1024, lr 1e-3, L1 8e-5
    cfg = Config(model="smollm2-135m", dataset="python-stdlib", layer=args.layer, d_in=model.cfg.d_model,
                 expansion=8, batch_size=1024, lr=1e-3, l1_coeff=8e-5, warmup_steps=50, dead_window=300,
                 total_tokens=args.tokens, eval_every=10**9, density_tokens=args.tokens // 2)
    special = special_token_ids(model.tokenizer)
    contexts = token_contexts(S.documents(S.open_corpus("python-stdlib")), model.tokenizer, 128, 32)
    eval_set = make_held_out(model, next(contexts), cfg.layer, special)
    training_contexts = [next(contexts) for _ in range(args.tokens // (32 * 127) + 2)]
    order = None
    print(f"SmolLM2-135M layer {cfg.layer}, d_sae {cfg.d_sae}, {args.tokens:,} training tokens, "
          f"{int(eval_set.keep.sum()):,} held-out tokens")
    for dtype in ("float32", "bfloat16"):
        cfg.precision = dtype
        t = time.perf_counter()
        acts = torch.cat(list(activation_chunks(model, training_contexts, cfg.layer, special,
                                                bf16=dtype == "bfloat16")))[:args.tokens]
        t_acts = time.perf_counter() - t
        if order is None:                                           # the same shuffle for both runs
            order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))
        acts = acts[order]
        torch.manual_seed(0)
        sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff, mse_norm="centred")   # as measured
        T.init_b_dec(sae, acts[:262_144].float(), cfg.b_dec_init)
        t = time.perf_counter()
        state = T.train(sae, iter(acts.split(cfg.batch_size)), cfg)
        t_train = time.perf_counter() - t
        sae.eval()
        m = evaluate(sae, model, eval_set, cfg.layer)
        density, _ = state.density()
        print(f"  {dtype:9s} EV {m['explained_variance']:.4f}  L0 {m['l0']:6.2f}  CE rec {m['ce_recovered']:.4f}"
              f"  dead {(density == 0).float().mean().item():.2%}  |  activations {len(acts) / t_acts:,.0f} tok/s,"
              f" SAE steps {len(acts) / t_train:,.0f} tok/s")


if __name__ == "__main__":
    main()
