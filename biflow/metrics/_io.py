"""Small helpers shared by the metrics: errors, content hashes, image-array checks."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from biflow.errors import UserError


class MetricError(UserError, ValueError):
    """Inputs a metric cannot use (NaN features, too few samples, wrong image layout), as one line."""


def digest(*parts: Any) -> str:
    """sha256 hex of a JSON list of `parts` (strings, numbers, dicts): a cache key."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()


def array_hash(*arrays: np.ndarray | None) -> str:
    """sha256 over dtype, shape and bytes of each array: a content hash for in-memory data."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def as_uint8_nhwc(images: Any) -> np.ndarray:
    """Images in either layout metrics accept -> uint8 (N, H, W, C) with C in {1, 3}.

    - uint8 arrays/tensors are NHWC already (a 3-d (N, H, W) array is grayscale);
    - float arrays/tensors are model space: NCHW in [-1, 1] (what samplers return); they are
      quantised like a saved PNG: round((x + 1) * 127.5), clipped to [0, 255].
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        images = images.numpy() if images.dtype == torch.uint8 else images.float().numpy()
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        if arr.ndim == 3:
            arr = arr[..., None]
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.ndim != 4:
            raise MetricError(f"float images must be NCHW in [-1, 1], got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise MetricError("images contain NaN or Inf values")
        arr = np.clip(np.rint((arr.transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    else:
        raise MetricError(f"images must be uint8 NHWC or float NCHW in [-1, 1], got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.shape[0] == 0:
        raise MetricError(f"images must be (N, H, W, C) with N >= 1 and C in {{1, 3}}, got shape {arr.shape}")
    return arr


def to_model_space(images_uint8: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
