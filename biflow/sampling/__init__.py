"""Samplers: the exact causal inverse of the forward flow (and later the 1-NFE reverse model)."""
from biflow.sampling.exact import sample_exact, tweedie_denoise

__all__ = ["sample_exact", "tweedie_denoise"]
