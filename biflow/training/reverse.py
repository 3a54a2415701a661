"""Stage 2: train the reverse model G against the frozen forward flow F (its EMA weights, eval mode)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from biflow.checkpoint import load_checkpoint
from biflow.config import ExperimentConfig, ReverseConfig
from biflow.models.forward_flow import ForwardFlow
from biflow.models.reverse import ReverseModel
from biflow.objectives.perceptual import build_perceptual
from biflow.objectives.reverse import reverse_step
from biflow.training.loop import Trainer, fit, resolve_device

GEOMETRY = {"in_channels", "image_size", "patch_size", "num_blocks", "num_classes"}  # always taken from F


def reverse_config_for(cfg: ReverseConfig, flow: ForwardFlow) -> ReverseConfig:
    """The reverse config with geometry, block count and classes taken from the trained flow."""
    return ReverseConfig.for_flow(flow.cfg, **cfg.model_dump(exclude=GEOMETRY))


def frozen_flow(path: str | Path, device: torch.device) -> ForwardFlow:
    """The forward flow's EMA weights, in eval mode, with gradients switched off."""
    flow = load_checkpoint(path, ema=True, device=device)
    return flow.requires_grad_(False)


def train_reverse(cfg: ExperimentConfig, out_dir: str | Path, forward_ckpt: str | Path, data_dir: str | Path,
                  on_log: Callable | None = None, progress: bool = True) -> tuple[Trainer, Path]:
    """Train G on pairs (x, F(x~)) computed on the fly from the training split; resumes if possible."""
    from biflow.data import batches, load_split

    tcfg = cfg.train_reverse
    device = resolve_device(tcfg.device)
    flow = frozen_flow(forward_ckpt, device)
    torch.manual_seed(tcfg.seed)  # reproducible initial weights
    reverse = ReverseModel(reverse_config_for(cfg.reverse, flow))
    loss_cfg = cfg.reverse_loss
    pnet = build_perceptual(loss_cfg).to(device) if loss_cfg.perceptual > 0 else None
    train = load_split(data_dir, "train")

    def step(model: ReverseModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return reverse_step(flow, model, x, y, loss_cfg, pnet)

    meta = {"forward_checkpoint": str(Path(forward_ckpt).resolve()), "denoising": loss_cfg.denoising,
            "reverse_loss": loss_cfg.model_dump(), "data": cfg.data.model_dump(), "data_dir": str(data_dir),
            "data_hash": train.content_hash}
    ckpt = Path(out_dir) / "reverse.pt"
    trainer = fit(reverse, step, lambda start: batches(train, tcfg.batch_size, seed=tcfg.seed + start),
                  tcfg, ckpt, meta=meta, on_log=on_log, desc="stage 2: reverse model", progress=progress)
    return trainer, ckpt
