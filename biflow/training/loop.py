"""The generic training loop shared by stage 1 (forward flow) and stage 2 (reverse model).

`fit` is a plain function: tests and laptops call it in-process, Ray Train workers call it per rank.
It owns the optimiser (AdamW, fused on CUDA), the warm-up + cosine schedule, gradient clipping, the EMA
weights, bf16 autocast on CUDA, optional torch.compile, periodic atomic checkpoints, resuming, NaN
detection and the progress bar.
The objective is a `step_fn(model, x, y) -> {"loss": tensor, other scalars...}`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from biflow.checkpoint import FORMAT, atomic_save, load_weights, model_kind, read_checkpoint
from biflow.config import TrainConfig
from biflow.device import resolve_device
from biflow.errors import CheckpointError, UserError

StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # start step -> (x, y) batches


class TrainingDiverged(UserError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms or 1-d gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


class Trainer:
    """Mutable training state: model, EMA, optimiser, schedule, step. Saved and restored as one checkpoint."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, ckpt_path: Path, meta: dict[str, Any]):
        self.cfg, self.ckpt_path, self.meta = cfg, Path(ckpt_path), meta
        self.device = resolve_device(cfg.device, "train.device")
        self.model = model.to(self.device).train()  # may be DDP-wrapped (Ray Train); `net` is the bare model
        self.net: nn.Module = getattr(model, "module", model)
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.opt = make_optimizer(self.model, cfg, self.device)
        if cfg.compile:  # compiled forward/backward for training only; state, EMA and checkpoints use the bare `net`
            self.model = torch.compile(self.model)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.step = 0
        self.metrics: dict[str, float] = {}

    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "kind": model_kind(self.net), "config": self.net.cfg.model_dump(),
            "model": self.net.state_dict(), "ema": self.ema.module.state_dict(),
            "ema_count": self.ema.n_averaged.clone(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "step": self.step, "metrics": dict(self.metrics),
            "train": self.cfg.model_dump(), **self.meta,
        }

    def save(self) -> None:
        atomic_save(self.state(), self.ckpt_path)

    def resume(self) -> bool:
        """Restore from ckpt_path if it exists; refuse a checkpoint of another architecture."""
        if not self.ckpt_path.exists():
            return False
        ckpt = read_checkpoint(self.ckpt_path, map_location=self.device)
        if ckpt["kind"] != model_kind(self.net) or ckpt["config"] != self.net.cfg.model_dump():
            diff = sorted(k for k, v in self.net.cfg.model_dump().items() if ckpt["config"].get(k) != v)
            raise CheckpointError(f"{self.ckpt_path}: was trained with another architecture (differs in {diff or ckpt['kind']}); "
                                  "delete it or choose another output directory")
        load_weights(self.net, ckpt["model"], str(self.ckpt_path))
        load_weights(self.ema.module, ckpt["ema"], str(self.ckpt_path))
        self.ema.n_averaged.copy_(ckpt["ema_count"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.step, self.metrics = ckpt["step"], ckpt.get("metrics", {})
        return True

    def train_step(self, step_fn: StepFn, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        use_amp = self.cfg.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = step_fn(self.model, x, y)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.step}; last good checkpoint: {self.ckpt_path} "
                "(lower the learning rate, enable grad_clip or norm control, then rerun to resume)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        self.sched.step()
        self.ema.update_parameters(self.net)
        self.step += 1
        scalars = {k: float(v.detach()) for k, v in out.items()}
        scalars.update(grad_norm=float(grad_norm), lr=self.sched.get_last_lr()[0])
        return scalars


def fit(
    model: nn.Module,
    step_fn: StepFn,
    batches: Batches,
    cfg: TrainConfig,
    ckpt_path: str | Path,
    meta: dict[str, Any] | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    is_main: bool = True,
    on_checkpoint: Callable[[Path, int, dict[str, float]], None] | None = None,
) -> Trainer:
    """Train `model` for cfg.steps optimiser steps, resuming from `ckpt_path` if it exists.

    meta: extra JSON-like entries stored in the checkpoint (e.g. the data config, the forward-flow path).
    on_log(step, metrics): called every cfg.log_every steps with averaged scalars and throughput.
    is_main: whether this process writes checkpoints (data-parallel training: rank 0 only).
    on_checkpoint(path, step, metrics): called on every process right after each checkpoint step
        (the file exists only where is_main); Ray Train reports checkpoints from here.
    Returns the Trainer (model, EMA, final metrics); the final checkpoint is at ckpt_path.
    """
    torch.manual_seed(cfg.seed)
    trainer = Trainer(model, cfg, Path(ckpt_path), meta or {})
    resumed = trainer.resume()
    if trainer.step >= cfg.steps:
        return trainer
    torch.manual_seed(cfg.seed + trainer.step)  # a resumed run continues with fresh, reproducible randomness
    data = batches(trainer.step)
    window: dict[str, list[float]] = {}
    tick, seen = time.perf_counter(), 0
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc=desc + (" (resumed)" if resumed else ""),
               disable=not progress, dynamic_ncols=True, leave=False)
    try:
        while trainer.step < cfg.steps:
            x, y = next(data)
            for k, v in trainer.train_step(step_fn, x, y).items():
                window.setdefault(k, []).append(v)
            seen += x.shape[0]
            bar.update(1)
            if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                elapsed = time.perf_counter() - tick
                trainer.metrics = {k: sum(v) / len(v) for k, v in window.items()}
                trainer.metrics["images_per_s"] = seen / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{trainer.metrics['loss']:.4f}")
                if on_log is not None:
                    on_log(trainer.step, dict(trainer.metrics))
                window, tick, seen = {}, time.perf_counter(), 0
            if trainer.step % cfg.ckpt_every == 0 or trainer.step == cfg.steps:
                if is_main:
                    trainer.save()
                if on_checkpoint is not None:
                    on_checkpoint(trainer.ckpt_path, trainer.step, dict(trainer.metrics))
    except KeyboardInterrupt:
        if is_main:
            trainer.save()  # keep the work done so far; rerunning resumes from here
        raise
    finally:
        bar.close()
    return trainer
