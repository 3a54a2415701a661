"""BiFlow: bidirectional normalizing flows (a TARFlow forward flow and a 1-NFE learned reverse model)."""
from biflow.checkpoint import load_checkpoint

__all__ = ["load_checkpoint"]
__version__ = "0.1.0"
