"""Samplers: the exact causal inverse of the forward flow, and one pass (1-NFE) of the reverse model."""
from biflow.sampling.cuda_graph import CudaGraphInverse
from biflow.sampling.exact import sample_exact, tweedie_denoise
from biflow.sampling.onenfe import sample_1nfe

__all__ = ["CudaGraphInverse", "sample_1nfe", "sample_exact", "tweedie_denoise"]
