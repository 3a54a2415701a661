"""The perceptual terms of the stage-2 loss as config: a list of nets with static weights, and the paired crop.

    reverse_loss:
      perceptual_terms:                 # each term adaptively weighted and logged apart (perceptual/<net>)
        - {net: vgg_lpips, weight: 0.4, weights: vgg16.pth, lin_weights: lpips_vgg.pth}
        - {net: convnext_pooled, weight: 0.1, weights: convnextv2_base_1k_224_ema.pt}
      perceptual_crop: {}               # pMF's paired RandomResizedCrop: size 224, scale (0.08, 1), ratio (3/4, 4/3)

The single-net keys of ReverseLossConfig (`perceptual`, `perceptual_net`, `perceptual_weights`) stay as the
shorthand for a one-term list. Where the weight files come from: docs/METHOD.md ("Perceptual weights").
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PerceptualNetName = Literal["random_conv", "vgg_lpips", "convnext", "convnext_pooled"]
PRETRAINED = ("vgg_lpips", "convnext", "convnext_pooled")  # nets that read a local weights file


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class PerceptualTermConfig(_Section):
    net: PerceptualNetName = Field(
        description="random_conv: offline random features (NOT the paper's nets); vgg_lpips: VGG16 LPIPS-style; "
                    "convnext: ConvNeXt-V2 stage-wise LPIPS-style; convnext_pooled: ConvNeXt-V2 pooled features after "
                    "the final LayerNorm, squared L2 (pMF)")
    weight: float = Field(ge=0, description="static weight on top of the adaptive weight (0: the term is off)")
    weights: str | None = Field(
        None, description="local state-dict file of the net (torchvision vgg16 / official ConvNeXt-V2 keys); "
                          "required for every net but random_conv; nothing is downloaded")
    seed: int = Field(0, description="random_conv: seed of its random weights (two seeds = two different nets)")
    lin_weights: str | None = Field(
        None, description="vgg_lpips / convnext: per-channel LPIPS weights, the lpips package's file (vgg.pth: "
                          "lin{l}.model.1.weight) or lin.{l} keys; None: those in `weights`, else all ones")

    @model_validator(mode="after")
    def _pretrained_needs_weights(self) -> "PerceptualTermConfig":
        if self.net in PRETRAINED and self.weight > 0 and not self.weights:
            raise ValueError(f"perceptual net {self.net!r} needs weights: a local state-dict file (nothing is downloaded)")
        if self.lin_weights and self.net not in ("vgg_lpips", "convnext"):
            raise ValueError(f"lin_weights are LPIPS channel weights; net {self.net!r} has none")
        return self


class PerceptualCropConfig(_Section):
    """A random-resized crop drawn once per pair and applied to both images (G's output and its target)."""

    size: int | None = Field(
        None, ge=8, description="output side; None: 224 when a pretrained net is used, else max(image side, net minimum)")
    scale: tuple[float, float] = Field((0.08, 1.0), description="range of the crop's area as a fraction of the image")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="range of the crop's aspect ratio (width / height)")

    @model_validator(mode="before")
    @classmethod
    def _from_min_area(cls, data: Any) -> Any:
        """The old shorthand: a number is the minimum area fraction of square crops."""
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"scale": (float(data), 1.0), "ratio": (1.0, 1.0)}
        return data

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"scale {list(v)} must satisfy 0 < low <= high <= 1")
        return v

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"ratio {list(v)} must satisfy 0 < low <= high")
        return v


def describe_perceptual(terms: list[PerceptualTermConfig]) -> str:
    """The stage-2 distance in words for reports: every net with its weight; random_conv is named as not the paper's."""
    if not terms:
        return "MSE only (no perceptual term)"
    parts = [f"{t.net} x{t.weight:g}" + (" (offline random features, NOT the paper's VGG-LPIPS / ConvNeXt-V2)"
                                          if t.net == "random_conv" else "") for t in terms]
    return "MSE + perceptual: " + " + ".join(parts)
