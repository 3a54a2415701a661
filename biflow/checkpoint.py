"""Checkpoints: one file holds the model's config, weights (raw and EMA), optimiser state and metadata.

Written atomically (temporary file in the same directory, then os.replace) and always loaded
with `torch.load(..., weights_only=True)`: a checkpoint is data, never code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from biflow.atomic import atomic_path
from biflow.errors import CheckpointError, UserError

FORMAT = "biflow-checkpoint-v1"


def _model_classes(kind: str):
    """kind -> (model class, config class); imported lazily to keep this module light."""
    if kind == "forward":
        from biflow.config import ForwardConfig
        from biflow.models.forward_flow import ForwardFlow

        return ForwardFlow, ForwardConfig
    if kind == "reverse":
        from biflow.config import ReverseConfig
        from biflow.models.reverse import ReverseModel

        return ReverseModel, ReverseConfig
    raise CheckpointError(f"unknown model kind {kind!r} in checkpoint")


def model_kind(model: nn.Module) -> str:
    for kind in ("forward", "reverse"):
        if type(model) is _model_classes(kind)[0]:
            return kind
    raise TypeError(f"not a biflow model: {type(model).__name__}")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file next to `path`, then rename over it."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_tensor_file(path: str | Path, what: str, error: type[UserError] = CheckpointError,
                     map_location: str | torch.device = "cpu") -> Any:
    """torch.load a local file with weights_only=True (tensors and plain containers only, never pickled code).

    A missing or unreadable file (truncated zip, garbage bytes, pickled objects) is one line of `error` naming `what`.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every way a file can fail to load is the same one-line error
        first = (str(err).splitlines() or [""])[0][:120]
        raise error(f"{path}: not a readable {what} ({type(err).__name__}: {first})") from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint dict (weights_only=True); one-line CheckpointError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    ckpt = load_tensor_file(path, "biflow checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a biflow checkpoint (missing format tag {FORMAT!r})")
    return ckpt


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    model_cls, cfg_cls = _model_classes(kind)
    from biflow.config import validate

    return model_cls(validate(cfg_cls, config, f"checkpoint {kind} config"))


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with a one-line error naming the first mismatch (wrong architecture)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                  else f"{shapes[0]} has shape {tuple(state[shapes[0]].shape)}, model expects {tuple(own[shapes[0]].shape)}")
        raise CheckpointError(f"{where}: weights do not match the model architecture ({detail})")
    model.load_state_dict(state)


def load_checkpoint(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in `path` from its own config; EMA weights by default; eval mode."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["kind"], ckpt["config"])
    weights = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    load_weights(model, weights, str(path))
    return model.to(device).eval()
