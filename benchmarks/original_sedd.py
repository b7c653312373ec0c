"""The baseline of `bench.py`: a straightforward implementation of the ORIGINAL SEDD code path.

Written from the logic of the original repository (Lou, Meng & Ermon, ICML 2024,
github.com/louaaron/Score-Entropy-Discrete-Diffusion: `model/transformer.py`, `losses.py`, `graph_lib.py`,
`sampling.py`, `model/ema.py`) so that the benchmark compares against what that code does, step by step:

* the network's output layer runs at every position over the full vocabulary [B, L, V], followed by the
  sigma scaling and a `torch.scatter` that zeroes the input token's entry (a second [B, L, V] tensor);
* the absorbing score entropy `pos - neg + const` (paper Eq. 8) picks the masked rows by boolean indexing
  (copies of [N, V]) and writes them into a zero-filled [B, L] buffer;
* plain `torch.optim.AdamW` (default implementation: a per-tensor loop on CPU), `clip_grad_norm_`, an EMA
  updated parameter by parameter in a Python loop (`s -= (1 - decay) (s - p)`);
* the analytic (Tweedie tau-leaping, paper Eq. 18) sampler: exp of the full log-scores, `staggered_score`,
  the one-hot `transp_transition` and Gumbel noise over [B, L, V] at every step, then the denoiser.

Attention uses torch SDPA: the original requires flash-attn (CUDA only); SDPA is torch's equivalent fused
kernel on both devices. Parameter names equal `model.SEDD`'s (the published checkpoints), so both networks
load the same state dict and compute the same function (checked in tests/unit/test_bench_baseline.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------- network
class _Norm(nn.Module):
    """The original LayerNorm: float32 `F.layer_norm` without bias, times a weight."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            normed = F.layer_norm(h.float(), (h.shape[-1],))
        return normed * self.weight[None, None, :]


