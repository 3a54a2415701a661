"""Networks: the forward flow F (data -> noise) and the reverse model G (noise -> data in one pass)."""
from biflow.models.forward_flow import ForwardFlow
from biflow.models.reverse import ReverseModel

__all__ = ["ForwardFlow", "ReverseModel"]
