"""The exact inverse on a GPU, captured once as a CUDA graph and replayed (BIFLOW.md §3).

The causal inverse is B * (T - 1) sequential steps of a few dozen small kernels each (2040 steps of ~40
kernels for a B/2 model at 256 tokens): on a GPU it is bound by the CPU's kernel-launch latency, not by
arithmetic. Capturing the whole unrolled loop (`ForwardFlow.inverse` as it is: each step's Python ints,
cache slices and shapes are baked into the graph) turns those ~10^5 launches into one graph launch.
The replay runs the very kernels of the eager pass, so its output equals eager decoding on the same GPU.

A graph is bound to one batch size, guidance scale, dtype and to the flow's parameter storage: build one
per (flow, batch, guidance) and reuse it; updating weights in place (load_state_dict, EMA copies) is fine,
moving the flow to another device is not. The Tweedie denoising step (a forward and a backward pass) runs
eagerly in `sample_exact`.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from biflow.errors import UserError
from biflow.models.forward_flow import ForwardFlow


class CudaGraphInverse:
    """inverse(z (N, C, H, W), y (N,) | None) -> x: `flow.inverse(z, y, guidance)` for a fixed N, as one CUDA graph."""

    def __init__(self, flow: ForwardFlow, batch: int, guidance: float = 0.0, amp_dtype: torch.dtype | None = None):
        param = next(flow.parameters())
        if param.device.type != "cuda":
            raise UserError(f"CUDA-graph sampling needs the flow on a CUDA device, it is on {param.device}")
        self.flow, self.batch, self.guidance, self.amp_dtype = flow, int(batch), float(guidance), amp_dtype
        self.z = torch.zeros((batch, *flow.image_shape()), device=param.device, dtype=param.dtype)  # static input
        num_classes = flow.cfg.num_classes
        self.y = torch.full((batch,), num_classes, dtype=torch.long, device=param.device) if num_classes else None
        side = torch.cuda.Stream(param.device)
        side.wait_stream(torch.cuda.current_stream(param.device))
        with torch.cuda.stream(side), self._autocast():  # warm-up off the capture: cuBLAS handles, SDPA kernel choice
            flow.inverse(self.z, self.y, self.guidance)
        torch.cuda.current_stream(param.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self._autocast():
            self.x = flow.inverse(self.z, self.y, self.guidance)  # static output, overwritten by every replay

    def _autocast(self):
        # autocast's weight-cast cache must be off while capturing: cached casts would outlive the graph's pool
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype, cache_enabled=False)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if z.shape != self.z.shape:
            raise ValueError(f"this graph decodes {tuple(self.z.shape)}, got {tuple(z.shape)}")
        self.z.copy_(z)
        if self.y is not None and y is not None:
            self.y.copy_(y)
        elif self.y is not None:
            self.y.fill_(self.flow.cfg.num_classes)  # no labels: the null label
        self.graph.replay()
        return self.x.clone()
