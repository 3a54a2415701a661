"""The BiFlow reverse model G: noise z -> data x in ONE network pass (BIFLOW.md §4).

A ViT over the same patch tokens as the forward flow, with bidirectional attention and DiT-style
adaLN-Zero blocks conditioned on c = class_emb(y) + w_emb(w) (w: the training-time CFG scale).
The layers are split into B + 1 segments: segment k (k = 0..B-1) undoes forward block B-1-k, and
a last segment denoises. After every segment a projection head (LayerNorm + Linear(width -> D))
reads the residual stream:

    z = x^B -> [seg 0] -> head 0 predicts x^{B-1}
            -> [seg 1] -> head 1 predicts x^{B-2}
            ...
            -> [seg B-1] -> head B-1 predicts x^0 = x~ (the noisy input of the forward flow)
            -> [seg B]   -> head B predicts the output x (clean data with learned denoising)

`forward` returns the head predictions re-ordered like the forward trajectory: hidden[i] predicts
trajectory[i] for i = 0..B-1, so the alignment loss is simply D(hidden, trajectory[:B]).
With head_feedback=False (hidden alignment) the heads only read the stream; with True (hidden
distillation, an ablation) each head's prediction is re-embedded and replaces the stream.
"""
from __future__ import annotations

import math
from itertools import accumulate

import torch
import torch.nn as nn

from biflow.config import ReverseConfig
from biflow.models.layers import MLP, Attention, patchify, unpatchify

W_SCALE = 250.0  # w in [0, 4] spans the timestep range [0, 1000] that DiT's sinusoidal embedding was designed for


