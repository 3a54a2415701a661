"""Exact sampling through the forward flow's causal inverse, with TARFlow's score-based denoising step."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from biflow.models.forward_flow import ForwardFlow

if TYPE_CHECKING:
    from biflow.sampling.cuda_graph import CudaGraphInverse


def tweedie_denoise(flow: ForwardFlow, x: torch.Tensor, y: torch.Tensor | None = None, sigma: float | None = None) -> torch.Tensor:
    """One Tweedie step x <- x + sigma^2 * grad_x log p(x | y): one forward and one backward pass.

    The flow models the noise-augmented data x~ = x + sigma*eps, so its samples carry that noise;
    the step moves them to the posterior mean E[x | x~].
    """
    sigma = flow.cfg.noise_std if sigma is None else sigma
    if sigma <= 0:
        return x
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        score = torch.autograd.grad(flow.log_prob(xg, y).sum(), xg)[0]
    return (x + sigma**2 * score).detach()


@torch.no_grad()
def sample_exact(
    flow: ForwardFlow,
    num: int,
    labels: torch.Tensor | int | None = None,
    guidance: float = 0.0,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    graph: CudaGraphInverse | None = None,
) -> torch.Tensor:
    """Draw `num` samples (N, C, H, W) in model space ([-1, 1] for pixels) via z ~ N(0, I) -> F^{-1}(z).

    labels: None (unconditional / null label), an int for all samples, or a (num,) tensor.
    Cost: B * (T - 1) sequential network steps (x2 rows with guidance), plus a forward+backward to denoise.
    graph: a CudaGraphInverse of this flow for batch `num` and this guidance (GPU): the same decoding, replayed.
    """
    param = next(flow.parameters())
    if isinstance(labels, int):
        labels = torch.full((num,), labels, dtype=torch.long, device=param.device)
    z = torch.randn((num, *flow.image_shape()), device=param.device, dtype=param.dtype, generator=generator)
    if graph is not None:
        if graph.flow is not flow or graph.batch != num or graph.guidance != guidance:
            raise ValueError(f"graph was captured for batch {graph.batch}, guidance {graph.guidance} of another call")
        x = graph(z, labels)
    else:
        x = flow.inverse(z, labels, guidance)
    return tweedie_denoise(flow, x, labels) if denoise else x
