"""Which torch device a setting names: one resolver for training, sampling, evaluation and the CLI."""
from __future__ import annotations

import torch

from biflow.errors import UserError


def resolve_device(name: str | torch.device, what: str = "device") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:N' as given.

    Asking for CUDA on a machine without it is a UserError naming the setting (`what`), not a late crash.
    """
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{what}={name!r} but CUDA is not available; use 'auto' or 'cpu'")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"{what}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