class _SigmaEmbedding(nn.Module):
    """GLIDE sinusoidal features of sigma (cos first) through Linear-SiLU-Linear."""

    def __init__(self, width: int, n_freq: int = 256):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.n_freq // 2
        exponent = torch.arange(half, device=sigma.device, dtype=torch.float32) / half
        angles = sigma.float()[:, None] * torch.exp(-math.log(10000.0) * exponent)[None, :]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class _Embedding(nn.Module):
    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(vocab, width) / math.sqrt(width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding[tokens]


class _RotaryTables(nn.Module):
    """The original Rotary: cos/sin tables [1, L, 3, 1, D] applied to the whole packed qkv (identity on v)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.cached_len = -1

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len != self.cached_len:
            pos = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
            angles = torch.einsum("l,f->lf", pos, self.inv_freq)
            angles = torch.cat([angles, angles], dim=-1)[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
            self.cos_cached, self.sin_cached = angles.cos(), angles.sin()
            self.cos_cached[:, :, 2].fill_(1.0)  # the value slot is not rotated
            self.sin_cached[:, :, 2].fill_(0.0)
            self.cached_len = seq_len
        return self.cos_cached, self.sin_cached


def _rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin on qkv [B, L, 3, H, D] (the original's non-flash fallback)."""
    first, second = qkv.chunk(2, dim=-1)
    return qkv * cos + torch.cat([-second, first], dim=-1) * sin


def _residual(update: torch.Tensor, gate: torch.Tensor, skip: torch.Tensor, p: float, training: bool):
    """The original `bias_dropout_add_scale`: skip + gate * dropout(update)."""
    return skip + gate * F.dropout(update, p=p, training=training)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, cond: int, dropout: float, mlp_ratio: int = 4):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = _Norm(width)
        self.attn_qkv = nn.Linear(width, 3 * width, bias=False)
        self.attn_out = nn.Linear(width, width, bias=False)
        self.norm2 = _Norm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * width, width),
        )
        self.adaLN_modulation = nn.Linear(cond, 6 * width)

    def forward(self, h: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], c: torch.Tensor):
        batch, seq_len, width = h.shape
        mod = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=2)
        skip = h
        normed = self.norm1(h) * (1 + mod[1]) + mod[0]
        qkv = self.attn_qkv(normed).view(batch, seq_len, 3, self.heads, width // self.heads)
        with torch.autocast(h.device.type, enabled=False):
            qkv = _rotate(qkv, tables[0].to(qkv.dtype), tables[1].to(qkv.dtype))
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        attended = (
            F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(batch, seq_len, width)
        )
        h = _residual(self.attn_out(attended), mod[2], skip, self.dropout, self.training)
        normed = self.norm2(h) * (1 + mod[4]) + mod[3]
        return _residual(self.mlp(normed), mod[5], h, self.dropout, self.training)


class _FinalLayer(nn.Module):
    def __init__(self, width: int, vocab: int, cond: int):
        super().__init__()
        self.norm_final = _Norm(width)
        self.linear = nn.Linear(width, vocab)
        self.adaLN_modulation = nn.Linear(cond, 2 * width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=2)
        return self.linear(self.norm_final(h) * (1 + scale) + shift)


class OriginalSEDD(nn.Module):
    """The original DiT-style score network: `forward(indices [B, L], sigma [B]) -> log-scores [B, L, V]`.

    Takes a SEDD run config (the published `config.json` layout) like `model.SEDD`.
    """

    def __init__(self, config):
        super().__init__()
        arch = config["model"]
        width, heads, cond = arch["hidden_size"], arch["n_heads"], arch["cond_dim"]
        vocab = config["tokens"] + (1 if config["graph"]["type"] == "absorb" else 0)
        self.scale_by_sigma = bool(arch["scale_by_sigma"])
        self.vocab_embed = _Embedding(width, vocab)
        self.sigma_map = _SigmaEmbedding(cond)
        self.rotary_emb = _RotaryTables(width // heads)
        self.blocks = nn.ModuleList(
            _Block(width, heads, cond, float(arch.get("dropout", 0.0))) for _ in range(arch["n_blocks"])
        )
        self.output_layer = _FinalLayer(width, vocab, cond)

    def forward(self, indices: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        h = self.vocab_embed(indices)
        c = F.silu(self.sigma_map(sigma))
        tables = self.rotary_emb(indices.shape[1])
        for block in self.blocks:
            h = block(h, tables, c)
        out = self.output_layer(h, c)
        if self.scale_by_sigma:
            esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log().to(out.dtype)
            out = out - esigm1_log[:, None, None] - math.log(out.shape[-1] - 1)
        return torch.scatter(out, -1, indices[..., None], torch.zeros_like(out[..., :1]))


# ----------------------------------------------------------------------------------------------- training
def loglinear_noise(t: torch.Tensor, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_bar(t), sigma(t)) of the log-linear schedule."""
    return -torch.log1p(-(1 - eps) * t), (1 - eps) / (1 - (1 - eps) * t)


def absorbing_score_entropy(log_score: torch.Tensor, sigma: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor):
    """The original `Absorbing.score_entropy`: [B, L, V] log-scores, sigma [B, 1] -> [B, L] (pos - neg + const)."""
    masked = xt == log_score.shape[-1] - 1
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)
    ratio = 1 / esigm1.expand_as(xt)[masked]
    neg_term = ratio * torch.gather(log_score[masked], -1, x0[masked][..., None]).squeeze(-1)
    pos_term = log_score[masked][:, :-1].exp().sum(dim=-1)
    const = ratio * (ratio.log() - 1)
    entropy = torch.zeros(*xt.shape, device=xt.device)
    entropy[masked] += pos_term - neg_term + const
    return entropy


def original_loss(
    model: OriginalSEDD,
    x0: torch.Tensor,
    t: torch.Tensor | None = None,
    xt: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """The original `get_loss_fn` (absorbing graph, log-linear noise): per-sequence DWDSE [B].

    `t` [B] and the perturbed batch `xt` [B, L] are drawn unless given (the original's optional arguments).
    """
    if t is None:
        t = (1 - eps) * torch.rand(x0.shape[0], device=x0.device) + eps
    sigma, dsigma = loglinear_noise(t)
    if xt is None:
        move = torch.rand(*x0.shape, device=x0.device) < 1 - (-sigma[:, None]).exp()
        xt = torch.where(move, model.output_layer.linear.out_features - 1, x0)
    log_score = model(xt, sigma)
    entropy = absorbing_score_entropy(log_score, sigma[:, None], xt, x0)
    return (dsigma[:, None] * entropy).sum(dim=-1)


class LoopEMA:
    """score_sde's EMA, as in the original: one Python-level update per parameter, with a temporary."""

    def __init__(self, parameters, decay: float):
        self.decay, self.num_updates = decay, 0
        self.shadow_params = [p.detach().clone() for p in parameters if p.requires_grad]

    @torch.no_grad()
    def update(self, parameters) -> None:
        self.num_updates += 1
        one_minus_decay = 1.0 - min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for shadow, param in zip(self.shadow_params, [p for p in parameters if p.requires_grad], strict=True):
            shadow.sub_(one_minus_decay * (shadow - param))


class OriginalTrainer:
    """The original step function: loss.mean().backward(), warmup lr, unscale/clip, AdamW, EMA, zero_grad.

    A GradScaler is used on CUDA as in the original (it is a no-op under bf16 autocast apart from its checks).
    """

    def __init__(
        self,
        model: OriginalSEDD,
        lr: float = 3e-4,
        warmup: int = 2500,
        grad_clip: float = 1.0,
        ema: float = 0.9999,
    ):
        self.model, self.lr, self.warmup, self.grad_clip = model, lr, warmup, grad_clip
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        self.ema = LoopEMA(model.parameters(), ema)
        device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
        self.step = 0

    def train_step(self, x0: torch.Tensor, t: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        """One update on x0 [B, L]; `dtype` runs the loss under autocast. Returns the mean loss (a tensor)."""
        with torch.autocast(x0.device.type, dtype=dtype, enabled=dtype is not None):
            loss = original_loss(self.model, x0, t).mean()
        self.scaler.scale(loss).backward()
        self.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * min(self.step / self.warmup, 1.0)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model.parameters())
        self.optimizer.zero_grad()
        return loss.detach()


# ----------------------------------------------------------------------------------------------- sampling
def _gumbel_argmax(probs: torch.Tensor) -> torch.Tensor:
    """The original `sample_categorical`: argmax of probs / Exp(1) noise, over the full last dim."""
    return (probs / (1e-10 - (torch.rand_like(probs) + 1e-10).log())).argmax(dim=-1)


def _analytic_probs(score: torch.Tensor, xt: torch.Tensor, dsigma: torch.Tensor, drop_mask: bool):
    """staggered_score(score, dsigma) * transp_transition(xt, dsigma) on full [B, L, V] tensors (Eq. 18)."""
    dsigma = dsigma[:, None]  # [B, 1]
    staggered = score.clone()
    extra = (1 - dsigma.exp()) * staggered.sum(dim=-1)
    staggered *= dsigma.exp()[..., None]
    staggered[..., -1] += extra
    mask_id = score.shape[-1] - 1
    edge = (-dsigma[..., None]).exp() * F.one_hot(xt, num_classes=score.shape[-1])
    edge += torch.where(xt == mask_id, 1 - (-dsigma).exp(), 0)[..., None]
    probs = staggered * edge
    return probs[..., :-1] if drop_mask else probs


@torch.no_grad()
def original_sample(
    model: OriginalSEDD,
    batch: int,
    length: int,
    steps: int,
    eps: float = 1e-5,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The original `get_pc_sampler` with the analytic predictor and the final denoiser, from all-mask tokens."""
    device = next(model.parameters()).device
    mask_id = model.output_layer.linear.out_features - 1
    x = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    dt = (1 - eps) / steps

    def scores(x, sigma):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return model(x, sigma).float().exp()

    for i in range(steps + 1):
        t = timesteps[i] * torch.ones(batch, device=device)
        sigma = loglinear_noise(t)[0]
        if i < steps:  # predictor step from t to t - dt
            dsigma = sigma - loglinear_noise(t - dt)[0]
            x = _gumbel_argmax(_analytic_probs(scores(x, sigma), x, dsigma, drop_mask=False))
        else:  # denoiser at t = eps, never ending in the mask state
            x = _gumbel_argmax(_analytic_probs(scores(x, sigma), x, sigma, drop_mask=True))
    return x
