"""Stage 1's objective (exact maximum likelihood on noise-augmented data) and held-out bits/dim; the stage itself
is built by biflow.training.stages."""
from __future__ import annotations

import math

import torch

from biflow.config import ForwardConfig
from biflow.models.forward_flow import ForwardFlow
from biflow.objectives.nll import PIXEL_BIN_LOG, bits_per_dim, drop_labels, nll_loss
from biflow.training.loop import StepFn

GAUSS_CONST = 0.5 * math.log(2 * math.pi)


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
