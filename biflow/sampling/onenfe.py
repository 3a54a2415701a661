"""1-NFE sampling with the reverse model (BIFLOW.md §6): x = G(z | y, w), one network pass, z ~ N(0, I)."""
from __future__ import annotations

import torch

from biflow.models.forward_flow import ForwardFlow
from biflow.models.reverse import ReverseModel
from biflow.sampling.exact import tweedie_denoise


def as_labels(labels: torch.Tensor | int | None, num: int, device: torch.device) -> torch.Tensor | None:
    """None (null label), an int for every sample, or a (num,) tensor -> (num,) long tensor or None."""
    if isinstance(labels, int):
        return torch.full((num,), labels, dtype=torch.long, device=device)
    return None if labels is None else labels.to(device=device, dtype=torch.long)


@torch.no_grad()
def sample_1nfe(
    reverse: ReverseModel,
    num: int,
    labels: torch.Tensor | int | None = None,
    w: torch.Tensor | float = 0.0,
    generator: torch.Generator | None = None,
    denoise_flow: ForwardFlow | None = None,
) -> torch.Tensor:
    """Draw `num` samples (num, C, H, W) in model space with one pass of G at guidance scale w.

    G emits the guided output itself (training-time CFG), so there is no second, unconditional pass.
    denoise_flow: only for a reverse model trained with denoising='score' (its output is the noisy x~):
    apply TARFlow's Tweedie step with this forward flow, at the cost of one forward + backward of F.
    """
    device = next(reverse.parameters()).device
    labels = as_labels(labels, num, device)
    z = torch.randn((num, *reverse.image_shape()), generator=generator, device=device)
    x, _ = reverse(z, labels, w)
    return x if denoise_flow is None else tweedie_denoise(denoise_flow, x, labels)
