"""Transformer pieces shared by the forward flow (causal) and the reverse model (bidirectional)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, C*p*p), raster order over patches."""
    return rearrange(x, "n c (h p) (w q) -> n (h w) (c p q)", p=p, q=p)


def unpatchify(t: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """(N, T, C*p*p) -> (N, C, H, W) for a square grid."""
    side = int(round(t.shape[1] ** 0.5))
    return rearrange(t, "n (h w) (c p q) -> n c (h p) (w q)", h=side, w=side, p=p, q=p, c=channels)


class KVCache:
    """Preallocated keys/values for one attention layer: (N, heads, T, head_dim) each.

    Lives only inside one decoding call (never stored on a module), so no state leaks between calls.
    """

    def __init__(self, n: int, heads: int, length: int, head_dim: int, like: torch.Tensor):
        self.k = like.new_empty(n, heads, length, head_dim)
        self.v = like.new_empty(n, heads, length, head_dim)


class Attention(nn.Module):
    """Multi-head self-attention on top of F.scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def _qkv(self, h: torch.Tensor):
        q, k, v = rearrange(self.qkv(h), "n t (three nh hd) -> three n nh t hd", three=3, nh=self.heads)
        return q, k, v  # each (N, nh, T, hd)

    def forward(self, h: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = self._qkv(h)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (N, nh, T, hd)
        return self.proj(rearrange(o, "n nh t hd -> n t (nh hd)"))

    def step(self, h: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """One causal decoding step: h is token `pos` (N, 1, W); attends to cached tokens <= pos.

        Plain views instead of einops here: this runs (T - 1) x layers x blocks times per sample."""
        n, _, width = h.shape
        q, k, v = self.qkv(h).view(n, 1, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        cache.k[:, :, pos : pos + 1] = k
        cache.v[:, :, pos : pos + 1] = v
        o = F.scaled_dot_product_attention(q, cache.k[:, :, : pos + 1], cache.v[:, :, : pos + 1])  # (N, nh, 1, hd)
        return self.proj(o.reshape(n, 1, width))


class MLP(nn.Module):
    """fc2(GELU(fc1(h))); gelu "tanh" (the tanh approximation) or "exact" (the erf form)."""

    def __init__(self, width: int, ratio: float, gelu: str = "tanh"):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.approximate = "tanh" if gelu == "tanh" else "none"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate=self.approximate))


class CausalLayer(nn.Module):
    """Pre-norm transformer layer with causal attention (forward-flow blocks)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, gelu: str = "tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, gelu)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), causal=True)
        return h + self.mlp(self.norm2(h))

    def step(self, h: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        h = h + self.attn.step(self.norm1(h), pos, cache)
        return h + self.mlp(self.norm2(h))
