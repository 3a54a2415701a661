"""Training-time classifier-free guidance (BIFLOW.md §5): G learns the *guided* output in one pass.

G takes the scale w as an input and emits G_cfg(z | c, w). The losses supervise the conditional
prediction recovered from it,

    G(z | c) = [G_cfg(z | c, w) + w * G(z | null, w=0)] / (1 + w),

which inverts G_cfg = G(z | c) + w * (G(z | c) - G(z | null)) (ordinary CFG with scale w). The
recovery is applied to the final output AND to every hidden prediction. w ~ U[0, w_max] per sample;
samples whose label was dropped train the unconditional model and get w = 0.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from biflow.objectives.nll import drop_labels


def combine_cfg(out_cond_w: torch.Tensor, out_uncond: torch.Tensor, w: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """(out_cond_w + w * out_uncond) / (1 + w), with per-sample w (N,) broadcast along `batch_dim`."""
    shape = [1] * out_cond_w.dim()
    shape[batch_dim] = -1
    w = w.to(out_cond_w.dtype).view(shape)
    return (out_cond_w + w * out_uncond) / (1 + w)


def sample_w(n: int, w_max: float, generator: torch.Generator | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Per-sample guidance scales w ~ U[0, w_max], (n,)."""
    return torch.rand(n, generator=generator, device=device) * w_max


def draw_guidance(
    y: torch.Tensor | None, num_classes: int, label_drop: float, w_max: float, n: int,
    device: torch.device, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Labels with dropout (null label = num_classes) and per-sample w, (n,); dropped or unlabelled samples get w = 0."""
    if y is None or not num_classes:
        return y, torch.zeros(n, device=device)
    y = drop_labels(y.to(device), label_drop, null=num_classes)
    w = sample_w(n, w_max, generator, device)
    return y, torch.where(y == num_classes, torch.zeros_like(w), w)


def recover_conditional(
    reverse: nn.Module, z: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor, uncond_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """G's conditional prediction (x (N, C, H, W), hidden (B, N, T, D)) recovered from its guided pass.

    The unconditional pass G(z | null, w=0) runs only when some w > 0, under no_grad unless `uncond_grad`
    ([ours]: by default it is a fixed reference, like a stop-gradient target; True backprops through it too).
    """
    x, hidden = reverse(z, y, w)
    if not bool((w > 0).any()):
        return x, hidden
    with torch.set_grad_enabled(uncond_grad and torch.is_grad_enabled()):
        x_u, hidden_u = reverse(z, None, torch.zeros_like(w))
    return combine_cfg(x, x_u, w), combine_cfg(hidden, hidden_u, w, batch_dim=1)
