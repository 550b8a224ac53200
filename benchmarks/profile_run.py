"""
Where the wall clock of `python train.py 2` goes, part by part, on this machine.

    python benchmarks/profile_run.py                    # the CPU preset on SmolLM2 (~7 min; ~15 in fp32)
    python benchmarks/profile_run.py --gpt2_shaped      # the same command as GPT-2 small would run it
    python benchmarks/profile_run.py -- --total_tokens=500000   # flags after -- go to train.py

Runs train.py's own run() in this process, with a timer around each part: loading, the
held-out set, the b_dec start, the model forwards that fill the buffer, the buffer's
shuffle, the SAE steps (dense and sparse apart), the evaluations, the checkpoints and the
saves. Each part's time excludes the parts inside it, so the rows add up to the total;
"the rest" is tokenisation, the data loop and Python. Prints the machine's matmul rates
at the encoder's shape beside the figures (machines of one class differ by up to ~1.5x).

--gpt2_shaped: GPT-2 small cannot be downloaded here, so this loads a GPT-2-small-shaped
HookedTransformer with random weights (12 layers, d_model 768, the same cost per token)
through the same code path, with SmolLM2's tokenizer (its vocabulary, 49,152, sized into
the model) on the offline corpus. train.py sees --model=gpt2, so the preset sizes it as
it would GPT-2.
"""

import argparse
import os
import sys
import time
from collections import defaultdict

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch                                    # noqa: E402
import sae as S                                 # noqa: E402
import train as T                               # noqa: E402
from bench import gpt2_shaped_model, matmul_limits, peak_memory_gb   # noqa: E402
from sources import UserError, load_smollm2_tokenizer   # noqa: E402


class Timers:
    """Exclusive timers: a part's time leaves out the timed parts called inside it."""

    def __init__(self):
        self.total, self.calls, self.stack = defaultdict(float), defaultdict(int), []

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            label = name(*args, **kwargs) if callable(name) else name
            if label is None:                              # not timed on its own (inside another part)
                return fn(*args, **kwargs)
            start = time.perf_counter()
            self.stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed, inner = time.perf_counter() - start, self.stack.pop()
                self.total[label] += elapsed - inner
                self.calls[label] += 1
                if self.stack:
                    self.stack[-1] += elapsed
        return timed


def profile(argv: list[str], gpt2_shaped: bool = False):
    """train.run(argv) with every part timed; prints the table (bench.py's end-to-end runs use it too)."""
    timers = Timers()
    in_eval = [False]

    if gpt2_shaped:
        argv = [*argv, "--model=gpt2", "--dataset=python-stdlib"]
        T.hub_status = lambda: (True, "benchmark: a random GPT-2-shaped model on local text")
    load = T.load_model

    def load_model(name, device):
        if gpt2_shaped:
            model = gpt2_shaped_model(49152).to(device)
            model.tokenizer = load_smollm2_tokenizer()
        else:
            model = load(name, device)
        # the activations' forwards; the evaluation's own forwards count as evaluation
        model.forward = timers.wrap(lambda *a, **k: None if in_eval[0] else "model forward (activations)",
                                    model.forward)
        return model

    def evaluating(fn):
        def inner(*a, **k):
            in_eval[0] = True
            try:
                return fn(*a, **k)
            finally:
                in_eval[0] = False
        return inner

    copy_blocks = S.bf16_blocks

    def bf16_blocks(model, n_blocks):        # the copy that bf16 forwards run: its own method, timed
        copied = copy_blocks(model, n_blocks)
        copied.forward = timers.wrap("model forward (activations)", type(copied).forward.__get__(copied))
        return copied

    S.bf16_blocks = bf16_blocks
    T.load_model = timers.wrap("loading the model", load_model)
    T.open_model_and_data = timers.wrap("opening data, checks", T.open_model_and_data)
    T.make_held_out = timers.wrap("held-out set (clean forward)", evaluating(T.make_held_out))
    T.init_b_dec = timers.wrap("b_dec start (geometric median)", T.init_b_dec)
    S.ActivationBuffer._fill = timers.wrap("buffer shuffle", S.ActivationBuffer._fill)
    T.train_step = timers.wrap(lambda sae, state, x, cfg: "SAE step, sparse" if cfg.sparse_step
                               and state.last_density < T.SPARSE_BELOW else "SAE step, dense", T.train_step)
    T.measure = timers.wrap(lambda run, with_kl, with_ce=True: "final evaluation (with KL)" if with_kl
                            else "periodic evaluations", evaluating(T.measure))
    T.checkpoint = timers.wrap("checkpoints", T.checkpoint)
    T.save_all = timers.wrap("saving", T.save_all)
    T.report = timers.wrap("saving", T.report)

    decide, runs = T.decide_settings, []
    T.decide_settings = lambda a: runs.append(decide(a)) or runs[-1]
    start = time.perf_counter()
    try:
        T.run(argv)
    except UserError as e:            # e.g. a timing run too short to learn: its times still count
        print(f"!! {e}")
    total = time.perf_counter() - start
    peak = peak_memory_gb()
    cfg = runs[0].cfg
    print(f"\npython train.py {' '.join(argv)}: {total:.0f} s ({total // 60:.0f}:{total % 60:04.1f}), "
          f"peak memory {peak:.2f} GB")
    rest = total - sum(timers.total.values())
    for name, t in sorted(timers.total.items(), key=lambda kv: -kv[1]) + [("the rest (tokenising, data loop)", rest)]:
        n = timers.calls.get(name, 0)
        per = f"  {t / n * 1e3:8.1f} ms x {n}" if n > 1 else ""
        print(f"  {name:34s} {t:7.1f} s  {t / total:6.1%}{per}")
    matmul_limits(cfg.batch_size, cfg.d_in, cfg.d_sae, repeats=5)     # the machine's rates, after the run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt2_shaped", action="store_true", help="a random GPT-2-small-shaped model, run as --model=gpt2")
    p.add_argument("--layer", default="2")
    p.add_argument("train_flags", nargs="*", help="flags for train.py (after --)")
    args = p.parse_args()
    profile([args.layer, "--out_dir=/tmp/sae-profile-runs", *args.train_flags], args.gpt2_shaped)


if __name__ == "__main__":
    main()
