"""Training: a generic `fit` (schedule, clipping, EMA, atomic checkpoints, resume) and the two stages built one way."""
from biflow.training.loop import fit
from biflow.training.stages import Stage, build_stage, train_in_memory

__all__ = ["Stage", "build_stage", "fit", "train_in_memory"]
