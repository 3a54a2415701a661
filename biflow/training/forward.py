"""Stage 1's objective (exact maximum likelihood on noise-augmented data) and held-out bits/dim: the standard one
(uniformly dequantised 8-bit pixels) and the training data's own (Gaussian-noised); the stage itself is built by
biflow.training.stages."""
from __future__ import annotations

import math

import torch

from biflow.config import ForwardConfig
from biflow.models.forward_flow import ForwardFlow
from biflow.objectives.nll import PIXEL_BIN_LOG, bits_per_dim, drop_labels, nll_loss, uniform_dequantize
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
            out["nll_noisy_bpd"] = (nll_per_dim + (PIXEL_BIN_LOG if pixels else 0.0)) / math.log(2)
            rms = trajectory.float().pow(2).mean(dim=(2, 3)).sqrt().mean(dim=1)  # (B+1,) per-state RMS
            out.update({f"state_rms/{i}": r for i, r in enumerate(rms)})
        return out

    return step


def _mean_bpd(flow: ForwardFlow, x: torch.Tensor, y: torch.Tensor | None, perturb, batch_size: int, pixels: bool) -> float:
    """Mean bits/dim of perturb(x) under the flow, in batches."""
    device = next(flow.parameters()).device
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = perturb(x[i : i + batch_size]).to(device)
        yb = None if y is None else y[i : i + batch_size].to(device)
        total += bits_per_dim(flow.log_prob(xb, yb), flow.dims, pixels).sum().item()
    return total / x.shape[0]


@torch.no_grad()
def evaluate_bpd(flow: ForwardFlow, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 256, seed: int = 0) -> float:
    """The standard bits/dim of held-out 8-bit pixels x (= u / 127.5 - 1): uniform dequantisation (TARFlow's
    protocol, `objectives.nll.uniform_dequantize`), an upper bound on -log2 P(u) per dimension (`test/bits_per_dim`)."""
    gen = torch.Generator().manual_seed(seed)
    return _mean_bpd(flow, x, y, lambda xb: uniform_dequantize(xb, gen), batch_size, True)


@torch.no_grad()
def evaluate_noisy_bpd(flow: ForwardFlow, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 256,
                       pixels: bool = True, seed: int = 0) -> float:
    """Bits/dim of x~ = x + sigma*eps, the Gaussian-noised data the flow is trained on (`test/nll_noisy_bpd`).

    Not a bound on the 8-bit likelihood (sigma = 0.05 is far wider than the 1/127.5 bin) and not comparable with
    published flows; it is the training objective's own scale, and the only bits/dim of continuous (latent) data.
    """
    gen = torch.Generator().manual_seed(seed)
    noisy = lambda xb: xb + flow.cfg.noise_std * torch.randn(xb.shape, generator=gen)  # noqa: E731
    return _mean_bpd(flow, x, y, noisy, batch_size, pixels)
