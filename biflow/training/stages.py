"""One way to build a training stage: `biflow train`, the pipeline's train steps (in-process and on every
Ray Train worker) and sweep trials all call `build_stage`.

    stage 1  "forward"   F = ForwardFlow, geometry from the data;   step = forward_step (NLL of x~)
    stage 2  "reverse"   G = ReverseModel, geometry from frozen F;  step = reverse_objective (hidden alignment)

A `Stage` is the model, its step function with every config bound (the model is only called, so a DDP or
compiled wrapper needs no adapter; the F/G pair is checked once, here), what its checkpoint records, and
its TrainConfig. Initial weights come from the TrainConfig's seed, never from what the process ran before
(Ray reuses worker processes). `train_in_memory` is the single-process loop over a split held in memory.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from biflow.config import FLOW_GEOMETRY, ExperimentConfig, ForwardConfig, ReverseConfig, TrainConfig
from biflow.data.model_space import TrainingData
from biflow.models.forward_flow import ForwardFlow
from biflow.training.loop import StepFn, Trainer, fit

Kind = Literal["forward", "reverse"]
Decoder = Callable[[torch.Tensor], torch.Tensor]  # model space -> images in [-1, 1] (a frozen VAE decoder)


@dataclass
class Stage:
    kind: Kind
    model: nn.Module
    step: StepFn  # step(model, x, y) -> {"loss": ..., scalars}
    meta: dict[str, Any]  # what the checkpoint records besides the weights (data, forward flow, loss settings)
    train: TrainConfig  # cfg.train_forward or cfg.train_reverse
    desc: str  # progress-bar label

    @property
    def ckpt_name(self) -> str:
        return f"{self.kind}.pt"


def with_geometry(cfg: ForwardConfig, meta: dict[str, Any]) -> ForwardConfig:
    """The forward config with its geometry (channels, side, classes) taken from the data's metadata."""
    height, width, channels = meta["image_shape"]
    if height != width:
        raise ValueError(f"images must be square, dataset has {height}x{width}")
    return ForwardConfig(**{**cfg.model_dump(), "in_channels": channels, "image_size": height,
                            "num_classes": cfg.num_classes and meta["num_classes"]})


def reverse_config_for(cfg: ReverseConfig, flow: ForwardFlow) -> ReverseConfig:
    """The reverse config with geometry, block count and classes taken from the trained flow."""
    return ReverseConfig.for_flow(flow.cfg, **cfg.model_dump(exclude=set(FLOW_GEOMETRY)))


def frozen_flow(path: str | Path, device: torch.device | str = "cpu") -> ForwardFlow:
    """The forward flow's EMA weights, in eval mode, with gradients switched off."""
    from biflow.checkpoint import load_checkpoint

    return load_checkpoint(path, ema=True, device=device).requires_grad_(False)


def build_stage(kind: Kind, cfg: ExperimentConfig, data: TrainingData, forward_ckpt: str | Path | None = None,
                device: torch.device | str = "cpu", decoder: Decoder | None = None) -> Stage:
    """The model, bound step function and checkpoint record of one stage.

    forward_ckpt: stage 2's trained forward flow (a local file). decoder: latent data only, the frozen VAE
    decoder the perceptual terms compare images through (needed iff reverse_loss has an active perceptual term).
    """
    train = cfg.train_forward if kind == "forward" else cfg.train_reverse
    torch.manual_seed(train.seed)  # initial weights from the config's seed, not from what the process ran before
    meta = {"data": cfg.data.model_dump(), **data.record()}
    if kind == "forward":
        from biflow.training.forward import forward_step

        fcfg = with_geometry(cfg.forward, data.meta)
        return Stage(kind, ForwardFlow(fcfg), forward_step(fcfg, pixels=not data.latent), meta, train,
                     "stage 1: forward flow")
    if kind != "reverse":
        raise ValueError(f"unknown stage {kind!r}; choose forward or reverse")
    from biflow.models.reverse import ReverseModel
    from biflow.objectives.perceptual import build_perceptual
    from biflow.objectives.reverse import reverse_objective

    if forward_ckpt is None:
        raise ValueError("stage 2 needs the trained forward flow (forward_ckpt)")
    flow = frozen_flow(forward_ckpt, device)
    loss = cfg.reverse_loss
    pnet = build_perceptual(loss).to(device) if loss.perceptual_list() else None
    if pnet is not None and data.latent and decoder is None:
        raise ValueError("a perceptual loss on latent data needs the VAE decoder (decoder=)")
    rcfg = reverse_config_for(cfg.reverse, flow)
    step = reverse_objective(flow, rcfg, loss, pnet, decoder if pnet is not None else None)
    meta.update(forward_checkpoint=str(Path(forward_ckpt).resolve()), denoising=loss.denoising,
                reverse_loss=loss.model_dump())
    return Stage(kind, ReverseModel(rcfg), step, meta, train, "stage 2: reverse model")


def train_in_memory(stage: Stage, data: TrainingData, ckpt: str | Path, *, train: TrainConfig | None = None,
                    on_log: Callable[[int, dict[str, float]], None] | None = None, progress: bool = False,
                    on_checkpoint: Callable[[Path, int, dict[str, float]], None] | None = None) -> Trainer:
    """`fit` the stage on its data's train split held in memory; resumes from `ckpt` when it exists.

    train: the stage's TrainConfig with execution changes (e.g. a sweep trial's checkpoint interval)."""
    tcfg = train or stage.train
    return fit(stage.model, stage.step, lambda start: data.batches("train", tcfg.batch_size, tcfg.seed + start),
               tcfg, ckpt, meta=stage.meta, on_log=on_log, desc=stage.desc, progress=progress,
               on_checkpoint=on_checkpoint)


def train_stage_into(kind: Kind, cfg: ExperimentConfig, out_dir: str | Path, data_dir: str | Path,
                     forward_ckpt: str | Path | None = None, on_log: Callable | None = None,
                     progress: bool = True) -> tuple[Trainer, Path]:
    """One stage on prepared pixel data at `data_dir`, checkpoint `out_dir/<kind>.pt` (resumed if present): `biflow train`."""
    from biflow.device import resolve_device

    data = TrainingData.open(Path(data_dir).resolve())
    train = cfg.train_forward if kind == "forward" else cfg.train_reverse
    stage = build_stage(kind, cfg, data, forward_ckpt, resolve_device(train.device, f"train_{kind}.device"))
    ckpt = Path(out_dir) / stage.ckpt_name
    return train_in_memory(stage, data, ckpt, on_log=on_log, progress=progress), ckpt
