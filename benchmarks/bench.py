"""
How fast is the SAE step and the activation pipeline on this machine, and how close to its limit?

    python benchmarks/bench.py               # everything (~15 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick       # fewer repeats, no end-to-end run
    python benchmarks/bench.py --sparse_only # the sparse step against the dense step
    python benchmarks/bench.py --preset_run  # `python train.py 2`, timed
    python benchmarks/bench.py --help

Needs no download: synthetic activations, a randomly initialised GPT-2-small-shaped
HookedTransformer, and (end to end) train.py's main path on a random GPT-2-shaped
model with SmolLM2's tokenizer on the offline corpus. Every figure is the median of
--repeats timings after one warm-up. Prints numbers; asserts nothing.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")      # train()'s progress bar would bury the numbers
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch                                    # noqa: E402
import train as T                               # noqa: E402
from sae import SAE                             # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()                                                # warm-up (allocations, oneDNN kernel choice)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def set_onednn(on: bool):
    torch.backends.mkldnn.matmul.fp32_precision = "bf16" if on else "none"


# -----------------------------------------------------------------------------
# 1. matmul throughput at the SAE's shapes


def matmul_limits(B: int, d_in: int, d_sae: int, repeats: int) -> float:
    """GFLOP/s of [B, d_in] @ [d_in, d_sae] per path; returns the best exact-fp32 figure."""
    a, w = torch.randn(B, d_in), torch.randn(d_in, d_sae) / d_in ** 0.5
    exact = (a.double() @ w.double())
    flops = 2 * B * d_in * d_sae
    best = 0.0
    print(f"matmul [{B}, {d_in}] @ [{d_in}, {d_sae}]")
    for name, onednn, dtype in [("fp32, default (MKL)", False, torch.float32),
                                ("fp32, oneDNN route", True, torch.float32),
                                ("bf16", False, torch.bfloat16)]:
        set_onednn(onednn)
        x, y = a.to(dtype), w.to(dtype)
        t = median_time(lambda: x @ y, repeats)
        err = (((x @ y).double() - exact).norm() / exact.norm()).item()
        is_exact = dtype == torch.float32 and err < 1e-5
        if is_exact:
            best = max(best, flops / t / 1e9)
        print(f"  {name:22s} {flops / t / 1e9:7.1f} GFLOP/s   rel. error {err:.1e}"
              f"{'' if is_exact else '  (not exact fp32)'}")
    set_onednn(False)
    print(f"  limit (best exact fp32): {best:.1f} GFLOP/s")
    return best


# -----------------------------------------------------------------------------
# 2. our training step vs a plain-torch reference step


def our_step_fn(B: int, d_in: int, d_sae: int, dtype: str, dead_share: float = 0.1):
    cfg = T.Config(d_in=d_in, expansion=d_sae // d_in, batch_size=B, total_tokens=10**12,
                   warmup_steps=0, dead_window=10**9, eval_every=10**9, precision=dtype)
    torch.manual_seed(0)
    sae = SAE(d_in, d_sae, cfg.l1_coeff)
    state = T.new_state(sae, cfg)
    x = torch.randn(B, d_in)
    batches = iter(lambda: x, None)

    def step():
        # mark a share of features dead before every step (some of them fire and come back to life)
        state.steps_since_fired[: int(dead_share * d_sae)] = 10**9
        cfg.total_tokens = (state.step + 1) * B         # exactly one more step
        T.train(sae, batches, cfg, state)
    return step


def plain_step_fn(B: int, d_in: int, d_sae: int):
    """The fewest lines of a ReLU SAE step: MSE + L1, Adam. No ghost grads, no decoder projection."""
    W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae) / d_in ** 0.5)
    W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in) / d_sae ** 0.5)
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(d_sae)), torch.nn.Parameter(torch.zeros(d_in))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-4)
    x = torch.randn(B, d_in)

    def step():
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        loss = ((f @ W_dec + b_dec - x) ** 2).mean() + 8e-5 * f.sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def steps(B: int, d_in: int, d_sae: int, limit: float, repeats: int):
    flops = 12 * B * d_in * d_sae                       # 6 matmuls of B x d_in x d_sae multiply-adds
    print(f"\ntraining step, batch {B}, d_in {d_in}, d_sae {d_sae} ({flops / 1e9:.0f} GFLOP a step)")
    variants = {  # name: (oneDNN route on, step function)
        "plain torch, default": (False, plain_step_fn(B, d_in, d_sae)),
        "ours, default": (False, our_step_fn(B, d_in, d_sae, "float32")),
        "plain torch, oneDNN": (True, plain_step_fn(B, d_in, d_sae)),
        "ours, oneDNN, no dead": (True, our_step_fn(B, d_in, d_sae, "float32", dead_share=0)),
        "ours, oneDNN, 10% dead": (True, our_step_fn(B, d_in, d_sae, "float32")),
        "ours, bf16 autocast": (True, our_step_fn(B, d_in, d_sae, "bfloat16")),
    }
    # round-robin repeats: on a shared machine whose speed drifts, every variant sees the same drift
    times = {name: [] for name in variants}
    for rep in range(repeats + 1):                      # the first round is the warm-up
        for name, (onednn, step) in variants.items():
            set_onednn(onednn)
            t = time.perf_counter()
            step()
            if rep > 0:
                times[name].append(time.perf_counter() - t)
    results = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in results.items():
        print(f"  {name:26s} {t:6.2f} s  {B / t:8.0f} tokens/s  {flops / t / 1e9:6.1f} GFLOP/s"
              f"  {flops / t / 1e9 / limit:5.0%} of the fp32 limit")
    set_onednn(False)
    plain = results["plain torch, oneDNN"]
    print(f"  time of ours / plain (oneDNN): {results['ours, oneDNN, no dead'] / plain:.2f}x with no dead features"
          f" (the cost of structure), {results['ours, oneDNN, 10% dead'] / plain:.2f}x with 10% dead"
          f" (+ the ghost loss: six more matmuls a tenth the size)")
    print(f"  bf16 autocast speed-up over our fp32 step: {results['ours, oneDNN, 10% dead'] / results['ours, bf16 autocast']:.2f}x"
          f" (oneDNN), {results['ours, default'] / results['ours, bf16 autocast']:.2f}x (default)")


# -----------------------------------------------------------------------------
# 2b. the sparse step against the dense step, by width and L0


def fixed_l0_step_fn(B: int, d_in: int, d_sae: int, l0: float, sparse: bool, precision: str, device: str = "cpu"):
    """train.py's step with b_enc reset before each step so that about l0 features fire per token
    (benchmarks/gpu.py uses it on CUDA)."""
    cfg = T.Config(d_in=d_in, expansion=d_sae // d_in, batch_size=B, total_tokens=10**12, warmup_steps=0,
                   dead_window=10**9, precision=precision, sparse_step=sparse)
    torch.manual_seed(0)
    sae = SAE(d_in, d_sae, cfg.l1_coeff).to(device)
    state = T.new_state(sae, cfg)
    x = torch.randn(B, d_in, device=device)
    # pre-activations are ~N(0, |x|^2 / d_in) per feature: the threshold that l0 / d_sae of them pass
    threshold = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - l0 / d_sae)).item()
    bias = -threshold * x.norm(dim=-1).mean().item() / d_in ** 0.5

    def step():
        with torch.no_grad():
            sae.b_enc.fill_(bias)
        state.last_density = 0.0 if sparse else 1.0
        T.train_step(sae, state, x, cfg)
        return state.last_density * d_sae                               # the L0 the step saw
    return step


def sparse_steps(B: int, d_in: int, expansions: list[int], l0s: list[float], limit: float, repeats: int,
                 precision: str):
    print(f"\nsparse step vs dense step, batch {B}, d_in {d_in}, {precision}"
          " (dense-equivalent FLOPs: 12 B d_in d_sae a step)")
    T.use_onednn_fp32_matmul()                          # as train.py: oneDNN only where it is exact fp32
    for expansion in expansions:
        d_sae = expansion * d_in
        flops = 12 * B * d_in * d_sae
        for l0 in l0s:
            fns = {name: fixed_l0_step_fn(B, d_in, d_sae, l0, name == "sparse", precision)
                   for name in ("dense", "sparse")}
            times, seen = {name: [] for name in fns}, 0.0
            for rep in range(repeats + 1):                               # round-robin; first = warm-up
                for name, fn in fns.items():
                    t = time.perf_counter()
                    seen = fn()
                    if rep > 0:
                        times[name].append(time.perf_counter() - t)
            dense, sparse = (statistics.median(times[n]) for n in ("dense", "sparse"))
            print(f"  {expansion:2d}x (d_sae {d_sae:6d}), L0 {seen:6.1f}: dense {dense * 1e3:6.0f} ms, "
                  f"sparse {sparse * 1e3:6.0f} ms ({dense / sparse:4.1f}x); effective {flops / sparse / 1e9:6.0f} "
                  f"GFLOP/s = {flops / sparse / 1e9 / limit:4.0%} of the fp32 limit (dense: {flops / dense / 1e9 / limit:4.0%})")
    set_onednn(False)


# -----------------------------------------------------------------------------
# 3. activation generation: full forward vs stopping after the hooked layer


def gpt2_shaped_model(d_vocab: int = 50257):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    cfg = HookedTransformerConfig(n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, n_ctx=1024,
                                  d_vocab=d_vocab, act_fn="gelu_new", normalization_type="LN", seed=0)
    return HookedTransformer(cfg).eval()


@torch.no_grad()
def activations(repeats: int, layer: int = 2):
    model = gpt2_shaped_model()
    tokens = torch.randint(0, 50257, (32, 128))
    hook = f"blocks.{layer}.hook_resid_pre"
    full = median_time(lambda: model.run_with_cache(tokens, names_filter=hook), repeats)
    stopped = median_time(lambda: model(tokens, stop_at_layer=layer), repeats)
    print(f"\nactivations at {hook}, GPT-2-small shapes, 32 x 128 tokens")
    print(f"  full forward with a hook    {tokens.numel() / full:8.0f} tokens/s")
    print(f"  stop_at_layer={layer} (ours)      {tokens.numel() / stopped:8.0f} tokens/s  ({full / stopped:.1f}x)")


# -----------------------------------------------------------------------------
# 4. end to end: train.py's main path, with where the time goes


def end_to_end_child(argv: list[str]):
    """Run train.py's main path on a random GPT-2-small-shaped model, timing each part (profile_run.py)."""
    from profile_run import profile
    profile(argv, gpt2_shaped=True)


