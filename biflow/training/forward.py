"""Stage 1: train the forward flow F by exact maximum likelihood on noise-augmented data."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from biflow.config import ExperimentConfig, ForwardConfig
from biflow.models.forward_flow import ForwardFlow
from biflow.objectives.nll import PIXEL_BIN_LOG, bits_per_dim, drop_labels, nll_loss
from biflow.training.loop import StepFn, Trainer, fit

GAUSS_CONST = 0.5 * math.log(2 * math.pi)


def with_geometry(cfg: ForwardConfig, meta: dict) -> ForwardConfig:
    """The forward config with its geometry (channels, side, classes) taken from the dataset metadata."""
    height, width, channels = meta["image_shape"]
    if height != width:
        raise ValueError(f"images must be square, dataset has {height}x{width}")
    return ForwardConfig(**{**cfg.model_dump(), "in_channels": channels, "image_size": height,
                            "num_classes": cfg.num_classes and meta["num_classes"]})


def forward_step(cfg: ForwardConfig, pixels: bool = True) -> StepFn:
    """The stage-1 objective for one batch: NLL of x~ = x + sigma*eps, with label dropout."""

    def step(flow: ForwardFlow, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x_noisy = x + cfg.noise_std * torch.randn_like(x)
        z, trajectory, logdet = flow(x_noisy, drop_labels(y, cfg.label_drop, cfg.num_classes))
        loss = nll_loss(z, logdet)
        out = {"loss": loss}
        with torch.no_grad():
            nll_per_dim = loss.detach() + GAUSS_CONST
            out["bits_per_dim"] = (nll_per_dim + (PIXEL_BIN_LOG if pixels else 0.0)) / math.log(2)
            rms = trajectory.float().pow(2).mean(dim=(2, 3)).sqrt().mean(dim=1)  # (B+1,) per-state RMS
            out.update({f"state_rms/{i}": r for i, r in enumerate(rms)})
        return out

    return step


@torch.no_grad()
def evaluate_bpd(flow: ForwardFlow, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 256, pixels: bool = True,
                 seed: int = 0) -> float:
    """Mean bits/dim of held-out data under the flow, on x~ = x + sigma*eps (the density the flow models)."""
    device = next(flow.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        xb = (xb + flow.cfg.noise_std * torch.randn(xb.shape, generator=gen)).to(device)
        yb = None if y is None else y[i : i + batch_size].to(device)
        total += bits_per_dim(flow.log_prob(xb, yb), flow.dims, pixels).sum().item()
    return total / x.shape[0]


def train_forward(cfg: ExperimentConfig, out_dir: str | Path, on_log: Callable | None = None,
                  progress: bool = True) -> tuple[Trainer, Path]:
    """Prepare the data, build F from the config (geometry from the data) and train it; resumes if possible."""
    from biflow.data import batches, load_split, prepare

    out_dir = Path(out_dir)
    data_dir = prepare(cfg.data, out_dir / "data")
    train = load_split(data_dir, "train")
    fcfg = with_geometry(cfg.forward, train.meta)
    torch.manual_seed(cfg.train_forward.seed)  # reproducible initial weights
    flow = ForwardFlow(fcfg)
    ckpt = out_dir / "forward.pt"
    meta = {"data": cfg.data.model_dump(), "data_dir": str(Path(data_dir).resolve()), "data_hash": train.content_hash}
    tcfg = cfg.train_forward
    trainer = fit(flow, forward_step(fcfg), lambda start: batches(train, tcfg.batch_size, seed=tcfg.seed + start),
                  tcfg, ckpt, meta=meta, on_log=on_log, desc="stage 1: forward flow", progress=progress)
    return trainer, ckpt