# ------------------------------------------------------------------ embeddings
def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) scalars -> (N, dim) cos/sin features at geometrically spaced frequencies (DiT's timestep features)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GuidanceEmbedder(nn.Module):
    """CFG scale w (N,) -> (N, width), embedded like a diffusion timestep: sinusoidal features + MLP."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(w * W_SCALE, self.freq_dim))


# ---------------------------------------------------------------------- layers
def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return h * (1 + scale) + shift  # h (N, T, W); shift, scale (N, 1, W)


class AdaLNBlock(nn.Module):
    """DiT block: pre-norm attention + MLP, each modulated (shift, scale) and gated by the condition c."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # zero-initialised: block = identity

    def forward(self, h: torch.Tensor, c: torch.Tensor, causal: bool) -> torch.Tensor:
        """h (N, T, W), c (N, W) -> (N, T, W)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)  # each (N, 1, W)
        h = h + gate1 * self.attn(modulate(self.norm1(h), shift1, scale1), causal=causal)
        return h + gate2 * self.mlp(modulate(self.norm2(h), shift2, scale2))


class ProjectionHead(nn.Module):
    """phi_k: per-token LayerNorm + Linear(width -> D), residual stream -> a state in input (token) space."""

    def __init__(self, width: int, token_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, token_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(h))  # (N, T, W) -> (N, T, D)


# ------------------------------------------------------------------ the model
class ReverseModel(nn.Module):
    """G: forward(z, y, w) -> (x (N, C, H, W), hidden (B, N, T, D)); hidden[i] predicts trajectory[i]."""

    def __init__(self, cfg: ReverseConfig | str = "digits", **overrides):
        super().__init__()
        if isinstance(cfg, str):
            cfg = ReverseConfig(size=cfg, **overrides)
        elif overrides:
            cfg = ReverseConfig(**{**cfg.model_dump(), **overrides})
        self.cfg = cfg
        width, dim = cfg.width, cfg.token_dim
        self.embed = nn.Linear(dim, width)  # z tokens -> stream
        self.pos = nn.Parameter(torch.zeros(cfg.num_tokens, width))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, width) if cfg.num_classes else None  # last row: null label
        self.w_emb = GuidanceEmbedder(width)
        self.blocks = nn.ModuleList(AdaLNBlock(width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.heads = nn.ModuleList(ProjectionHead(width, dim) for _ in range(cfg.num_blocks + 1))  # heads[B]: output
        # hidden distillation: re-embed head k's prediction as the input of segment k + 1
        self.feedback = nn.ModuleList(nn.Linear(dim, width) for _ in range(cfg.num_blocks)) if cfg.head_feedback else None
        ends = list(accumulate(cfg.segments))
        self.bounds = list(zip([0] + ends[:-1], ends))  # [start, stop) block indices of each segment
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All initialisation of the reverse model lives here."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # DiT: xavier for every projection
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)  # learned positional embedding
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)  # class table, null row included
        for layer in (self.w_emb.mlp[0], self.w_emb.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)  # DiT's timestep-MLP init
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)  # adaLN-Zero: gates start at 0, every block is the identity
            nn.init.zeros_(block.modulation[-1].bias)
        for head in self.heads:
            # Zero heads (DiT's zero output layer): every prediction starts at 0, the mean of the (zero-mean)
            # states, so the first steps neither blow up the loss nor push random gradients into the trunk.
            # With head_feedback the stream after head 0 is then z-independent until head 0 learns (its own
            # alignment term trains it from step one): the bottleneck hidden distillation is about.
            nn.init.zeros_(head.proj.weight)
            nn.init.zeros_(head.proj.bias)

    # ------------------------------------------------------------------ helpers
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self, attention: bool = True) -> int:
        """FLOPs of one forward pass per sample (a multiply-add = 2): every Linear, plus attention's two T x T products."""
        cfg = self.cfg
        t, w, d, hidden = cfg.num_tokens, cfg.width, cfg.token_dim, int(cfg.width * cfg.mlp_ratio)
        linear = 2 * t * d * w + 2 * (self.w_emb.freq_dim * w + w * w)  # token embedding, guidance MLP
        linear += cfg.depth * (2 * w * 6 * w + 2 * t * w * (3 * w + w + 2 * hidden))  # adaLN, qkv, proj, MLP
        linear += (cfg.num_blocks + 1) * 2 * t * w * d + (cfg.num_blocks * 2 * t * d * w if cfg.head_feedback else 0)
        return linear + (cfg.depth * 4 * t * t * w if attention else 0)

    def image_shape(self) -> tuple[int, int, int]:
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)

    def condition(self, y: torch.Tensor | None, w: torch.Tensor | float | None, n: int, device: torch.device) -> torch.Tensor:
        """c = class_emb(y) + w_emb(w), (N, W). y=None: null label; w=None: 0; a float w applies to all samples."""
        w = torch.as_tensor(0.0 if w is None else w, dtype=torch.float32, device=device).expand(n)
        c = self.w_emb(w)
        if self.class_emb is not None:
            if y is None:
                y = torch.full((n,), self.cfg.num_classes, dtype=torch.long, device=device)
            c = c + self.class_emb(y.to(device=device, dtype=torch.long))
        return c

    # --------------------------------------------------------------- the model
    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, w: torch.Tensor | float | None = None):
        """z (N, C, H, W) -> x (N, C, H, W), hidden (B, N, T, D) with hidden[i] predicting trajectory[i]."""
        n, p, num_blocks = z.shape[0], self.cfg.patch_size, self.cfg.num_blocks
        causal = self.cfg.attention == "causal"
        c = self.condition(y, w, n, z.device)  # (N, W)
        h = self.embed(patchify(z, p)) + self.pos  # (N, T, W)
        preds = []  # preds[k]: head k after segment k, i.e. x^{B-1-k} for k < B, the output for k = B
        for k, (start, stop) in enumerate(self.bounds):
            for block in self.blocks[start:stop]:
                h = block(h, c, causal)
            preds.append(self.heads[k](h))  # (N, T, D)
            if self.feedback is not None and k < num_blocks:
                h = self.feedback[k](preds[-1]) + self.pos  # the prediction replaces the stream
        x = unpatchify(preds[num_blocks], p, self.cfg.in_channels)  # (N, C, H, W)
        hidden = torch.stack(preds[num_blocks - 1 :: -1])  # (B, N, T, D): reversed segment order
        return x, hidden
