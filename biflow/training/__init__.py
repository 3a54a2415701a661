"""Training loops: a generic `fit` (schedule, clipping, EMA, atomic checkpoints, resume) and the two stages."""
from biflow.training.loop import fit, resolve_device

__all__ = ["fit", "resolve_device"]
