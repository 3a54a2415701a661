"""Import an apple/ml-tarflow `Model` checkpoint as a biflow forward flow (a stage-1 checkpoint).

ml-tarflow's TARFlow is the same flow as ours with four architectural differences, each a ForwardConfig switch:
no LayerNorm before the output projection (`final_norm: false`), exact GELU (`gelu: exact`), the null label as
the mean of the class embeddings (`null_label: mean`), and a fixed head dimension of 64 (`heads = width / 64`).
It has no norm control (`clip: null`). Its state dict maps onto ours key by key; the positional embedding of a
reversed block is stored in canonical order there and in the block's order here, so it is flipped.

Log-determinants: ml-tarflow's block log-det is a *mean* over the T*D token dimensions, ours is the *sum*
(the exact log|det J| per sample). For the same input, ours = reference * dims (dims = C*H*W = T*D);
`tarflow_logdet` converts ours back. The NLL losses agree: ours divides the sum by dims.

Only nvp-mode models with the fixed prior (`var` all ones) import; anything else is a one-line CheckpointError
naming what differs. The source is read with `torch.load(weights_only=True)`: a training state such as
`{"model": state_dict, ...}` and DDP's `module.` (or torch.compile's `_orig_mod.`) key prefixes are accepted.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import torch

from biflow.checkpoint import FORMAT, atomic_save, load_tensor_file, load_weights
from biflow.config import ForwardConfig
from biflow.errors import CheckpointError
from biflow.models.forward_flow import ForwardFlow

HEAD_DIM = 64  # ml-tarflow's MetaBlock default, which its Model always uses
SOURCE = "apple/ml-tarflow"
PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
# reference suffix inside blocks.{i}. -> ours (a layer's suffixes are under attn_blocks.{j}. / layers.{j}.)
LAYER_KEYS = {"attention.norm": "norm1", "attention.qkv": "attn.qkv", "attention.proj": "attn.proj",
              "mlp.norm": "norm2", "mlp.main.0": "mlp.fc1", "mlp.main.2": "mlp.fc2"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _strip(key: str) -> str:
    while key.startswith(PREFIXES):
        key = key.split(".", 1)[1]
    return key


def unwrap_state(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The model state dict inside what ml-tarflow (or a training script around it) saved."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        raise CheckpointError(f"{where}: already a biflow checkpoint; use it as it is")
    for _ in range(3):  # {"model": {...}}, {"state_dict": {...}}, possibly nested once more
        inner = next((obj[k] for k in ("model", "state_dict", "model_state_dict") if isinstance(obj.get(k), dict)),
                     None) if isinstance(obj, dict) else None
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where}: not an ml-tarflow Model state dict (expected a dict of tensors, "
                              "or one under 'model' / 'state_dict')")
    return {_strip(k): v for k, v in obj.items()}


def read_tarflow_state(path: str | Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) an ml-tarflow checkpoint and return its Model state dict (prefixes removed)."""
    return unwrap_state(load_tensor_file(path, "checkpoint"), str(path))


