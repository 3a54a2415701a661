"""Sampling speed: wall-clock time per image, and the network-evaluation count of each sampler.

Shared by `biflow eval` and the benchmarks, so both report the same numbers the same way:
median over repeats of one batch's wall time (after warm-up), with CUDA synchronised around it.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def time_sampler(fn: Callable[[int], Any], batch: int, repeats: int = 5, warmup: int = 1,
                 device: str | torch.device | None = None) -> dict[str, Any]:
    """Time `fn(batch)` (which draws `batch` images) and report per-image cost.

    Returns ms_per_image (median over repeats / batch), images_per_s, ms_per_batch (median),
    ms_per_batch_all (every repeat), batch, repeats, warmup, threads, device.
    """
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, repeats >= 1, warmup >= 0; got {batch}, {repeats}, {warmup}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn(batch)
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn(batch)
        sync()
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    return {
        "ms_per_image": 1000.0 * per_batch / batch,
        "images_per_s": batch / per_batch if per_batch > 0 else float("inf"),
        "ms_per_batch": 1000.0 * per_batch,
        "ms_per_batch_all": [1000.0 * t for t in times],
        "batch": int(batch),
        "repeats": int(repeats),
        "warmup": int(warmup),
        "threads": torch.get_num_threads(),
        "device": str(device) if not cuda else f"{device} ({torch.cuda.get_device_name(device)})",
    }


def sampler_nfe(sampler: str, *, num_blocks: int = 0, num_tokens: int = 0, guidance: float = 0.0,
                conditional: bool = True, denoise: bool = False) -> int:
    """Sequential network evaluations per sample.

    1nfe:  1 (guidance and learned denoising are inside the single pass).
    exact: num_blocks * (num_tokens - 1) causal steps; x2 with guidance on a class-conditional
           model (a second, unconditional pass per step).
    denoise: the score-based (Tweedie) step is applied: +2 (one forward and one backward pass
           through the flow). Always with `exact`; with `1nfe` only for a reverse model trained
           without learned denoising.
    """
    if sampler == "1nfe":
        return 1 + (2 if denoise else 0)
    if sampler == "exact":
        if num_blocks < 1 or num_tokens < 1:
            raise ValueError("exact sampler NFE needs num_blocks and num_tokens")
        steps = num_blocks * (num_tokens - 1)
        if guidance > 0 and conditional:
            steps *= 2
        return steps + (2 if denoise else 0)
    raise ValueError(f"unknown sampler {sampler!r}; choose 1nfe or exact")
