"""Adaptive loss weighting (BIFLOW.md §5): every term is sg(w) * D with w = (D + c)^(-p), per sample.

The value is D / (D + c)^p, but the gradient is (D + c)^(-p) * dD: with p = 1 each term's gradient is
normalised by its own size, so small and large distances (early and late trajectory states, easy and
hard samples) pull with comparable strength. Static per-term weights multiply the result.
"""
from __future__ import annotations

import torch


def adaptive_weight(d: torch.Tensor, p: float = 1.0, c: float = 1e-2) -> torch.Tensor:
    """Per-sample distances d (N,) -> sg((d + c)^(-p)) * d, (N,). p = 0 returns d unchanged."""
    if p == 0:
        return d
    return (d.detach() + c).pow(-p) * d