def _need(state: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{where}: missing key {key} (not an ml-tarflow Model state dict?)")
    return state[key]


def _geometry(tokens: int, token_dim: int, image_size: int | None, patch_size: int | None,
              in_channels: int | None, where: str) -> tuple[int, int, int]:
    """(in_channels, image_size, patch_size) from T and D = C*p*p, with the user's hints."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"{where}: {tokens} patches do not form a square grid")
    if patch_size is None and image_size is not None:
        patch_size = image_size // side
    if patch_size is not None:
        candidates = [(token_dim // patch_size**2, patch_size)] if token_dim % patch_size**2 == 0 else []
    elif in_channels is not None:
        p = math.isqrt(token_dim // in_channels) if token_dim % in_channels == 0 else 0
        candidates = [(in_channels, p)] if p and in_channels * p * p == token_dim else []
    else:  # images: 1 or 3 channels
        candidates = [(c, math.isqrt(token_dim // c)) for c in (1, 3)
                      if token_dim % c == 0 and c * math.isqrt(token_dim // c) ** 2 == token_dim]
        if len(candidates) != 1:
            raise CheckpointError(f"{where}: token dimension {token_dim} does not say the patch size; "
                                  "give --patch-size (or --in-channels)")
    if not candidates or (in_channels is not None and candidates[0][0] != in_channels):
        raise CheckpointError(f"{where}: token dimension {token_dim} is not channels x patch_size^2 for the given "
                              f"patch_size={patch_size} in_channels={in_channels}")
    channels, patch = candidates[0]
    if image_size is not None and image_size != side * patch:
        raise CheckpointError(f"{where}: {tokens} patches of side {patch} make {side * patch}px images, not {image_size}")
    return channels, side * patch, patch


def tarflow_config(state: dict[str, torch.Tensor], *, where: str = "checkpoint", image_size: int | None = None,
                   patch_size: int | None = None, in_channels: int | None = None, head_dim: int = HEAD_DIM,
                   **fields: Any) -> ForwardConfig:
    """The ForwardConfig that expresses the ml-tarflow Model whose state dict this is (fields: e.g. noise_std)."""
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks:
        raise CheckpointError(f"{where}: no blocks.N.* keys (not an ml-tarflow Model state dict)")
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"{where}: missing key blocks.{min(set(range(len(blocks))) - set(blocks))}.proj_in.weight")
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.0\.attn_blocks\.(\d+)\.", k))})
    if not layers:
        raise CheckpointError(f"{where}: missing key blocks.0.attn_blocks.0.attention.qkv.weight")
    width, token_dim = _need(state, "blocks.0.proj_in.weight", where).shape
    outputs = _need(state, "blocks.0.proj_out.weight", where).shape[0]
    if outputs == token_dim:
        raise CheckpointError(f"{where}: a non-nvp (volume-preserving) model: proj_out has {outputs} outputs, "
                              f"nvp mode has 2 x {token_dim}; only nvp models import")
    var = state.get("var")
    if var is not None and not bool((var == 1).all()):
        raise CheckpointError(f"{where}: the prior variance `var` is not all ones (a learned prior); only nvp models "
                              "with the unit prior import")
    tokens = _need(state, "blocks.0.pos_embed", where).shape[0]
    hidden = _need(state, "blocks.0.attn_blocks.0.mlp.main.0.weight", where).shape[0]
    if width % head_dim:
        raise CheckpointError(f"{where}: width {width} is not a multiple of the head dimension {head_dim}")
    classes = state["blocks.0.class_embed"].shape[0] if "blocks.0.class_embed" in state else 0
    channels, side, patch = _geometry(tokens, token_dim, image_size, patch_size, in_channels, where)
    return ForwardConfig(size=None, in_channels=channels, image_size=side, patch_size=patch, width=width,
                         heads=width // head_dim, layers_per_block=len(layers), num_blocks=len(blocks),
                         mlp_ratio=hidden / width, num_classes=classes, clip=None, clip_shift=False,
                         final_norm=False, gelu="exact", null_label="mean", **fields)


def _reference_layout(cfg: ForwardConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the ml-tarflow Model this config expresses, with its shape."""
    w, d, t, hidden = cfg.width, cfg.token_dim, cfg.num_tokens, int(cfg.width * cfg.mlp_ratio)
    out: dict[str, tuple[int, ...]] = {"var": (t, d)}
    for i in range(cfg.num_blocks):
        b = f"blocks.{i}."
        out.update({b + "proj_in.weight": (w, d), b + "proj_in.bias": (w,), b + "pos_embed": (t, w),
                    b + "proj_out.weight": (2 * d, w), b + "proj_out.bias": (2 * d,), b + "attn_mask": (t, t)})
        if cfg.num_classes:
            out[b + "class_embed"] = (cfg.num_classes, 1, w)
        for j in range(cfg.layers_per_block):
            a = f"{b}attn_blocks.{j}."
            shapes = {"attention.norm": (w,), "attention.qkv": (3 * w, w), "attention.proj": (w, w),
                      "mlp.norm": (w,), "mlp.main.0": (hidden, w), "mlp.main.2": (w, hidden)}
            for name, shape in shapes.items():
                out[f"{a}{name}.weight"] = shape
                out[f"{a}{name}.bias"] = (shape[0],)
    return out


def check_layout(state: dict[str, torch.Tensor], cfg: ForwardConfig, where: str) -> None:
    """One-line error for the first missing or unexpected key or wrong shape; a causal mask and unit prior."""
    layout = _reference_layout(cfg)
    missing = [k for k in layout if k not in state and k != "var"]
    unexpected = [k for k in state if k not in layout]
    if missing or unexpected:
        raise CheckpointError(f"{where}: {'missing key ' + missing[0] if missing else 'unexpected key ' + unexpected[0]}"
                              " (an architecture the forward-flow switches cannot express)")
    for key, shape in layout.items():
        if key in state and tuple(state[key].shape) != shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected {shape} "
                                  "(layers or blocks of different sizes cannot be expressed)")
    causal = torch.ones(cfg.num_tokens, cfg.num_tokens).tril()
    for i in range(cfg.num_blocks):
        if not torch.equal(state[f"blocks.{i}.attn_mask"].float(), causal):
            raise CheckpointError(f"{where}: blocks.{i}.attn_mask is not the lower-triangular causal mask")


