"""The BiFlow forward model: a TARFlow-style autoregressive flow with norm control.

Data x (N, C, H, W) -> patches (N, T, D) -> B causal flow blocks -> z ~ N(0, I).
Block i reads tokens in raster order (i even) or reversed order (i odd); inside a block
the affine parameters of token t depend only on tokens < t, so the Jacobian is triangular.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from biflow.config import ForwardConfig
from biflow.models.layers import CausalLayer, KVCache, patchify, unpatchify


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (bf16 autocast) are lifted to float32; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class FlowBlock(nn.Module):
    """z_t = (x_t - b_t) * exp(-a_t), with (a_t, b_t) predicted from x_{<t} by a causal transformer."""

    def __init__(self, cfg: ForwardConfig, flip: bool):
        super().__init__()
        self.flip = flip  # read tokens in reversed order
        self.clip, self.clip_shift = cfg.clip, cfg.clip_shift
        self.heads = cfg.heads
        self.proj_in = nn.Linear(cfg.token_dim, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.width))
        self.mean_null = cfg.null_label == "mean"  # null label = mean of the class rows, not a learned row
        rows = cfg.num_classes + (0 if self.mean_null else 1)
        self.class_emb = nn.Embedding(rows, cfg.width) if cfg.num_classes else None
        self.layers = nn.ModuleList(CausalLayer(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.gelu)
                                    for _ in range(cfg.layers_per_block))
        self.norm = nn.LayerNorm(cfg.width) if cfg.final_norm else nn.Identity()
        self.proj_out = nn.Linear(cfg.width, 2 * cfg.token_dim)  # zero-initialised: identity at start

    def _order(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical <-> block order (an involution)."""
        return x.flip(1) if self.flip else x

    def _embed(self, x: torch.Tensor, y: torch.Tensor | None, start: int) -> torch.Tensor:
        h = self.proj_in(x) + self.pos[start : start + x.shape[1]]  # (N, t, W)
        if self.class_emb is not None:
            h = h + F.embedding(y, self.class_rows())[:, None]  # nn.Embedding's own lookup on the table
        return h

    def class_rows(self) -> torch.Tensor:
        """The label embedding table (num_classes + 1, W): the class rows, then the null label's row."""
        table = self.class_emb.weight
        return torch.cat([table, table.mean(0, keepdim=True)]) if self.mean_null else table

    def _affine(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output (N, t, 2D) -> log-scale a and shift b, soft-clipped for norm control."""
        a, b = _at_least_fp32(out).chunk(2, dim=-1)
        if self.clip is not None:
            a = self.clip * torch.tanh(a / self.clip)
            if self.clip_shift:
                b = self.clip * torch.tanh(b / self.clip)
        return a, b

    def affine_params(self, xb: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full causal pass over block-ordered tokens xb (N, T, D): (a, b) for every position.

        The output is shifted right by one token, so position t sees only tokens < t; token 0 gets (0, 0).
        """
        h = self._embed(xb, y, 0)
        for layer in self.layers:
            h = layer(h)
        out = self.proj_out(self.norm(h))  # (N, T, 2D)
        out = F.pad(out[:, :-1], (0, 0, 1, 0))  # shift right by one token
        return self._affine(out)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, T, D) canonical order -> z (N, T, D) canonical order, logdet (N,)."""
        xb = self._order(x)
        a, b = self.affine_params(xb, y)
        z = (xb - b) * torch.exp(-a)
        return self._order(z), -a.sum(dim=(1, 2))

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, y: torch.Tensor | None, y_null: torch.Tensor | None, guidance: float) -> torch.Tensor:
        """Decode x from z one token at a time with a preallocated KV cache (T - 1 network steps).

        With guidance g > 0 the batch also runs unconditionally (labels y_null) and
        a <- a + g_t (a - a_u), b <- b + g_t (b - b_u), with g_t = g * t / (T - 1) ramped over positions.
        """
        zb = self._order(z)
        n, length, _ = zb.shape
        guided = guidance > 0 and self.class_emb is not None
        labels = torch.cat([y, y_null]) if guided else y
        rows = 2 * n if guided else n
        head_dim = self.pos.shape[1] // self.heads
        device = self.pos.device.type
        like = self.pos  # the cache holds keys/values in the dtype the layers produce (bf16 under CUDA autocast)
        if torch.is_autocast_enabled(device):
            like = self.pos.new_empty(0, dtype=torch.get_autocast_dtype(device))
        caches = [KVCache(rows, self.heads, length, head_dim, like) for _ in self.layers]
        # what _embed adds to proj_in(x) at every position, computed once: positions + proj_in's bias (+ labels)
        cond = (self.pos + self.proj_in.bias).expand(rows, -1, -1)
        if self.class_emb is not None:
            cond = cond + F.embedding(labels, self.class_rows())[:, None]  # (rows, T, W)
        weight = self.proj_in.weight.t()
        x = torch.empty_like(zb)
        x[:, 0] = zb[:, 0]  # token 0 has a = b = 0
        for t in range(length - 1):
            xt = x[:, t]
            h = torch.addmm(cond[:, t], torch.cat([xt, xt]) if guided else xt, weight)[:, None]  # (rows, 1, W)
            for layer, cache in zip(self.layers, caches):
                h = layer.step(h, t, cache)
            a, b = self._affine(self.proj_out(self.norm(h)))  # params of token t + 1
            if guided:  # a + g (a - a_u) = lerp(a_u, a, 1 + g): one kernel each
                g = guidance * (t + 1) / (length - 1)
                (a, a_u), (b, b_u) = a.chunk(2), b.chunk(2)
                a, b = torch.lerp(a_u, a, 1 + g), torch.lerp(b_u, b, 1 + g)
            x[:, t + 1 : t + 2] = torch.addcmul(b, zb[:, t + 1 : t + 2], a.exp())
        return self._order(x)


class ForwardFlow(nn.Module):
    """F: data -> noise. forward(x, y) -> (z, trajectory, logdet); inverse(z, y, guidance) -> x."""

    def __init__(self, cfg: ForwardConfig | str = "digits", **overrides):
        super().__init__()
        if isinstance(cfg, str):
            cfg = ForwardConfig(size=cfg, **overrides)
        elif overrides:
            cfg = ForwardConfig(**{**cfg.model_dump(), **overrides})
        self.cfg = cfg
        self.blocks = nn.ModuleList(FlowBlock(cfg, flip=i % 2 == 1) for i in range(cfg.num_blocks))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All initialisation of the forward flow lives here."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)  # small random projections
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)  # class and null-label embeddings
        for block in self.blocks:
            nn.init.normal_(block.pos, std=0.02)  # learned positional embedding
            nn.init.zeros_(block.proj_out.weight)  # zero output projection: every block starts as identity
            nn.init.zeros_(block.proj_out.bias)

    # ------------------------------------------------------------------ helpers
    @property
    def dims(self) -> int:
        """Dimensions per sample, C*H*W."""
        return self.cfg.in_channels * self.cfg.image_size**2

    def image_shape(self) -> tuple[int, int, int]:
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)

    def flops_per_sample(self, attention: bool = True) -> int:
        """FLOPs of one forward pass per sample (a multiply-add = 2; causal attention counted in full; training ~3x)."""
        cfg = self.cfg
        t, w, d, hidden = cfg.num_tokens, cfg.width, cfg.token_dim, int(cfg.width * cfg.mlp_ratio)
        per_layer = 2 * t * w * (3 * w + w + 2 * hidden) + (4 * t * t * w if attention else 0)
        return cfg.num_blocks * (2 * t * d * w + cfg.layers_per_block * per_layer + 2 * t * w * 2 * d)

    def labels(self, y: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        """Class labels for the blocks: None for an unconditional model, the null label where y is None."""
        if not self.cfg.num_classes:
            return None
        if y is None:
            return torch.full((n,), self.cfg.num_classes, dtype=torch.long, device=device)
        return y.to(device=device, dtype=torch.long)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.cfg.patch_size)  # (N, C, H, W) -> (N, T, D)

    def to_image(self, t: torch.Tensor) -> torch.Tensor:
        return unpatchify(t, self.cfg.patch_size, self.cfg.in_channels)  # (N, T, D) -> (N, C, H, W)

    # ---------------------------------------------------------------- the flow
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """x (N, C, H, W) -> z (N, C, H, W), trajectory (B+1, N, T, D) canonical order, logdet (N,)."""
        y = self.labels(y, x.shape[0], x.device)
        h = self.to_tokens(x)
        states, logdet = [h], x.new_zeros(x.shape[0], dtype=_at_least_fp32(x).dtype)
        for block in self.blocks:
            h, ld = block(h, y)
            states.append(h)
            logdet = logdet + ld
        return self.to_image(h), torch.stack(states), logdet

    def inverse(self, z: torch.Tensor, y: torch.Tensor | None = None, guidance: float = 0.0) -> torch.Tensor:
        """Exact inverse: z (N, C, H, W) -> x (N, C, H, W); z is not modified."""
        n = z.shape[0]
        y = self.labels(y, n, z.device)
        y_null = self.labels(None, n, z.device)
        h = self.to_tokens(z)
        for block in reversed(self.blocks):
            h = block.inverse(h, y, y_null, guidance)
        return self.to_image(h)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log-density log p(x | y) in nats per sample, (N,)."""
        z, _, logdet = self(x, y)
        z = _at_least_fp32(z.flatten(1))
        return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logdet
