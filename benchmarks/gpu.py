"""
The post's recipe on one GPU: how fast is the SAE step, how fast is a whole run, and how long
would the post's 300M tokens take?

    python benchmarks/gpu.py          # on a CUDA machine: under 8 minutes on one H100-class GPU
    python benchmarks/gpu.py --dry    # anywhere: the same code at small shapes on the CPU (CI runs this)

Made for a rented or borrowed GPU that has PyTorch and nothing else: no network, no
TransformerLens. Besides a copy of this repository it needs two small pure-Python packages,
tqdm and safetensors (wheels of a few hundred kB: `pip download tqdm safetensors -d wheels/`
where there is a network, then `pip install --no-index --find-links wheels/ tqdm safetensors`).
The language model is a GPT-2-small-shaped transformer written below with random weights:
the cost of GPT-2's forward pass, not its activations (GPT-2 itself would need a download).

What it prints, at the post's shapes (batch 4,096, d_in 768, d_sae 24,576):
  1. train.py's train_step, dense and sparse, with about 20, 50 and 100 features firing per
     token, in fp32, fp32 with TF32 matmuls, and bf16 autocast: ms per step, peak GPU memory.
     The sparse step was designed and its switch point (SPARSE_BELOW) measured on CPUs;
     train.py uses the dense one on CUDA unless --sparse_step=True, until this says otherwise.
  2. train() end to end on activations of blocks.8.hook_resid_pre made by the model as
     train.py makes them (activation_chunks, the half-refilled ActivationBuffer): tokens per
     second and where the time goes (model forward, buffer, SAE steps).
  3. The projected wall clock of 300M tokens at that rate; the goal is <= 15 minutes.
Prints numbers; asserts nothing.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
import types

os.environ.setdefault("TQDM_DISABLE", "1")      # train()'s progress bar would bury the numbers
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import torch                                    # noqa: E402
import torch.nn as nn                           # noqa: E402
import torch.nn.functional as F                 # noqa: E402

import train as T                               # noqa: E402
from bench import fixed_l0_step_fn             # noqa: E402
from sae import SAE, ActivationBuffer, activation_chunks   # noqa: E402

POST = dict(batch=4096, d_in=768, d_sae=24576, n_layers=12, d_vocab=50257, layer=8, steps=300,
            buffer_contexts=4096, l0s=(20, 50, 100), repeats=10)
DRY = dict(batch=256, d_in=64, d_sae=512, n_layers=2, d_vocab=1000, layer=1, steps=12,
           buffer_contexts=16, l0s=(20, 50, 100), repeats=2)
POST_TOKENS = 300_000_000


class Block(nn.Module):
    """A GPT-2 block: pre-LayerNorm attention and MLP, each added to the residual stream."""

    def __init__(self, d: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.n_heads = d // 64 if d >= 64 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:                       # [batch, pos, d]
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], -1)
        heads = lambda t: t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)   # [batch, head, pos, d_head]
        attn = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).flatten(-2))
        return x + self.mlp(self.ln2(x))


class GPT2Shaped(nn.Module):
    """Token and position embeddings and n_layers blocks; model(tokens, stop_at_layer=L) returns the
    residual stream entering block L, as TransformerLens's HookedTransformer does (what train.py calls)."""

    def __init__(self, n_layers: int, d: int, d_vocab: int, n_ctx: int = 1024):
        super().__init__()
        self.embed, self.pos = nn.Embedding(d_vocab, d), nn.Embedding(n_ctx, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layers))
        # what sae.bf16_blocks reads of a HookedTransformer besides the blocks (its bf16 copy for bf16 forwards)
        self.tokenizer, self.cfg = None, types.SimpleNamespace(dtype=torch.float32)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=()):
        """activation_chunks' hook context; one layer at a time needs none."""
        if fwd_hooks:
            raise NotImplementedError("this benchmark trains on one layer")
        yield

    def forward(self, tokens: torch.Tensor, stop_at_layer: int) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks[:stop_at_layer]:
            x = block(x)
        return x


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up, the GPU's queue drained each time."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_at_l0(shape: dict, l0: float, sparse: bool, precision: str, device: str):
    """bench.py's fixed-L0 train_step on this device, and the list of the L0s its calls saw."""
    step, seen = fixed_l0_step_fn(shape["batch"], shape["d_in"], shape["d_sae"], l0, sparse, precision, device), []
    return (lambda: seen.append(step())), seen


