"""Denoising networks: ``(noisy expression x_t, step t, image embedding) -> (mean output, variance value)`` per gene.

Both architectures share the conditioning of the Stem paper: ``c = MLP(sinusoidal(t)) + MLP(embedding)``, injected in
every block by adaptive LayerNorm with zero-initialised gates (adaLN-Zero: each residual branch starts as the
identity, so a fresh network predicts zeros and training starts stable).

- ``"transformer"`` (:class:`GeneTransformer`, the paper's): one token per gene, token = learned gene embedding + a
  small MLP of that gene's noisy value, no positional embedding, self-attention across genes.
- ``"mlp"`` (:class:`ResidualMLP`): residual MLP blocks over the whole gene vector; far cheaper on a CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t w_k), sin(t w_k)]`` of (integer or real) steps ``t``, frequencies ``w_k`` geometric."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2)) if dim % 2 else emb


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` broadcast over any middle axes."""
    while shift.ndim < x.ndim:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


def _gate(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    while g.ndim < x.ndim:
        g = g.unsqueeze(1)
    return g * x


class Conditioning(nn.Module):
    """``c = MLP(sinusoidal(t)) + MLP(embedding)``."""

    def __init__(self, cond_dim: int, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time = _mlp(freq_dim, width, width)
        self.image = _mlp(cond_dim, width, width)

    def forward(self, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``(B,)`` steps and ``(B, D)`` embeddings -> ``(B, width)`` conditioning vectors."""
        return self.time(timestep_embedding(t, self.freq_dim)) + self.image(emb)


class AdaLNZero(nn.Module):
    """Produces ``n`` modulation vectors (shifts, scales, gates) from ``c``; zero-initialised."""

    def __init__(self, width: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.proj = nn.Linear(width, n * width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return the ``n`` modulation vectors, each ``(B, width)``."""
        return self.proj(F.silu(c)).chunk(self.n, dim=-1)


class GeneAttentionBlock(nn.Module):
    """Pre-norm transformer block over gene tokens with adaLN-Zero: attention and an MLP, each gated."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads}).")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, int(width * mlp_ratio)),
            nn.GELU(approximate="tanh"),
            nn.Linear(int(width * mlp_ratio), width),
        )
        self.ada = AdaLNZero(width, 6)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-head self-attention across the tokens of ``x`` ``(B, N, width)`` (``mask`` ``(B, N)``: keys used)."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return self.out(y.transpose(1, 2).reshape(b, n, w))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``(B, N, width)`` modulated by ``c`` ``(B, width)`` -> tokens (``mask``: see :meth:`attention`)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)
        x = x + _gate(gate1, self.attention(_modulate(self.norm1(x), shift1, scale1), mask))
        return x + _gate(gate2, self.mlp(_modulate(self.norm2(x), shift2, scale2)))


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block with adaLN-Zero."""

    def __init__(self, width: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.ada = AdaLNZero(width, 3)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Features ``(B, width)`` modulated by ``c`` ``(B, width)`` -> features."""
        shift, scale, gate = self.ada(c)
        return x + _gate(gate, self.mlp(_modulate(self.norm(x), shift, scale)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a zero-initialised linear map to ``n_out`` outputs."""

    def __init__(self, width: int, n_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = AdaLNZero(width, 2)
        self.linear = nn.Linear(width, n_out)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Features (any middle axes) modulated by ``c`` -> ``n_out`` outputs."""
        shift, scale = self.ada(c)
        return self.linear(_modulate(self.norm(x), shift, scale))


class GeneTransformer(nn.Module):
    """The Stem denoiser: a transformer over gene tokens conditioned by adaLN-Zero.

    Parameters
    ----------
    n_genes
        Panel size (number of tokens).
    cond_dim
        Width of the image embedding.
    width
        Token width.
    depth
        Number of blocks.
    heads
        Attention heads.
    mlp_ratio
        Hidden width of the block MLPs, relative to ``width``.
    learn_variance
        Also output the variance interpolation value per gene.
    """

    def __init__(
        self,
        n_genes: int,
        cond_dim: int,
        *,
        width: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        learn_variance: bool = True,
    ) -> None:
        super().__init__()
        self.learn_variance = learn_variance
        self.gene_embedding = nn.Parameter(torch.randn(n_genes, width) * 0.02)
        self.value = _mlp(1, width, width)
        self.cond = Conditioning(cond_dim, width)
        self.blocks = nn.ModuleList([GeneAttentionBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(width, 2 if learn_variance else 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``(B, G)`` noisy values, ``t`` ``(B,)`` steps, ``emb`` ``(B, D)`` -> mean output ``(B, G)``, ``v`` or None."""
        c = self.cond(t, emb)
        h = self.gene_embedding[None] + self.value(x.unsqueeze(-1))
        for block in self.blocks:
            h = block(h, c)
        out = self.final(h, c)
        return out[..., 0], (torch.tanh(out[..., 1]) if self.learn_variance else None)


class ResidualMLP(nn.Module):
    """A cheaper denoiser: residual adaLN-Zero MLP blocks over the whole gene vector.

    Parameters are those of :class:`GeneTransformer`; ``heads`` is ignored, ``dropout`` applies inside the blocks.
    """

    def __init__(
        self,
        n_genes: int,
        cond_dim: int,
        *,
        width: int = 256,
        depth: int = 3,
        heads: int = 1,
        mlp_ratio: float = 2.0,
        learn_variance: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.learn_variance = learn_variance
        self.n_genes = n_genes
        self.inp = nn.Linear(n_genes, width)
        self.cond = Conditioning(cond_dim, width)
        self.blocks = nn.ModuleList([ResidualBlock(width, mlp_ratio, dropout) for _ in range(depth)])
        self.final = FinalLayer(width, n_genes * (2 if learn_variance else 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the network; same contract as :meth:`GeneTransformer.forward`."""
        c = self.cond(t, emb)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        out = self.final(h, c)
        if not self.learn_variance:
            return out, None
        return out[:, : self.n_genes], torch.tanh(out[:, self.n_genes :])


class NeighbourhoodTransformer(nn.Module):
    """A joint denoiser of a spot and its neighbours: one token per spot, attention among the spots.

    Token ``k`` of a neighbourhood is ``Linear(x_k) + MLP(condition_k) + MLP(offset_k)``: the spot's noisy values,
    its own image condition and its position relative to the centre spot (token 0) in grid steps. The diffusion
    step modulates every block (adaLN-Zero); padded tokens are masked out of the attention.

    Parameters
    ----------
    n_genes, cond_dim, width, depth, heads, mlp_ratio
        As for :class:`GeneTransformer`.
    learn_variance
        Must be ``False``: the joint model is trained on the simple loss only.
    """

    def __init__(
        self,
        n_genes: int,
        cond_dim: int,
        *,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        learn_variance: bool = False,
    ) -> None:
        super().__init__()
        if learn_variance:
            raise ValueError("The neighbourhood denoiser has no learned variance; use learn_variance=False.")
        self.learn_variance = False
        self.freq_dim = 256
        self.inp = nn.Linear(n_genes, width)
        self.image = _mlp(cond_dim, width, width)
        self.position = _mlp(2, width, width)
        self.time = _mlp(self.freq_dim, width, width)
        self.blocks = nn.ModuleList([GeneAttentionBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(width, n_genes)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """Apply the network: mean output ``(B, K, G)`` and ``None``.

        ``x`` ``(B, K, G)``, ``t`` ``(B,)``, ``emb`` ``(B, K, D)``, ``offsets`` ``(B, K, 2)``, ``valid`` ``(B, K)``.
        """
        c = self.time(timestep_embedding(t, self.freq_dim))
        h = self.inp(x) + self.image(emb) + self.position(offsets)
        for block in self.blocks:
            h = block(h, c, valid)
        return self.final(h, c), None


#: the denoisers by name
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "transformer": GeneTransformer,
    "mlp": ResidualMLP,
    "neighbourhood": NeighbourhoodTransformer,
}

#: default sizes per architecture (the transformer's are the paper's)
DEFAULTS: dict[str, dict[str, Any]] = {
    "transformer": {"depth": 12, "width": 384, "heads": 6, "mlp_ratio": 4.0},
    "mlp": {"depth": 3, "width": 256, "heads": 1, "mlp_ratio": 2.0},
    "neighbourhood": {"depth": 2, "width": 128, "heads": 4, "mlp_ratio": 2.0},
}


def n_parameters(module: nn.Module) -> int:
    """Count the parameters.

    Examples
    --------
    >>> n_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in module.parameters())
