"""Pixels <-> model tensors, a shuffled batch iterator, and PNG image grids.

Model space is float32 (N, C, H, W) in [-1, 1]: x = u / 127.5 - 1 for uint8 u, and back
u = round((x + 1) * 127.5) clamped to 0..255, which is exact on values that came from uint8.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from biflow.atomic import atomic_write_bytes
from biflow.data.shards import ShardSet


def to_model(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    u = torch.as_tensor(images)
    if u.dtype != torch.uint8 or u.ndim != 4:
        raise ValueError(f"to_model: expected uint8 (N, H, W, C), got {u.dtype} {tuple(u.shape)}")
    return u.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (N, C, H, W)


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """float (N, C, H, W), nominally in [-1, 1] -> uint8 (N, H, W, C), clamped and rounded."""
    t = torch.as_tensor(x).detach()
    if t.ndim != 4 or not t.is_floating_point():
        raise ValueError(f"to_uint8: expected float (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
    u = ((t.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)  # (N, C, H, W)
    return u.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)


def batches(
    shardset: ShardSet, batch_size: int, seed: int = 0, device: str | torch.device = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Infinite iterator of (x float32 (B, C, H, W) in [-1, 1], y int64 (B,)) on `device`.

    The data is moved to `device` once (as uint8). Each epoch is a fresh permutation drawn from
    `seed`; the last incomplete batch is dropped when N >= batch_size, otherwise every batch is
    the whole (shuffled) dataset of N < batch_size rows.
    """
    images = np.ascontiguousarray(shardset.images)  # uint8 (N, H, W, C), converted per batch
    return shuffled_batches(images, shardset.labels, batch_size, seed, device, to_model)


def shuffled_batches(
    data: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0, device: str | torch.device = "cpu",
    transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.float(),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (transform(data[idx]), labels[idx]) over seeded per-epoch permutations (the `batches` contract).

    Arrays move to `device` once in their storage dtype; the last incomplete batch is dropped when
    N >= batch_size, otherwise every batch is the whole shuffled dataset.
    """
    n = len(data)
    if n == 0:
        raise ValueError("batches: empty dataset")
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    x_all = torch.from_numpy(np.ascontiguousarray(data)).to(device)
    y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(device)  # (N,)
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen).to(device)
        for lo in range(0, n - bs + 1, bs):
            idx = perm[lo : lo + bs]
            yield transform(x_all[idx]), y_all[idx]


def grid_image(images: np.ndarray, nrow: int = 8, min_cell: int = 32, pad: int = 2) -> Image.Image:
    """uint8 (N, H, W, C) with C in {1, 3} -> one PIL image, `nrow` cells per row.

    Cells are upscaled by an integer factor (nearest) until their shorter side is >= min_cell.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"grid: expected non-empty uint8 (N, H, W, 1|3), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_cell / min(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, sH, sW, C)
    h, w = h * scale, w * scale
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)  # mode L or RGB


def save_grid(images: np.ndarray, path: str | Path, nrow: int = 8, min_cell: int = 32) -> Path:
    """Write `grid_image(images, nrow, min_cell)` as a PNG at `path`, atomically; returns `path`."""
    buf = io.BytesIO()
    grid_image(images, nrow, min_cell).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
