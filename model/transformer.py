"""The SEDD score network: a DiT-style bidirectional transformer conditioned on the noise level sigma.

Parameter names match the published `louaaron/sedd-small` / `sedd-medium` checkpoints exactly.
`forward(indices, sigma)` returns log-scores log s_theta(x, sigma)_y of shape [B, L, vocab]; with
`scale_by_sigma` (absorbing graph) the output is shifted by -log(e^sigma - 1) - log(vocab - 1) so that a
fresh model starts near the right magnitude (paper, Appendix C.2), and the entry of the input token is 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import Packing, attention, packed_attention
from model.config import SEDDConfig, from_run_config, to_container, to_run_config
from model.rotary import Rotary, apply_rotary


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x (1 + scale) + shift."""
    return x * (1 + scale) + shift


# Output rows are padded to a multiple of this on CUDA: with GPT-2's 50258 rows (not a multiple of 8) every
# GEMM of the output layer has a misaligned leading dimension and cuBLAS falls back to slow kernels.
CUDA_OUTPUT_ROW_MULTIPLE = 64


def padded_linear(x: torch.Tensor, linear: nn.Linear, multiple: int) -> torch.Tensor:
    """`linear(x)` computed with the weight's rows (and the bias) zero-padded to a multiple of `multiple`, then
    sliced back: the same numbers, with aligned GEMMs. x [..., in] -> [..., out] (a view of a padded buffer)."""
    out_features = linear.weight.shape[0]
    pad = -out_features % multiple
    if pad == 0:
        return linear(x)
    weight, bias = linear.weight, linear.bias
    if torch.is_autocast_enabled(x.device.type):  # pad the low-precision copy autocast would make anyway
        dtype = torch.get_autocast_dtype(x.device.type)
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    weight = F.pad(weight, (0, 0, 0, pad))
    bias = None if bias is None else F.pad(bias, (0, pad))
    return F.linear(x, weight, bias)[..., :out_features]


class LayerNorm(nn.Module):
    """Bias-free LayerNorm, always computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [self.dim])
        return x * self.weight


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the scalar sigma followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """[N] -> [N, dim] cos/sin features (GLIDE/DiT)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.embedding, not self.embedding[x]: the same rows, but its backward is a fast scatter-add where
        # advanced indexing's is a sort-based index_put (measured: 2.8 ms of a 91 ms H100 step)
        return F.embedding(x, self.embedding)


class DDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-modulated attention and MLP, gated residuals."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim, bias=True),
        )
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(
        self,
        x: torch.Tensor,
        rotary_cos_sin: tuple[torch.Tensor, torch.Tensor],
        c: torch.Tensor,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """x [B, L, dim] (cos/sin [L, D]) or, with `packing`, the real tokens x [T, dim] (cos/sin [T, D]);
        c [B, cond_dim]. Returns x's shape."""
        modulation = self.adaLN_modulation(c)
        modulation = modulation[:, None] if packing is None else modulation.index_select(0, packing.sequence)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = self.attn_qkv(h).unflatten(-1, (3, self.n_heads, -1))  # [..., 3, H, D]
        qk = apply_rotary(qkv[..., :2, :, :], *rotary_cos_sin)
        qkv = torch.cat([qk, qkv[..., 2:, :, :]], dim=-3)
        h = (attention(qkv) if packing is None else packed_attention(qkv, packing)).flatten(-2)
        x = x + gate_msa * F.dropout(self.attn_out(h), self.dropout, self.training)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(h, self.dropout, self.training)


class DDitFinalLayer(nn.Module):
    """adaLN-modulated norm and the linear map to the vocabulary."""

    def __init__(self, hidden_size: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)
        self.cuda_row_multiple = CUDA_OUTPUT_ROW_MULTIPLE  # 1 turns the padding off (benchmarks/bench.py)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [..., L, hidden] with c [..., cond] (one c per sequence), or x [N, hidden] with c [N, cond]."""
        modulation = self.adaLN_modulation(c)
        if x.dim() == modulation.dim() + 1:
            modulation = modulation.unsqueeze(-2)
        shift, scale = modulation.chunk(2, dim=-1)
        multiple = self.cuda_row_multiple if x.is_cuda else 1
        return padded_linear(modulate(self.norm_final(x), shift, scale), self.linear, multiple)


class SEDD(nn.Module, PyTorchModelHubMixin, library_name="sedd", tags=["sedd", "discrete-diffusion"]):
    """The SEDD transformer. `SEDD(config)` takes a run config (the published `config.json`) or a `SEDDConfig`.

    `model.config` is always the run config (an OmegaConf DictConfig), so the original API
    `graph_lib.get_graph(model.config)` and `noise_lib.get_noise(model.config)` works on any instance.
    """

    def __init__(self, config: Mapping[str, Any] | DictConfig | SEDDConfig):
        super().__init__()
        if isinstance(config, SEDDConfig):
            arch, run_config = config, to_run_config(config)
        else:
            run_config = to_container(config)
            arch = from_run_config(run_config)
        self.config = OmegaConf.create(run_config)
        self.arch = arch
        self.absorb = arch.absorb
        self.scale_by_sigma = arch.scale_by_sigma

        self.vocab_embed = EmbeddingLayer(arch.hidden_size, arch.vocab_size)
        self.sigma_map = TimestepEmbedder(arch.cond_dim)
        self.rotary_emb = Rotary(arch.hidden_size // arch.n_heads)
        self.blocks = nn.ModuleList(
            DDiTBlock(arch.hidden_size, arch.n_heads, arch.cond_dim, arch.mlp_ratio, arch.dropout)
            for _ in range(arch.n_blocks)
        )
        self.output_layer = DDitFinalLayer(arch.hidden_size, arch.vocab_size, arch.cond_dim)
        self.activation_checkpointing = False  # recompute each block in backward (training.prepare_model)

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size

    def compile_blocks(self, mode: str | None = None) -> None:
        """`torch.compile` each transformer block in place (parameter and state-dict names unchanged), with
        torch.compile's `mode` (None: its default). The blocks are most of a step's work; the first calls at each
        new shape compile. Measured in benchmarks/README.md (`bench.py --compile`)."""
        for block in self.blocks:
            block.compile(mode=mode)

    def forward(
        self,
        indices: torch.Tensor,
        sigma: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_mask: torch.Tensor | None = None,
        raw: bool = False,
    ) -> torch.Tensor:
        """Log-scores of the SEDD score network.

        indices [B, L] long, sigma [B], attention_mask [B, L] (1 real, 0 pad).
        Returns [B, L, vocab] float32, or with `output_mask` [B, L] bool only the selected positions,
        [N, vocab] in row-major order (the output layer is the costliest part; the loss needs few rows).
        `raw=True` returns the output layer's logits before the sigma scaling and the input-token zero.
        """
        hidden, c = self.trunk(indices, sigma, attention_mask)
        if output_mask is not None:
            # index_select on flat positions (its backward is index_add, not a sort-based index_put)
            flat = output_mask.reshape(-1).nonzero(as_tuple=True)[0]
            batch = flat // output_mask.shape[1]
            hidden = hidden.flatten(0, 1).index_select(0, flat)
            c, indices, sigma = c.index_select(0, batch), indices.reshape(-1)[flat], sigma[batch]
        if raw:
            return self.output_layer(hidden, c)
        return self.head(hidden, c, indices, sigma)

    def trunk(
        self, indices: torch.Tensor, sigma: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything but the output layer: hidden states [B, L, hidden] and the conditioning c [B, cond].

        With padding in `attention_mask` the blocks run on the real tokens only (packed, see `Packing`); the
        hidden states at padded positions are then 0.
        """
        packing = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            packing = Packing.from_mask(attention_mask)
        c = F.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb(indices.shape[1], indices.device)
        if packing is not None:
            indices, cos, sin = packing.pack(indices), cos[packing.position], sin[packing.position]
        x = self.vocab_embed(indices)
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                x = checkpoint(block, x, (cos, sin), c, packing, use_reentrant=False)
            else:
                x = block(x, (cos, sin), c, packing)
        return (x if packing is None else packing.unpack(x)), c

    def head(
        self, hidden: torch.Tensor, c: torch.Tensor, indices: torch.Tensor, sigma: torch.Tensor
    ) -> torch.Tensor:
        """Output layer on hidden [B, L, hidden] (c [B, cond], indices [B, L], sigma [B]) or on gathered
        positions hidden [N, hidden] (c [N, cond], indices [N], sigma [N]). Returns float32 log-scores."""
        # contiguous: in fp32 on CUDA the output layer returns a view of its row-padded buffer
        x = self.output_layer(hidden, c).float().contiguous()
        if self.scale_by_sigma:
            sigma = sigma.float()
            esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log()
            esigm1_log = esigm1_log.view(*sigma.shape, *([1] * (x.dim() - sigma.dim())))
            x = x.sub_(esigm1_log).sub_(math.log(x.shape[-1] - 1))  # in place: x is this call's own output
        return x.scatter_(-1, indices[..., None], 0.0)

    # ----------------------------------------------------------------- hub I/O
    def _save_pretrained(self, save_directory) -> None:
        """Write `model.safetensors` and `config.json` (the run config, published layout)."""
        from model.hub_io import save_hub_directory

        save_hub_directory(self, save_directory)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str,
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
    ) -> SEDD:
        """Load from a hub id (e.g. `louaaron/sedd-small`) or a hub-format directory (config.json + weights).

        Weights may be `model.safetensors` or `pytorch_model.bin`; loading is strict by default.
        """
        from model.hub_io import load_state_dict_file, read_json, resolve_pretrained_files

        files = resolve_pretrained_files(
            str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        model = cls(read_json(files.config))
        model.load_weights(load_state_dict_file(files.weights, map_location), strict=strict)
        return model.to(map_location)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load a state dict (a DDP `module.` prefix is removed; the deterministic rotary buffer may be absent)."""
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        state_dict.setdefault("rotary_emb.inv_freq", self.rotary_emb.inv_freq)
        self.load_state_dict(state_dict, strict=strict)