def peak_memory_gb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: a child started by fork + exec
    reports the parent's peak in ru_maxrss when it was higher (here: the step benchmarks' 5.8 GB)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e6
    except OSError:                                     # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def end_to_end(tokens: int, out_dir: str, dtypes: list[str]):
    # the post's shapes: expansion 32 (d_sae 24,576), 4,096-token batches, a ~520k-activation buffer
    for dtype in dtypes:
        argv = ["2", "--preset=post", f"--precision={dtype}", f"--total_tokens={tokens}", f"--out_dir={out_dir}",
                "--eval_every=1000000", "--eval_contexts=16"]
        subprocess.run([sys.executable, __file__, "--e2e-child", *argv], check=True)


def preset_run():
    """`python train.py 2` as a user runs it (the CPU preset, SmolLM2, offline data): wall clock and peak
    memory, between two measurements of the machine's exact-fp32 matmul rate (a shared machine drifts)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    d_in = 576                                   # SmolLM2, the model the preset trains offline
    shape = (T.CPU_PRESET["batch_size"], d_in, T.CPU_PRESET["expansion"] * d_in)   # the encoder's product
    before = matmul_limits(*shape, repeats=5)
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", "2"], cwd=root, check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    after = matmul_limits(*shape, repeats=5)
    print(f"\nCPU preset end to end: python train.py 2 took {seconds:.0f} s ({seconds // 60:.0f}:{seconds % 60:02.0f}), "
          f"peak memory (max RSS) {peak:.2f} GB; exact-fp32 matmul rate {before:.0f} GFLOP/s before, {after:.0f} after")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timings per figure (median reported)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d_in", type=int, default=768)
    p.add_argument("--d_sae", type=int, default=24576)
    p.add_argument("--e2e_tokens", type=int, default=20 * 4096, help="tokens for each end-to-end run")
    p.add_argument("--e2e_dtypes", default="float32,bfloat16", help="an end-to-end run for each")
    p.add_argument("--out_dir", default="/tmp/sae-bench-runs")
    p.add_argument("--quick", action="store_true", help="1 repeat, no end-to-end run")
    p.add_argument("--e2e_only", action="store_true", help="only the end-to-end runs")
    p.add_argument("--sparse_only", action="store_true", help="only dense vs sparse step")
    p.add_argument("--preset_run", action="store_true", help="only `python train.py 2`, timed (~10 minutes)")
    p.add_argument("--sparse_batch", type=int, default=1024)
    p.add_argument("--sparse_d_in", type=int, default=576, help="SmolLM2's width: the CPU preset's shapes")
    p.add_argument("--sparse_expansions", default="8,16,32")
    p.add_argument("--sparse_l0s", default="20,40,100,300")
    p.add_argument("--e2e-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.e2e_child is not None:
        return end_to_end_child(args.e2e_child)
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    if args.preset_run:
        return preset_run()
    if args.sparse_only or not args.e2e_only:
        limit = matmul_limits(args.sparse_batch, args.sparse_d_in, 16 * args.sparse_d_in, repeats)
        for precision in ("bfloat16", "float32") if T.native_bf16() else ("float32",):
            sparse_steps(args.sparse_batch, args.sparse_d_in, [int(v) for v in args.sparse_expansions.split(",")],
                         [float(v) for v in args.sparse_l0s.split(",")], limit, repeats, precision)
        if args.sparse_only:
            return
    if not args.e2e_only:
        limit = matmul_limits(args.batch, args.d_in, args.d_sae, repeats)
        steps(args.batch, args.d_in, args.d_sae, limit, repeats)
        activations(repeats)
    if not args.quick:
        end_to_end(args.e2e_tokens, args.out_dir, args.e2e_dtypes.split(","))


if __name__ == "__main__":
    main()
