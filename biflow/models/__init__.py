"""Networks: the forward flow F (data -> noise) and the reverse model G (noise -> data in one pass)."""
from biflow.models.forward_flow import ForwardFlow

__all__ = ["ForwardFlow"]