def step_table(shape: dict, device: str):
    print(f"\n1. train_step, batch {shape['batch']}, d_in {shape['d_in']}, d_sae {shape['d_sae']} ({device})")
    print(f"  {'precision':22s} {'L0':>6s} {'dense ms':>9s} {'sparse ms':>10s} {'peak GB, either':>16s}")
    cuda = device == "cuda"
    for name, precision, tf32 in (("fp32", "float32", False), ("fp32, TF32 matmuls", "float32", True),
                                  ("bf16 autocast", "bfloat16", False)):
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        for l0 in shape["l0s"]:
            row = {}
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for sparse in (False, True):
                fn, seen = step_at_l0(shape, l0, sparse, precision, device)
                row[sparse] = timed(fn, shape["repeats"])
                peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
            print(f"  {name:22s} {statistics.median(seen):6.1f} {row[False] * 1e3:9.2f} {row[True] * 1e3:10.2f} "
                  f"{peak:16.2f}")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False


def end_to_end(shape: dict, device: str, precision: str) -> float:
    """train() on a stream made as train.py makes it; returns tokens per second."""
    torch.manual_seed(0)
    model = GPT2Shaped(shape["n_layers"], shape["d_in"], shape["d_vocab"]).to(device).eval()
    bos = shape["d_vocab"] - 1
    timers = {"model forward": 0.0, "buffer (fill, shuffle)": 0.0}
    forward = GPT2Shaped.forward

    def timed_forward(self, *a, **kw):      # on the class: bf16 runs go through a copy of the model
        sync()
        start = time.perf_counter()
        out = forward(self, *a, **kw)
        sync()
        timers["model forward"] += time.perf_counter() - start
        return out
    GPT2Shaped.forward = timed_forward

    def contexts():                       # random tokens, BOS first, 32 contexts of 128 per forward
        g = torch.Generator().manual_seed(1)
        while True:
            tokens = torch.randint(0, bos, (32, 128), generator=g)
            tokens[:, 0] = bos
            yield tokens

    cfg = T.Config(d_in=shape["d_in"], expansion=shape["d_sae"] // shape["d_in"], batch_size=shape["batch"],
                   total_tokens=shape["steps"] * shape["batch"], precision=precision, warmup_steps=10,
                   dead_window=10**9, buffer_contexts=shape["buffer_contexts"], eval_every=10**9,
                   sparse_step=device != "cuda")          # what train.py would choose on this device
    chunks = activation_chunks(model, contexts(), shape["layer"], [bos], bf16=precision == "bfloat16")
    fill = ActivationBuffer._fill

    def timed_fill(self, *a, **kw):
        start = time.perf_counter()
        out = fill(self, *a, **kw)
        sync()
        timers["buffer (fill, shuffle)"] += time.perf_counter() - start
        return out
    ActivationBuffer._fill = timed_fill
    try:
        sync()
        start = time.perf_counter()
        buffer = ActivationBuffer(chunks, cfg.buffer_size, cfg.batch_size, seed=0)
        sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff).to(device)
        T.train(sae, buffer, cfg)
        sync()
        total = time.perf_counter() - start
    finally:
        ActivationBuffer._fill, GPT2Shaped.forward = fill, forward
    timers["buffer (fill, shuffle)"] -= timers["model forward"]                  # fills include forwards
    timers["SAE steps and the rest"] = total - sum(timers.values())
    tokens = cfg.total_steps * cfg.batch_size
    print(f"\n2. train() end to end, {precision}: {tokens:,} tokens in {total:.1f} s = {tokens / total:,.0f} tokens/s "
          f"(the first buffer fill of {cfg.buffer_size:,} activations included)")
    for name, t in timers.items():
        print(f"  {name:24s} {t:7.2f} s  {t / total:5.1%}")
    return tokens / total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="small shapes on the CPU: checks that the script runs")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    shape = DRY if args.dry else POST
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"no GPU in use ({'--dry' if args.dry else 'none found'}): small shapes on the CPU")
        shape = DRY
    step_table(shape, device)
    rates = {p: end_to_end(shape, device, p) for p in ("float32", "bfloat16")}
    print("\n3. the post's 300M tokens at these rates (the release took ~3 hours on an A6000, the post says)")
    for precision, rate in rates.items():
        seconds = POST_TOKENS / rate
        print(f"  {precision:9s} {seconds / 60:8.1f} minutes (goal: <= 15, i.e. >= {POST_TOKENS / 900:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
