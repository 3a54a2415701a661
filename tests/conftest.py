"""Shared fixtures: small, deterministic, non-trivial forward flows."""
from __future__ import annotations

import pytest
import torch

from biflow.models.forward_flow import ForwardFlow


def randomize_flow(flow: ForwardFlow, std: float = 0.2, seed: int = 0) -> ForwardFlow:
    """Give every block a random (non-zero) output projection, so the flow is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in flow.blocks:
            block.proj_out.weight.copy_(torch.randn(block.proj_out.weight.shape, generator=gen) * std)
            block.proj_out.bias.copy_(torch.randn(block.proj_out.bias.shape, generator=gen) * std)
    return flow


@pytest.fixture
def make_flow():
    """Factory for a random non-trivial tiny flow: make_flow(dtype=..., randomize=True, **ForwardConfig fields)."""

    def build(dtype: torch.dtype = torch.float32, randomize: bool = True, std: float = 0.2, seed: int = 0, **overrides):
        kw = dict(image_size=4, patch_size=2, in_channels=1, num_classes=3)
        kw.update(overrides)
        torch.manual_seed(seed)
        flow = ForwardFlow("tiny", **kw)
        if randomize:
            randomize_flow(flow, std=std, seed=seed)
        return flow.to(dtype).eval()

    return build


@pytest.fixture
def tiny_flow(make_flow) -> ForwardFlow:
    """A random non-trivial tiny flow in float32: 1 channel, 4x4 image, 2x2 patches, 3 classes."""
    return make_flow()