def convert_state(state: dict[str, torch.Tensor], cfg: ForwardConfig) -> dict[str, torch.Tensor]:
    """ml-tarflow keys and layouts -> ForwardFlow's (the mask and the unit prior are dropped)."""
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_blocks):
        src, dst = f"blocks.{i}.", f"blocks.{i}."
        pos = state[src + "pos_embed"]
        out[dst + "pos"] = pos.flip(0) if i % 2 else pos  # reversed blocks: ours is stored in the block's order
        for p in ("weight", "bias"):
            out[f"{dst}proj_in.{p}"] = state[f"{src}proj_in.{p}"]
            out[f"{dst}proj_out.{p}"] = state[f"{src}proj_out.{p}"]
        if cfg.num_classes:
            out[dst + "class_emb.weight"] = state[src + "class_embed"][:, 0]
        for j in range(cfg.layers_per_block):
            for theirs, ours in LAYER_KEYS.items():
                for p in ("weight", "bias"):
                    out[f"{dst}layers.{j}.{ours}.{p}"] = state[f"{src}attn_blocks.{j}.{theirs}.{p}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def tarflow_flow(state: dict[str, torch.Tensor], *, where: str = "checkpoint", **options: Any) -> ForwardFlow:
    """A ForwardFlow with the weights of an ml-tarflow Model state dict (options: tarflow_config's)."""
    cfg = tarflow_config(state, where=where, **options)
    check_layout(state, cfg, where)
    flow = ForwardFlow(cfg)
    load_weights(flow, {k: v.to(torch.float32) for k, v in convert_state(state, cfg).items()}, where)
    return flow.eval()


def tarflow_logdet(logdet: torch.Tensor, flow: ForwardFlow) -> torch.Tensor:
    """Our per-sample log|det J| (a sum over dimensions) as ml-tarflow reports it (per-block means, summed)."""
    return logdet / flow.dims


def check_fits_data(cfg: ForwardConfig, meta: dict[str, Any], where: str) -> None:
    """One-line error unless the flow's geometry and classes are those of the data (a shard manifest's meta)."""
    height, width, channels = meta["image_shape"]
    if (channels, height, width) != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise CheckpointError(f"{where}: the flow models {cfg.in_channels}x{cfg.image_size}x{cfg.image_size} images, "
                              f"the data has {channels}x{height}x{width}")
    if cfg.num_classes and cfg.num_classes != meta["num_classes"]:
        raise CheckpointError(f"{where}: the flow has {cfg.num_classes} classes, the data {meta['num_classes']}")


def data_record(root: str | Path, cfg: ForwardConfig, where: str) -> dict[str, Any]:
    """What a checkpoint records about a prepared data root (train/, test/) it belongs to, after checking it fits."""
    from biflow.data import read_manifest

    root = Path(root).resolve()
    manifest = read_manifest(root / "train")
    check_fits_data(cfg, manifest["meta"], where)
    return {"data_dir": str(root), "data_hash": manifest["content_hash"]}


def import_tarflow(source: str | Path, out: str | Path, *, meta: dict[str, Any] | None = None,
                   data_dir: str | Path | None = None, **options: Any) -> Path:
    """Write the ml-tarflow checkpoint `source` as a biflow forward-flow checkpoint at `out`.

    options: tarflow_config's (image_size, patch_size, in_channels, head_dim, noise_std, label_drop, ...);
    data_dir: a prepared data root the flow models (checked; `biflow eval` and `biflow train --stage reverse` use it);
    meta: extra entries the checkpoint records (e.g. the data config).
    """
    source = Path(source)
    flow = tarflow_flow(read_tarflow_state(source), where=str(source), **options)
    if data_dir is not None:
        meta = {**data_record(data_dir, flow.cfg, str(source)), **(meta or {})}
    record = {"format": FORMAT, "kind": "forward", "config": flow.cfg.model_dump(), "model": flow.state_dict(),
              "ema": None, "step": 0, "metrics": {}, **(meta or {}),
              "imported": {"from": SOURCE, "source": str(source.resolve()), "sha256": file_sha256(source),
                           "logdet": "biflow sums log|det| over the C*H*W dims; ml-tarflow averages (ours = theirs * dims)"}}
    return atomic_save(record, out)
